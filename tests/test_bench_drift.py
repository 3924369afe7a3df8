"""The bench's fidelity figures (`bench.drift`): each case against the reference setting.

On the tiny MLX model (no torch): the teacher-forced greedy choices reproduce a greedy
decode token for token (an off-by-one in the alignment fails), the reference case writes
the reference output and scores zero distance against it, a case with fewer diffusion
steps scores a positive distance, a sweep without the reference case gets a reference
job first, and the first-chunk latency counts to the first 0.2 s of audio.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from bench import drift
from bench.cases import Case, Work
from bench.figures import first_playable_s
from bench.results import validate
from bench.runner import RunOptions, measure_case, new_run, run_sweep

# 2 s prompt, 60 speech tokens (2.4 s of audio)
WORK = Work(2.0, 2.4, 10, 13, 50, 100, 60)


def _prepared(mlx_tiny_dir: Path):
    from bench.interface import Prepared

    return Prepared(
        {"label": "synthetic"}, {"dirs": {"fp32": str(mlx_tiny_dir)}, "load_overrides": {}}
    )


def test_teacher_forced_greedy_reproduces_a_greedy_decode(mlx_tiny_dir: Path) -> None:
    import mlx.core as mx

    import cosyvoice2
    from bench.fixed_length import FixedLengthSampler
    from cosyvoice2.model import Prompt
    from cosyvoice2.sampling import GreedySampler

    model = cosyvoice2.load(mlx_tiny_dir)
    x = {k: mx.array(v) for k, v in WORK.inputs().items()}
    prompt = Prompt(
        x["embedding"], x["prompt_text"], x["prompt_speech_token"], x["prompt_speech_token"], None
    )
    size = model.config.llm.speech_token_size
    n = 30
    ratio = (n + 0.5) / WORK.text_tokens
    tokens = list(
        model.speech_token_stream(
            x["text"],
            prompt,
            seed=0,
            sampling=FixedLengthSampler(GreedySampler(), size),
            max_token_text_ratio=ratio,
            min_token_text_ratio=ratio,
        )
    )
    assert len(tokens) == n
    got = drift.teacher_forced_greedy(model, x, tokens)
    assert got.tolist() == tokens
    assert len(set(tokens)) > 3  # not a constant sequence that any alignment would match


def test_compare_scores_identical_and_different_outputs() -> None:
    rng = np.random.default_rng(0)
    t = np.arange(48000) / 24000
    audio = (0.3 * np.sin(2 * np.pi * 150 * t) + 0.01 * rng.standard_normal(t.size)).astype(
        np.float32
    )
    ref = drift.Output([1, 2, 3, 4], audio, [audio.size], 24000)
    greedy = np.array([1, 2, 3, 4])
    same = drift.compare(ref, greedy, ref, greedy)["figures"]
    assert same["mrstft_distance"] == 0 and same["log_mel_distance"] == 0
    assert same["token_agreement_greedy"] == 1 and same["token_agreement_sampled"] == 1
    noisy = audio + 0.05 * rng.standard_normal(audio.size).astype(np.float32)
    other = drift.Output([1, 2, 9, 9], noisy, [24000, 24000], 24000)
    res = drift.compare(ref, greedy, other, np.array([1, 2, 3, 7]))
    figs, details = res["figures"], res["details"]
    assert figs["mrstft_distance"] > 0.05 and figs["log_mel_distance"] > 0.01
    assert figs["token_agreement_sampled"] == 0.5 and figs["token_agreement_greedy"] == 0.75
    assert details["first_divergence"] == 2
    assert details["clicks"]["points"] == [0, 24000, 48000]


def test_reference_case_then_fewer_steps(mlx_tiny_dir: Path, tmp_path: Path) -> None:
    from bench.targets import CosyVoice2Target

    target, prepared = CosyVoice2Target(), _prepared(mlx_tiny_dir)
    ref_case = Case()
    assert drift.is_reference(ref_case)
    path = drift.reference_path(tmp_path, ref_case, WORK)
    rec = measure_case(target, prepared, ref_case, WORK, 1, 1, reference=str(path))
    assert path.exists()
    f = {k: v["median"] for k, v in rec["figures"].items()}
    assert f["mrstft_distance"] == 0 and f["token_agreement_greedy"] == 1
    assert "prompt_s" not in f  # non-streaming: the peak RSS is the synthesis alone
    assert rec["fidelity"]["reference"] == ref_case.id
    assert "synthetic" in rec["fidelity"]["note"]
    fewer = Case(steps=2)
    rec2 = measure_case(target, prepared, fewer, WORK, 1, 1, reference=str(path))
    f2 = {k: v["median"] for k, v in rec2["figures"].items()}
    assert f2["mrstft_distance"] > 0.01 and f2["log_mel_distance"] > 0
    assert f2["token_agreement_sampled"] == 1  # the same LLM and seed: the same tokens
    doc = new_run([ref_case, fewer], RunOptions(repeats=1), run_id="d")
    doc["cases"], doc["status"] = [rec, rec2], "complete"
    assert validate(doc) == []


@pytest.fixture
def tiny_sweep(mlx_tiny_dir: Path, monkeypatch) -> None:
    """`run_sweep` on the tiny MLX dir with `WORK` for every case, in process."""
    import bench.runner as runner

    prepared = _prepared(mlx_tiny_dir)
    monkeypatch.setattr(
        runner,
        "prepare_target",
        lambda name, cases, opts: (runner.get_target(name), prepared, {}),
    )
    monkeypatch.setattr(runner.Work, "for_case", classmethod(lambda cls, *a, **k: WORK))


def test_sweep_without_the_reference_case_runs_a_reference_job(
    tiny_sweep: None, tmp_path: Path
) -> None:
    cases = [Case(steps=2, stream=True)]
    opts = RunOptions(repeats=1, warmup=1, isolate=False)
    doc = new_run(cases, opts, run_id="r")
    doc = run_sweep(doc, tmp_path / "r.json", progress=False)
    (rec,) = doc["cases"]
    assert rec["status"] == "ok", rec.get("error")
    assert list((tmp_path / "r.outputs").glob("reference-*.npz"))
    f = {k: v["median"] for k, v in rec["figures"].items()}
    assert f["mrstft_distance"] > 0.01
    assert len(rec["fidelity"]["clicks"]["points"]) > 2  # start, the joins, end
    assert doc["fidelity"]["weights"] == "synthetic"
    assert f["new_speaker_first_chunk_s"] >= f["prompt_s"] > 0


def test_a_sweep_without_the_reference_precision_prepares_it(
    mlx_tiny_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """An 8-bit-only sweep still gets its fidelity figures: the target is prepared with the
    reference setting's LLM precision (fp32) too, whose model dir the reference job loads."""
    import bench.runner as runner
    from bench.interface import Prepared

    asked: list[list[str]] = []

    def prepare(name, cases, opts):
        asked.append(sorted({c.llm for c in cases}))
        dirs = {c.llm: str(mlx_tiny_dir) for c in cases}  # only what was asked for
        return (
            runner.get_target(name),
            Prepared({"label": "synthetic"}, {"dirs": dirs, "load_overrides": {}}),
            {},
        )

    monkeypatch.setattr(runner, "prepare_target", prepare)
    monkeypatch.setattr(runner.Work, "for_case", classmethod(lambda cls, *a, **k: WORK))
    opts = RunOptions(repeats=1, warmup=0, isolate=False)
    doc = run_sweep(
        new_run([Case(llm="8bit", steps=2)], opts, run_id="q"), tmp_path / "q.json", False
    )
    assert asked == [["8bit", "fp32"]]
    (rec,) = doc["cases"]
    assert rec["status"] == "ok", rec.get("error")
    assert "mrstft_distance" in rec["figures"]


def test_no_fidelity_option(tiny_sweep: None, tmp_path: Path) -> None:
    opts = RunOptions(repeats=1, warmup=0, isolate=False, fidelity=False)
    doc = run_sweep(new_run([Case(steps=1)], opts, run_id="n"), tmp_path / "n.json", False)
    assert "mrstft_distance" not in doc["cases"][0]["figures"]
    assert not (tmp_path / "n.outputs").exists()


def test_first_playable_counts_to_the_first_fifth_of_a_second() -> None:
    assert first_playable_s([1.0, 2.0, 3.0], [0.04, 0.04, 0.5]) == 3.0
    assert first_playable_s([1.0, 2.0, 3.0], [0.1, 0.1, 0.5]) == 2.0
    assert first_playable_s([1.0, 2.0], [0.24, 0.5]) == 1.0
    assert first_playable_s([1.0, 2.0], [0.05, 0.05]) == 2.0  # shorter in all: the last chunk


def test_flow_bits_and_cfg_axes() -> None:
    from bench.cases import _coerce, product

    c = Case(flow_bits=8, cfg=0.5)
    assert c.id.endswith("/flow_bits=8/cfg=0.5")
    assert Case.from_dict(_coerce({"flow_bits": "4bit", "cfg": "0"})).id.endswith(
        "/flow_bits=4/cfg=0"
    )
    assert Case().id == "cosyvoice2/llm=fp32/dtype=fp32/steps=10/text=short/stream=off"
    assert not drift.is_reference(c) and drift.reference_case(c) == Case()
    fast = Case(stream=True, first_hop=10, saved=True, final="chunked")
    assert drift.reference_case(fast) == Case(stream=True)
    assert drift.is_reference(Case(stream=True))
    assert len(product(flow_bits=[None, 8], cfg=[None, 0.0])) == 4
    for bad in ({"flow_bits": 3}, {"flow_bits": True}, {"cfg": -1.0}, {"cfg": float("nan")}):
        with pytest.raises(ValueError):
            Case(**bad)
    assert dataclasses.replace(c, cfg=None).load_key != c.load_key


def test_cli_axes_and_bad_values() -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]

    def bench(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "bench", "run", "--dry-run", *args],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=120,
        )

    r = bench("--flow-bits", "none,8", "--cfg", "default,0.5", "--steps", "1")
    assert r.returncode == 0, r.stderr
    ids = [line for line in r.stdout.splitlines() if line.startswith("cosyvoice2/")]
    assert len(ids) == 4
    assert "cosyvoice2/llm=fp32/dtype=fp32/steps=1/text=short/stream=off/flow_bits=8/cfg=0.5" in ids
    r = bench()  # the default sweep: the reference setting first, one timed call per case
    assert r.stdout.splitlines()[0] == Case().id
    assert "repeats 1," in r.stdout
    for bad in (["--flow-bits", "3"], ["--cfg", "-1"], ["--cfg", "x"]):
        r = bench(*bad)
        assert r.returncode == 2, (bad, r.returncode, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_quality_step_joins_the_eval_figures(tmp_path: Path, monkeypatch) -> None:
    """`bench run --quality`: each case gets its eval entry and `wer`/`cer`/`sim` figures."""
    import bench.cli as cli
    import bench.quality as quality

    seen = {}

    def fake(model, cases, out_dir, asr, seed, progress):
        seen.update(model=model, ids=[c["id"] for c in cases], asr=asr, out=out_dir)
        return {
            cases[0]["id"]: {"wer": 2.5, "cer": 1.0, "sim": 0.61, "n": 5},
            cases[1]["id"]: {"skipped": "no such setting"},
        }

    monkeypatch.setattr(quality, "run_quality", fake)
    a, b = Case(), Case(steps=1)
    doc = new_run([a, b], RunOptions(repeats=1), run_id="q")
    doc["weights"] = {"label": "real", "path": "/models/cv2"}
    doc["cases"] = [
        {"id": c.id, "status": "ok", "settings": c.to_dict(), "figures": {}} for c in (a, b)
    ]
    path = tmp_path / "q.json"
    cli.run_quality_step(doc, path, "offline:tiny.en")
    assert seen["model"] == "/models/cv2" and seen["ids"] == [a.id, b.id]
    assert seen["out"] == tmp_path / "q.quality"
    first, second = doc["cases"]
    assert {k: first["figures"][k]["median"] for k in ("wer", "cer", "sim")} == {
        "wer": 2.5,
        "cer": 1.0,
        "sim": 0.61,
    }
    assert second["quality"] == {"skipped": "no such setting"} and second["figures"] == {}
    assert path.exists()
    assert cli.quality_mode("real", "auto") and not cli.quality_mode("synthetic", "auto")


def test_sensitive_profile_scales_the_output_layer_and_residual_projections() -> None:
    from cosyvoice2_testing.synthetic import PROFILES, sensitive_llm_state

    one = np.ones(2, dtype=np.float32)
    keys = {
        "llm_decoder.weight": 6.0,
        "llm_decoder.bias": 6.0,
        "llm.model.model.layers.0.self_attn.o_proj.weight": 4.0,
        "llm.model.model.layers.3.mlp.down_proj.weight": 4.0,
        "llm.model.model.layers.0.self_attn.q_proj.weight": 1.0,
        "llm.model.model.layers.0.mlp.up_proj.weight": 1.0,
        "speech_embedding.weight": 1.0,
        "llm.model.model.embed_tokens.weight": 1.0,
    }
    out = sensitive_llm_state({k: one for k in keys})
    assert {k: float(v[0]) for k, v in out.items()} == keys
    assert PROFILES == ("default", "sensitive")


def test_no_prompt_processing_for_a_dir_without_speech_tokenizer() -> None:
    """mlx-audio-plus dirs have no speech tokenizer or CAM++: no `prompt_s`, not a failed case."""
    from types import SimpleNamespace

    from bench.targets import CosyVoice2Target
    from cosyvoice2.mlx_audio_plus import Missing

    def boom(*a, **k):
        raise AssertionError("prompt_from_wav must not be called")

    model = SimpleNamespace(
        speech_tokenizer=Missing(RuntimeError("none")), campplus=object(), prompt_from_wav=boom
    )
    assert CosyVoice2Target().process_prompt(model, WORK) is None


def test_a_bad_reference_file_costs_the_fidelity_figures_not_the_timings(
    mlx_tiny_dir: Path, tmp_path: Path
) -> None:
    from bench.targets import CosyVoice2Target

    case = Case(steps=1)
    path = drift.reference_path(tmp_path, case, WORK)
    path.write_bytes(b"not an npz")
    rec = measure_case(
        CosyVoice2Target(), _prepared(mlx_tiny_dir), case, WORK, 1, 0, reference=str(path)
    )
    assert rec["status"] == "ok" and "rtf" in rec["figures"]
    assert "mrstft_distance" not in rec["figures"]
    assert rec["fidelity"]["reference"] == Case().id and rec["fidelity"]["error"]


def test_a_failed_reference_job_says_why_in_one_line() -> None:
    from bench.runner import _summary

    log = "worker exited with status 1:\nTraceback (most recent call last):\n  ...\nKeyError: 'fp32'\n"
    assert _summary(log) == "worker exited with status 1: ... KeyError: 'fp32'"
    assert _summary("one line") == "one line" and _summary("  \n") == ""


def test_a_combination_load_refuses_is_recorded_unsupported(
    tiny_sweep: None, mlx_tiny_dir: Path, tmp_path: Path
) -> None:
    """`--dtype bf16 --flow-bits 16` (which `cosyvoice2.load` refuses) is an `unsupported`
    record with the reason, not a load that fails with a traceback in every such case."""
    import cosyvoice2
    from bench.targets import CosyVoice2Target
    from cosyvoice2.options import OptionError

    with pytest.raises(OptionError, match="flow_bits 16"):
        cosyvoice2.load(mlx_tiny_dir, flow_dtype="bfloat16", flow_bits=16)
    target = CosyVoice2Target()
    assert target.supports(Case(flow_bits=16)) is None
    assert target.supports(Case(dtype="bf16", flow_bits=8)) is None  # load accepts it:
    cosyvoice2.load(mlx_tiny_dir, flow_dtype="bfloat16", flow_bits=8)
    opts = RunOptions(repeats=1, warmup=0, isolate=False, fidelity=False)
    cases = [Case(dtype="bf16", flow_bits=16), Case(dtype="fp16", flow_bits=16)]
    doc = run_sweep(new_run(cases, opts, run_id="u"), tmp_path / "u.json", False)
    for rec in doc["cases"]:
        assert rec["status"] == "unsupported", rec
        assert "needs dtype fp32" in rec["reason"] and rec["settings"]["dtype"] in rec["reason"]
    assert validate(doc) == []
