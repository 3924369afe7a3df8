"""Every precision path of a loaded model against float32, on the tiny random-weight model.

Paths: the speech LM at bfloat16, float16, 8 and 4 bits (`llm_dtype`/`llm_bits` of
`cosyvoice2.load`); the flow with HiFT at bfloat16 and float16 (`set_dtype` after load);
the flow's linear layers at 8 and 4 bits (`flow_bits`, `cosyvoice2.flow.quantize`) on
every compute route, streaming (flow cache) and not, after a bfloat16 cast, and on a
model loaded with `COSYVOICE2_KERNELS=0`; and the CFG rate (`inference_cfg_rate`).

Each bound below is a measured value times a margin (stated at the constant); it
guards against a precision path that stops being that precision (a cast or a
quantisation that does nothing is caught by the structural checks beside it) or that
gets much worse (a wrong scale, group or dtype route: distances of order 1). The tiny
model's weights are drawn with std 1/sqrt(fan-in) (`tests/mlx_tiny.py`), so every
layer shapes the output and a precision error propagates as in a real model.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import cosyvoice2
from bench.fidelity import log_mel_distance
from cosyvoice2 import backend
from cosyvoice2.engine import Prompt
from cosyvoice2.errors import InputError
from cosyvoice2.flow.cache import FlowState, flow_step
from cosyvoice2.flow.ops import linear
from cosyvoice2.flow.quantize import flow_precision, quantize_flow
from cosyvoice2.flow.transformer import BasicTransformerBlock
from cosyvoice2.model import CosyVoice2
from cosyvoice2.options import OptionError
from cosyvoice2.streaming import StreamSchedule
from tests.routes import ROUTES, on_route

STEPS = 2  # Euler steps of every flow run here (the distances hardly depend on it)
GROUP = 32  # the tiny flow's dims are multiples of 32, not all of 64 (the rule: group | in-dim)
# Shorter flow inputs where one is enough, and for the bfloat16 quantised flow (MLX's CPU
# matmul is slow in bfloat16 and its quantised matmul slower still).
SHORT = {"n_tokens": 8, "n_prompt": 2, "steps": 1}

# Speech LM, teacher-forced prefill + 20 cached steps (21 positions), against float32:
# name: (load kwargs, min top-1 agreement, max |logit diff| / std(fp32 logits)).
# Measured (agreement, diff): bf16 (1.0, 0.042), fp16 (1.0, 0.0097), 8-bit (0.952,
# 0.155), 4-bit at group 32 (0.571, 2.19): the random tiny LM's logits have many near
# ties, so a small error flips some top-1s. Floors: 0.9 for the floats (2 flips of 21),
# 0.85 for 8-bit (2 more flips than measured), 0.35 for 4-bit (measured x 0.6);
# ceilings: the measured diff x 2. They catch a cast or quantisation that is skipped
# (diff 0, checked first) or broken (a wrong scale or group: agreement near 0).
LLM_PATHS = {
    "bf16": ({"llm_dtype": "bfloat16"}, 0.9, 0.085),
    "fp16": ({"llm_dtype": "float16"}, 0.9, 0.02),
    "8bit": ({"llm_bits": 8}, 0.85, 0.31),
    "4bit": ({"llm_bits": 4, "group_size": 32}, 0.35, 4.4),
}

# Flow mel (relative L2 to float32, whole utterance, each route): measured 8-bit
# 0.0048 and 4-bit 0.109 on all three routes; bounds = measured x 2. The 8-bit
# distance must also be under a quarter of the 4-bit one (test_flow_bits_are_ordered).
FLOW_BITS_MEL = {8: 0.01, 4: 0.22}
# Streaming (flow cache, hops of 5 tokens) quantised mel against float32 streaming:
# measured 8-bit 0.0052 and 4-bit 0.114; bounds = measured x 2.
FLOW_BITS_STREAM_MEL = {8: 0.011, 4: 0.23}
# A bfloat16 flow, then 8-bit (`SHORT` inputs): measured 0.016 (plain) to 0.024
# (extension, composed); bound = the largest x 2.
BF16_THEN_8BIT_MEL = 0.048
# Flow + HiFT cast to a half dtype: (mel relative L2, audio log-mel distance in nats,
# `bench.fidelity.log_mel_distance`). Measured bf16 (0.0049, 0.0097), fp16 (0.00064,
# 0.0015); bounds = measured x 2.
HALF_FLOW_HIFT = {"bfloat16": (0.01, 0.02), "float16": (0.0013, 0.003)}
# The estimator's transformer projections in bfloat16 (`flow_bits=16`), whole utterance,
# mel relative L2 to float32: measured 0.0018 on every route; bound = measured x 2.
# Every route computes one function per layer (bf16 weights, inputs rounded to bf16,
# float32 sums): a layer's output on each route against that function in float64 within
# BF16_LAYER (float32 summation; a route that skipped or truncated the input rounding is
# off by about 2^-9). Whole mels of two routes are not compared with each other: rounding
# to bf16 turns their float32 differences (1e-7) into bf16-sized ones within a few layers.
BF16_LINEARS_MEL = 0.0036
BF16_LAYER = 1e-5
# The attention of such a block: its products of bf16-rounded queries, keys, values and
# softmax weights (float32 softmax), relative L2 (the weights' rounding boundaries make
# an element-wise bound fragile; see tests/test_kernels.py). Without the rounding of the
# weights the distance is about 1e-3.
BF16_ATTENTION = 1e-4
# CFG rate 0 against the default 0.7 (`SHORT` inputs): measured mel relative L2 0.265;
# it must be at least half of that (a rate that is ignored gives exactly 0).
CFG_ZERO_MIN_MEL = 0.13


def _rel(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(got.astype(np.float64) - ref) / np.linalg.norm(ref))


def _np(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32)).astype(np.float64)


def _quantized(model: CosyVoice2) -> int:
    return sum(1 for _, m in model.flow.named_modules() if isinstance(m, nn.QuantizedLinear))


# ---------------------------------------------------------------------- speech LM


def _llm_logits(model: CosyVoice2, n_steps: int = 20) -> np.ndarray:
    """Logits of the prefill and `n_steps` cached steps fed fixed speech tokens."""
    rng = np.random.default_rng(12)
    llm = model.llm
    text = mx.array(rng.integers(0, 1000, (1, 9)), dtype=mx.int32)
    prompt_text = mx.array(rng.integers(0, 1000, (1, 7)), dtype=mx.int32)
    prompt_speech = mx.array(rng.integers(0, 6561, (1, 25)), dtype=mx.int32)
    steps = rng.integers(0, 6561, n_steps)
    cache = llm.make_cache()
    x = llm.prompt_input(text, prompt_text, prompt_speech)
    out = []
    with backend.active(model.backend):
        for i in range(n_steps + 1):
            out.append(_np(llm.forward_one_step(x, cache)[0]).reshape(-1))
            if i < n_steps:
                x = llm.speech_embedding(mx.array([[int(steps[i])]]))
    return np.stack(out)


@pytest.fixture(scope="module")
def llm_reference(mlx_tiny_dir: Path) -> np.ndarray:
    return _llm_logits(cosyvoice2.load(mlx_tiny_dir))


def _llm_scores(got: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    agree = float(np.mean(got.argmax(-1) == ref.argmax(-1)))
    return agree, float(np.max(np.abs(got - ref)) / ref.std())


@pytest.mark.parametrize("name", list(LLM_PATHS))
def test_llm_precision(mlx_tiny_dir: Path, llm_reference: np.ndarray, name: str) -> None:
    kwargs, min_agree, max_diff = LLM_PATHS[name]
    model = cosyvoice2.load(mlx_tiny_dir, **kwargs)
    assert model.meta["llm_precision"] != {"dtype": "float32"}
    agree, diff = _llm_scores(_llm_logits(model), llm_reference)
    print(f"\n[precision] llm {name}: top-1 agreement {agree:.3f}, max|diff|/std {diff:.4f}")
    assert diff > 0, f"{name}: logits identical to float32: the precision was not applied"
    assert agree >= min_agree, f"{name}: top-1 agreement {agree:.3f} < {min_agree}"
    assert diff <= max_diff, f"{name}: max |logit diff| / std {diff:.4f} > {max_diff}"


# ---------------------------------------------------------------------- flow


def _inputs(n_tokens: int = 20, n_prompt: int = 6) -> tuple[list[int], Prompt]:
    rng = np.random.default_rng(5)
    tokens = [int(t) for t in rng.integers(0, 6561, n_tokens)]
    ptok = mx.array(rng.integers(0, 6561, (1, n_prompt)), dtype=mx.int32)
    prompt = Prompt(
        embedding=mx.array(rng.standard_normal((1, 192)).astype(np.float32)),
        prompt_text=mx.zeros((1, 0), dtype=mx.int32),
        llm_speech_token=ptok,
        flow_speech_token=ptok,
        speech_feat=mx.array(rng.standard_normal((1, 2 * n_prompt, 80)).astype(np.float32)),
    )
    return tokens, prompt


def _mel(model: CosyVoice2, n_tokens: int = 20, n_prompt: int = 6, steps: int = STEPS):
    """The flow's mel for the fixed inputs, whole utterance, on the active route."""
    tokens, p = _inputs(n_tokens, n_prompt)
    mel = model.flow.inference(
        mx.array([tokens], dtype=mx.int32),
        p.flow_speech_token,
        p.speech_feat,
        p.embedding,
        n_timesteps=steps,
    )
    return _np(mel)


class _RecordMels:
    """Collects the mel of every HiFT call of a model (the engine's flow output)."""

    def __init__(self, model: CosyVoice2):
        self.hift, self.mels = model.hift, []

    def __enter__(self) -> _RecordMels:
        inner = self.hift.inference

        def inference(mel, *args, **kwargs):
            self.mels.append(_np(mel))
            return inner(mel, *args, **kwargs)

        self.hift.inference = inference
        return self

    def __exit__(self, *exc) -> None:
        del self.hift.inference  # back to the class method


# Streaming in hops of 5 tokens, the last chunk chunk-masked too: every chunk runs the
# flow cache (`cosyvoice2.flow.cache`) over the chunks before it.
SCHEDULE = StreamSchedule(token_hop_len=5, final_full_attention=False)


def _synth(
    model: CosyVoice2, stream: bool, n_tokens: int = 20
) -> tuple[np.ndarray, np.ndarray, int]:
    """(mel, audio, chunks) of the engine for the fixed inputs (the model's own backend)."""
    tokens, prompt = _inputs(n_tokens)
    with _RecordMels(model) as rec:
        chunks = [
            _np(o["tts_speech"]).reshape(-1)
            for o in model.token2wav_stream(
                iter(tokens), prompt, stream, 1.0, n_timesteps=STEPS, schedule=SCHEDULE
            )
        ]
    return np.concatenate(rec.mels, axis=-1), np.concatenate(chunks), len(chunks)


@pytest.fixture(scope="module")
def fp32(mlx_tiny_dir: Path) -> CosyVoice2:
    return cosyvoice2.load(mlx_tiny_dir)


@pytest.fixture(scope="module")
def quantized(mlx_tiny_dir: Path) -> dict[int, CosyVoice2]:
    return {
        bits: cosyvoice2.load(mlx_tiny_dir, flow_bits=bits, flow_group_size=GROUP)
        for bits in (8, 4)
    }


def _route_mels(model: CosyVoice2) -> dict[str, np.ndarray]:
    """`_mel` of `model` on each compute route this machine has."""
    out = {}
    for route in ROUTES:
        try:
            with on_route(route):
                out[route] = _mel(model)
        except pytest.skip.Exception:
            pass
    return out


@pytest.fixture(scope="module")
def fp32_mels(fp32: CosyVoice2) -> dict[str, np.ndarray]:
    return _route_mels(fp32)


@pytest.fixture(scope="module")
def quantized_mel(quantized: dict[int, CosyVoice2]):
    """`(route, bits) -> mel` of the quantised models, each computed once."""
    cache: dict[tuple[str, int], np.ndarray] = {}

    def mel(route: str, bits: int) -> np.ndarray:
        if (route, bits) not in cache:
            with on_route(route):
                cache[route, bits] = _mel(quantized[bits])
        return cache[route, bits]

    return mel


def test_quantised_flow_is_quantised(quantized: dict[int, CosyVoice2]) -> None:
    """Every linear of the tiny flow (in-dims multiples of 32) is an `nn.QuantizedLinear`
    at the asked bits; embeddings, convolutions and HiFT stay float; the model says so."""
    for bits, model in quantized.items():
        n = _quantized(model)
        assert n > 0 and not any(type(m) is nn.Linear for _, m in model.flow.named_modules())
        assert all(
            m.bits == bits and m.group_size == GROUP
            for _, m in model.flow.named_modules()
            if isinstance(m, nn.QuantizedLinear)
        )
        assert type(model.flow.input_embedding) is nn.Embedding
        assert model.flow.decoder.estimator.final_proj.weight.dtype == mx.float32
        assert not any(isinstance(m, nn.QuantizedLinear) for _, m in model.hift.named_modules())
        record = model.meta["flow_precision"]
        assert record["quantization"] == {
            "bits": bits,
            "group_size": GROUP,
            "quantized_linears": n,
            "float_linears": 0,
        }
        assert model.flow_precision["bits"] == bits and model.flow_precision["dtype"] == "float32"


def test_group_size_leaves_other_dims_float(mlx_tiny_dir: Path) -> None:
    """At group 128 the linears whose input dim is not a multiple of 128 stay float."""
    model = cosyvoice2.load(mlx_tiny_dir, flow_bits=8, flow_group_size=128)
    mods = list(model.flow.named_modules())
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in mods)
    floats = [m for _, m in mods if type(m) is nn.Linear]
    assert floats and all(m.weight.shape[-1] % 128 for m in floats)
    assert model.flow_precision["float_linears"] == len(floats)
    with on_route("composed"):
        assert np.isfinite(_mel(model, **SHORT)).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_flow_bits_mel_on_every_route(quantized_mel, fp32_mels, route: str, bits: int) -> None:
    dist = _rel(quantized_mel(route, bits), fp32_mels[route])
    print(f"\n[precision] flow {bits}-bit ({route}): mel rel L2 {dist:.5f}")
    assert 0 < dist <= FLOW_BITS_MEL[bits], f"{bits}-bit mel rel L2 {dist:.5f}"


def test_flow_bits_are_ordered(quantized_mel, fp32_mels) -> None:
    """8-bit is closer to float32 than 4-bit (a 4-bit path that is not 4-bit would not be)."""
    d8, d4 = (_rel(quantized_mel("composed", b), fp32_mels["composed"]) for b in (8, 4))
    assert d8 < d4 / 4, (d8, d4)


@pytest.mark.parametrize("bits", [8, 4])
def test_flow_bits_streaming(fp32: CosyVoice2, quantized, bits: int) -> None:
    """The streaming flow (flow cache, chunk after chunk) of the quantised model against
    float32 streaming."""
    ref, _, n = _synth(fp32, stream=True)
    assert n >= 3, f"{n} chunks"
    got, audio, _ = _synth(quantized[bits], stream=True)
    dist = _rel(got, ref)
    print(f"\n[precision] flow {bits}-bit streaming: mel rel L2 {dist:.5f}")
    assert np.isfinite(audio).all()
    assert 0 < dist <= FLOW_BITS_STREAM_MEL[bits], f"{bits}-bit streaming mel rel L2 {dist:.5f}"


@pytest.fixture(scope="module")
def bf16_linears(mlx_tiny_dir: Path) -> CosyVoice2:
    return cosyvoice2.load(mlx_tiny_dir, flow_bits=16)


def test_bf16_linears_are_bf16(bf16_linears: CosyVoice2) -> None:
    """The 6 projections of each estimator transformer block hold bfloat16 weights (in
    bf16 pair panels where the extension packed them), nothing else changed; the model
    says so."""
    flow = bf16_linears.flow
    blocks = [m for _, m in flow.named_modules() if isinstance(m, BasicTransformerBlock)]
    targets = [
        m
        for b in blocks
        for m in (b.attn1.to_q, b.attn1.to_k, b.attn1.to_v, b.attn1.to_out[0])
        + (b.ff.net[0].proj, b.ff.net[2])
    ]
    assert blocks and all(m.weight.dtype == mx.bfloat16 for m in targets)
    others = [
        p for n, p in tree_flatten(flow.parameters()) if not any(p is m.weight for m in targets)
    ]
    assert all(p.dtype == mx.float32 for p in others)
    assert flow.encoder_proj.weight.dtype == mx.float32
    record = bf16_linears.meta["flow_precision"]
    assert record["bits"] == 16 and record["bf16_linears"] == len(targets) == 6 * len(blocks)
    assert record["quantization"]["bf16_linears"] == len(targets)
    if bf16_linears.backend.extension is not None:
        assert blocks[0].attn1._fused[2].dtype == mx.bfloat16  # the pair panels


@pytest.fixture(scope="module")
def bf16_linears_mels(bf16_linears: CosyVoice2) -> dict[str, np.ndarray]:
    return _route_mels(bf16_linears)


def test_bf16_linears_mel_on_every_route(bf16_linears_mels, fp32_mels, route: str) -> None:
    if route not in bf16_linears_mels:
        pytest.skip(f"route {route} not available")
    dist = _rel(bf16_linears_mels[route], fp32_mels[route])
    print(f"\n[precision] flow bf16 linears ({route}): mel rel L2 {dist:.5f}")
    assert 0 < dist <= BF16_LINEARS_MEL, f"bf16 linears mel rel L2 {dist:.5f}"


def _bf16_np(a: mx.array) -> np.ndarray:
    return _np(a.astype(mx.bfloat16))


def test_bf16_linear_layers_on_every_route(bf16_linears: CosyVoice2, route: str) -> None:
    """One projection, the fused q/k/v and a whole transformer block (the extension's
    `transformer_block` node) against the bf16-linear function in float64."""
    block = next(
        m for _, m in bf16_linears.flow.named_modules() if isinstance(m, BasicTransformerBlock)
    )
    attn, out = block.attn1, block.attn1.to_out[0]
    rng = np.random.default_rng(3)
    x = mx.array(rng.standard_normal((1, 37, out.weight.shape[1])).astype(np.float32))
    h = mx.array(rng.standard_normal((1, 37, attn.to_q.weight.shape[1])).astype(np.float32))
    qkv_in = mx.array(
        rng.standard_normal((1, 37, 3 * attn.heads * attn.dim_head)).astype(np.float32)
    )
    with on_route(route):
        y = _np(linear(out, x))
        qkv = _np(attn.qkv(h))
        att = _np(attn.attend(qkv_in, [], 0))
    ref = _bf16_np(x) @ _np(out.weight).T + _np(out.bias)
    assert _rel(y, ref) <= BF16_LAYER, _rel(y, ref)
    scale = attn.dim_head**-0.5
    # q's weight scaled in bfloat16, as the fused weight is (exact where the scale is a power of 2)
    wq = _np(attn.to_q.weight * scale)
    w = np.concatenate([wq, _np(attn.to_k.weight), _np(attn.to_v.weight)])
    ref = _bf16_np(h) @ w.T
    assert _rel(qkv, ref) <= BF16_LAYER, _rel(qkv, ref)
    # attention: scores and weighted values of bf16-rounded operands, softmax in float
    hd, dh = attn.heads * attn.dim_head, attn.dim_head
    r = _bf16_np(qkv_in)[0]
    ref = np.zeros((37, hd))
    for i in range(attn.heads):
        q, k, v = (r[:, j * hd + i * dh : j * hd + (i + 1) * dh] for j in range(3))
        s = q @ k.T
        p = np.exp(s - s.max(1, keepdims=True))
        ref[:, i * dh : (i + 1) * dh] = _bf16_np(mx.array(p / p.sum(1, keepdims=True))) @ v
    assert _rel(att[0], ref) <= BF16_ATTENTION, _rel(att[0], ref)


def test_bf16_linears_streaming(fp32: CosyVoice2, bf16_linears: CosyVoice2) -> None:
    """The streaming flow (flow cache: the transformer-block kernel over cached keys and
    values) of the bf16-linear model against float32 streaming, and against its own
    whole-utterance mel."""
    ref, _, n = _synth(fp32, stream=True)
    got, audio, _ = _synth(bf16_linears, stream=True)
    dist = _rel(got, ref)
    print(f"\n[precision] flow bf16 linears streaming: mel rel L2 {dist:.5f}")
    assert n >= 3 and np.isfinite(audio).all()
    assert 0 < dist <= BF16_LINEARS_MEL, dist
    # the flow cache keeps the blocks' keys and values in bf16 (what the bf16 products
    # read), the convolutions' context in float32
    tokens, prompt = _inputs(30)
    for model, dtype in ((bf16_linears, mx.bfloat16), (fp32, mx.float32)):
        _, state = flow_step(
            model.flow,
            FlowState(),
            mx.array([tokens], dtype=mx.int32),
            prompt.speech_feat,
            model.flow.speaker(prompt.embedding),
            STEPS,
            False,
        )
        entries = [e for pair in state.steps for branch in pair for e in branch]
        kv = [b for e in entries if isinstance(e, list) for b in e]
        tails = [e for e in entries if isinstance(e, mx.array)]
        assert kv and tails, "no committed keys/values or convolution context"
        assert all(b.dtype == dtype for b in kv) and all(t.dtype == mx.float32 for t in tails)


@pytest.fixture(scope="module")
def bf16_8bit(mlx_tiny_dir: Path) -> CosyVoice2:
    model = cosyvoice2.load(mlx_tiny_dir)
    model.flow.set_dtype(mx.bfloat16)
    quantize_flow(model.flow, 8, GROUP)
    return model


def test_bf16_then_8bit(fp32: CosyVoice2, bf16_8bit: CosyVoice2, route: str) -> None:
    """A flow cast to bfloat16 and then quantised: scales in bfloat16, every route runs it."""
    precision = flow_precision(bf16_8bit.flow)
    assert precision["dtype"] == "bfloat16" and precision["bits"] == 8
    assert _quantized(bf16_8bit) > 0
    with on_route(route):
        dist = _rel(_mel(bf16_8bit, **SHORT), _mel(fp32, **SHORT))
    print(f"\n[precision] flow bf16 + 8-bit ({route}): mel rel L2 {dist:.5f}")
    assert 0 < dist <= BF16_THEN_8BIT_MEL


def test_kernels_off_at_load(mlx_tiny_dir: Path, fp32: CosyVoice2, monkeypatch) -> None:
    """`COSYVOICE2_KERNELS=0` when the model is loaded: the quantised flow on the backend
    chosen without the extension, through the engine."""
    monkeypatch.setenv("COSYVOICE2_KERNELS", "0")
    model = cosyvoice2.load(mlx_tiny_dir, flow_bits=8, flow_group_size=GROUP)
    assert model.backend.extension is None and _quantized(model) > 0
    monkeypatch.delenv("COSYVOICE2_KERNELS")
    got, _, _ = _synth(model, stream=False)
    ref, _, _ = _synth(fp32, stream=False)
    dist = _rel(got, ref)
    assert 0 < dist <= FLOW_BITS_MEL[8], dist


@pytest.mark.parametrize("dtype", list(HALF_FLOW_HIFT))
def test_half_flow_and_hift(mlx_tiny_dir: Path, fp32: CosyVoice2, dtype: str) -> None:
    model = cosyvoice2.load(mlx_tiny_dir)
    for part in (model.flow, model.hift):
        # no mx.eval here: set_dtype evaluates the cast itself, or the CFG branch threads fail
        part.set_dtype(getattr(mx, dtype))
    assert flow_precision(model.flow)["dtype"] == dtype
    ref_mel, ref_audio, _ = _synth(fp32, stream=False)
    mel, audio, _ = _synth(model, stream=False)
    mel_dist, audio_dist = _rel(mel, ref_mel), log_mel_distance(ref_audio, audio)
    print(f"\n[precision] flow+HiFT {dtype}: mel rel L2 {mel_dist:.5f}, log-mel {audio_dist:.5f}")
    max_mel, max_audio = HALF_FLOW_HIFT[dtype]
    assert audio.shape == ref_audio.shape
    assert 0 < mel_dist <= max_mel and 0 < audio_dist <= max_audio, (mel_dist, audio_dist)


# ---------------------------------------------------------------------- CFG rate


def test_cfg_rate(mlx_tiny_dir: Path, fp32: CosyVoice2) -> None:
    """The official 0.7 given explicitly equals the default bit for bit; 0 differs."""
    same = cosyvoice2.load(mlx_tiny_dir, inference_cfg_rate=0.7)
    zero = cosyvoice2.load(mlx_tiny_dir, inference_cfg_rate=0)
    assert fp32.meta["inference_cfg_rate"] == 0.7 and zero.meta["inference_cfg_rate"] == 0.0
    assert zero.flow_precision["inference_cfg_rate"] == 0.0
    assert fp32.flow.decoder.config.inference_cfg_rate == 0.7  # other instances keep theirs
    with on_route("composed"):
        ref = _mel(fp32, **SHORT)
        assert np.array_equal(_mel(same, **SHORT), ref)
        dist = _rel(_mel(zero, **SHORT), ref)
    print(f"\n[precision] cfg rate 0 vs 0.7: mel rel L2 {dist:.5f}")
    assert dist >= CFG_ZERO_MIN_MEL


# ---------------------------------------------------------------------- bad values and the CLI


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"flow_bits": 3}, "flow_bits"),
        ({"flow_bits": "8"}, "flow_bits"),
        ({"flow_bits": True}, "flow_bits"),
        ({"flow_bits": 8, "flow_group_size": 48}, "flow_group_size"),
        ({"inference_cfg_rate": -0.1}, "inference_cfg_rate"),
        ({"inference_cfg_rate": float("nan")}, "inference_cfg_rate"),
        ({"inference_cfg_rate": float("inf")}, "inference_cfg_rate"),
        ({"inference_cfg_rate": "0.7"}, "inference_cfg_rate"),
        ({"flow_bits": 16, "flow_dtype": "bfloat16"}, "flow_bits"),
        ({"flow_bits": 16, "flow_dtype": "float16"}, "flow_bits"),
    ],
)
def test_bad_values(tmp_path: Path, kwargs: dict, name: str) -> None:
    """Refused before the model is read (the dir need not exist), in one line naming the argument."""
    with pytest.raises(OptionError) as e:
        cosyvoice2.load(tmp_path / "no-such-dir", **kwargs)
    assert e.value.option == name and str(e.value).startswith(name) and "\n" not in str(e.value)


def _cli(args: list, capsys) -> tuple[int, str]:
    from cosyvoice2.cli import main

    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def _synth_args(model: Path, out: Path, prompt: Path) -> list:
    return ["synth", "--model", model, "--text", "Hello.", "--prompt-wav", prompt,
            "--prompt-text", "Hi.", "--out", out, "--steps", 2, "--quiet"]  # fmt: skip


def test_cli_flags(mlx_tiny_dir: Path, prompt_wav: Path, tmp_path: Path, capsys, monkeypatch):
    seen: dict = {}

    def load(path, **kwargs) -> CosyVoice2:
        seen.update(kwargs)
        raise InputError("stopped after load's arguments")

    out = tmp_path / "x.wav"
    with monkeypatch.context() as m:
        m.setattr(cosyvoice2, "load", load)
        code, _ = _cli(
            [*_synth_args(mlx_tiny_dir, out, prompt_wav), "--flow-bits", 4,
             "--inference-cfg-rate", 0.5, "--flow-dtype", "bfloat16"],
            capsys,
        )  # fmt: skip
    assert code == 2
    assert seen == {"flow_bits": 4, "inference_cfg_rate": 0.5, "flow_dtype": "bfloat16"}
    code, err = _cli(
        [*_synth_args(mlx_tiny_dir, out, prompt_wav), "--inference-cfg-rate", -1], capsys
    )
    assert code == 2 and "--inference-cfg-rate" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as e:  # argparse's choices
        _cli([*_synth_args(mlx_tiny_dir, out, prompt_wav), "--flow-bits", 5], capsys)
    assert e.value.code == 2 and "--flow-bits" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        _cli([*_synth_args(mlx_tiny_dir, out, prompt_wav), "--flow-dtype", "bf16"], capsys)
    assert e.value.code == 2 and "--flow-dtype" in capsys.readouterr().err
    assert not out.exists()
