"""Eval and bench over `mlx.launch` ranks (MLX's ring backend, local processes, CPU) on the
tiny model: the merged results equal a single-process run's apart from timing and the
per-rank machine records, with 2 and 3 ranks, and after a rank is killed mid-run and the
run resumed (only what was missing is done again)."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.figures import FIDELITY, FIGURES

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = Path(sys.executable).parent / "mlx.launch"

pytestmark = pytest.mark.skipif(
    not LAUNCH.exists(), reason=f"no mlx.launch beside {sys.executable}"
)


def _ports(n: int) -> int:
    """A first port with `n` free ports after it (the ring backend listens on port + rank)."""
    for _ in range(50):
        base = random.randrange(20000, 60000)
        try:
            socks = []
            for k in range(n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", base + k))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


def _launch_cmd(n: int, module: str, argv: list[str]) -> list[str]:
    return [str(LAUNCH), "-n", str(n), "--starting-port", str(_ports(n)), "--"] + [
        sys.executable,
        "-m",
        module,
        *map(str, argv),
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _kill_rank(cmd: list[str], part: Path, ready, timeout: float = 300) -> dict:
    """Start `cmd` (an mlx.launch), SIGKILL the rank whose part file is `part` once
    `ready(part document)` holds; return the part as it was at the kill."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            doc = None
            if part.exists():
                try:
                    doc = json.loads(part.read_text(encoding="utf-8"))
                except ValueError:  # never: parts are renamed into place whole
                    pytest.fail(f"{part} is not whole JSON")
            if doc is not None and ready(doc):
                os.kill(doc["shard"]["pid"], signal.SIGKILL)
                break
            if proc.poll() is not None:
                pytest.fail(f"the run ended before the kill: {proc.stdout.read().decode()[-3000:]}")
            time.sleep(0.05)
        else:
            pytest.fail("the rank did not get far enough in time")
        out = proc.communicate(timeout=120)[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    # mlx.launch stops the other ranks and says so (its own exit status stays 0)
    assert "rank 1 exited with code -9" in out, out[-3000:]
    return doc


# --------------------------------------------------------------------------- eval


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory) -> Path:
    """Four Asterisk prompts (real speech with transcripts) as a `meta.lst`."""
    pytest.importorskip("mlx_whisper")
    from eval.realspeech import english_transcripts, voice_dir

    try:
        d = voice_dir("en_US_f_Allison")
        texts = english_transcripts()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    clips = [c for c in sorted(texts) if (d / f"{c}.wav").is_file()][:4]
    root = tmp_path_factory.mktemp("set")
    lines = [f"{c}|{texts[c]}|{d / (c + '.wav')}|{texts[c]}" for c in clips]
    (root / "meta.lst").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "meta.lst"


def _eval_args(eval_set: Path, model: Path, out: Path) -> list:
    return ["run", "--set", eval_set, "--model-dir", model, "--steps", "2", "--seed", "3"] + [
        "--asr",
        "offline:tiny.en",
        "--sim",
        "resemblyzer",
        "--out",
        out,
    ]


@pytest.fixture(scope="module")
def eval_single(eval_set: Path, mlx_tiny_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval-single")
    _run([sys.executable, "-m", "eval", *map(str, _eval_args(eval_set, mlx_tiny_dir, out))])
    return out


def _eval_same(single: Path, merged: Path) -> dict:
    """Assert the merged eval outputs equal the single-process run's, bar timing and machine."""
    a = json.loads((single / "results.json").read_text(encoding="utf-8"))
    b = json.loads((merged / "results.json").read_text(encoding="utf-8"))
    per_rank = ("date", "git", "versions", "machine", "shards")
    assert {k: v for k, v in a.items() if k not in per_rank} == {
        k: v for k, v in b.items() if k not in per_rank
    }
    assert b["machine"] == b["shards"][0]["machine"]
    assert (single / "utterances.csv").read_text() == (merged / "utterances.csv").read_text()
    rows = [
        [{k: v for k, v in r.items() if k != "date"} for r in csv.DictReader(open(p, newline=""))]
        for p in (single / "summary.csv", merged / "summary.csv")
    ]
    assert rows[0] == rows[1]
    manifest = json.loads((merged / "manifest.json").read_text(encoding="utf-8"))
    assert [e["id"] for e in manifest["utterances"]] == [u["id"] for u in a["utterances"]]
    assert all((merged / e["wav"]).is_file() for e in manifest["utterances"])
    return b


@pytest.mark.parametrize("n", [2, 3])
def test_eval_over_ranks_equals_one_process(
    n: int, eval_set: Path, mlx_tiny_dir: Path, eval_single: Path, tmp_path: Path
) -> None:
    _run(_launch_cmd(n, "eval", _eval_args(eval_set, mlx_tiny_dir, tmp_path)))
    doc = _eval_same(eval_single, tmp_path)
    assert [s["rank"] for s in doc["shards"]] == list(range(n))
    assert sum(s["utterances"] for s in doc["shards"]) == 4
    assert sum(1 for r in doc["utterances"] if r["error_rate"] is not None) == 4


def test_eval_rank_killed_then_resumed(
    eval_set: Path, mlx_tiny_dir: Path, eval_single: Path, tmp_path: Path
) -> None:
    args = _eval_args(eval_set, mlx_tiny_dir, tmp_path)
    part = tmp_path / "parts" / "1-of-2" / "part.json"
    killed = _kill_rank(_launch_cmd(2, "eval", args), part, lambda d: len(d["rows"]) >= 1)
    assert killed["status"] == "running" and len(killed["rows"]) == 1
    assert not (tmp_path / "results.json").exists()  # no merge without every part
    proc = _run(_launch_cmd(2, "eval", [*args, "--resume"]))
    assert f"rank 1-of-2: {len(killed['rows'])} scored rows kept" in proc.stdout
    _eval_same(eval_single, tmp_path)
    final = json.loads(part.read_text(encoding="utf-8"))
    for row in killed["rows"]:  # kept as they were: neither synthesised nor scored again
        assert final["scored_from"][row["id"]] == killed["scored_from"][row["id"]]
        assert row in final["rows"]


def test_eval_shard_jobs_then_merge(eval_set: Path, tmp_path: Path) -> None:
    """`--shard i/n` jobs with no launcher, then `eval merge` (the copy synthesizer: fast)."""
    args = ["run", "--set", eval_set, "--tts", "copy", "--sim", "none", "--limit", "3"]
    single, merged = tmp_path / "single", tmp_path / "merged"
    _run([sys.executable, "-m", "eval", *map(str, args), "--out", str(single)])
    for r in (1, 0):
        _run(
            [
                sys.executable,
                "-m",
                "eval",
                *map(str, args),
                "--out",
                str(merged),
                "--shard",
                f"{r}/2",
            ]
        )
    bad = subprocess.run(
        [sys.executable, "-m", "eval", "merge", str(tmp_path)],
        cwd=ROOT, env=_env(), capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 1 and "no parts/ folder" in bad.stderr
    _run([sys.executable, "-m", "eval", "merge", str(merged)])
    _eval_same(single, merged)


def test_eval_synth_shard_jobs_then_merge(eval_set: Path, tmp_path: Path) -> None:
    """A synthesis alone (`eval synth --shard`): the merged manifest in set order, and a
    merge that lacks a part refused."""
    args = ["synth", "--set", eval_set, "--tts", "copy", "--out", tmp_path]
    _run([sys.executable, "-m", "eval", *map(str, args), "--shard", "1/3"])
    merge = [sys.executable, "-m", "eval", "merge", str(tmp_path)]
    bad = subprocess.run(merge, cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert bad.returncode == 1 and "ranks [0, 2] (of 3) is missing" in bad.stderr
    assert not (tmp_path / "manifest.json").exists()
    for r in (0, 2):
        _run([sys.executable, "-m", "eval", *map(str, args), "--shard", f"{r}/3"])
    _run(merge)
    manifest = json.loads((tmp_path / "manifest.json").read_text(encoding="utf-8"))
    ids = [line.split("|")[0] for line in eval_set.read_text().splitlines()]
    assert [e["id"] for e in manifest["utterances"]] == ids
    assert [e["wav"].split("/")[1] for e in manifest["utterances"]] == [
        f"{i % 3}-of-3" for i in range(len(ids))
    ]


# --------------------------------------------------------------------------- bench

TIMING = {"settings", "timings"}  # nothing else of `calls` is compared


def _bench_args(out: Path, *more: str) -> list[str]:
    return ["run", "--size", "tiny", "--steps", "1,2,3,4", "--stream", "off", "--repeats", "1"] + [
        "--warmup",
        "0",
        "--no-progress",
        "--report",
        "none",
        "--out",
        str(out),
        *more,
    ]


KEEP = {n for n, f in FIGURES.items() if f.better is None and f.unit != "cores"} | set(FIDELITY)
"""Figures that describe the work and the output, not its speed: equal in every run."""


def _bench_content(doc: dict) -> dict:
    """A results document without timing fields and per-rank machine records."""
    out = {k: doc[k] for k in ("schema", "status", "weights", "targets", "settings", "plan")}
    out["fidelity"] = doc.get("fidelity")
    out["cases"] = [
        {
            "id": c["id"],
            "settings": c["settings"],
            "work": c.get("work"),
            "status": c["status"],
            "weights": c.get("weights"),
            "figures": {k: v for k, v in c.get("figures", {}).items() if k in KEEP},
            "fidelity": c.get("fidelity"),
            "calls": len(c.get("calls", [])),
        }
        for c in doc["cases"]
    ]
    return out


@pytest.fixture(scope="module")
def bench_single(tmp_path_factory) -> dict:
    pytest.importorskip("torch")  # the synthetic official dir the tiny bench model comes from
    out = tmp_path_factory.mktemp("bench-single")
    _run([sys.executable, "-m", "bench", *_bench_args(out, "--name", "single")])
    return json.loads((out / "single.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("n, more", [(2, ()), (3, ("--in-process",))])
def test_bench_over_ranks_equals_one_process(
    n: int, more: tuple, bench_single: dict, tmp_path: Path
) -> None:
    _run(_launch_cmd(n, "bench", _bench_args(tmp_path, "--name", "ranks", *more)))
    doc = json.loads((tmp_path / "ranks.json").read_text(encoding="utf-8"))
    from bench.results import validate

    assert validate(doc) == [] and doc["status"] == "complete"
    single = _bench_content(bench_single)
    single["settings"] = {**single["settings"], "isolate": "--in-process" not in more}
    assert _bench_content(doc) == single
    assert any(c["figures"].get("log_mel_distance") for c in doc["cases"])  # fidelity ran
    assert [s["rank"] for s in doc["shards"]] == list(range(n))
    assert sorted(i for s in doc["shards"] for i in s["cases"]) == sorted(
        c["id"] for c in doc["plan"]
    )
    assert all(c["machine"]["kind"] == doc["machine"]["kind"] for c in doc["cases"])


def test_bench_rank_killed_then_resumed(bench_single: dict, tmp_path: Path) -> None:
    args = _bench_args(tmp_path, "--name", "k", "--in-process")
    part = tmp_path / "k.parts" / "1-of-2.json"
    ok = lambda d: sum(c["status"] == "ok" for c in d["cases"]) >= 1  # noqa: E731
    killed = _kill_rank(_launch_cmd(2, "bench", args), part, ok)
    kept = [c for c in killed["cases"] if c["status"] == "ok"]
    assert 1 <= len(kept) < 2
    assert not (tmp_path / "k.json").exists()
    # a bare --resume: rank 0 finds the unfinished run and tells the others its id
    resume = [a for a in args if a not in ("--name", "k")] + ["--resume"]
    _run(_launch_cmd(2, "bench", resume))
    doc = json.loads((tmp_path / "k.json").read_text(encoding="utf-8"))
    assert doc["status"] == "complete"
    single = _bench_content(bench_single)
    single["settings"] = {**single["settings"], "isolate": False}
    assert _bench_content(doc) == single
    by_id = {c["id"]: c for c in doc["cases"]}
    for c in kept:  # the cases finished before the kill were not run again
        assert by_id[c["id"]] == c
    again = [c for c in doc["cases"] if c["id"] in doc["shards"][1]["cases"] and c not in kept]
    assert again and all(c["env"]["pid"] != killed["shard"]["pid"] for c in again)
