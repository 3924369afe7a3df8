"""Full-size (CosyVoice2-0.5B shapes) flow parity against the official code on synthetic weights.

Selected with `-m full`. Uses the cached synthetic official dir without ONNX files
(`cached_official_dir("full", onnx=False)`, generated on first use), loads
`flow.pt` into both sides (official: `load_official`; MLX: `config_from_official_dir`
+ `sanitize` + strict `load_weights`), and compares the encoder output, one
estimator call and the final mel of `inference` at 1, 3 and 10 steps, plus the
official streaming schedule chunk by chunk. Tolerance 1e-3 max abs (the issue's).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from tests.test_flow_parity import (
    TOL,
    check_flow_parity,
    make_inputs,
    max_err,
    mlx_flow_from_state,
    official_inference,
    streaming_schedule,
    to_mlx_layout,
    to_torch_layout,
)

pytestmark = [pytest.mark.full, pytest.mark.parity]


@pytest.fixture(scope="module")
def full_pair(torch_threads):
    pytest.importorskip("torch")
    pytest.importorskip("cosyvoice")
    from cosyvoice2.config import config_from_official_dir
    from cosyvoice2.testing.official import load_official
    from cosyvoice2.testing.synthetic import cached_official_dir

    path = cached_official_dir("full", onnx=False)
    cfg = config_from_official_dir(path).flow
    tflow = load_official("flow", path)
    return cfg, tflow, mlx_flow_from_state(cfg, tflow.state_dict())


def test_full_encoder_matches_official(full_pair) -> None:
    import torch

    cfg, tflow, model = full_pair
    token, ptoken, _, _ = make_inputs(28, 47, seed=20)
    tokens = np.concatenate([ptoken, token], axis=1)
    with torch.no_grad():
        x = tflow.input_embedding(torch.from_numpy(tokens).long())
        for streaming in (False, True):
            ref, _ = tflow.encoder(x, torch.tensor([x.shape[1]]), streaming=streaming)
            got = model.encoder(mx.array(x.numpy()), streaming=streaming)
            err = max_err(got, ref.numpy())
            assert err <= TOL, f"streaming={streaming}: max abs diff {err}"


def test_full_estimator_one_call_matches_official(full_pair) -> None:
    import torch

    _, tflow, model = full_pair
    rng = np.random.default_rng(21)
    t_len = 151
    x, mu, cond = (rng.standard_normal((2, 80, t_len)).astype(np.float32) for _ in range(3))
    spks = rng.standard_normal((2, 80)).astype(np.float32)
    t = np.array([0.5, 0.5], np.float32)
    mask = np.ones((2, 1, t_len), np.float32)
    for streaming in (False, True):
        with torch.no_grad():
            ref = tflow.decoder.estimator(
                *(torch.from_numpy(a) for a in (x, mask, mu, t, spks, cond)), streaming=streaming
            ).numpy()
        got = model.decoder.estimator(
            to_mlx_layout(x),
            None,
            to_mlx_layout(mu),
            mx.array(t),
            mx.array(spks),
            to_mlx_layout(cond),
            streaming,
        )
        err = max_err(to_torch_layout(got), ref)
        assert err <= TOL, (
            f"streaming={streaming}: max abs diff {err} (output max {np.abs(ref).max()})"
        )


@pytest.mark.parametrize("steps", [1, 3, 10])
def test_full_flow_inference_matches_official(full_pair, steps: int) -> None:
    _, tflow, model = full_pair
    # prompt 28 tokens (56 frames) and 47 new tokens: not multiples of 25
    modes = ((False, True), (True, False)) if steps == 10 else ((False, True),)
    check_flow_parity(tflow, model, 28, 47, steps=(steps,), seed=22 + steps, modes=modes)


def test_full_flow_streaming_chunks_match_official(full_pair) -> None:
    _, tflow, model = full_pair
    n_prompt, n_tokens = 31, 58
    token, ptoken, pfeat, emb = make_inputs(n_prompt, n_tokens, seed=30)
    for used, offset, streaming, finalize in streaming_schedule(n_prompt, n_tokens):
        ref = official_inference(
            tflow, 10, token[:, :used], ptoken, pfeat, emb, streaming, finalize
        )
        got = model.inference(
            mx.array(token[:, :used]),
            mx.array(ptoken),
            mx.array(pfeat),
            mx.array(emb),
            streaming=streaming,
            finalize=finalize,
        )
        err = max_err(got[:, 2 * offset :], ref[:, 2 * offset :])
        assert err <= TOL, f"chunk at offset {offset} (finalize={finalize}): max abs diff {err}"
