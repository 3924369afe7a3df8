"""A sweep split over ranks (`sharding`): each rank's part of the results file, and the merge.

Rank i of n runs the cases of its shard: the plan's groups of cases that differ only in
target and streaming settings (`work_key`) dealt out in plan order, so a case is never
split, and a case, its official twin and its streaming siblings run on the same machine
(their side-by-side and streaming ratios stay within one machine). Its part is an ordinary results file of those cases, written after every case
as any run's, at

    <out>/<run_id>.parts/<i>-of-<n>.json     (and `<i>-of-<n>.outputs/`, its fidelity outputs)

with a `shard` record: rank, size, host, process id and the whole run's plan. A killed
rank leaves its finished cases there; rerunning the same command with `--resume RUN_ID`
runs only the cases its part lacks.

The merge (rank 0 under `mlx.launch`; `python -m bench merge` after `--shard` jobs) is
`<out>/<run_id>.json`: the whole plan, every part's cases in plan order (each case
records the machine it ran on, as in any run), `status` complete when every part is,
`machine` and `versions` of rank 0, and `shards`: each rank's machine, versions, host,
status and case ids.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

from bench.cases import Case
from sharding import Shard, ShardError, host_record


def work_key(case: Case) -> Case:
    """What the cases of one group share: the case without its target and streaming axes."""
    return dataclasses.replace(
        case, target="", stream=False, first_hop=None, saved=False, final="full"
    )


def shard_cases(plan: list[Case], shard: Shard) -> list[Case]:
    """The cases of `shard`: the groups of `work_key`, dealt out in plan order."""
    return shard.take_groups(plan, key=work_key)


def parts_dir(out: Path, run_id: str) -> Path:
    return Path(out) / f"{run_id}.parts"


def part_path(out: Path, run_id: str, shard: Shard) -> Path:
    return parts_dir(out, run_id) / f"{shard.name}.json"


def shard_record(shard: Shard, plan: list[Case]) -> dict[str, Any]:
    """The `shard` record of a part: who ran it, and the whole run's plan (for the merge)."""
    return {
        "rank": shard.rank,
        "size": shard.size,
        **host_record(),
        "plan": [{"id": c.id, **c.to_dict()} for c in plan],
    }


def check_part(part: dict[str, Any], plan: list[Case], settings: dict[str, Any]) -> None:
    """ShardError when a part on disk belongs to another plan or other settings than the
    command that resumes it."""
    rec = part.get("shard")
    if not isinstance(rec, dict):
        raise ShardError(f"{part.get('run_id')}: not a part of a sharded run (no shard record)")
    if [c.get("id") for c in rec.get("plan", [])] != [c.id for c in plan]:
        raise ShardError(
            f"the part of run {part.get('run_id')} has another plan: resume it with the "
            "arguments it was started with"
        )
    if part.get("settings") != settings:
        raise ShardError(
            f"the part of run {part.get('run_id')} has other settings: resume it with the "
            "arguments it was started with"
        )


def merge_parts(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The results document of the whole run (ShardError when parts are missing or are not of
    one run). Parts that are unfinished give a merged run marked `interrupted`."""
    if not parts:
        raise ShardError("no parts to merge")
    by_rank: dict[int, dict[str, Any]] = {}
    first = parts[0]
    for p in parts:
        rec = p.get("shard")
        if not isinstance(rec, dict):
            raise ShardError(f"run {p.get('run_id')}: not a part (no shard record)")
        for key, a, b in (
            ("run id", p.get("run_id"), first.get("run_id")),
            ("number of ranks", rec.get("size"), first["shard"].get("size")),
            ("plan", rec.get("plan"), first["shard"].get("plan")),
            ("settings", p.get("settings"), first.get("settings")),
        ):
            if a != b:
                raise ShardError(f"parts with another {key}: not one run")
        if rec["rank"] in by_rank:
            raise ShardError(f"two parts of rank {rec['rank']}")
        by_rank[rec["rank"]] = p
    size = first["shard"]["size"]
    missing = [r for r in range(size) if r not in by_rank]
    if missing:
        raise ShardError(
            f"run {first['run_id']}: the parts of ranks {missing} (of {size}) are missing"
        )
    ranks = [by_rank[r] for r in range(size)]
    plan = ranks[0]["shard"]["plan"]
    order = {c["id"]: i for i, c in enumerate(plan)}
    doc = copy.deepcopy(ranks[0])
    del doc["shard"]
    doc["plan"] = plan
    doc["cases"] = sorted(
        (copy.deepcopy(c) for p in ranks for c in p["cases"]),
        key=lambda c: order.get(c["id"], len(order)),
    )
    doc["status"] = "complete" if all(p["status"] == "complete" for p in ranks) else "interrupted"
    doc["created"] = min(p["created"] for p in ranks)
    doc["updated"] = max(p["updated"] for p in ranks)
    for p in ranks[1:]:
        for name, target in p.get("targets", {}).items():
            doc["targets"].setdefault(name, target)
        if "fidelity" in p:
            doc.setdefault("fidelity", p["fidelity"])
    main = plan[0]["target"] if plan else None  # whose weights a run records (`run_sweep`)
    prepared = [p["targets"][main]["weights"] for p in ranks if main in p.get("targets", {})]
    doc["weights"] = prepared[0] if prepared else {"label": "unknown"}
    doc["shards"] = [
        {
            "rank": r,
            "size": size,
            "hostname": p["shard"].get("hostname"),
            "pid": p["shard"].get("pid"),
            "status": p["status"],
            "machine": p["machine"],
            "versions": p["versions"],
            "created": p["created"],
            "updated": p["updated"],
            "cases": [c["id"] for c in p["cases"]],
        }
        for r, p in enumerate(ranks)
    ]
    return doc


def shared_hosts(doc: dict[str, Any]) -> dict[str, list[int]]:
    """Hosts that ran several ranks of a merged run at once (their timings overlap)."""
    hosts: dict[str, list[int]] = {}
    for s in doc.get("shards", []):
        hosts.setdefault(str(s.get("hostname")), []).append(s.get("rank"))
    return {h: r for h, r in hosts.items() if len(r) > 1}
