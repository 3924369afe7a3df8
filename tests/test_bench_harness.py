"""The bench harness: valid results files, regression checks, resume, fixed length, kept runs.

Harness logic is tested with the `toy` target (a small real MLX workload shaped like
the pipeline, `bench/toy.py`); the pipeline adapter (`bench/targets.py`) and the
official reference (`bench/reference.py`) are tested on the tiny synthetic model.
No test asserts on speed.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.cases import (
    Case,
    Work,
    default_cases,
    full_cases,
    load_sweep_file,
    quick_cases,
    reference_cases,
)
from bench.compare import compare, format_table
from bench.figures import FIGURES, playback_gaps
from bench.results import load, validate, write_json_atomic
from bench.runner import RunOptions, new_run, run_sweep

ROOT = Path(__file__).resolve().parent.parent


def _bench(
    *args: str, env: dict | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run `python -m bench ...` from the repo root."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    """A complete toy run through the CLI (worker processes, as a real run)."""
    out = tmp_path_factory.mktemp("bench-results")
    proc = _bench(
        "run",
        "--target",
        "toy",
        "--quick",
        "--repeats",
        "2",
        "--out",
        str(out),
        "--name",
        "toy-run",
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out / "toy-run.json"


# --------------------------------------------------------------------------- results files


def test_run_writes_a_valid_results_file(toy_run: Path) -> None:
    doc = load(toy_run)  # raises on any schema problem
    assert validate(doc) == []
    assert doc["status"] == "complete"
    assert doc["weights"]["label"] == "synthetic"
    assert {"kind", "os", "cpu", "cores", "memory_gb"} <= set(doc["machine"])
    assert {"mlx", "mlx_lm", "git_commit", "cosyvoice2_mlx"} <= set(doc["versions"])
    ids = [c["id"] for c in doc["cases"]]
    assert ids == [c.id for c in quick_cases("toy")]
    for case in doc["cases"]:
        assert case["status"] == "ok", case.get("error")
        assert case["weights"] == "synthetic"
        assert case["env"]["isolated"] is True
        figs = case["figures"]
        assert figs["wall_s"]["n"] == 2  # the cold call is a warm-up, not a repeat
        assert len(case["calls"]) == 3 and case["calls"][0]["cold"]
        assert figs["speech_tokens"]["min"] == figs["speech_tokens"]["max"] == 125
        # 125 tokens at 25 Hz = 5 s of audio
        assert figs["audio_s"]["median"] == pytest.approx(5.0)
        for name in ("rtf", "ttft_s", "decode_tok_s", "flow_s", "hift_s", "load_s", "cpu_s"):
            assert name in figs
        assert case["env"]["loadavg_start"] is not None or sys.platform == "win32"
        assert figs["rss_peak_mb"]["median"] > 0
        assert figs["mlx_peak_mb"]["median"] > 0
    stream = doc["cases"][1]
    assert stream["settings"]["stream"] is True
    assert {"first_chunk_s", "cold_first_chunk_s", "playback_gap_max_s"} <= set(stream["figures"])
    assert stream["figures"]["chunks"]["median"] > 1
    assert "first_chunk_s" not in doc["cases"][0]["figures"]


def test_validate_reports_broken_documents(toy_run: Path) -> None:
    doc = json.loads(toy_run.read_text())
    broken = copy.deepcopy(doc)
    del broken["machine"]
    assert any("machine" in p for p in validate(broken))

    broken = copy.deepcopy(doc)
    del broken["cases"][0]["figures"]["rtf"]
    assert any("rtf" in p for p in validate(broken))

    broken = copy.deepcopy(doc)
    f = broken["cases"][0]["figures"]["wall_s"]
    f["min"], f["max"] = f["max"] + 1, f["min"] - 1
    assert any("min <= median <= max" in p for p in validate(broken))

    broken = copy.deepcopy(doc)
    broken["weights"]["label"] = "made-up"
    assert any("weights.label" in p for p in validate(broken))

    broken = copy.deepcopy(doc)
    broken["cases"][0]["figures"]["speech_tokens"]["max"] = 124
    assert any("fixed-length" in p for p in validate(broken))

    broken = copy.deepcopy(doc)
    broken["cases"].pop()
    assert any("missing" in p for p in validate(broken))  # complete but a case is missing

    broken = copy.deepcopy(doc)
    broken["cases"][0]["figures"]["made_up"] = broken["cases"][0]["figures"]["rtf"]
    assert any("unknown figure" in p for p in validate(broken))


def test_atomic_write_keeps_old_file_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


# --------------------------------------------------------------------------- compare


def _scaled(doc: dict, factor: float) -> dict:
    """A copy of `doc` whose every directional figure is `factor` times worse."""
    out = copy.deepcopy(doc)
    for case in out["cases"]:
        for name, f in case["figures"].items():
            better = FIGURES[name].better
            if better is None:
                continue
            k = factor if better == "lower" else 1.0 / factor
            for key in ("median", "min", "max"):
                f[key] = f[key] * k
            f["values"] = [v * k for v in f["values"]]
    return out


def test_compare_passes_a_run_against_itself(toy_run: Path) -> None:
    doc = load(toy_run)
    cmp = compare(doc, doc)
    assert cmp.ok
    assert cmp.rows and not cmp.regressions
    assert {r.verdict for r in cmp.rows} <= {"ok", "noise"}
    proc = _bench("compare", str(toy_run), str(toy_run))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS" in proc.stdout


def test_compare_flags_an_injected_2x_regression(toy_run: Path, tmp_path: Path) -> None:
    doc = load(toy_run)
    slow = _scaled(doc, 2.0)
    assert validate(slow) == []
    cmp = compare(slow, doc)
    assert not cmp.ok
    flagged = {(r.case.split("/")[-1], r.figure) for r in cmp.regressions}
    # every case's RTF and wall time (well above their noise floors), and decode speed
    for case in ("stream=off", "stream=on"):
        for figure in ("rtf", "wall_s", "decode_tok_s"):
            assert (case, figure) in flagged
    for r in cmp.rows:
        if r.baseline == 0:  # e.g. no playback gap: 2 x 0 is still 0
            assert r.verdict == "noise"
            continue
        assert r.worse == pytest.approx(2.0)
        assert r.verdict in ("REGRESSION", "noise")
    # the same run read the other way is an improvement, not a failure
    assert compare(doc, slow).ok
    path = tmp_path / "slow.json"
    write_json_atomic(path, slow)
    proc = _bench("compare", str(path), str(toy_run), "--markdown", str(tmp_path / "cmp.md"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "REGRESSION" in proc.stdout and "FAIL" in proc.stdout
    assert "| case | figure |" in (tmp_path / "cmp.md").read_text()


def _doc(cases: dict[str, dict[str, float]], label: str = "synthetic") -> dict:
    """A minimal document with given medians (for the comparison rules)."""
    return {
        "weights": {"label": label},
        "machine": {"kind": "k"},
        "cases": [
            {
                "id": cid,
                "status": "ok",
                "figures": {n: {"median": v, "min": v, "max": v, "n": 1} for n, v in figs.items()},
            }
            for cid, figs in cases.items()
        ],
    }


def test_compare_rules() -> None:
    base = _doc({"a": {"wall_s": 10.0, "decode_tok_s": 10.0, "ttft_s": 0.005, "load_s": 1.0}})
    # within tolerance (20% < 25%)
    assert compare(_doc({"a": {"wall_s": 12.0}}), base).ok
    # lower is better: 30% slower fails, 30% faster is an improvement
    assert not compare(_doc({"a": {"wall_s": 13.0}}), base).ok
    assert compare(_doc({"a": {"wall_s": 7.0}}), base).rows[0].verdict == "improved"
    # higher is better: tokens/s dropping to 7.5 is 1.33x worse
    row = compare(_doc({"a": {"decode_tok_s": 7.5}}), base).rows[0]
    assert row.verdict == "REGRESSION" and row.worse == pytest.approx(10 / 7.5)
    assert compare(_doc({"a": {"decode_tok_s": 20.0}}), base).ok
    # below the noise floor (20 ms) a 2x change is not judged, unless floors are off
    assert compare(_doc({"a": {"ttft_s": 0.010}}), base).rows[0].verdict == "noise"
    assert not compare(_doc({"a": {"ttft_s": 0.010}}), base, floors=False).ok
    # per-figure tolerances: load time has its own 50%; overrides win
    assert compare(_doc({"a": {"load_s": 1.4}}), base).ok
    assert not compare(_doc({"a": {"load_s": 1.4}}), base, overrides={"load_s": 0.1}).ok
    assert not compare(_doc({"a": {"wall_s": 11.0}}), base, tolerance=0.05).ok
    # new and missing cases; strict makes missing ones fail
    other = _doc({"b": {"wall_s": 1.0}})
    cmp = compare(other, base)
    assert cmp.ok and cmp.new == ["b"] and cmp.missing == ["a"]
    assert not compare(other, base, strict=True).ok
    # a case that ran in the baseline but failed in the run fails the comparison
    failed = _doc({"a": {}})
    failed["cases"][0]["status"] = "error"
    failed["cases"][0]["error"] = "boom"
    assert not compare(failed, base).ok
    # different weights labels are warned about
    assert compare(_doc({"a": {"wall_s": 10.0}}, label="real"), base).warnings
    assert "PASS" in format_table(compare(base, base))
    with pytest.raises(ValueError):
        compare(base, base, overrides={"nonsense": 0.1})


# --------------------------------------------------------------------------- interrupt and resume


def test_interrupted_sweep_resumes_without_repeating_finished_cases(
    tmp_path: Path, monkeypatch
) -> None:
    log = tmp_path / "calls.log"
    monkeypatch.setenv("BENCH_TOY_LOG", str(log))
    plan = [Case(target="toy", steps=s) for s in (1, 2, 3, 5)]
    opts = RunOptions(repeats=1, warmup=1, isolate=False)
    doc = new_run(plan, opts, run_id="resume")
    path = tmp_path / "resume.json"
    done_before: list[str] = []

    def interrupt_after_two(record: dict) -> None:
        done_before.append(record["id"])
        if len(done_before) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(doc, path, progress=False, on_case_done=interrupt_after_two)
    saved = load(path)
    assert saved["status"] == "interrupted"
    assert [c["id"] for c in saved["cases"]] == [c.id for c in plan[:2]]
    first_records = copy.deepcopy(saved["cases"])
    calls_before = log.read_text().splitlines()
    # the finished cases of an interrupted run can be stored as a (partial) baseline
    base = tmp_path / "base.json"
    assert _bench("baseline", str(path), "--to", str(base)).returncode == 2
    proc = _bench("baseline", str(path), "--to", str(base), "--partial")
    assert proc.returncode == 0, proc.stderr
    partial = load(base)
    assert partial["status"] == "complete" and partial["cases"] == first_records
    assert [c["id"] for c in partial["plan"]] == [c.id for c in plan[:2]]
    assert calls_before == [plan[0].id] * 2 + [plan[1].id] * 2  # cold + 1 repeat each

    resumed = run_sweep(saved, path, progress=False)
    final = load(path)
    assert resumed["status"] == final["status"] == "complete"
    assert [c["id"] for c in final["cases"]] == [c.id for c in plan]
    assert final["cases"][:2] == first_records  # finished cases kept as they were
    calls_after = log.read_text().splitlines()[len(calls_before) :]
    assert calls_after == [plan[2].id] * 2 + [plan[3].id] * 2


def test_ctrl_c_keeps_finished_cases_and_resume_completes(tmp_path: Path) -> None:
    """A real SIGINT to the CLI while a worker runs; then `--resume`."""
    log = tmp_path / "calls.log"
    env = {"BENCH_TOY_LOG": str(log), "BENCH_TOY_SLEEP": "0.5"}
    args = ["run", "--target", "toy", "--steps", "1,2,3", "--repeats", "1", "--out", str(tmp_path)]
    cmd = [sys.executable, "-m", "bench", *args, "--name", "sig", "--no-progress"]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # Ctrl-C as in a terminal, even when this test runs where SIGINT is ignored (a
        # shell's background job inherits SIG_IGN, and Python then keeps ignoring it).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    path = tmp_path / "sig.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if path.exists() and json.loads(path.read_text())["cases"]:
            break
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be interrupted: {proc.communicate()}")
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("no case finished in time")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    doc = load(path)
    assert doc["status"] == "interrupted"
    finished = [c["id"] for c in doc["cases"] if c["status"] == "ok"]
    assert finished and len(finished) < 3
    assert "--resume sig" in err.decode()
    n_before = len(log.read_text().splitlines())

    res = _bench(*args, "--resume", "sig", "--no-progress", env={"BENCH_TOY_LOG": str(log)})
    assert res.returncode == 0, res.stdout + res.stderr
    doc = load(path)
    assert doc["status"] == "complete"
    assert [c["status"] for c in doc["cases"]] == ["ok"] * 3
    rerun = set(log.read_text().splitlines()[n_before:])
    assert not rerun & set(finished)
    assert rerun == {c["id"] for c in doc["cases"]} - set(finished)


def test_failing_case_is_recorded_and_sweep_goes_on(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BENCH_TOY_FAIL", "steps=2")
    plan = [Case(target="toy", steps=s) for s in (1, 2, 3)]
    doc = new_run(plan, RunOptions(repeats=1, warmup=0, isolate=False), run_id="fail")
    run_sweep(doc, tmp_path / "fail.json", progress=False)
    saved = load(tmp_path / "fail.json")
    assert [c["status"] for c in saved["cases"]] == ["ok", "error", "ok"]
    assert "toy failure injected" in saved["cases"][1]["error"]


# --------------------------------------------------------------------------- fixed length


def test_fixed_length_gives_exactly_the_requested_tokens() -> None:
    import mlx.core as mx

    from bench.fixed_length import FixedLengthSampler, TooFewTokens, take_exact
    from bench.toy import SPEECH_TOKEN_SIZE, ToyTarget, _sampler

    target = ToyTarget()
    handle = target.load(Case(target="toy"), target.prepare([], {}))
    work = Work.for_case(Case(target="toy"), prompt_seconds=1.0)
    inputs = work.inputs()
    inputs["text_all"] = inputs["prompt_text"][0].tolist() + inputs["text"][0].tolist()
    inputs["prompt_speech_token"] = inputs["prompt_speech_token"][0]

    # Left alone, the toy LM (end-of-speech biased up) stops long before 125 tokens.
    natural = list(handle.llm.inference(inputs, _sampler(), mx.random.key(0), max_len=125))
    assert len(natural) < 125
    with pytest.raises(TooFewTokens):
        list(take_exact(handle.llm.inference(inputs, _sampler(), mx.random.key(0), 125), 125))

    for n in (1, 40, 125):
        sampler = FixedLengthSampler(_sampler(), SPEECH_TOKEN_SIZE)
        gen = handle.llm.inference(inputs, sampler, mx.random.key(0), max_len=1000)
        tokens = list(take_exact(gen, n))
        assert len(tokens) == n
        assert all(0 <= t < SPEECH_TOKEN_SIZE for t in tokens)
        assert gen.gi_frame is None  # the generator was closed: decoding stopped


def test_fixed_length_sampler_masks_every_non_speech_id() -> None:
    import mlx.core as mx

    from bench.fixed_length import FixedLengthSampler

    class Greedy:
        window = 3

        def __call__(self, scores, recent, key):
            return mx.argmax(scores, axis=-1)

    scores = mx.zeros((10,)).at[7].add(5.0).at[8].add(4.0).at[9].add(3.0).at[2].add(1.0)
    wrapped = FixedLengthSampler(Greedy(), speech_token_size=7)
    assert wrapped.window == 3
    assert Greedy()(scores, None, None).item() == 7
    assert wrapped(scores, None, None).item() == 2


def test_take_exact_closes_the_generator() -> None:
    from bench.fixed_length import take_exact

    closed = []

    def gen():
        try:
            yield from range(100)
        finally:
            closed.append(True)

    assert list(take_exact(gen(), 5)) == [0, 1, 2, 3, 4]
    assert closed == [True]


# --------------------------------------------------------------------------- cases and sweeps


def test_work_of_the_headline_case() -> None:
    w = Work.for_case(Case())
    assert (w.prompt_speech_tokens, w.prompt_mel_frames, w.speech_tokens) == (75, 150, 125)
    assert w.prefill_positions == 120  # 1 sos + 15 prompt text + 28 text + 1 task id + 75 prompt
    a, b = w.inputs(), w.inputs()
    assert all((a[k] == b[k]).all() for k in a)  # seeded: same inputs every call
    assert a["prompt_feat"].shape == (1, 150, 80) and a["embedding"].shape == (1, 192)
    assert Work.for_case(Case(text="long")).speech_tokens == 750


def test_sweep_file_toml_and_json(tmp_path: Path) -> None:
    toml = tmp_path / "s.toml"
    toml.write_text(
        '[sweep]\nllm = ["fp32", "8bit"]\nsteps = [1, 10]\nstream = [false, true]\n'
        '[[case]]\nllm = "4bit"\nsteps = 3\n[run]\nrepeats = 5\n'
    )
    sweep = load_sweep_file(toml)
    assert len(sweep.cases) == 2 * 2 * 2 + 1
    assert sweep.cases[-1] == Case(llm="4bit", steps=3)
    assert sweep.options == {"repeats": 5}
    js = tmp_path / "s.json"
    js.write_text(json.dumps({"sweep": {"steps": [1, 2]}, "case": [{"stream": "on"}]}))
    assert [c.id for c in load_sweep_file(js).cases] == [
        Case(steps=1).id,
        Case(steps=2).id,
        Case(stream=True).id,
    ]
    bad = tmp_path / "bad.toml"
    bad.write_text('[sweep]\ncolour = ["red"]\n')
    with pytest.raises(ValueError, match="colour"):
        load_sweep_file(bad)
    bad.write_text('[sweep]\nllm = ["fp64"]\n')
    with pytest.raises(ValueError, match="fp64"):
        load_sweep_file(bad)


def test_plans() -> None:
    default = default_cases()
    assert default[0] == Case()  # the reference setting first
    assert Case(stream=True) in default
    assert Case(stream=True, first_hop=10, saved=True, final="chunked") in default
    assert {c.steps for c in default} == {1, 3, 5, 10}
    assert {c.llm for c in default} == {"fp32", "8bit", "4bit"}
    assert {c.dtype for c in default} == {"fp32", "bf16"}
    assert {c.flow_bits for c in default} == {None, 16}
    full = full_cases()
    # precisions x steps x texts x streaming, flow/HiFT dtypes, no kernels, low-latency hop
    assert len(full) == len({c.id for c in full}) == 5 * 5 * 3 * 2 + 2 * 2 + 5 + 3
    ref = reference_cases(default_cases())
    assert all(c.target == "official" and c.llm == c.dtype == "fp32" for c in ref)
    assert Case(target="official") in ref and Case(target="official", stream=True) in ref
    assert all(c.first_hop is None and c.kernels == "auto" for c in ref)
    assert all(not c.saved and c.final == "full" for c in ref)
    # optional axes appear in the id only when set, so ids of older runs stay valid
    assert Case().id == "cosyvoice2/llm=fp32/dtype=fp32/steps=10/text=short/stream=off"
    assert Case(stream=True, first_hop=10, kernels="off").id.endswith("/kernels=off/first_hop=10")
    assert Case.from_dict({"first_hop": "official", "stream": "on"}) == Case(stream=True)
    assert Case(stream=True, saved=True, final="chunked").id.endswith("/saved=on/final=chunked")
    assert Case.from_dict({"saved": "on"}) == Case(saved=True)
    with pytest.raises(ValueError):
        Case(first_hop=0)
    with pytest.raises(ValueError, match="final"):
        Case(final="masked")
    proc = _bench("run", "--dry-run", "--reference", "official", "--steps", "1,10")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert Case(steps=1).id in lines and Case(target="official", steps=10).id in lines


def test_toy_first_hop() -> None:
    from bench.toy import ToyTarget

    target = ToyTarget()
    work = Work.for_case(Case(target="toy"), prompt_seconds=1.0)
    chunks = {}
    for hop in (None, 5):
        case = Case(target="toy", stream=True, steps=1, first_hop=hop)
        t = target.run(target.load(case, target.prepare([], {})), case, work)
        assert t.speech_tokens == 125 and t.audio_s == pytest.approx(5.0)
        chunks[hop] = t.chunk_audio_s
    assert chunks[None][0] == pytest.approx(25 * 2 * 480 / 24000)
    assert chunks[5][0] == pytest.approx(5 * 2 * 480 / 24000)
    assert len(chunks[5]) == len(chunks[None]) + 1


def test_playback_gaps() -> None:
    # chunks of 1 s arriving at 2, 2.5, 4.5 s: playback 2-3, 3-4, then a 0.5 s gap
    assert playback_gaps([2.0, 2.5, 4.5], [1.0, 1.0, 1.0]) == [0.0, 0.5]
    assert playback_gaps([1.0], [1.0]) == []


def test_list_and_baseline_commands(toy_run: Path, tmp_path: Path) -> None:
    proc = _bench("list", "--dir", str(toy_run.parent))
    assert proc.returncode == 0 and "toy-run" in proc.stdout and "complete" in proc.stdout
    proc = _bench("show", "toy-run", "--dir", str(toy_run.parent))
    assert proc.returncode == 0 and "SYNTHETIC" in proc.stdout
    assert "first chunk / non-stream" in proc.stdout
    # `compare` without a baseline for this machine kind explains how to store one
    doc = load(toy_run)
    doc["machine"]["kind"] = "no-such-machine-kind"
    path = tmp_path / "other.json"
    write_json_atomic(path, doc)
    proc = _bench("compare", str(path))
    assert proc.returncode == 3 and "python -m bench baseline" in proc.stdout


def test_keep_a_run_and_show_it_by_path_or_id(toy_run: Path, tmp_path: Path, monkeypatch) -> None:
    """`keep` copies a complete run into the kept-runs dir; `show` prints it by path, and a run
    id not in the results dir is looked up among the kept runs; incomplete runs are not kept."""
    import bench.results
    from bench.results import keep_run, resolve_run

    runs = tmp_path / "runs"
    proc = _bench("keep", str(toy_run), "--to", str(runs))
    kept = runs / "toy-run.json"
    assert proc.returncode == 0 and kept.is_file(), proc.stdout + proc.stderr
    assert load(kept) == load(toy_run)
    proc = _bench("show", str(kept))
    assert proc.returncode == 0 and "toy-run" in proc.stdout and "SYNTHETIC" in proc.stdout
    assert _bench("keep", str(toy_run), "--to", str(runs)).returncode == 2  # never overwritten
    monkeypatch.setattr(bench.results, "RUNS", runs)
    assert resolve_run("toy-run", tmp_path / "empty") == kept
    assert resolve_run(str(kept)) == kept
    with pytest.raises(FileNotFoundError):
        resolve_run("no-such-run", tmp_path / "empty")
    doc = load(toy_run)
    doc["status"], doc["run_id"] = "interrupted", "toy-cut"
    cut = tmp_path / "toy-cut.json"
    write_json_atomic(cut, doc)
    with pytest.raises(ValueError, match="interrupted"):
        keep_run(cut, runs)


def test_micro_benchmarks_store_their_json(tmp_path: Path) -> None:
    from bench.micro import run_micro

    pytest.importorskip("pytest_benchmark")
    benches = tmp_path / "benchmarks"
    benches.mkdir()
    (benches / "test_tiny.py").write_text(
        "def test_sum(benchmark):\n    assert benchmark(sum, range(100)) == 4950\n"
    )
    info = run_micro(
        tmp_path / "out",
        "r1",
        ["-p", "no:cacheprovider", "--benchmark-max-time=0.01"],
        bench_dir=benches,
    )
    assert info["returncode"] == 0
    data = json.loads((tmp_path / "out" / info["path"]).read_text())
    (bench,) = data["benchmarks"]
    assert bench["name"] == "test_sum" and bench["stats"]["rounds"] >= 5
    assert run_micro(tmp_path / "out", "r2", bench_dir=tmp_path / "none")["path"] is None


# --------------------------------------------------------------------------- the pipeline


def test_pipeline_fixed_length_tokens(mlx_tiny_dir: Path) -> None:
    import mlx.core as mx

    import cosyvoice2
    from bench.fixed_length import FixedLengthSampler, take_exact
    from cosyvoice2.llm import default_sampler
    from cosyvoice2.model import Prompt

    model = cosyvoice2.load(mlx_tiny_dir)
    work = Work.for_case(Case(), prompt_seconds=1.0)
    x = {k: mx.array(v) for k, v in work.inputs().items()}
    prompt = Prompt(
        x["embedding"],
        x["prompt_text"],
        x["prompt_speech_token"],
        x["prompt_speech_token"],
        x["prompt_feat"],
    )
    size = model.config.llm.speech_token_size
    for n in (1, 23):
        ratio = (n + 0.5) / work.text_tokens
        gen = model.speech_token_stream(
            x["text"],
            prompt,
            seed=3,
            sampling=FixedLengthSampler(default_sampler(model.config.llm), size),
            max_token_text_ratio=ratio,
            min_token_text_ratio=ratio,
        )
        tokens = list(gen)  # the LLM's own max length stops it: exactly n
        assert len(tokens) == n
        assert all(0 <= t < size for t in tokens)
        assert list(take_exact(iter(tokens), n)) == tokens


@pytest.mark.parametrize(
    ("stream", "first_hop", "saved"), [(False, None, False), (True, None, False), (True, 10, True)]
)
def test_pipeline_case_record(
    mlx_tiny_dir: Path, stream: bool, first_hop: int | None, saved: bool
) -> None:
    from bench.interface import Prepared
    from bench.runner import measure_case
    from bench.targets import CosyVoice2Target

    target = CosyVoice2Target()
    prepared = Prepared(
        {"label": "synthetic"}, {"dirs": {"fp32": str(mlx_tiny_dir)}, "load_overrides": {}}
    )
    final = "chunked" if saved else "full"
    case = Case(steps=1, stream=stream, first_hop=first_hop, saved=saved, final=final)
    # 2 s prompt, 60 speech tokens (2.4 s): three streaming chunks on the official schedule
    work = Work(2.0, 2.4, 10, 13, 50, 100, 60)
    record = measure_case(target, prepared, case, work, repeats=1, warmup=int(saved))
    figs = record["figures"]
    assert figs["speech_tokens"]["median"] == 60
    assert figs["audio_s"]["median"] == pytest.approx(60 / 25)
    for name in ("rtf", "ttft_s", "decode_tok_s", "flow_s", "hift_s", "mlx_peak_mb", "load_s"):
        assert name in figs, name
    if stream:
        t = record["calls"][-1]["timings"]
        # official: first hop 25 (+ 3 look-ahead; the prompt's 50 tokens are a multiple of 25),
        # then 25, then the rest (10); first_hop=10: 10, then 15 (back to the 25-token grid
        # at 75), 25, then the rest (10)
        hop = first_hop or 25
        assert t["chunk_audio_s"][0] == pytest.approx((hop * 2 * 480 - 8 * 480) / 24000)
        assert len(t["chunk_times_s"]) == (3 if first_hop is None else 4)
        assert sum(t["chunk_audio_s"]) == pytest.approx(60 / 25)
        assert t["chunk_times_s"] == sorted(t["chunk_times_s"])
        assert figs["first_chunk_s"]["median"] < figs["wall_s"]["median"]
    doc = new_run([case], RunOptions(repeats=1), run_id="p")
    doc["cases"] = [record]
    doc["status"] = "complete"
    assert validate(doc) == []


def test_official_reference_case_record(tiny_official_dir: Path, monkeypatch) -> None:
    """The official PyTorch code on the same tiny weights and work (in this process)."""
    import bench.reference
    from bench.reference import OfficialTarget
    from bench.runner import measure_case

    monkeypatch.setattr(bench.reference, "TORCH_THREADS", 1)
    target = OfficialTarget()
    prepared = target.prepare([], {"size": "tiny"})
    assert prepared.weights["label"] == "synthetic"
    work = Work(2.0, 2.4, 10, 13, 50, 100, 60)
    for stream in (False, True):
        record = measure_case(
            target, prepared, Case(target="official", steps=1, stream=stream), work, 1, 0
        )
        figs = record["figures"]
        assert figs["speech_tokens"]["median"] == 60
        assert figs["audio_s"]["median"] == pytest.approx(60 / 25)
        if stream:
            t = record["calls"][-1]["timings"]
            assert len(t["chunk_times_s"]) == 3
            assert t["chunk_audio_s"][0] == pytest.approx((25 * 2 * 480 - 8 * 480) / 24000)


def test_call_clock_separates_interleaved_stages_and_reports_overlapped_llm_wall_times() -> None:
    """Same thread: decode = token span minus the flow time spent inside it. Tokens pulled by
    another thread (the overlapped LLM): decode = the token span itself."""
    import threading
    import time

    from bench.timing import CallClock

    def run(in_thread: bool):
        clock = CallClock()
        clock.start()
        flow = clock.timed("flow", lambda: time.sleep(0.05))

        def gen():
            for i in range(3):
                time.sleep(0.01)
                yield i

        if in_thread:
            out: list = []
            t = threading.Thread(target=lambda: out.extend(clock.tokens(gen())))
            t.start()
            flow()
            t.join()
        else:
            for _ in clock.tokens(gen()):
                flow()
        return clock.timings(stream=False)

    serial = run(False)
    assert serial.decode_s < 0.1  # two sleeps of 0.01; with the 2 x 0.05 s of flow left in: >= 0.12
    assert "llm_overlapped" not in serial.extra
    overlapped = run(True)
    assert overlapped.extra["llm_overlapped"] == 1.0
    assert overlapped.decode_s >= 0.015 and overlapped.llm_s >= overlapped.decode_s


# ------------------------------------------------------- the official reference against the wheel
#
# bench/reference.py transcribes the official decode loop (to time it token by token) and
# drives the official token2wav on the official streaming schedule. These tests compare
# the transcription with the wheel's own entry points on the tiny synthetic model:
# `CosyVoice2Model.llm_job` (`Qwen2LM.inference` -> `inference_wrapper`) for the tokens,
# `CosyVoice2Model.tts` for the audio. Both sides run the same torch modules in the same
# order, so the clean difference is exactly zero; the power checks put one realistic
# transcription bug into bench/reference.py (never into the wheel).


@pytest.fixture(scope="module")
def official_tiny():
    """The reference's own loader (`OfficialTarget.load`) on the tiny synthetic official dir."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("cosyvoice", reason="the official CosyVoice code is not installed")
    import bench.reference
    from bench.reference import OfficialTarget

    target = OfficialTarget()
    prepared = target.prepare([], {"size": "tiny"})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench.reference, "TORCH_THREADS", 1)  # `load` sets torch's threads
        handle = target.load(Case(target="official", steps=2), prepared)
    assert torch.get_num_threads() == 1
    return handle, Path(prepared.options["official_dir"])


REF_BACKBONE_SCALE = 0.7
"""The Qwen2 backbone's projections are rescaled to N(0, (0.7 / sqrt(fan_in))^2) for the token
comparison (the same module serves both sides, so the comparison stays like for like). With the
official initialisation (std 0.02) the backbone hardly changes the residual stream and the next
token depends on little but the last input: there, a transcription that skips the first prompt
token still yielded all 120 tokens unchanged (measured), so the comparison could not fail. At
this scale the context decides the tokens and the same bug changes 93 of them
(tests/test_llm.py's BACKBONE_SCALE, for the same reason)."""


class _GreedyWithStops:
    """Deterministic stand-in for `Qwen2LM.sampling` on both sides: the arg-max over the speech
    tokens (eos, 6562 and 6563 masked), except a fill token (6563) at the 20th draw and eos once
    120 tokens are out, so that `inference_wrapper`'s skip (`continue`) and stop paths run too."""

    def __init__(self, speech_token_size: int):
        self.s, self.calls = speech_token_size, 0

    def __call__(self, scores, decoded_tokens, sampling):
        import torch

        self.calls += 1
        if self.calls == 20:
            return torch.tensor(self.s + 2)
        if len(decoded_tokens) >= 120:
            return torch.tensor(self.s)
        return torch.tensor(int(scores[: self.s].argmax()))


def _mismatches(a: list[int], b: list[int]) -> int:
    return sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))


def test_official_reference_decode_loop_equals_the_wheels_llm_job(official_tiny) -> None:
    """`official_speech_tokens` (the transcribed `Qwen2LM.inference`) yields the tokens of the
    wheel's `CosyVoice2Model.llm_job` on the same inputs and sampling; a transcription that
    skips the first prompt speech token fails by >= 10 tokens."""
    import math

    import numpy as np
    import torch

    import bench.reference as reference
    from tests.power import assert_power, wrapped

    h, _ = official_tiny
    llm, model = h.llm, h.model
    s = llm.speech_token_size
    rng = np.random.default_rng(5)
    text = torch.tensor(rng.integers(0, 151000, (1, 8)), dtype=torch.int32)  # max 160 tokens
    prompt_text = torch.tensor(rng.integers(0, 151000, (1, 7)), dtype=torch.int32)
    prompt_speech = torch.tensor(rng.integers(0, s, (1, 30)), dtype=torch.int32)

    def wheel() -> list[int]:
        llm.sampling = _GreedyWithStops(s)
        model.tts_speech_token_dict["t"] = []
        model.llm_job(text, prompt_text, prompt_speech, torch.zeros(1, 192), "t")
        return model.tts_speech_token_dict.pop("t")

    def transcribed() -> list[int]:
        llm.sampling = _GreedyWithStops(s)
        with torch.inference_mode():
            return list(reference.official_speech_tokens(llm, text, prompt_text, prompt_speech))

    saved = {k: v.clone() for k, v in llm.llm.state_dict().items()}
    try:
        with torch.no_grad():
            for name, p in llm.llm.model.model.layers.named_parameters():
                if name.endswith(".weight") and "norm" not in name:
                    p.mul_(REF_BACKBONE_SCALE / math.sqrt(p.shape[-1]) / p.std())
        ref = wheel()
        # a reference that looks like decoding: stopped by eos at 120, varied tokens
        assert len(ref) == 120 and len(set(ref)) >= 60, (len(ref), len(set(ref)))

        def skip_first_prompt_token(original):
            return lambda llm_, t, pt, ps: original(llm_, t, pt, ps[:, 1:])

        assert_power(
            "reference decode loop vs wheel llm_job: mismatching tokens of 120",
            lambda: _mismatches(transcribed(), ref),
            0,
            wrapped(reference, "official_lm_input", skip_first_prompt_token),
            "first prompt speech token skipped",
        )
    finally:
        llm.llm.load_state_dict(saved)


def test_official_reference_fixed_length_gives_exactly_the_target(official_tiny) -> None:
    """The bench's fixed length on the transcribed loop: exactly n speech tokens, none >= 6561."""
    import numpy as np
    import torch

    from bench.reference import official_speech_tokens

    h, _ = official_tiny
    s = h.llm.speech_token_size
    rng = np.random.default_rng(6)
    x = [torch.tensor(rng.integers(0, 151000, (1, n)), dtype=torch.int32) for n in (4, 5)]
    prompt_speech = torch.tensor(rng.integers(0, s, (1, 12)), dtype=torch.int32)
    h.llm.sampling = lambda scores, decoded, k: torch.tensor(int(scores.argmax()))
    for n in (1, 9, 90):  # 90 > 20 x 4 text tokens: the official ratio would stop at 80
        with torch.inference_mode():
            toks = list(official_speech_tokens(h.llm, x[0], x[1], prompt_speech, fixed_length=n))
        assert len(toks) == n and all(0 <= t < s for t in toks)


def test_official_reference_qwen2_attention_is_what_from_pretrained_picks(
    official_tiny, tmp_path: Path
) -> None:
    """The reference's backbone runs the attention the wheel's `Qwen2Encoder` gets from
    `Qwen2ForCausalLM.from_pretrained` on the model dir's config (sdpa on this torch), not the
    eager attention that `load_official` builds for the parity tests."""
    import shutil

    import torch
    from cosyvoice.llm.llm import Qwen2Encoder

    h, official_dir = official_tiny
    qwen = h.llm.llm.model
    pretrained = tmp_path / "CosyVoice-BlankEN"
    qwen.save_pretrained(pretrained)
    shutil.copy(official_dir / "CosyVoice-BlankEN" / "config.json", pretrained / "config.json")
    official = Qwen2Encoder(str(pretrained)).model
    picked = official.config._attn_implementation
    assert qwen.config._attn_implementation == picked
    if hasattr(torch.nn.functional, "scaled_dot_product_attention"):
        assert picked == "sdpa"


def _prompt_and_tokens(seed: int, n_prompt: int, n_tokens: int):
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    prompt_token = torch.tensor(rng.integers(0, 6561, (1, n_prompt)), dtype=torch.int32)
    prompt_feat = torch.tensor(rng.standard_normal((1, 2 * n_prompt, 80)).astype(np.float32))
    embedding = torch.tensor(rng.standard_normal((1, 192)).astype(np.float32))
    tokens = [int(t) for t in rng.integers(0, 6561, n_tokens)]
    return prompt_token, prompt_feat, embedding, tokens


def _chunks_max_err(a: list, b: list) -> float:
    import numpy as np

    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf")  # another schedule: other chunks
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


STREAM_TOL = 1e-5
"""Absolute, on the waveform: the same torch modules run the same calls on both sides (clean
error exactly 0), so anything above float32 rounding is a different schedule or call."""


@pytest.mark.parametrize("stream", [True, False])
def test_official_reference_token2wav_schedule_equals_the_wheels_tts(
    official_tiny, stream: bool
) -> None:
    """`OfficialStream` (the reference's token2wav schedule) gives the chunks of the wheel's
    `CosyVoice2Model.tts` on the same tokens (fed as `source_speech_token`, so `tts` runs its own
    loop and thread without the LLM). Streaming: a prompt of 40 tokens (first hop 25 + 10 pad),
    75 tokens: two chunks, then the last call, which `tts` makes with full attention
    (`stream=False, finalize=True`); keeping the chunked attention there fails by >= 10x."""
    import numpy as np
    import torch

    from bench.reference import OfficialStream
    from tests.power import assert_power, patched

    h, _ = official_tiny
    model = h.model
    prompt_token, prompt_feat, embedding, tokens = _prompt_and_tokens(11, 40, 75)

    def wheel() -> list:
        torch.manual_seed(0)  # HiFT's source noise: the same draws in the same order
        with torch.inference_mode():
            out = model.tts(
                text=torch.zeros(1, 1, dtype=torch.int32),
                flow_embedding=embedding,
                flow_prompt_speech_token=prompt_token,
                prompt_speech_feat=prompt_feat,
                source_speech_token=torch.tensor([tokens], dtype=torch.int32),
                stream=stream,
            )
            return [o["tts_speech"].numpy().reshape(-1) for o in out]

    def reference() -> list:
        torch.manual_seed(0)
        with torch.inference_mode():
            s = OfficialStream(model, prompt_token, prompt_feat, embedding, stream)
            out = [w.numpy().reshape(-1) for t in tokens for w in s.push(t)]
            return [*out, s.finish().numpy().reshape(-1)]

    ref = wheel()
    assert len(ref) == (3 if stream else 1)
    wav = np.concatenate(ref)
    rms, peak = float(np.sqrt(np.mean(wav**2))), float(np.max(np.abs(wav)))
    clipped = float(np.mean(np.abs(wav) >= 0.99))
    # a waveform like speech's level, not silence and not HiFT's +-0.99 clamp
    assert 0.02 <= rms <= 0.5 and 0.05 <= peak < 0.99 and clipped < 0.01, (rms, peak, clipped)
    measure = lambda: _chunks_max_err(reference(), ref)  # noqa: E731
    if not stream:
        assert measure() <= STREAM_TOL
        return

    def chunked_last_call(self, toks: list[int], finalize: bool):
        """The earlier transcription: the last streaming call kept `stream=True`."""
        return model.token2wav(
            token=torch.tensor(toks).unsqueeze(dim=0),
            prompt_token=self.prompt_token,
            prompt_feat=self.prompt_feat,
            embedding=self.embedding,
            token_offset=self.token_offset,
            uuid=self.uuid,
            stream=True,
            finalize=finalize,
        )

    assert_power(
        "reference streaming chunks vs wheel tts: max abs wav difference",
        measure,
        STREAM_TOL,
        patched(OfficialStream, "_token2wav", chunked_last_call),
        "last streaming call with chunked attention (stream=True)",
    )


# ------------------------------------------------------------------ machine kind


@pytest.mark.parametrize(
    ("flags", "tier"),
    [
        (set(), "sse"),
        ({"avx2"}, "sse"),  # AVX2 without FMA: not the kernels' avx2 tier
        ({"avx2", "fma"}, "avx2"),  # e.g. AMD Zen 3
        ({"avx2", "fma", "avx512f"}, "avx512"),
        ({"avx2", "fma", "avx512f", "avx512_bf16"}, "avx512bf16"),  # e.g. AMD Zen 4
        ({"avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}, "amx"),
        ({"avx2", "fma", "amx_tile", "amx_bf16"}, "avx2"),  # AMX needs the AVX-512 BF16 tier
    ],
)
def test_cpu_isa_tiers(flags: set[str], tier: str, monkeypatch) -> None:
    from bench import machine

    monkeypatch.setattr(machine.platform, "machine", lambda: "x86_64")
    assert machine.cpu_isa(flags) == tier


@pytest.mark.parametrize(
    ("ids", "generation"),
    [
        ({"vendor": "AuthenticAMD", "family": 25, "model": 1}, "f25"),  # Zen 3 (and Zen 4)
        ({"vendor": "AuthenticAMD", "family": 26, "model": 2}, "f26"),  # Zen 5
        ({"vendor": "GenuineIntel", "family": 6, "model": 143}, "f6m143"),  # Sapphire Rapids
        ({"vendor": "GenuineIntel", "family": 6, "model": 207}, "f6m207"),  # Emerald Rapids
        (None, None),
    ],
)
def test_cpu_generation(ids: dict | None, generation: str | None, monkeypatch) -> None:
    from bench import machine

    monkeypatch.setattr(machine.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(machine, "cpu_ids", lambda: ids)
    assert machine.cpu_generation() == generation


def test_machine_kind_tells_generations_of_one_name_apart(monkeypatch) -> None:
    """Zen 4 and Zen 5 report the same name ("AMD EPYC"), core count and tier: the family
    number makes them two kinds; Zen 3 and Zen 4 share the family, the tier tells them apart."""
    from bench import machine

    monkeypatch.setattr(machine.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(machine, "cpu_model", lambda: "AMD EPYC")
    monkeypatch.setattr(machine, "cpu_count", lambda: 2)
    bf16 = {"avx2", "fma", "avx512f", "avx512_bf16"}
    kinds = {}
    for name, family, flags in (
        ("zen3", 25, {"avx2", "fma"}),
        ("zen4", 25, bf16),
        ("zen5", 26, bf16),
    ):
        ids = {"vendor": "AuthenticAMD", "family": family, "model": 1}
        monkeypatch.setattr(machine, "cpu_ids", lambda ids=ids: ids)
        monkeypatch.setattr(machine, "cpu_flags", lambda flags=flags: flags)
        kinds[name] = machine.machine_kind()
    platform_ = machine.sys.platform.rstrip("0123456789")
    assert kinds == {
        "zen3": f"{platform_}-x86_64-amd-epyc-f25-2c-avx2",
        "zen4": f"{platform_}-x86_64-amd-epyc-f25-2c-avx512bf16",
        "zen5": f"{platform_}-x86_64-amd-epyc-f26-2c-avx512bf16",
    }


def test_cpu_ids_reads_the_first_processor() -> None:
    from bench import machine

    text = (
        "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
        "model name\t: AMD EPYC\n\nprocessor\t: 1\nvendor_id\t: Other\ncpu family\t: 1\n"
    )
    assert machine.cpu_ids(text) == {"vendor": "AuthenticAMD", "family": 26, "model": 2}
    assert machine.cpu_ids("processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\n") is None
    assert machine.cpu_ids("vendor_id\t: X\ncpu family\t: six\nmodel\t: 1\n") is None


def test_machine_kind_names_the_isa_tier() -> None:
    """Two CPUs of one model name and core count but different tiers are different kinds."""
    from bench import machine

    info = machine.machine_info()
    tier = machine.cpu_isa()
    assert info["isa"] == tier
    generation = machine.cpu_generation()
    if generation:
        assert f"-{generation}-{machine.cpu_count()}c" in info["kind"]
    assert set(info["cpu_flags"]) <= set(machine.RECORDED_FLAGS)
    if tier is None:
        assert not info["kind"].endswith(tuple(f"-{t}" for t, _ in machine.ISA_TIERS))
    else:
        assert info["kind"].endswith(f"c-{tier}") and info["kind"] == machine.machine_kind()
