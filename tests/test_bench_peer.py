"""The `mlx-audio-plus` peer bench target (`bench/peer.py`): planning, refusals, the runner's
per-target interpreter, fixed-length masking, the weight checks, the shape adaptation.

Everything here runs offline in the default session except the last test, which makes the
peer's virtualenv (pip, minutes) and times a call on the tiny synthetic weights: it is
marked `full` (selected with `-m full` / `nox -s tests_full`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cases import Case, Work, default_cases, reference_cases
from bench.interface import Prepared, get_target
from bench.runner import RunOptions, execute_case, new_run, worker_env

ROOT = Path(__file__).resolve().parent.parent
PEER = "mlx-audio-plus"


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


# --------------------------------------------------------------------------- planning


def test_peer_target_refuses_what_it_cannot_run() -> None:
    from bench.peer import STREAMING_REASON, PeerTarget

    target = get_target(PEER)
    assert isinstance(target, PeerTarget) and target.name == PEER and target.backend == "mlx"
    for steps in (1, 3, 10):
        for text in ("short", "long"):
            assert target.supports(Case(target=PEER, steps=steps, text=text)) is None
    assert target.supports(Case(target=PEER, stream=True)) == STREAMING_REASON
    assert target.supports(Case(target=PEER, stream=True, first_hop=10)) == STREAMING_REASON
    assert target.supports(Case(target=PEER, first_hop=10)) == STREAMING_REASON
    assert target.supports(Case(target=PEER, final="chunked")) == STREAMING_REASON
    for case in (Case(target=PEER, llm="8bit"), Case(target=PEER, dtype="bf16")):
        assert "fp32 only" in target.supports(case)
    assert "kernels" in target.supports(Case(target=PEER, kernels="off"))
    assert "saved-speaker" in target.supports(Case(target=PEER, saved=True))
    # the harness process never imports the peer's package (it lives in its own venv)
    assert "mlx_audio" not in sys.modules
    assert target.env()["HF_HUB_OFFLINE"] == "1"


def test_reference_plan_adds_peer_twins() -> None:
    sweep = default_cases() + [Case(llm="8bit")]
    twins = reference_cases(sweep, PEER)
    assert all(c.target == PEER and c.llm == c.dtype == "fp32" for c in twins)
    assert all(c.kernels == "auto" and c.first_hop is None and not c.saved for c in twins)
    ids = [c.id for c in twins]
    assert ids == [
        Case(target=PEER).id,
        Case(target=PEER, stream=True).id,  # planned, recorded as unsupported when run
        Case(target=PEER, steps=5).id,
        Case(target=PEER, steps=3).id,
        Case(target=PEER, steps=1).id,
    ]

    proc = _bench("run", "--dry-run", "--reference", PEER, "--steps", "1,10")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert Case(target=PEER, steps=1).id in lines and Case(target=PEER).id in lines
    assert not any(line.startswith("official/") for line in lines)
    proc = _bench("run", "--dry-run", "--reference", f"official,{PEER}", "--quick")
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, proc.stderr
    for target in ("cosyvoice2", "official", PEER):
        assert Case(target=target).id in lines and Case(target=target, stream=True).id in lines
    assert len(lines) == 6 + 1  # six cases and the summary line
    proc = _bench("run", "--dry-run", "--reference", "vox-tts")
    assert proc.returncode != 0 and "vox-tts" in proc.stderr


def _record(case: Case, wall: float, decode_tok_s: float) -> dict:
    figs = {"wall_s": wall, "rtf": wall / 5, "decode_tok_s": decode_tok_s, "flow_s": wall / 2}
    return {
        "id": case.id,
        "settings": case.to_dict(),
        "status": "ok",
        "figures": {k: {"median": v} for k, v in figs.items()},
    }


def test_side_by_side_per_reference() -> None:
    from bench.report import describe, side_by_side

    ours, official, peer = (Case(target=t) for t in ("cosyvoice2", "official", PEER))
    doc = new_run([ours, official, peer], RunOptions(repeats=1), run_id="ratios")
    doc["cases"] = [
        _record(ours, 10.0, 10.0),
        _record(official, 20.0, 4.0),
        _record(peer, 40.0, 5.0),
    ]
    (vs_peer,) = side_by_side(doc, PEER)
    assert vs_peer["case"] == ours.id and vs_peer[PEER] == peer.id
    assert vs_peer["ratios"]["wall_s"] == pytest.approx(0.25)
    assert vs_peer["ratios"]["decode_tok_s"] == pytest.approx(0.5)  # as time per token
    # the peer's case is not one of "ours" against the official code
    (vs_official,) = side_by_side(doc)
    assert vs_official["case"] == ours.id and vs_official["ratios"]["wall_s"] == pytest.approx(0.5)
    text = describe(doc)
    assert "ours / official" in text and f"ours / {PEER}" in text
    assert f"ours / {PEER}" in describe(doc, markdown=True)


# --------------------------------------------------------------------------- the runner


def test_case_workers_run_with_the_targets_interpreter(tmp_path: Path) -> None:
    """`Prepared.options["python"]` picks the worker's interpreter; other targets keep ours."""
    log = tmp_path / "argv.log"
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    target = get_target("toy")
    prepared = Prepared({"label": "synthetic"}, {"python": str(wrapper)})
    case = Case(target="toy", steps=1)
    work = Work.for_case(case, prompt_seconds=1.0)
    opts = RunOptions(repeats=1, warmup=0)
    env = worker_env(target, blas="off")
    record = execute_case(target, prepared, env, case, work, opts)
    assert record["status"] == "ok", record.get("error")
    assert record["env"]["isolated"] is True and record["env"]["python"] == str(wrapper)
    assert log.read_text().split()[:3] == ["-m", "bench.worker", "case"]
    # in this process a foreign interpreter cannot be honoured: the case fails, clearly
    inproc = dataclasses.replace(opts, isolate=False)
    record = execute_case(target, prepared, env, case, work, inproc)
    assert record["status"] == "error" and "--in-process" in record["error"]
    assert len(log.read_text().splitlines()) == 1
    # without the option, the harness's own interpreter runs the case in this process
    record = execute_case(target, Prepared({"label": "synthetic"}), env, case, work, inproc)
    assert record["status"] == "ok" and record["env"]["isolated"] is False


# --------------------------------------------------------------------------- pieces of the target


def test_masked_sampling_draws_speech_tokens_only() -> None:
    import mlx.core as mx

    from bench.peer import _MaskedSampling

    calls = []

    def greedy(scores: mx.array, decoded: list[int], top_k: int) -> int:
        calls.append((list(decoded), top_k))
        return int(mx.argmax(scores).item())

    scores = mx.array([0.0, 1.0, 2.0, 3.0, 4.0, 9.0, 8.0, 7.0])
    assert greedy(scores, [], 25) == 5  # left alone, the best id is not a speech token
    masked = _MaskedSampling(greedy, speech_token_size=5)
    assert masked(scores, [1, 2], 25) == 4
    assert calls[-1] == ([1, 2], 25)


def test_weight_check_catches_missing_and_unused_tensors() -> None:
    import mlx.core as mx

    from bench.peer import check_weights

    w = {k: mx.zeros((2, 2)) for k in ("flow.a.weight", "hift.b.weight", "qwen2.lm_head.weight")}
    pe = mx.zeros((1, 4, 2))
    params = [("flow.a.weight", w["flow.a.weight"]), ("hifigan.b.weight", w["hift.b.weight"])]
    params.append(("flow.encoder.embed.pos_enc.pe", pe))
    check_weights(params, w)  # lm_head unused and the positional table not loaded: fine
    random_init = mx.zeros((2, 2))  # equal values, but not the file's tensor
    with pytest.raises(RuntimeError, match=r"1 parameters not loaded \(flow.a.weight\)"):
        check_weights([("flow.a.weight", random_init), *params[1:]], w)
    with pytest.raises(RuntimeError, match=r"1 tensors unused \(hift.b.weight\)"):
        check_weights([params[0], params[2]], w)


def _official_dir(tmp_path: Path, size: str) -> Path:
    """The config files of a synthetic official dir (no weights; no torch needed)."""
    from cosyvoice2_testing.synthetic import official_yaml_text, qwen_config

    d = tmp_path / size
    (d / "CosyVoice-BlankEN").mkdir(parents=True)
    (d / "cosyvoice2.yaml").write_text(official_yaml_text(size), encoding="utf-8")
    (d / "CosyVoice-BlankEN" / "config.json").write_text(json.dumps(qwen_config(size)))
    return d


def test_shape_adaptation_only_for_non_05b_shapes(tmp_path: Path) -> None:
    from bench.peer import adaptation

    assert adaptation(_official_dir(tmp_path, "full")) == (None, None)
    sections, qwen2 = adaptation(_official_dir(tmp_path, "tiny"))
    assert sections["llm"]["llm_input_size"] == 64
    assert sections["flow"]["decoder"]["channels"] == [64]
    assert sections["flow"]["encoder"]["num_blocks"] == 1
    assert sections["hifigan"]["base_channels"] == 32
    assert qwen2["num_hidden_layers"] == 2 and qwen2["hidden_size"] == 64


def test_qwen2_shapes_patch_is_scoped() -> None:
    import mlx_lm.models.qwen2 as qwen2

    from bench.peer import _qwen2_shapes

    real = qwen2.ModelArgs
    with _qwen2_shapes(None):
        assert qwen2.ModelArgs is real
    with _qwen2_shapes({"num_hidden_layers": 2, "hidden_size": 64}):
        args = qwen2.ModelArgs(
            model_type="qwen2",
            hidden_size=896,
            intermediate_size=4864,
            num_attention_heads=14,
            num_hidden_layers=24,
            num_key_value_heads=2,
            vocab_size=151936,
            rms_norm_eps=1e-6,
        )
        assert (args.num_hidden_layers, args.hidden_size, args.intermediate_size) == (2, 64, 4864)
    assert qwen2.ModelArgs is real


def test_requirements_pin_the_harness_mlx_and_its_mlx_lm_range() -> None:
    from importlib import metadata

    from bench.peer import requirements

    reqs = requirements()
    mlx = "mlx[cpu]" if sys.platform.startswith("linux") else "mlx"
    assert f"{mlx}=={metadata.version('mlx')}" in reqs
    assert "mlx-lm>=0.18,<0.30" in reqs and "transformers>=4.49,<5" in reqs
    assert not any(r.startswith(("mlx-audio", "librosa", "sounddevice")) for r in reqs)


def test_safetensors_keys_reads_the_header(tmp_path: Path) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    from bench.peer import safetensors_keys

    path = tmp_path / "m.safetensors"
    save_file({"hift.conv_pre.weight_g": np.zeros(2, np.float32), "b": np.ones(3)}, str(path))
    assert sorted(safetensors_keys(path)) == ["b", "hift.conv_pre.weight_g"]


# --------------------------------------------------------------------------- the real thing


@pytest.mark.full
def test_peer_case_on_tiny_weights() -> None:
    """Makes the peer venv (pip), converts the tiny synthetic model with mlx-audio-plus's
    converter and times a call in a worker running the venv's python."""
    pytest.importorskip("torch")  # the synthetic official dir is generated with the official code
    pytest.importorskip("cosyvoice", reason="the official CosyVoice code is not installed")
    from bench.peer import PeerTarget

    target = PeerTarget()
    prepared = target.prepare([], {"size": "tiny"})
    assert prepared.weights["adapted"] is True
    assert prepared.versions["mlx-audio-plus"] == "0.1.8"
    assert Path(prepared.options["python"]).exists()
    env = worker_env(target)
    work = Work(2.0, 2.4, 10, 13, 50, 100, 60)
    opts = RunOptions(repeats=1, warmup=0)
    record = execute_case(target, prepared, env, Case(target=PEER, steps=1), work, opts)
    assert record["status"] == "ok", record.get("error")
    figs = record["figures"]
    assert figs["speech_tokens"]["median"] == 60
    assert figs["audio_s"]["median"] == pytest.approx(60 / 25)
    for name in ("rtf", "ttft_s", "decode_tok_s", "flow_s", "hift_s", "mlx_peak_mb", "load_s"):
        assert name in figs, name
    assert record["env"]["openblas_preloaded"] == (
        sys.platform.startswith("linux")
        and os.path.exists("/usr/lib/x86_64-linux-gnu/libopenblas.so.0")
    )
    streaming = execute_case(target, prepared, env, Case(target=PEER, stream=True), work, opts)
    assert streaming["status"] == "unsupported"
