"""Parity of the MLX flow with the official PyTorch flow on the same random weights (tiny sizes).

The official modules are built here from explicit tiny hyperparameters (see
`tiny_flow_config`): the official encoder hard-codes 512 channels for its
`PreLookaheadLayer` and `Upsample1D`, so a runnable official flow needs an
encoder of width 512; the rest is small. Every parameter that the official
initialisation leaves at a constant (norm weights and biases) is perturbed, so
a misplaced bias or norm cannot hide.

Tolerance: 1e-3 max abs (the issue's); measured errors are about 1e-5.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from cosyvoice2.config import CFMConfig, EncoderConfig, EstimatorConfig, FlowConfig
from cosyvoice2.flow import CausalMaskedDiffWithXvec
from cosyvoice2.flow.decoder import ConditionalDecoder

pytestmark = pytest.mark.parity

TOL = 1e-3


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


def build_official_flow(cfg: FlowConfig, seed: int = 0, perturb: bool = True):
    """The official `CausalMaskedDiffWithXvec` with `cfg`'s sizes, random weights from `seed`, eval mode.

    Note: the official `CausalConditionalCFM.__init__` reseeds torch's global generator to 0.
    """
    import torch

    from cosyvoice2.testing.shims import install_shims

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


def max_err(got, ref) -> float:
    return float(
        np.abs(np.asarray(got, dtype=np.float64) - np.asarray(ref, dtype=np.float64)).max()
    )


def official_inference(
    tflow, n_timesteps: int, token, prompt_token, prompt_feat, embedding, streaming, finalize
) -> np.ndarray:
    """Official `flow.inference` with `n_timesteps` (it hard-codes 10), channels-last numpy `(1, T, 80)`."""
    import torch

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
    return feat.numpy().transpose(0, 2, 1)


def make_inputs(n_prompt: int, n_tokens: int, seed: int, vocab: int = 6561):
    rng = np.random.default_rng(seed)
    return (
        rng.integers(0, vocab, (1, n_tokens)).astype(np.int32),
        rng.integers(0, vocab, (1, n_prompt)).astype(np.int32),
        rng.standard_normal((1, 2 * n_prompt, 80)).astype(np.float32),
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


def check_flow_parity(
    tflow,
    model: CausalMaskedDiffWithXvec,
    n_prompt: int,
    n_tokens: int,
    steps: tuple[int, ...],
    seed: int,
    modes: tuple[tuple[bool, bool], ...] = ((False, True), (True, False), (True, True)),
    report: Callable[[str], None] | None = None,
) -> None:
    token, ptoken, pfeat, emb = make_inputs(n_prompt, n_tokens, seed)
    for n in steps:
        for streaming, finalize in modes:
            ref = official_inference(tflow, n, token, ptoken, pfeat, emb, streaming, finalize)
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
                report(f"steps={n} streaming={streaming} finalize={finalize}: {err:.2e}")
            assert err <= TOL, (
                f"steps={n} streaming={streaming} finalize={finalize}: max abs diff {err}"
            )


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pair(torch_threads):
    pytest.importorskip("torch")
    pytest.importorskip("cosyvoice")
    cfg = tiny_flow_config()
    tflow = build_official_flow(cfg, seed=0)
    return cfg, tflow, mlx_flow_from_state(cfg, tflow.state_dict())


# --- tests ----------------------------------------------------------------------------------


def test_official_noise_is_ours(tiny_pair) -> None:
    from cosyvoice2.flow.noise import cfm_noise

    _, tflow, _ = tiny_pair
    ref = tflow.decoder.rand_noise.numpy()
    err = max_err(to_torch_layout(cfm_noise(ref.shape[2])), ref)
    assert err <= 1e-6, f"max abs diff {err}"


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("with_context", [False, True])
def test_encoder_matches_official(tiny_pair, streaming: bool, with_context: bool) -> None:
    import torch

    cfg, tflow, model = tiny_pair
    rng = np.random.default_rng(10)
    n = 61  # tokens, not a multiple of the 25-token chunk
    x = rng.standard_normal((1, n, cfg.encoder.input_size)).astype(np.float32)
    with torch.no_grad():
        if with_context:
            ref, _ = tflow.encoder(
                torch.from_numpy(x[:, :-3]),
                torch.tensor([n]),
                context=torch.from_numpy(x[:, -3:]),
                streaming=streaming,
            )
        else:
            ref, _ = tflow.encoder(torch.from_numpy(x), torch.tensor([n]), streaming=streaming)
    if with_context:
        got = model.encoder(mx.array(x[:, :-3]), mx.array(x[:, -3:]), streaming=streaming)
    else:
        got = model.encoder(mx.array(x), streaming=streaming)
    assert got.shape == tuple(ref.shape)
    err = max_err(got, ref.numpy())
    assert err <= TOL, f"max abs diff {err}"


@pytest.mark.parametrize("streaming", [False, True])
def test_estimator_one_call_matches_official(tiny_pair, streaming: bool) -> None:
    import torch

    _, tflow, model = tiny_pair
    rng = np.random.default_rng(11)
    t_len = 123  # frames: not a multiple of the 50-frame chunk
    x, mu, cond = (rng.standard_normal((2, 80, t_len)).astype(np.float32) for _ in range(3))
    spks = rng.standard_normal((2, 80)).astype(np.float32)
    t = np.array([0.37, 0.37], np.float32)
    mask = np.ones((2, 1, t_len), np.float32)
    mask[1, :, 100:] = 0.0  # one padded batch row exercises the mask path
    with torch.no_grad():
        ref = tflow.decoder.estimator(
            *(torch.from_numpy(a) for a in (x, mask, mu, t, spks, cond)), streaming=streaming
        ).numpy()
    got = model.decoder.estimator(
        to_mlx_layout(x),
        to_mlx_layout(mask),
        to_mlx_layout(mu),
        mx.array(t),
        mx.array(spks),
        to_mlx_layout(cond),
        streaming,
    )
    err = max_err(to_torch_layout(got), ref)
    assert err <= TOL, f"max abs diff {err}"
    # without a mask (all frames valid) the first row is the same computation
    got1 = model.decoder.estimator(
        to_mlx_layout(x[:1]),
        None,
        to_mlx_layout(mu[:1]),
        mx.array(t[:1]),
        mx.array(spks[:1]),
        to_mlx_layout(cond[:1]),
        streaming,
    )
    err = max_err(to_torch_layout(got1), ref[:1])
    assert err <= TOL, f"mask=None: max abs diff {err}"


@pytest.mark.parametrize("steps", [1, 3, 10])
def test_flow_inference_matches_official(tiny_pair, steps: int) -> None:
    _, tflow, model = tiny_pair
    # prompt 13 tokens (26 frames), 31 new tokens: neither is a multiple of 25
    check_flow_parity(tflow, model, n_prompt=13, n_tokens=31, steps=(steps,), seed=steps)


def test_flow_streaming_chunks_match_official(tiny_pair) -> None:
    """The official CosyVoice2 streaming schedule, chunk by chunk, on both sides."""
    _, tflow, model = tiny_pair
    n_prompt, n_tokens = 14, 70
    token, ptoken, pfeat, emb = make_inputs(n_prompt, n_tokens, seed=5)
    calls = streaming_schedule(n_prompt, n_tokens)
    # first hop padded to 36 tokens (14 + 36 = 50), then 25, then a short final chunk of 9
    assert calls == [(39, 0, True, False), (64, 36, True, False), (70, 61, False, True)]
    for used, offset, streaming, finalize in calls:
        ref = official_inference(
            tflow, 10, token[:, :used], ptoken, pfeat, emb, streaming, finalize
        )[:, 2 * offset :]
        got = model.inference(
            mx.array(token[:, :used]),
            mx.array(ptoken),
            mx.array(pfeat),
            mx.array(emb),
            streaming=streaming,
            finalize=finalize,
        )[:, 2 * offset :]
        assert got.shape == ref.shape
        err = max_err(got, ref)
        assert err <= TOL, f"chunk at offset {offset} (finalize={finalize}): max abs diff {err}"


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


def test_non_causal_conditional_decoder_matches_official(torch_threads) -> None:
    """The multi-level Matcha `ConditionalDecoder` (Downsample1D, transposed-conv Upsample1D, GroupNorm)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("cosyvoice")
    from cosyvoice2.testing.shims import install_shims

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
    x, mu, cond = (rng.standard_normal((2, 80, t_len)).astype(np.float32) for _ in range(3))
    spks = rng.standard_normal((2, 80)).astype(np.float32)
    t = np.array([0.2, 0.9], np.float32)
    mask = np.ones((2, 1, t_len), np.float32)
    mask[0, :, 35:] = 0.0
    with torch.no_grad():
        ref = tdec(*(torch.from_numpy(a) for a in (x, mask, mu, t, spks, cond))).numpy()
    got = model(
        to_mlx_layout(x),
        to_mlx_layout(mask),
        to_mlx_layout(mu),
        mx.array(t),
        mx.array(spks),
        to_mlx_layout(cond),
    )
    err = max_err(to_torch_layout(got), ref)
    assert err <= TOL, f"max abs diff {err}"


def test_tiny_official_dir_loads_and_matches(tiny_pt_dir: Path, torch_threads) -> None:
    """The synthetic tiny dir's `flow.pt` through `config_from_official_dir` + `sanitize`."""
    from cosyvoice2.config import config_from_official_dir
    from cosyvoice2.testing.official import load_official

    cfg = config_from_official_dir(tiny_pt_dir).flow
    if cfg.encoder.output_size != 512:
        pytest.skip(
            "the tiny synthetic dir's flow encoder is not 512 wide; the official code hard-codes 512 "
            "channels in PreLookaheadLayer/Upsample1D, so that flow cannot run (see the flow report)"
        )
    tflow = load_official("flow", tiny_pt_dir)
    model = mlx_flow_from_state(cfg, tflow.state_dict())
    check_flow_parity(tflow, model, n_prompt=13, n_tokens=31, steps=(2,), seed=9)
