"""Parity of the MLX flow with the official PyTorch flow on the same random weights (tiny sizes).

The official modules are built here from explicit tiny hyperparameters (see
`tiny_flow_config`): the official encoder hard-codes 512 channels for its
`PreLookaheadLayer` and `Upsample1D`, so a runnable official flow needs an
encoder of width 512; the rest is small. Every parameter that the official
initialisation leaves at a constant (norm weights and biases) is perturbed, so
a misplaced bias or norm cannot hide.

Realistic references. With the official initialisation the flow's output is
the fixed starting noise plus a small velocity (mean 0, std 1.3: nothing like a
log-mel, and a wrong velocity is diluted by the noise both sides share), the
encoder's attention is nearly uniform (a positional bug moves its output by
about the tolerance), and `mu` is small beside the prompt condition (the tokens
hardly shape the mel). `realistic_weights` therefore scales, in the official
module before its weights are copied to ours (identical on both sides), the
encoder's query, key and position projections (x3), `encoder_proj` (x4) and the
estimator's output projection `final_proj` (x1.5 tiny, x1.25 full), whose bias
becomes a spectral tilt. The prompt mel fed as `cond` is a synthetic log-mel
(`synthetic_log_mel`). Every mel reference is checked before the comparison
(`assert_realistic_mel`): 1st and 99th percentiles within [-12, 3] (the
official feature extractor gives log(1e-5) = -11.5 at its floor and about +2 at
speech peaks), mean within [-8, -2] (about -5 on real speech) and a mean
per-bin standard deviation over time of at least 0.5 (1.7 to 2.1 on real
speech). Encoder outputs and velocities are checked to vary over time
(`assert_not_degenerate`).

Tolerance: 1e-3 max abs for every comparison (mel, velocity, encoder output),
the claimed mel tolerance; the clean errors are about 1e-5. The fixed noise is
compared at 1e-6 (float32 rounding of log/cos/sin: 4.8e-7).

Routes and power. The encoder, estimator, CFM, whole-flow, streaming-chunk and
non-causal decoder comparisons run on each compute route (`tests.routes`: the
CPU extension, plain MLX ops with numba, MLX composed ops alone; the official
references are computed once). Every comparison runs, through
`tests.power.assert_power`, once more with one small bug put into our side,
which must push the error past 10x the tolerance: the relative-position table
one position off (encoder), the time embedding's frequencies spaced by log(1e4) / half
instead of / (half - 1) (estimator), the classifier-free guidance rate 0.7 -> 0.69 (CFM), the Euler
steps evaluated at the end of their interval (whole flow), one look-ahead token
dropped (streaming chunks), GroupNorm without torch's channel grouping
(non-causal decoder), convolution kernels flipped in `sanitize` (loading a
model dir), the Box-Muller halves swapped (noise).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from cosyvoice2.config import CFMConfig, EncoderConfig, EstimatorConfig, FlowConfig
from cosyvoice2.flow import CausalMaskedDiffWithXvec, decoder, encoder, flow_matching
from cosyvoice2.flow.conditional_decoder import ConditionalDecoder
from tests.power import assert_power, patched, wrapped
from tests.test_flow_noise import box_muller_halves_swapped

pytestmark = pytest.mark.parity

TOL = 1e-3
NOISE_TOL = 1e-6

LOG_FLOOR = math.log(1e-5)  # the official mel's floor: log(max(x, 1e-5))
MEL_BULK = (-12.0, 3.0)  # where the 1st..99th percentiles of a real log-mel lie
MEL_MEAN = (-8.0, -2.0)
MIN_TIME_STD = 0.5

# `realistic_weights`: encoder query/key/position scale, `encoder_proj` scale, and
# `final_proj` scale per flow size (the mel it gives is checked by `assert_realistic_mel`)
ATTENTION_SCALE = 3.0
MU_SCALE = 4.0
HEAD_SCALE = {"tiny": 1.5, "full": 1.25}


def tiny_flow_config() -> FlowConfig:
    """A small flow the official code can run (encoder width 512 is hard-coded there)."""
    return FlowConfig(
        encoder=EncoderConfig(
            input_size=512,
            output_size=512,
            attention_heads=2,
            linear_units=64,
            num_blocks=1,
            num_up_blocks=4,
        ),
        decoder=CFMConfig(
            estimator=EstimatorConfig(
                channels=(64,), attention_head_dim=32, n_blocks=1, num_mid_blocks=2, num_heads=2
            )
        ),
    )


def _perturb_constants(module, seed: int, scale: float = 0.1) -> None:
    """Add noise to 1-D parameters and biases (initialised to constants by the official code)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 or name.endswith("bias"):
                p.add_(scale * torch.randn(p.shape, generator=g))


def realistic_weights(tflow, size: str, seed: int = 0) -> None:
    """Scale the official flow's random weights in place, before ours copies them (both sides
    get the same weights), so that its encoder attention and its mel look like a trained model's.

    - Encoder attention: the query, key and relative-position projections are
      multiplied by `ATTENTION_SCALE`. With torch's default initialisation the content
      scores' standard deviation is 0.33 and a query's largest attention weight 0.035
      over 60 tokens (uniform: 0.017): positions hardly matter (the relative positions
      one off moved the encoder output by 1.6e-3 only). Scaled: 2.9 and 0.47. The
      estimator's attention (no positions) keeps its initialisation.
    - Tokens: `encoder_proj` (encoder output to `mu`) is multiplied by `MU_SCALE`.
      With the default initialisation `mu` has a standard deviation of 0.57, beside
      a prompt condition of about -5 +- 2.5, so the mel hardly depends on the
      tokens: at full size one look-ahead token dropped moved the streamed mel by
      7e-3 only. Scaled, the tokens shape the mel as they do in the real model.
    - Mel: the estimator's `final_proj` weight is multiplied by `HEAD_SCALE[size]` and
      its bias set to a spectral tilt (-2.5 at the lowest bin to -7.5 at the highest,
      plus noise of std 0.5). Both CFG branches share the bias, so the solved mel's
      mean follows the tilt, and its variation over time comes from the velocity as
      much as from the starting noise. Unscaled, the mel is that noise plus a small
      velocity (mean 0, std 1.3), and a wrong velocity would be diluted by the noise.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    est = tflow.decoder.estimator
    proj = est.final_proj
    n = proj.bias.shape[0]
    with torch.no_grad():
        tflow.encoder_proj.weight.mul_(MU_SCALE)
        for name, m in tflow.encoder.named_modules():
            if name.endswith("self_attn"):
                for lin in (m.linear_q, m.linear_k, m.linear_pos):
                    lin.weight.mul_(ATTENTION_SCALE)
        proj.weight.mul_(HEAD_SCALE[size])
        proj.bias.copy_(torch.linspace(-2.5, -7.5, n) + 0.5 * torch.randn(n, generator=g))


def synthetic_log_mel(rng: np.random.Generator, frames: int) -> np.ndarray:
    """A `(1, frames, 80)` stand-in for a real prompt log-mel: the tilt of `realistic_weights`
    plus noise of std 2, clipped to the official floor and +2.5."""
    tilt = np.linspace(-2.5, -7.5, 80)
    mel = tilt + 2.0 * rng.standard_normal((1, frames, 80))
    return np.clip(mel, LOG_FLOOR, 2.5).astype(np.float32)


def assert_realistic_mel(mel, what: str = "reference mel") -> None:
    """`mel` `(1, T, 80)` is in the range of real log-mels and varies over time (module doc)."""
    a = np.asarray(mel, dtype=np.float64)
    assert a.ndim == 3 and a.shape[-1] == 80 and a.shape[1] >= 2, a.shape
    assert np.isfinite(a).all(), f"{what}: not finite"
    lo, hi = np.percentile(a, [1, 99])
    mean, time_std = a.mean(), a.std(axis=1).mean()
    summary = (
        f"{what}: 1st..99th percentiles {lo:.2f}..{hi:.2f}, mean {mean:.2f}, "
        f"std over time {time_std:.2f} (min {a.min():.2f}, max {a.max():.2f})"
    )
    print(summary)
    assert MEL_BULK[0] <= lo and hi <= MEL_BULK[1], f"not a log-mel range: {summary}"
    assert MEL_MEAN[0] <= mean <= MEL_MEAN[1], f"not a log-mel level: {summary}"
    assert time_std >= MIN_TIME_STD, f"constant over time: {summary}"


def assert_not_degenerate(a, what: str, time_axis: int = 1) -> None:
    """`a` is finite, not ~0 and not constant along `time_axis`."""
    a = np.asarray(a, dtype=np.float64)
    assert np.isfinite(a).all(), f"{what}: not finite"
    std, time_std = a.std(), a.std(axis=time_axis).mean()
    assert std > 0.1 and time_std > 0.1, (
        f"{what}: degenerate (std {std:.3g}, over time {time_std:.3g})"
    )


def build_official_flow(cfg: FlowConfig, seed: int = 0, perturb: bool = True):
    """The official `CausalMaskedDiffWithXvec` with `cfg`'s sizes, random weights from `seed`, eval mode.

    Note: the official `CausalConditionalCFM.__init__` reseeds torch's global generator to 0.
    """
    import torch

    from cosyvoice2_testing.shims import install_shims

    install_shims()
    from cosyvoice.flow.decoder import CausalConditionalDecoder as TDecoder
    from cosyvoice.flow.flow import CausalMaskedDiffWithXvec as TFlow
    from cosyvoice.flow.flow_matching import CausalConditionalCFM as TCFM
    from cosyvoice.transformer.upsample_encoder import UpsampleConformerEncoder as TEncoder
    from omegaconf import DictConfig

    e, d, est = cfg.encoder, cfg.decoder, cfg.decoder.estimator
    torch.manual_seed(seed)
    encoder = TEncoder(
        input_size=e.input_size,
        output_size=e.output_size,
        attention_heads=e.attention_heads,
        linear_units=e.linear_units,
        num_blocks=e.num_blocks,
        dropout_rate=0.1,
        positional_dropout_rate=0.1,
        attention_dropout_rate=0.1,
        normalize_before=e.normalize_before,
        input_layer="linear",
        pos_enc_layer_type=e.pos_enc_layer_type,
        selfattention_layer_type=e.selfattention_layer_type,
        use_cnn_module=False,
        macaron_style=False,
        static_chunk_size=e.static_chunk_size,
    )
    estimator = TDecoder(
        in_channels=est.in_channels,
        out_channels=est.out_channels,
        channels=list(est.channels),
        dropout=0.0,
        attention_head_dim=est.attention_head_dim,
        n_blocks=est.n_blocks,
        num_mid_blocks=est.num_mid_blocks,
        num_heads=est.num_heads,
        act_fn=est.act_fn,
        static_chunk_size=est.static_chunk_size,
        num_decoding_left_chunks=est.num_decoding_left_chunks,
    )
    cfm_params = DictConfig(
        {
            "sigma_min": d.sigma_min,
            "solver": "euler",
            "t_scheduler": d.t_scheduler,
            "training_cfg_rate": 0.2,
            "inference_cfg_rate": d.inference_cfg_rate,
            "reg_loss_type": "l1",
        }
    )
    decoder = TCFM(
        in_channels=d.in_channels,
        cfm_params=cfm_params,
        n_spks=d.n_spks,
        spk_emb_dim=d.spk_emb_dim,
        estimator=estimator,
    )
    flow = TFlow(
        input_size=cfg.input_size,
        output_size=cfg.output_size,
        spk_embed_dim=cfg.spk_embed_dim,
        output_type="mel",
        vocab_size=cfg.vocab_size,
        input_frame_rate=cfg.input_frame_rate,
        only_mask_loss=True,
        token_mel_ratio=cfg.token_mel_ratio,
        pre_lookahead_len=cfg.pre_lookahead_len,
        encoder=encoder,
        decoder=decoder,
    )
    if perturb:
        _perturb_constants(flow, seed + 1)
    return flow.eval()


def mlx_flow_from_state(cfg: FlowConfig, state: dict) -> CausalMaskedDiffWithXvec:
    """The MLX flow loaded (strictly) from an official state dict through `sanitize`."""
    model = CausalMaskedDiffWithXvec(cfg)
    weights = model.sanitize({k: v.detach().cpu().numpy() for k, v in state.items()})
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model


def to_torch_layout(a: mx.array | np.ndarray) -> np.ndarray:
    """Channels-last `(B, T, C)` -> torch `(B, C, T)`."""
    return np.ascontiguousarray(np.asarray(a).transpose(0, 2, 1))


def to_mlx_layout(a) -> mx.array:
    """torch `(B, C, T)` (tensor or array) -> channels-last MLX `(B, T, C)`."""
    a = a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)
    return mx.array(np.ascontiguousarray(a.transpose(0, 2, 1)))


def run_torch_layout(module, x, mask, mu, t, spks, cond, *args) -> np.ndarray:
    """`module(x, mask, mu, t, spks, cond, *args)` (an estimator) on torch-layout numpy
    inputs (`mask` may be None), its output back in torch layout."""
    got = module(
        to_mlx_layout(x),
        None if mask is None else to_mlx_layout(mask),
        to_mlx_layout(mu),
        mx.array(t),
        mx.array(spks),
        to_mlx_layout(cond),
        *args,
    )
    return to_torch_layout(got)


def max_err(got, ref) -> float:
    return float(
        np.abs(np.asarray(got, dtype=np.float64) - np.asarray(ref, dtype=np.float64)).max()
    )


def _memo(tflow) -> dict:
    """Outputs already computed by this official module (its weights never change after
    the fixture builds it; the route-parametrised tests ask for the same references)."""
    return tflow.__dict__.setdefault("_parity_memo", {})


def official_inference(
    tflow, n_timesteps: int, token, prompt_token, prompt_feat, embedding, streaming, finalize
) -> np.ndarray:
    """Official `flow.inference` with `n_timesteps` (it hard-codes 10), channels-last numpy `(1, T, 80)`.

    Memoised per module and inputs.
    """
    import torch

    key = (
        "inference",
        n_timesteps,
        bool(streaming),
        bool(finalize),
        *(np.ascontiguousarray(a).tobytes() for a in (token, prompt_token, prompt_feat, embedding)),
    )
    memo = _memo(tflow)
    if key in memo:
        return memo[key]
    forward = tflow.decoder.forward

    def with_steps(*args, **kwargs):
        return forward(*args, **{**kwargs, "n_timesteps": n_timesteps})

    tflow.decoder.forward = with_steps
    try:
        feat, _ = tflow.inference(
            torch.as_tensor(token),
            torch.tensor([token.shape[1]]),
            torch.as_tensor(prompt_token),
            torch.tensor([prompt_token.shape[1]]),
            torch.as_tensor(prompt_feat),
            torch.tensor([prompt_feat.shape[1]]),
            torch.as_tensor(embedding),
            streaming=streaming,
            finalize=finalize,
        )
    finally:
        del tflow.decoder.forward
    memo[key] = feat.numpy().transpose(0, 2, 1)
    return memo[key]


def make_inputs(n_prompt: int, n_tokens: int, seed: int, vocab: int = 6561):
    """New tokens `(1, n_tokens)`, prompt tokens `(1, n_prompt)`, a synthetic prompt log-mel
    `(1, 2 * n_prompt, 80)` and an x-vector `(1, 192)`."""
    rng = np.random.default_rng(seed)
    return (
        rng.integers(0, vocab, (1, n_tokens)).astype(np.int32),
        rng.integers(0, vocab, (1, n_prompt)).astype(np.int32),
        synthetic_log_mel(rng, 2 * n_prompt),
        rng.standard_normal((1, 192)).astype(np.float32),
    )


def streaming_schedule(n_prompt: int, n_tokens: int, hop: int = 25, lookahead: int = 3):
    """The official CosyVoice2 streaming calls: `(tokens used, token_offset, streaming, finalize)`.

    Hops of `hop` tokens plus `lookahead` (the first hop padded so prompt + hop is a
    multiple of `hop`) with `streaming=True, finalize=False`, then all tokens with
    `finalize=True` and `streaming=False` (the official final call leaves the flag
    at its default).
    """
    pad = -(-n_prompt // hop) * hop - n_prompt
    calls, offset = [], 0
    while True:
        this_hop = hop + pad if offset == 0 else hop
        if n_tokens - offset < this_hop + lookahead:
            break
        calls.append((offset + this_hop + lookahead, offset, True, False))
        offset += this_hop
    calls.append((n_tokens, offset, False, True))
    return calls


MODES = ((False, True), (True, False), (True, True))  # (streaming, finalize)


def flow_parity_error(
    tflow,
    model: CausalMaskedDiffWithXvec,
    n_prompt: int,
    n_tokens: int,
    steps: tuple[int, ...],
    seed: int,
    modes: tuple[tuple[bool, bool], ...] = MODES,
    report: Callable[[str], None] | None = None,
) -> float:
    """The largest max-abs error of our `inference` against the official one over `steps` x
    `modes` (each reference checked by `assert_realistic_mel` first)."""
    token, ptoken, pfeat, emb = make_inputs(n_prompt, n_tokens, seed)
    worst = 0.0
    for n in steps:
        for streaming, finalize in modes:
            ref = official_inference(tflow, n, token, ptoken, pfeat, emb, streaming, finalize)
            label = f"steps={n} streaming={streaming} finalize={finalize}"
            assert_realistic_mel(ref, f"official mel, {label}")
            got = model.inference(
                mx.array(token),
                mx.array(ptoken),
                mx.array(pfeat),
                mx.array(emb),
                streaming=streaming,
                finalize=finalize,
                n_timesteps=n,
            )
            assert got.shape == ref.shape, (got.shape, ref.shape)
            err = max_err(got, ref)
            if report:
                report(f"{label}: {err:.2e}")
            worst = max(worst, err)
    return worst


def chunks_parity_error(tflow, model, n_prompt: int, n_tokens: int, seed: int) -> float:
    """The largest max-abs error over the official streaming schedule's chunks (the frames
    each call adds), 10 steps."""
    token, ptoken, pfeat, emb = make_inputs(n_prompt, n_tokens, seed)
    worst = 0.0
    for used, offset, streaming, finalize in streaming_schedule(n_prompt, n_tokens):
        ref = official_inference(
            tflow, 10, token[:, :used], ptoken, pfeat, emb, streaming, finalize
        )[:, 2 * offset :]
        assert_realistic_mel(ref, f"official chunk at token {offset}")
        got = model.inference(
            mx.array(token[:, :used]),
            mx.array(ptoken),
            mx.array(pfeat),
            mx.array(emb),
            streaming=streaming,
            finalize=finalize,
        )[:, 2 * offset :]
        assert got.shape == ref.shape, (got.shape, ref.shape)
        worst = max(worst, max_err(got, ref))
    return worst


# --- bugs put into our side for the power checks --------------------------------------------


def rel_positions_shifted() -> contextlib.AbstractContextManager:
    """Encoder bug: the relative-position table one position off (row k encodes `T - k`
    instead of `T - 1 - k`)."""
    return wrapped(
        encoder, "rel_position_table", lambda orig: lambda size, d: orig(size + 1, d)[:, :-2]
    )


def time_frequencies_off() -> contextlib.AbstractContextManager:
    """Estimator bug: the sinusoidal time embedding's frequencies spaced by `log(10000) / half`
    instead of the official `/ (half - 1)`."""

    def call(self, x: mx.array, scale: float = 1000.0) -> mx.array:
        half = self.dim // 2
        freqs = mx.exp(mx.arange(half, dtype=mx.float32) * -(math.log(10000) / half))
        emb = scale * x[:, None] * freqs[None]
        return mx.concatenate([mx.sin(emb), mx.cos(emb)], axis=-1)

    return patched(decoder.SinusoidalPosEmb, "__call__", call)


def cfg_rate(model: CausalMaskedDiffWithXvec, rate: float = 0.69):
    """CFM bug: classifier-free guidance at `rate` instead of the configured 0.7."""
    config = dataclasses.replace(model.decoder.config, inference_cfg_rate=rate)
    return patched(model.decoder, "config", config)


def euler_at_step_end() -> contextlib.AbstractContextManager:
    """CFM bug: each Euler step evaluates the velocity at the end of its interval (`t + dt`)."""
    return wrapped(
        flow_matching,
        "euler_times",
        lambda orig: lambda n, scheduler="cosine": [(t + dt, dt) for t, dt in orig(n, scheduler)],
    )


def lookahead_token_dropped() -> contextlib.AbstractContextManager:
    """Streaming bug: the `PreLookaheadLayer` gets one look-ahead token fewer than given
    (zero padding in its place)."""

    def make(orig):
        def call(self, inputs, context=None, cache=None):
            return orig(self, inputs, None if context is None else context[:, :-1], cache)

        return call

    return wrapped(encoder.PreLookaheadLayer, "__call__", make)


@contextlib.contextmanager
def group_norm_not_torch_grouped(model: nn.Module) -> Iterator[None]:
    """Decoder bug: MLX's own GroupNorm grouping (`pytorch_compatible=False`) in every `Block1D`."""
    with contextlib.ExitStack() as stack:
        for _, m in model.named_modules():
            if isinstance(m, nn.GroupNorm):
                stack.enter_context(patched(m, "pytorch_compatible", False))
        yield


def conv_kernels_flipped() -> contextlib.AbstractContextManager:
    """Loading bug: `sanitize` reverses every convolution kernel (correlation vs convolution)."""

    def make(orig):
        def sanitize(self, weights):
            return {k: v[:, ::-1] if v.ndim == 3 else v for k, v in orig(self, weights).items()}

        return sanitize

    return wrapped(CausalMaskedDiffWithXvec, "sanitize", make)


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pair(torch_threads):
    pytest.importorskip("torch")
    pytest.importorskip("cosyvoice")
    cfg = tiny_flow_config()
    tflow = build_official_flow(cfg, seed=0)
    realistic_weights(tflow, "tiny")
    return cfg, tflow, mlx_flow_from_state(cfg, tflow.state_dict())


ENCODER_CASES = tuple((s, c) for s in (False, True) for c in (False, True))  # streaming, context


@pytest.fixture(scope="module")
def encoder_refs(tiny_pair):
    """Input `(1, 61, 512)` (61 tokens: not a multiple of the 25-token chunk) and the official
    encoder's output for each (streaming, with look-ahead context) case."""
    import torch

    cfg, tflow, _ = tiny_pair
    rng = np.random.default_rng(10)
    n = 61
    x = rng.standard_normal((1, n, cfg.encoder.input_size)).astype(np.float32)
    refs = {}
    with torch.no_grad():
        for streaming, with_context in ENCODER_CASES:
            if with_context:
                ref, _ = tflow.encoder(
                    torch.from_numpy(x[:, :-3]),
                    torch.tensor([n]),
                    context=torch.from_numpy(x[:, -3:]),
                    streaming=streaming,
                )
            else:
                ref, _ = tflow.encoder(torch.from_numpy(x), torch.tensor([n]), streaming=streaming)
            refs[streaming, with_context] = ref.numpy()
            assert_not_degenerate(refs[streaming, with_context], "official encoder output")
    return x, refs


@pytest.fixture(scope="module")
def estimator_refs(tiny_pair):
    """Estimator inputs (torch layout, batch 2, 123 frames: not a multiple of the 50-frame
    chunk; the second row padded after frame 100) and the official velocity per `streaming`."""
    import torch

    _, tflow, _ = tiny_pair
    rng = np.random.default_rng(11)
    t_len = 123
    mel = synthetic_log_mel(rng, 2 * t_len).reshape(2, t_len, 80).transpose(0, 2, 1)
    z = rng.standard_normal((2, 80, t_len)).astype(np.float32)
    t = np.array([0.37, 0.37], np.float32)
    x = ((1 - t[:, None, None]) * z + t[:, None, None] * mel).astype(np.float32)
    mu = (mel + 0.5 * rng.standard_normal(mel.shape)).astype(np.float32)
    cond = np.where(np.arange(t_len) < 40, mel, 0.0).astype(np.float32)
    spks = rng.standard_normal((2, 80)).astype(np.float32)
    mask = np.ones((2, 1, t_len), np.float32)
    mask[1, :, 100:] = 0.0  # one padded batch row exercises the mask path
    inputs = (x, mask, mu, t, spks, cond)
    refs = {}
    with torch.no_grad():
        for streaming in (False, True):
            refs[streaming] = tflow.decoder.estimator(
                *(torch.from_numpy(a) for a in inputs), streaming=streaming
            ).numpy()
            assert_not_degenerate(refs[streaming][:, :, :100], "official velocity", time_axis=2)
    return inputs, refs


@pytest.fixture(scope="module")
def cfm_refs(tiny_pair):
    """CFM inputs from the official flow (mu of 13 prompt + 31 new tokens, the projected
    x-vector, the prompt mel padded with zeros; torch layout) and the official mel per
    `streaming`, 10 steps."""
    import torch
    import torch.nn.functional as F

    _, tflow, _ = tiny_pair
    token, ptoken, pfeat, emb = make_inputs(13, 31, seed=4)
    tokens = torch.from_numpy(np.concatenate([ptoken, token], axis=1)).long()
    with torch.no_grad():
        h, _ = tflow.encoder(tflow.input_embedding(tokens), torch.tensor([tokens.shape[1]]))
        mu = tflow.encoder_proj(h).transpose(1, 2).contiguous()
        spks = tflow.spk_embed_affine_layer(F.normalize(torch.from_numpy(emb), dim=1))
    cond = torch.zeros_like(mu)
    cond[:, :, : pfeat.shape[1]] = torch.from_numpy(pfeat).transpose(1, 2)
    mask = torch.ones(1, 1, mu.shape[2])
    refs = {}
    for streaming in (False, True):
        mel, _ = tflow.decoder(mu, mask, 10, spks=spks, cond=cond, streaming=streaming)
        refs[streaming] = mel.numpy().transpose(0, 2, 1)
        assert_realistic_mel(refs[streaming], f"official CFM mel, streaming={streaming}")
    return tuple(a.numpy() for a in (mu, spks, cond)), refs


# --- tests ----------------------------------------------------------------------------------


def test_official_noise_is_ours(tiny_pair) -> None:
    from cosyvoice2.flow.noise import cfm_noise

    _, tflow, _ = tiny_pair
    ref = tflow.decoder.rand_noise.numpy()
    assert_power(
        "CFM starting noise vs the official module's",
        lambda: max_err(to_torch_layout(cfm_noise(ref.shape[2])), ref),
        NOISE_TOL,
        box_muller_halves_swapped(),
        "Box-Muller cos/sin halves swapped",
    )


def test_encoder_matches_official(tiny_pair, encoder_refs, route: str) -> None:
    """The encoder, full and chunk-masked attention, with and without look-ahead context."""
    _, _, model = tiny_pair
    x, refs = encoder_refs

    def measure() -> float:
        worst = 0.0
        for (streaming, with_context), ref in refs.items():
            if with_context:
                got = model.encoder(mx.array(x[:, :-3]), mx.array(x[:, -3:]), streaming=streaming)
            else:
                got = model.encoder(mx.array(x), streaming=streaming)
            assert got.shape == ref.shape
            worst = max(worst, max_err(got, ref))
        return worst

    assert_power(
        f"flow encoder ({route})",
        measure,
        TOL,
        rel_positions_shifted(),
        "relative positions one off",
    )


def test_estimator_one_call_matches_official(tiny_pair, estimator_refs, route: str) -> None:
    """One estimator call: batch 2 with a padded row, and batch 1 without a mask (the
    inference path), full and chunk-masked attention."""
    _, _, model = tiny_pair
    (x, mask, mu, t, spks, cond), refs = estimator_refs
    est = model.decoder.estimator

    def measure() -> float:
        worst = 0.0
        for streaming, ref in refs.items():
            worst = max(
                worst, max_err(run_torch_layout(est, x, mask, mu, t, spks, cond, streaming), ref)
            )
            # without a mask (all frames valid) the first row is the same computation
            x1, mu1, t1, spks1, cond1 = (a[:1] for a in (x, mu, t, spks, cond))
            got1 = run_torch_layout(est, x1, None, mu1, t1, spks1, cond1, streaming)
            worst = max(worst, max_err(got1, ref[:1]))
        return worst

    assert_power(
        f"estimator, one call ({route})",
        measure,
        TOL,
        time_frequencies_off(),
        "time-embedding frequencies log(1e4)/half",
    )


def test_cfm_matches_official(tiny_pair, cfm_refs, route: str) -> None:
    """The CFM loop (10 Euler steps with CFG) on the official flow's own mu, speaker and cond."""
    _, _, model = tiny_pair
    (mu, spks, cond), refs = cfm_refs

    def measure() -> float:
        worst = 0.0
        for streaming, ref in refs.items():
            got = model.decoder(
                to_mlx_layout(mu),
                None,
                10,
                spks=mx.array(spks),
                cond=to_mlx_layout(cond),
                streaming=streaming,
            )
            worst = max(worst, max_err(got, ref))
        return worst

    assert_power(f"CFM, 10 steps ({route})", measure, TOL, cfg_rate(model), "CFG rate 0.69")


def test_flow_inference_matches_official(tiny_pair, route: str) -> None:
    """Whole `inference` at 1, 3 and 10 steps, in the three (streaming, finalize) modes."""
    _, tflow, model = tiny_pair
    # prompt 13 tokens (26 frames), 31 new tokens: neither is a multiple of 25
    assert_power(
        f"flow inference, 1/3/10 steps x 3 modes ({route})",
        lambda: flow_parity_error(tflow, model, 13, 31, steps=(1, 3, 10), seed=3),
        TOL,
        euler_at_step_end(),
        "Euler velocity at t + dt",
    )


def test_flow_streaming_chunks_match_official(tiny_pair, route: str) -> None:
    """The official CosyVoice2 streaming schedule, chunk by chunk, on both sides."""
    _, tflow, model = tiny_pair
    # first hop padded to 36 tokens (14 + 36 = 50), then 25, then a short final chunk of 9
    assert streaming_schedule(14, 70) == [
        (39, 0, True, False),
        (64, 36, True, False),
        (70, 61, False, True),
    ]
    assert_power(
        f"streaming flow chunks ({route})",
        lambda: chunks_parity_error(tflow, model, 14, 70, seed=5),
        TOL,
        lookahead_token_dropped(),
        "one look-ahead token dropped",
    )


def test_lookahead_context_is_used_and_chunks_stay_causal(tiny_pair) -> None:
    """With `finalize=False` the 3 look-ahead tokens are context (not dropped), seen only by later chunks."""
    _, _, model = tiny_pair
    token, ptoken, _, _ = make_inputs(5, 40, seed=7)
    base = model.encode(mx.array(token), mx.array(ptoken), streaming=True, finalize=False)
    assert base.shape[1] == 2 * (5 + 40 - 3)
    other = token.copy()
    other[0, -3:] = (other[0, -3:] + 1) % 6561
    changed = model.encode(mx.array(other), mx.array(ptoken), streaming=True, finalize=False)
    diff = np.abs(np.array(changed - base)).max(axis=(0, 2))
    assert diff[-1] > 1e-3  # the last frames depend on the context tokens
    assert diff[:50].max() == 0.0  # the first 25-token chunk (50 frames) cannot see them
    full = model.encode(mx.array(other), mx.array(ptoken), streaming=False, finalize=False)
    full_base = model.encode(mx.array(token), mx.array(ptoken), streaming=False, finalize=False)
    assert np.abs(np.array(full - full_base))[:, :50].max() > 0.0  # full attention sees everything


@pytest.fixture(scope="module")
def non_causal_pair(torch_threads):
    """The official multi-level Matcha `ConditionalDecoder`, ours loaded from it, inputs and
    the official velocity."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("cosyvoice")
    from cosyvoice2_testing.shims import install_shims

    install_shims()
    from cosyvoice.flow.decoder import ConditionalDecoder as TDecoder

    cfg = EstimatorConfig(
        channels=(32, 48), attention_head_dim=16, n_blocks=1, num_mid_blocks=1, num_heads=2
    )
    torch.manual_seed(3)
    tdec = TDecoder(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        channels=list(cfg.channels),
        dropout=0.0,
        attention_head_dim=cfg.attention_head_dim,
        n_blocks=cfg.n_blocks,
        num_mid_blocks=cfg.num_mid_blocks,
        num_heads=cfg.num_heads,
        act_fn="gelu",
    )
    _perturb_constants(tdec, 4)
    tdec.eval()
    model = ConditionalDecoder(cfg)
    flow_like = CausalMaskedDiffWithXvec.sanitize(
        model, {k: v.numpy() for k, v in tdec.state_dict().items()}
    )
    model.load_weights(list(flow_like.items()), strict=True)
    rng = np.random.default_rng(12)
    t_len = 41  # odd: the upsampled path is cut back to the skip length
    mel = synthetic_log_mel(rng, 2 * t_len).reshape(2, t_len, 80).transpose(0, 2, 1)
    z = rng.standard_normal((2, 80, t_len)).astype(np.float32)
    t = np.array([0.2, 0.9], np.float32)
    x = ((1 - t[:, None, None]) * z + t[:, None, None] * mel).astype(np.float32)
    mu = (mel + 0.5 * rng.standard_normal(mel.shape)).astype(np.float32)
    cond = np.where(np.arange(t_len) < 15, mel, 0.0).astype(np.float32)
    spks = rng.standard_normal((2, 80)).astype(np.float32)
    mask = np.ones((2, 1, t_len), np.float32)
    mask[0, :, 35:] = 0.0
    inputs = (x, mask, mu, t, spks, cond)
    with torch.no_grad():
        ref = tdec(*(torch.from_numpy(a) for a in inputs)).numpy()
    assert_not_degenerate(ref[:, :, :35], "official velocity", time_axis=2)
    return model, inputs, ref


def test_non_causal_conditional_decoder_matches_official(non_causal_pair, route: str) -> None:
    """The multi-level Matcha `ConditionalDecoder` (Downsample1D, transposed-conv Upsample1D, GroupNorm)."""
    model, (x, mask, mu, t, spks, cond), ref = non_causal_pair

    def measure() -> float:
        return max_err(run_torch_layout(model, x, mask, mu, t, spks, cond), ref)

    assert_power(
        f"non-causal ConditionalDecoder ({route})",
        measure,
        TOL,
        group_norm_not_torch_grouped(model),
        "GroupNorm without torch's grouping",
    )


def test_tiny_official_dir_loads_and_matches(tiny_pt_dir: Path, torch_threads) -> None:
    """The synthetic tiny dir's `flow.pt` through `config_from_official_dir` + `sanitize`."""
    from cosyvoice2.config import config_from_official_dir
    from cosyvoice2_testing.official import load_official

    cfg = config_from_official_dir(tiny_pt_dir).flow
    # the official code hard-codes 512 channels in PreLookaheadLayer/Upsample1D
    assert cfg.encoder.output_size == 512, "the tiny synthetic dir's flow must be runnable"
    tflow = load_official("flow", tiny_pt_dir)
    realistic_weights(tflow, "tiny")
    state = tflow.state_dict()
    assert_power(
        "flow from the tiny official dir",
        lambda: flow_parity_error(
            tflow, mlx_flow_from_state(cfg, state), 13, 31, steps=(2,), seed=9
        ),
        TOL,
        conv_kernels_flipped(),
        "sanitize flips convolution kernels",
    )
