"""Sharding without a launcher: shard arithmetic, parts and their merge, machine kinds kept apart.

The runs over `mlx.launch` ranks are in `tests/test_distributed.py`.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cases import Case, reference_cases
from bench.compare import compare
from bench.report import describe, side_by_side
from bench.results import by_machine, machine_kinds, validate
from bench.shards import merge_parts as merge_bench
from bench.shards import shard_cases
from sharding import Shard, ShardError, from_args, parse_shard

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- arithmetic


@pytest.mark.parametrize("text, want", [("0/1", (0, 1)), ("1/2", (1, 2)), (" 2 / 3 ", (2, 3))])
def test_parse_shard(text: str, want: tuple[int, int]) -> None:
    assert parse_shard(text) == want


@pytest.mark.parametrize(
    "text, words",
    [("2/2", "0 to 1"), ("1/0", "at least 1"), ("a/b", "expected i/n"), ("1", "expected i/n")],
)
def test_parse_shard_refuses(text: str, words: str) -> None:
    with pytest.raises(ShardError, match=words):
        parse_shard(text)


def test_shard_under_a_launcher_is_refused(monkeypatch) -> None:
    monkeypatch.setenv("MLX_RANK", "0")
    with pytest.raises(ShardError, match="under mlx.launch"):
        from_args("0/2")


def test_no_launcher_no_shard_is_the_whole_run(monkeypatch) -> None:
    for k in ("MLX_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        monkeypatch.delenv(k, raising=False)
    s = from_args(None)
    assert (s.rank, s.size, s.connected) == (0, 1, False)
    assert s.take(list("abc")) == list("abc")


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_shards_cover_every_item_once_in_order(n: int) -> None:
    items = [f"u{i}" for i in range(11)]
    parts = [Shard(r, n).take(items) for r in range(n)]
    assert sorted(x for p in parts for x in p) == sorted(items)
    for p in parts:
        assert p == [x for x in items if x in p]  # set order within a shard
    assert parts == [Shard(r, n).take(items) for r in range(n)]  # deterministic


@pytest.mark.parametrize("n", [2, 3])
def test_bench_shards_keep_a_work_and_its_twins_together(n: int) -> None:
    plan = [Case(steps=s, stream=st) for s in (1, 2, 3, 4) for st in (False, True)]
    plan += reference_cases(plan, "official")
    shards = [shard_cases(plan, Shard(r, n)) for r in range(n)]
    assert sorted(c.id for s in shards for c in s) == sorted(c.id for c in plan)
    for s in shards:
        steps = {c.steps for c in s}
        # every case of a step count (streaming sibling, official twin) is on this rank
        assert {c.id for c in plan if c.steps in steps} == {c.id for c in s}
    groups = list(dict.fromkeys(c.steps for c in plan))  # the official headline adds 10
    assert [sorted({c.steps for c in s}) for s in shards] == [
        sorted(Shard(r, n).take(groups)) for r in range(n)
    ]


# --------------------------------------------------------------------------- bench parts


def _part(rank: int, size: int, plan: list[Case], status: str = "complete") -> dict:
    """A part as `bench run --shard` writes it, with a made-up figure per case."""
    from bench.runner import RunOptions, new_run
    from bench.shards import shard_record

    shard = Shard(rank, size)
    mine = shard_cases(plan, shard)
    doc = new_run(mine, RunOptions(repeats=1), run_id="r")
    doc["shard"] = shard_record(shard, plan)
    doc["status"] = status
    doc["weights"] = {"label": "synthetic"}
    doc["targets"] = {"toy": {"weights": {"label": "synthetic"}}}
    done = mine if status == "complete" else mine[:1]
    doc["cases"] = [_ok_case(c, doc["machine"], 0.1 * c.steps) for c in done]
    return doc


def _ok_case(case: Case, machine: dict, wall: float) -> dict:
    from bench.figures import summarize

    figs = {
        n: summarize([v])
        for n, v in (("wall_s", wall), ("audio_s", 1.0), ("rtf", wall), ("speech_tokens", 25))
    }
    figs["load_s"] = summarize([0.1])
    return {
        "id": case.id,
        "settings": case.to_dict(),
        "work": {"speech_tokens": 25, "prompt_speech_tokens": 75, "text_tokens": 10},
        "status": "ok",
        "weights": "synthetic",
        "figures": figs,
        "machine": machine,
    }


PLAN = [Case(target="toy", steps=s) for s in (1, 2, 3, 5, 8)]


def test_bench_merge_is_the_whole_run_in_plan_order() -> None:
    parts = [_part(r, 3, PLAN) for r in (2, 0, 1)]
    doc = merge_bench(parts)
    assert validate(doc) == []
    assert doc["status"] == "complete" and "shard" not in doc
    assert [c["id"] for c in doc["plan"]] == [c["id"] for c in doc["cases"]] == [c.id for c in PLAN]
    assert [s["rank"] for s in doc["shards"]] == [0, 1, 2]
    assert doc["shards"][1]["cases"] == [c.id for c in shard_cases(PLAN, Shard(1, 3))]


def test_bench_merge_of_an_unfinished_part_is_interrupted() -> None:
    doc = merge_bench([_part(0, 2, PLAN), _part(1, 2, PLAN, status="interrupted")])
    assert doc["status"] == "interrupted" and validate(doc) == []
    assert len(doc["cases"]) == len(shard_cases(PLAN, Shard(0, 2))) + 1


@pytest.mark.parametrize(
    "spoil, words",
    [
        (lambda ps: ps.pop(1), r"ranks \[1\] \(of 3\) are missing"),
        (lambda ps: ps[1]["shard"].update(rank=0), "two parts of rank 0"),
        (lambda ps: ps[2].update(run_id="other"), "another run id"),
        (lambda ps: ps[2]["shard"]["plan"].pop(), "another plan"),
        (lambda ps: ps[1]["settings"].update(repeats=5), "another settings"),
        (lambda ps: ps[0].pop("shard"), "not a part"),
    ],
)
def test_bench_merge_refuses_parts_of_several_runs(spoil, words: str) -> None:
    parts = [_part(r, 3, PLAN) for r in range(3)]
    spoil(parts)
    with pytest.raises(ShardError, match=words):
        merge_bench(parts)


def _bench(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_bench_shard_jobs_then_merge(tmp_path: Path) -> None:
    """`--shard i/n` jobs (a CI matrix) and `bench merge`: the toy target, no launcher."""
    args = ["run", "--target", "toy", "--steps", "1,2,3", "--repeats", "1", "--no-fidelity"]
    args += ["--out", str(tmp_path), "--no-progress", "--report", "none", "--in-process"]
    no_name = _bench(*args, "--shard", "0/2")
    assert no_name.returncode == 2 and "--name" in no_name.stderr
    for r in (0, 1):
        proc = _bench(*args, "--shard", f"{r}/2", "--name", "m")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "python -m bench merge" in proc.stdout
    again = _bench(*args, "--shard", "1/2", "--name", "m")
    assert again.returncode == 2 and "--resume m" in again.stderr
    parts = tmp_path / "m.parts"
    assert sorted(p.name for p in parts.glob("*.json")) == ["0-of-2.json", "1-of-2.json"]
    only_one = _bench("merge", str(parts / "0-of-2.json"), "--out", str(tmp_path))
    assert only_one.returncode == 2 and "missing" in only_one.stderr
    assert not (tmp_path / "m.json").exists()
    proc = _bench("merge", str(parts), "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads((tmp_path / "m.json").read_text())
    assert doc["status"] == "complete" and validate(doc) == []
    assert [c["id"] for c in doc["cases"]] == [c["id"] for c in doc["plan"]]
    assert all(c["machine"]["kind"] == doc["machine"]["kind"] for c in doc["cases"])
    # a resumed shard with other arguments is refused, not mixed into the part
    other = _bench(*[a if a != "1,2,3" else "1,2" for a in args], "--shard", "0/2", "--resume", "m")
    assert other.returncode == 2 and "another plan" in other.stderr


# --------------------------------------------------------------------------- machine kinds


def _two_machine_run() -> tuple[dict, dict]:
    """A merged run whose steps=1 group ran on kind A and steps=10 group on kind B (each case
    with its official twin), and a baseline of kind A for all of them."""
    plan = [Case(steps=s) for s in (1, 10)]
    plan += reference_cases(plan, "official")
    a = {"kind": "kind-a", "cpu": "cpu a", "cores": 2}
    b = {"kind": "kind-b", "cpu": "cpu b", "cores": 8}
    base = _part(0, 1, plan)
    base.pop("shard")
    base["machine"] = dict(a, os="linux", arch="x86_64")
    for c in base["cases"]:
        c["machine"] = a
    run = copy.deepcopy(base)
    for c in run["cases"]:
        if c["settings"]["steps"] == 10:
            c["machine"] = b
            for name in ("wall_s", "rtf"):
                f = c["figures"][name]
                f["median"] = f["min"] = f["max"] = f["median"] * 0.25  # a faster machine
    return run, base


def _steps(case_id: str) -> int:
    return int(case_id.split("steps=")[1].split("/")[0])


def test_a_run_of_two_machines_is_split_by_kind() -> None:
    run, _ = _two_machine_run()
    assert machine_kinds(run) == ["kind-a", "kind-b"]
    parts = by_machine(run)
    assert [k for k, _ in parts] == ["kind-a", "kind-b"]
    assert [len(d["cases"]) for _, d in parts] == [2, 2]
    assert parts[1][1]["machine"]["cpu"] == "cpu b"
    # side-by-side ratios only within a kind: ours on B against the official on B
    pairs = [p for _, sub in parts for p in side_by_side(sub)]
    assert len(pairs) == 2
    for pair in pairs:
        assert _steps(pair["case"]) == _steps(pair["official"])
    text = describe(run)
    assert "machine kind kind-a: 2 cases" in text and "machine kind kind-b: 2 cases" in text


def test_compare_never_takes_another_machine_kind_as_one_machine() -> None:
    run, base = _two_machine_run()
    cmp = compare(run, base)
    assert len(cmp.other_machine) == 2 and all("kind-b" in x for x in cmp.other_machine)
    assert {_steps(r.case) for r in cmp.rows} == {1}
    assert cmp.ok
    # the same run with every case on kind A: the 4x change is judged (and can fail)
    for c in run["cases"]:
        c["machine"] = base["cases"][0]["machine"]
    assert not compare(base, run).ok
