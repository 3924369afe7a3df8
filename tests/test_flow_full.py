"""Full-size (CosyVoice2-0.5B shapes) flow parity against the official code on synthetic weights.

Both sides load the cached synthetic official dir without ONNX files (the
`full_pt_dir` fixture, generated on first use): official `load_official`; ours
`config_from_official_dir` + `sanitize` + strict `load_weights`. The weights are
made realistic as in `tests/test_flow_parity.py` (`realistic_weights`: encoder
attention x3, `encoder_proj` x4, `final_proj` x1.25 with a spectral tilt, identical
on both sides), and each mel reference is checked to look like a real log-mel
before the comparison.

In the default run: `test_full_flow_one_step_matches_official`, the encoder and
one CFG estimator call (`inference` with one Euler step) on 10 prompt and 20 new
tokens, with two power checks (the encoder's relative positions one off; CFG
rate 0.69). Selected with `-m full`: the encoder output, one estimator call, the
final mel at 1, 3 and 10 steps and the official streaming schedule chunk by
chunk, each with its power check.

Tolerance 1e-3 max abs (the claimed mel tolerance) everywhere; each bug must
push the error past 10x that.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from tests.power import assert_power
from tests.test_flow_parity import (
    TOL,
    assert_not_degenerate,
    cfg_rate,
    chunks_parity_error,
    euler_at_step_end,
    flow_parity_error,
    lookahead_token_dropped,
    make_inputs,
    max_err,
    mlx_flow_from_state,
    realistic_weights,
    rel_positions_shifted,
    run_torch_layout,
    time_frequencies_off,
)

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def full_pair(full_pt_dir: Path, torch_threads):
    from cosyvoice2.config import config_from_official_dir
    from cosyvoice2_testing.official import load_official

    cfg = config_from_official_dir(full_pt_dir).flow
    tflow = load_official("flow", full_pt_dir)
    realistic_weights(tflow, "full")
    return cfg, tflow, mlx_flow_from_state(cfg, tflow.state_dict())


def test_full_flow_one_step_matches_official(full_pair) -> None:
    """Default run: encoder + one estimator call at full size, 10 prompt + 20 new tokens."""
    _, tflow, model = full_pair

    def measure() -> float:
        return flow_parity_error(tflow, model, 10, 20, steps=(1,), seed=40, modes=((False, True),))

    assert_power(
        "full-size flow, 1 step (encoder)",
        measure,
        TOL,
        rel_positions_shifted(),
        "relative positions one off",
    )
    assert_power("full-size flow, 1 step (CFM)", measure, TOL, cfg_rate(model), "CFG rate 0.69")


@pytest.mark.full
def test_full_encoder_matches_official(full_pair) -> None:
    import torch

    _, tflow, model = full_pair
    token, ptoken, _, _ = make_inputs(28, 47, seed=20)
    tokens = np.concatenate([ptoken, token], axis=1)
    refs = {}
    with torch.no_grad():
        x = tflow.input_embedding(torch.from_numpy(tokens).long())
        for streaming in (False, True):
            refs[streaming], _ = tflow.encoder(x, torch.tensor([x.shape[1]]), streaming=streaming)
            assert_not_degenerate(refs[streaming].numpy(), "official encoder output")
    x = mx.array(x.numpy())

    def measure() -> float:
        return max(
            max_err(model.encoder(x, streaming=streaming), ref.numpy())
            for streaming, ref in refs.items()
        )

    assert_power(
        "full-size flow encoder",
        measure,
        TOL,
        rel_positions_shifted(),
        "relative positions one off",
    )


@pytest.mark.full
def test_full_estimator_one_call_matches_official(full_pair) -> None:
    import torch

    from tests.test_flow_parity import synthetic_log_mel

    _, tflow, model = full_pair
    rng = np.random.default_rng(21)
    t_len = 151
    mel = synthetic_log_mel(rng, 2 * t_len).reshape(2, t_len, 80).transpose(0, 2, 1)
    z = rng.standard_normal((2, 80, t_len)).astype(np.float32)
    t = np.array([0.5, 0.5], np.float32)
    x = ((1 - t[:, None, None]) * z + t[:, None, None] * mel).astype(np.float32)
    mu = (mel + 0.5 * rng.standard_normal(mel.shape)).astype(np.float32)
    cond = np.where(np.arange(t_len) < 50, mel, 0.0).astype(np.float32)
    spks = rng.standard_normal((2, 80)).astype(np.float32)
    mask = np.ones((2, 1, t_len), np.float32)
    refs = {}
    for streaming in (False, True):
        with torch.no_grad():
            refs[streaming] = tflow.decoder.estimator(
                *(torch.from_numpy(a) for a in (x, mask, mu, t, spks, cond)), streaming=streaming
            ).numpy()
        assert_not_degenerate(refs[streaming], "official velocity", time_axis=2)

    def measure() -> float:
        worst = 0.0
        for streaming, ref in refs.items():
            got = run_torch_layout(model.decoder.estimator, x, None, mu, t, spks, cond, streaming)
            worst = max(worst, max_err(got, ref))
        return worst

    assert_power(
        "full-size estimator, one call",
        measure,
        TOL,
        time_frequencies_off(),
        "time-embedding frequencies log(1e4)/half",
    )


@pytest.mark.full
def test_full_flow_inference_matches_official(full_pair) -> None:
    """1 and 3 steps non-streaming, 10 steps in both modes that CosyVoice2 uses."""
    _, tflow, model = full_pair

    # prompt 28 tokens (56 frames) and 47 new tokens: not multiples of 25
    def measure() -> float:
        short = flow_parity_error(tflow, model, 28, 47, (1, 3), seed=23, modes=((False, True),))
        ten = flow_parity_error(
            tflow, model, 28, 47, (10,), seed=32, modes=((False, True), (True, False))
        )
        return max(short, ten)

    assert_power(
        "full-size flow inference", measure, TOL, euler_at_step_end(), "Euler velocity at t + dt"
    )


@pytest.mark.full
def test_full_flow_streaming_chunks_match_official(full_pair) -> None:
    _, tflow, model = full_pair
    assert_power(
        "full-size streaming flow chunks",
        lambda: chunks_parity_error(tflow, model, 31, 58, seed=30),
        TOL,
        lookahead_token_dropped(),
        "one look-ahead token dropped",
    )
