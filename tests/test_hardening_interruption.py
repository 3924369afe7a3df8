"""Interruption: a command killed with SIGKILL at any moment leaves the old state or the new one.

For each of `cosyvoice2 convert`, `cosyvoice2 speakers add`, `python -m bench run` and
`python -m eval`, the command runs as a child process and is killed two ways:

- at chosen moments of its run with a real `SIGKILL` (polling its output for the
  files it makes: a staging dir, a results file, a case record, a wav, ...);
- deterministically, just before its K-th file system step (a rename: `os.replace`
  or `os.rename`; a tree removal: `shutil.rmtree`; for the eval results also each CSV
  row written), for every K up to the number of steps of a whole run: the child dies
  with `os._exit`, which, like `SIGKILL`, runs no `except` and no `finally`.

After every kill the destination is checked: absent or the old content, or complete and
valid (loaded the way its readers load it); never a partial file at its path. Then the
next run (or `--resume`) must succeed and leave no leftovers of the killed one.

A kill is not an error message, so these scenarios assert directly and are not in the
bad-input table.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.bad_inputs import snapshot

ROOT = Path(__file__).resolve().parent.parent
KILLED_AT_STEP = 137  # the exit status of a child stopped by `_STEP_KILLER`

# `python -c _STEP_KILLER K MODULE ARGS...`: runs `python -m MODULE ARGS...`, dying just
# before its K-th file system step (K = 0: never). STEP_KINDS lists which steps count:
# `rename` (os.replace, os.rename), `rmtree` (shutil.rmtree), `csv` (each CSV row written);
# default `rename,rmtree`. With STEP_COUNT_FILE set, the number of steps of a whole run is
# written there at exit.
_STEP_KILLER = """
import atexit, csv, os, runpy, shutil, sys

k, module, args = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
from tests.kill_steps import before_step

step, seen = before_step(k)

kinds = os.environ.get("STEP_KINDS", "rename,rmtree").split(",")
if "rename" in kinds:
    os.replace = step(os.replace)
    os.rename = step(os.rename)
if "rmtree" in kinds:
    shutil.rmtree = step(shutil.rmtree)
if "csv" in kinds:
    csv.DictWriter.writerow = step(csv.DictWriter.writerow)
count_file = os.environ.get("STEP_COUNT_FILE")
if count_file:
    atexit.register(lambda: open(count_file, "w").write(str(seen[0])))
sys.argv = [module, *args]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), **(extra or {})}


def _run_killed_at_step(
    k: int, module: str, argv: list[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGV`, killed just before its K-th file system step."""
    return subprocess.run(
        [sys.executable, "-c", _STEP_KILLER, str(k), module, *map(str, argv)],
        cwd=ROOT,
        env=_env(env),
        capture_output=True,
        text=True,
        timeout=600,
    )


def _count_steps(module: str, argv: list[str], tmp: Path, env: dict[str, str] | None = None) -> int:
    """Run the command whole once; the number of its file system steps."""
    count = tmp / "steps.txt"
    proc = _run_killed_at_step(0, module, argv, {**(env or {}), "STEP_COUNT_FILE": str(count)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return int(count.read_text())


def _kill_when(
    module: str,
    argv: list[str],
    ready: Callable[[], bool],
    env: dict[str, str] | None = None,
    delay: float = 0.0,
    timeout: float = 300,
) -> bool:
    """Start `python -m MODULE ARGV`, SIGKILL it once `ready()` holds (after `delay` s).

    The child runs in its own session; after the kill, whatever it started (a bench
    worker, say) is killed too. Returns whether the child was still running when killed.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *map(str, argv)],
        cwd=ROOT,
        env=_env(env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + timeout
        while proc.poll() is None and not ready():
            assert time.monotonic() < deadline, f"{module} {argv}: never reached the kill point"
            time.sleep(0.005)
        if delay:
            time.sleep(delay)
        alive = proc.poll() is None
        if alive:
            os.kill(proc.pid, signal.SIGKILL)
        return alive
    finally:
        if proc.poll() is None:  # an assertion above: stop it all the same
            os.kill(proc.pid, signal.SIGKILL)
        try:  # what it started (a bench worker) goes too; its group lives while it is unreaped
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()


def _leftovers(dst: Path) -> list[str]:
    """Entries beside `dst` named after it (staging dirs, backups, temporary files)."""
    return sorted(p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}."))


# --------------------------------------------------------------------------- convert


def _staging_has(dst: Path, name: str | None) -> Callable[[], bool]:
    def ready() -> bool:
        for p in dst.parent.glob(f".{dst.name}.staging-*"):
            if name is None or (p / name).exists():
                return True
        return False

    return ready


def _check_convert_state(dst: Path, old: dict[str, str], new: dict[str, str], when: str) -> None:
    from cosyvoice2.files import backup_path

    if dst.exists():
        assert snapshot(dst) in (old, new), f"convert killed {when}: {dst} is neither old nor new"
    else:
        backup = backup_path(dst)
        assert snapshot(backup) == old, f"convert killed {when}: {dst} lost and no whole backup"


def _reset(dst: Path, content: Path) -> None:
    """`dst` a copy of `content`, with nothing else beside it."""
    shutil.rmtree(dst.parent)
    shutil.copytree(content, dst)


def test_convert_killed_mid_write_or_mid_swap_keeps_the_old_dir_or_writes_the_new(
    tiny_official_dir: Path, tiny_mlx_dir: Path, mlx_tiny_dir: Path, tmp_path: Path
) -> None:
    """`convert --overwrite` over an existing MLX dir, killed while it writes its staging dir
    (SIGKILL) and at each step of the swap (before each rename, before removing the
    backup): the dir is the old one or the new one, or, between the two renames, the old
    one whole under its backup name, which the next run restores (and then, without
    `--overwrite`, refuses to replace). The next run converts cleanly, leaving nothing."""
    from cosyvoice2.files import backup_path

    new = snapshot(tiny_mlx_dir)  # the same conversion, made whole by the fixture
    old = snapshot(mlx_tiny_dir)
    assert old != new
    dst = tmp_path / "out" / "mlx"
    argv = ["convert", tiny_official_dir, dst, "--overwrite"]
    shutil.copytree(mlx_tiny_dir, dst)
    n = _count_steps("cosyvoice2", argv, tmp_path)  # a whole run: ends with the swap
    assert snapshot(dst) == new and _leftovers(dst) == []

    _reset(dst, mlx_tiny_dir)
    # before the second rename of the swap: `dst` is missing, the old dir is the backup
    assert _run_killed_at_step(n - 1, "cosyvoice2", argv).returncode == KILLED_AT_STEP
    assert not dst.exists() and snapshot(backup_path(dst)) == old
    proc = _run_killed_at_step(0, "cosyvoice2", argv[:-1])  # without --overwrite
    assert proc.returncode == 2 and "already exists" in proc.stderr, proc.stderr
    assert snapshot(dst) == old and _leftovers(dst) == []  # restored; staging dir removed

    # before the first rename of the swap, and before removing the backup (each from the
    # clean old dir, so that its steps are numbered as in the whole run)
    assert _run_killed_at_step(n - 2, "cosyvoice2", argv).returncode == KILLED_AT_STEP
    assert snapshot(dst) == old
    _reset(dst, mlx_tiny_dir)
    assert _run_killed_at_step(n, "cosyvoice2", argv).returncode == KILLED_AT_STEP
    assert snapshot(dst) == new and backup_path(dst).exists()

    # real SIGKILLs while the staging dir is being filled, over the old dir again
    _reset(dst, mlx_tiny_dir)
    for what in (None, "llm.safetensors", "config.json"):  # config.json: just before the swap
        alive = _kill_when("cosyvoice2", argv, _staging_has(dst, what))
        assert alive or what == "config.json", f"it ended before its staging dir had {what}"
        _check_convert_state(dst, old, new, f"once the staging dir had {what or 'nothing'}")
    proc = _run_killed_at_step(0, "cosyvoice2", argv)
    assert proc.returncode == 0, proc.stderr
    assert snapshot(dst) == new and _leftovers(dst) == []
    import cosyvoice2

    assert cosyvoice2.load(dst).sample_rate > 0  # loadable


# --------------------------------------------------------------------------- speakers add


@pytest.fixture
def prompt_wav(tmp_path: Path) -> Path:
    import numpy as np
    import soundfile as sf

    sr = 16000
    t = np.arange(int(1.5 * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * 140 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    path = tmp_path / "prompt.wav"
    sf.write(path, x.astype(np.float32), sr)
    return path


def _speakers_state(model: Path) -> set[str]:
    """The saved speaker ids, every one loaded whole; fails on a broken store."""
    from cosyvoice2.model_dir import speaker_store

    store = speaker_store(model)
    index = model / "speakers" / "index.json"
    if index.exists():
        json.loads(index.read_text(encoding="utf-8"))  # whole JSON, never a partial file
    out = set()
    for spk_id in store.list():
        spk = store.load(spk_id)
        assert spk.embedding.shape == (1, 192), spk_id
        out.add(spk_id)
    return out


def _without_speakers(snap: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in snap.items() if not k.startswith("speakers")}


def test_speakers_add_killed_at_any_moment_keeps_the_store_whole(
    mlx_tiny_dir: Path, prompt_wav: Path, tmp_path: Path
) -> None:
    """`speakers add` killed with SIGKILL (while it loads the model; once it writes into the
    store), then before each of its renames, each run starting from what the killed one
    left: the store always loads, with the earlier speaker and the new one absent or whole,
    the rest of the model dir untouched; the run that is not killed adds the speaker."""
    import mlx.core as mx

    from cosyvoice2.model_dir import speaker_store
    from cosyvoice2.speakers import Speaker

    model = tmp_path / "model"
    shutil.copytree(mlx_tiny_dir, model)
    rest = _without_speakers(snapshot(model))
    zeros = mx.zeros((1, 0), dtype=mx.int32)
    bob = Speaker("bob", mx.ones((1, 192)), zeros, zeros, mx.zeros((1, 0, 80)))
    speaker_store(model).save(bob)
    speakers = model / "speakers"
    before = {p.name for p in speakers.iterdir()}
    argv = ["speakers", "add", "--model", model, "--prompt-wav", prompt_wav]
    argv += ["--id", "alice/../x", "--prompt-text", "Alice."]
    both = {"bob", "alice/../x"}

    for when, ready, delay in (
        ("while loading", lambda: True, 1.0),
        ("once writing", lambda: {p.name for p in speakers.iterdir()} != before, 0.0),
    ):
        _kill_when("cosyvoice2", argv, ready, delay=delay)
        assert _speakers_state(model) in ({"bob"}, both), when
        assert _without_speakers(snapshot(model)) == rest, when
    for k in range(1, 100):
        proc = _run_killed_at_step(k, "cosyvoice2", argv)
        if proc.returncode == 0:
            break
        assert proc.returncode == KILLED_AT_STEP, f"step {k}: {proc.stderr}"
        assert _speakers_state(model) in ({"bob"}, both), f"killed before step {k}"
        assert _without_speakers(snapshot(model)) == rest
    assert k >= 3, "expected at least two renames (the speaker's file, the index)"
    assert _speakers_state(model) == both
    assert _without_speakers(snapshot(model)) == rest


# --------------------------------------------------------------------------- bench run


def _bench_args(out: Path, name: str) -> list[str]:
    return [
        "run", "--target", "toy", "--steps", "1,2", "--repeats", "1", "--warmup", "0",
        "--out", out, "--name", name, "--no-progress",
    ]  # fmt: skip


def _check_bench_file(path: Path, when: str) -> dict | None:
    """The results file: absent, or a whole valid document (never a partial one)."""
    from bench.results import load

    if not path.exists():
        return None
    try:
        return load(path)
    except ValueError as e:
        raise AssertionError(f"bench killed {when}: {e}") from e


def _finish_bench(out: Path, name: str, log: Path, when: str) -> None:
    """Resume the run (or start it again if no results file was written); it completes,
    without repeating the cases that were finished, and leaves no temporary file."""
    from bench.results import load

    path = out / f"{name}.json"
    before = _check_bench_file(path, when)
    finished = [c["id"] for c in (before or {}).get("cases", []) if c["status"] == "ok"]
    n_calls = len(log.read_text().splitlines()) if log.exists() else 0
    args = _bench_args(out, name) + (["--resume", name] if before is not None else [])
    proc = _run_killed_at_step(0, "bench", args, {"BENCH_TOY_LOG": str(log)})
    assert proc.returncode == 0, f"after a kill {when}: {proc.stdout}{proc.stderr}"
    doc = load(path)
    assert doc["status"] == "complete" and [c["status"] for c in doc["cases"]] == ["ok", "ok"]
    rerun = set(log.read_text().splitlines()[n_calls:]) if log.exists() else set()
    assert not rerun & set(finished), f"after a kill {when}: finished cases ran again"
    assert _leftovers(path) == [], f"after a kill {when}: {_leftovers(path)}"


def test_bench_run_killed_at_every_save_resumes(tmp_path: Path) -> None:
    """A bench run killed before each rename of its results file: the file is absent or a
    valid document; `--resume` (or a fresh start) completes it."""
    only = {"STEP_KINDS": "rename"}  # the saves of the results file (os.replace)
    n = _count_steps("bench", _bench_args(tmp_path / "count", "count"), tmp_path, only)
    assert n >= 4  # before the first worker, after preparing, after each case, at the end
    for k in range(1, n + 1):
        out, log = tmp_path / f"k{k}", tmp_path / f"k{k}.log"
        env = {**only, "BENCH_TOY_LOG": str(log)}
        proc = _run_killed_at_step(k, "bench", _bench_args(out, "r"), env)
        assert proc.returncode == KILLED_AT_STEP, f"step {k} of {n}: {proc.stdout}{proc.stderr}"
        _finish_bench(out, "r", log, f"before step {k}")


def test_bench_run_sigkilled_mid_sweep_resumes(tmp_path: Path) -> None:
    """Real SIGKILLs: once the results file exists, and once the first case is recorded
    (its worker for the next case then running); each time `--resume` completes the run."""
    path = tmp_path / "r.json"

    def cases_done(n: int) -> Callable[[], bool]:
        def ready() -> bool:
            try:
                return len(json.loads(path.read_text())["cases"]) >= n
            except (OSError, ValueError, KeyError):
                return False

        return ready

    for i, ready in enumerate((path.exists, cases_done(1))):
        if path.exists():
            path.unlink()
        log = tmp_path / f"{i}.log"
        env = {"BENCH_TOY_LOG": str(log), "BENCH_TOY_SLEEP": "0.3"}
        assert _kill_when("bench", _bench_args(tmp_path, "r"), ready, env=env), "ended first"
        _finish_bench(tmp_path, "r", log, f"at point {i}")


# --------------------------------------------------------------------------- eval


@pytest.fixture
def eval_set(asterisk_meta: Path) -> Path:
    """Two Asterisk prompts as a test set (copy synthesis: the prompt is the output)."""
    pytest.importorskip("mlx_whisper")
    pytest.importorskip("jiwer")
    return asterisk_meta


RESULT_FILES = ("results.json", "summary.csv", "utterances.csv")


def _result_leftovers(out: Path) -> list[str]:
    """Temporary files of the results writer (`.results.json.*.tmp`, ...)."""
    return sorted(
        p.name for p in out.iterdir() if p.name.startswith(tuple(f".{n}." for n in RESULT_FILES))
    )


# A child that writes the eval results of the document in argv[2] into argv[1], dying just
# before its K-th step (argv[3]): a rename or a CSV row written.
_KILLED_RESULTS_WRITER = """
import csv, json, os, sys
from pathlib import Path

from eval.results_io import write_results

out, doc, k = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text()), int(sys.argv[3])
from tests.kill_steps import before_step

step, seen = before_step(k)

os.replace = step(os.replace)
csv.DictWriter.writerow = step(csv.DictWriter.writerow)
write_results(doc, out)
"""


def _eval_files(out: Path) -> dict[str, object]:
    """What each results file says (hypotheses, date), each read whole; fails on a partial one."""
    from eval.results_io import read_results

    doc = read_results(out)
    with open(out / "utterances.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(out / "summary.csv", encoding="utf-8", newline="") as f:
        summary = list(csv.DictReader(f))
    assert len(rows) == len(doc["utterances"]) and len(summary) == 1
    return {
        "results.json": ([u["hypothesis"] for u in doc["utterances"]], doc["date"]),
        "utterances.csv": [r["hypothesis"] for r in rows],
        "summary.csv": summary[0]["date"],
    }


def test_eval_killed_at_any_moment_keeps_whole_results(eval_set: Path, tmp_path: Path) -> None:
    """`python -m eval run` killed with SIGKILL once a wav is written and once scoring has
    begun, each run going on from what the last left; then the results writer killed
    before each rename and each CSV row: every file is absent or whole, the old one or the
    new one (a new `results.json` only beside new CSVs); the next run completes."""
    out = tmp_path / "out"
    argv = ["run", "--set", eval_set, "--asr", "offline:tiny.en", "--sim", "none"]
    argv += ["--tts", "copy", "--out", out]
    wavs = out / "wavs"
    for when, ready in (
        ("once a wav is written", lambda: wavs.exists() and any(wavs.iterdir())),
        ("once scoring has written a file", lambda: (out / "utterances.csv").exists()),
    ):
        _kill_when("eval", argv, ready)
        manifest = out / "manifest.json"
        if manifest.exists():  # whole JSON
            assert isinstance(json.loads(manifest.read_text(encoding="utf-8")), dict), when
        if (out / "results.json").exists():  # whole, with whole CSVs beside it
            assert _eval_files(out), when
    proc = _run_killed_at_step(0, "eval", argv)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    old = _eval_files(out)
    assert _result_leftovers(out) == []

    doc = json.loads((out / "results.json").read_text(encoding="utf-8"))
    doc["date"] = "2000-01-01T00:00:00+00:00"
    for u in doc["utterances"]:
        u["hypothesis"] = f"{u['hypothesis']} (again)"
    new = {
        "results.json": ([u["hypothesis"] for u in doc["utterances"]], doc["date"]),
        "utterances.csv": [u["hypothesis"] for u in doc["utterances"]],
        "summary.csv": doc["date"],
    }
    new_doc = tmp_path / "new.json"
    new_doc.write_text(json.dumps(doc), encoding="utf-8")
    env = _env()
    k = 0
    while True:
        k += 1
        proc = subprocess.run(
            [sys.executable, "-c", _KILLED_RESULTS_WRITER, str(out), str(new_doc), str(k)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        state = _eval_files(out)
        if proc.returncode == 0:
            break
        assert proc.returncode == KILLED_AT_STEP, f"step {k}: {proc.stderr}"
        for name, value in state.items():
            assert value in (old[name], new[name]), f"killed before step {k}: {name}"
        if state["results.json"] == new["results.json"]:  # renamed last: the CSVs are new too
            assert state == new, f"killed before step {k}"
    assert k >= 7, "expected three CSV rows and three renames"
    assert state == new and _result_leftovers(out) == []


def test_load_recovers_a_model_dir_lost_mid_swap(mlx_tiny_dir: Path, tmp_path: Path) -> None:
    """A `convert` killed between the two renames of its swap leaves only the backup;
    loading the model puts it back first."""
    from cosyvoice2.files import backup_path
    from cosyvoice2.model import CosyVoice2

    dst = tmp_path / "model"
    shutil.copytree(mlx_tiny_dir, backup_path(dst))
    assert not dst.exists()
    model = CosyVoice2.load(dst)
    assert dst.is_dir() and not backup_path(dst).exists()
    assert model.path == dst
