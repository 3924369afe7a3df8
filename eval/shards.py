"""An eval run split over ranks (`sharding`): each rank's part, and their merge.

A sharded run writes, in its output folder (the one a single-process run would use):

    <out>/parts/<i>-of-<n>/manifest.json, wavs/   rank i's synthesis (as `eval.synth`)
    <out>/parts/<i>-of-<n>/part.json              rank i's scored rows (`run` only)
    <out>/results.json, utterances.csv, summary.csv, manifest.json   the merge

Rank i takes the utterances at positions i, i + n, ... of the set (after `--limit`).
`part.json` is rewritten atomically after every scored utterance; with `--resume` a rerun
keeps the rows whose synthesis it reuses unchanged (the manifest entry each row was scored
from is kept beside it) and scores the rest; without it the rows are scored again (the
synthesis cache is reused either way, as in a single-process run).

The merge (rank 0 under `mlx.launch`; `python -m eval merge OUT` after `--shard` jobs)
needs every rank's complete part, with the same set, settings and models; its
`results.json` holds what a single-process run's would (rows in set order, summary), with
`machine`, `git` and `versions` of rank 0 and a `shards` record: each rank's machine,
versions, host and utterance count. The merged `manifest.json` names each wav under its
part's folder: on one machine (or after copying the parts' folders) `python -m eval score
--synth-dir OUT` reads it as any synthesis.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from eval.score import UtteranceResult
from sharding import Shard, ShardError, host_record

PART_FORMAT = "cosyvoice2-mlx eval part"
PART_VERSION = 1
PARTS = "parts"


def part_dir(out: Path, shard: Shard) -> Path:
    return Path(out) / PARTS / shard.name


def new_part(
    shard: Shard,
    test_set: dict[str, Any],
    order: list[str],
    settings: dict[str, Any],
    models: dict[str, Any],
    weights: str,
) -> dict[str, Any]:
    """An empty part: what identifies the run, and no rows yet."""
    from eval.results_io import git_state, machine_info, package_versions

    return {
        "format": PART_FORMAT,
        "format_version": PART_VERSION,
        "status": "running",
        "shard": {"rank": shard.rank, "size": shard.size, **host_record()},
        "machine": machine_info(),
        "git": git_state(),
        "versions": package_versions(),
        "test_set": test_set,
        "order": order,
        "settings": settings,
        "models": models,
        "weights": weights,
        "rows": [],
        "scored_from": {},
    }


def read_part(path: Path) -> dict[str, Any]:
    """A `part.json`, checked; ShardError (one line) when it is not one."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardError(f"{path}: not a readable part ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != PART_FORMAT:
        raise ShardError(f"{path}: not an eval part")
    if doc.get("format_version") != PART_VERSION:
        raise ShardError(f"{path}: unsupported part format_version {doc.get('format_version')}")
    return doc


def reusable_rows(
    part: dict[str, Any] | None, fresh: dict[str, Any], entries: dict[str, Any]
) -> dict[str, UtteranceResult]:
    """The rows of an earlier part that a resumed run keeps: same set, settings and models,
    and scored from the synthesis entry that is there now (not one made again since)."""
    if part is None:
        return {}
    for key in ("test_set", "order", "settings", "models"):
        if part.get(key) != fresh[key]:
            return {}
    kept = {}
    for row in part.get("rows", []):
        e = entries.get(row.get("id"))
        if e is not None and part.get("scored_from", {}).get(row["id"]) == asdict(e):
            kept[row["id"]] = UtteranceResult(**row)
    return kept


def write_part(path: Path, part: dict[str, Any]) -> None:
    from eval.synth import _atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(path, json.dumps(part, indent=1, ensure_ascii=False, allow_nan=False))


def merge_parts(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The results document of a whole run from its ranks' parts (ShardError when a part is
    missing or unfinished, or the parts are not of one run)."""
    from eval.results_io import build_results

    if not parts:
        raise ShardError("no parts to merge")
    size = parts[0]["shard"]["size"]
    by_rank: dict[int, dict[str, Any]] = {}
    for p in parts:
        rank = p["shard"]["rank"]
        if p["shard"]["size"] != size:
            raise ShardError(f"parts of {size} and of {p['shard']['size']} ranks: not one run")
        if rank in by_rank:
            raise ShardError(f"two parts of rank {rank}")
        by_rank[rank] = p
    missing = [r for r in range(size) if r not in by_rank]
    if missing:
        raise ShardError(f"parts of ranks {missing} (of {size}) are missing")
    unfinished = [r for r, p in sorted(by_rank.items()) if p.get("status") != "complete"]
    if unfinished:
        raise ShardError(
            f"the parts of ranks {unfinished} are unfinished: rerun them with --resume"
        )
    first = by_rank[0]
    for r, p in sorted(by_rank.items()):
        for key in ("test_set", "order", "settings", "models", "weights"):
            if p.get(key) != first.get(key):
                raise ShardError(f"rank {r}'s part has another {key} than rank 0's: not one run")
    rows: dict[str, UtteranceResult] = {}
    for p in by_rank.values():
        for row in p["rows"]:
            rows[row["id"]] = UtteranceResult(**row)
    absent = [u for u in first["order"] if u not in rows]
    if absent:
        raise ShardError(f"no row for {len(absent)} utterance(s), e.g. {absent[0]!r}")
    doc = build_results(
        [rows[u] for u in first["order"]],
        first["test_set"],
        first["settings"],
        first["models"],
        first["weights"],
    )
    doc["machine"], doc["git"], doc["versions"] = first["machine"], first["git"], first["versions"]
    doc["shards"] = [
        {
            **p["shard"],
            "machine": p["machine"],
            "git": p["git"],
            "versions": p["versions"],
            "utterances": len(p["rows"]),
        }
        for _, p in sorted(by_rank.items())
    ]
    return doc


def merge_manifests(out: Path, manifests: dict[str, dict[str, Any]], order: list[str]) -> None:
    """`<out>/manifest.json` from the parts' manifests (`{part name: manifest data}`): each
    wav named under its part's folder, entries in set order."""
    from eval.synth import SynthEntry, SynthRun

    names = {}
    for name in manifests:
        rank, _, size = name.partition("-of-")
        if not (rank.isdigit() and size.isdigit()):
            raise ShardError(f"{PARTS}/{name}: not a part's folder (<i>-of-<n>)")
        names[int(rank)] = int(size)
    sizes = set(names.values())
    if len(sizes) > 1:
        raise ShardError(f"parts of {sorted(sizes)} ranks: not one run")
    missing = [r for r in range(max(sizes, default=0)) if r not in names]
    if missing:
        raise ShardError(f"the synthesis of ranks {missing} (of {max(sizes)}) is missing")
    settings = None
    entries: dict[str, SynthEntry] = {}
    for name, data in sorted(manifests.items()):
        if settings is None:
            settings = data["settings"]
        elif data["settings"] != settings:
            raise ShardError(f"part {name}'s synthesis has other settings than the others")
        for e in data["utterances"]:
            entry = SynthEntry(**e)
            if entry.wav is not None:
                entry.wav = f"{PARTS}/{name}/{entry.wav}"
            entries[entry.id] = entry
    if settings is None:
        raise ShardError("no synthesis manifests to merge")
    rank = {u: i for i, u in enumerate(order)}
    ordered = sorted(entries, key=lambda u: rank.get(u, len(rank)))
    SynthRun(out, settings, {u: entries[u] for u in ordered}).save()


def interleaved_order(manifests: dict[str, dict[str, Any]]) -> list[str]:
    """The set order of a synthesis merged without scored parts: rank r's k-th entry was at
    position k * n + r of the set (`Shard.take`), so the parts are dealt back in turn."""
    lists = [
        [e["id"] for e in manifests[name]["utterances"]]
        for name in sorted(manifests, key=lambda name: int(name.split("-", 1)[0]))
    ]
    longest = max(map(len, lists), default=0)
    return [lst[k] for k in range(longest) for lst in lists if k < len(lst)]


def local_parts(out: Path) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """The parts and synthesis manifests found under `<out>/parts/` (for `eval merge`)."""
    root = Path(out) / PARTS
    if not root.is_dir():
        raise ShardError(f"{out}: no {PARTS}/ folder (nothing was run with --shard here)")
    parts, manifests = [], {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        if (d / "part.json").is_file():
            parts.append(read_part(d / "part.json"))
        if (d / "manifest.json").is_file():
            try:
                manifests[d.name] = json.loads((d / "manifest.json").read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ShardError(f"{d / 'manifest.json'}: not readable ({e})") from None
    return parts, manifests
