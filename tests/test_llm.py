"""`cosyvoice2.llm` without the official code: loading, seeding, prefix reuse, the decode loop, precision.

The model is the tiny shape of the synthetic official dir, initialised in MLX the
way the official code initialises it (Hugging Face Qwen2: normal(0, 0.02)
weights, zero biases, unit norms; torch defaults for `llm_decoder` and the
embeddings), so no torch is needed.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map_with_path

from cosyvoice2.config import LLMConfig, QwenConfig
from cosyvoice2.llm import (
    PromptPrefix,
    Qwen2LM,
    _length_limit,
    cast,
    default_sampler,
    quantize,
    weights_of,
)
from cosyvoice2.sampling import GreedySampler, RasSampler, empty_recent, push_recent
from cosyvoice2_testing.legacy import LegacyDecoder

S = 6561
TINY = LLMConfig(
    llm_input_size=64,
    llm_output_size=64,
    qwen=QwenConfig(
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
)


def random_tiny(seed: int = 0, config: LLMConfig = TINY) -> Qwen2LM:
    """A tiny model with official-like random initialisation (deterministic per seed)."""
    model = Qwen2LM(config)
    d = config.llm_output_size
    names = sorted(k for k, _ in tree_flatten(model.parameters()))
    index = {n: i for i, n in enumerate(names)}

    def init(path: str, p: mx.array) -> mx.array:
        k = mx.random.split(mx.random.key(seed), len(names))[index[path]]
        if path.startswith("llm_decoder."):
            return mx.random.uniform(-1 / math.sqrt(d), 1 / math.sqrt(d), p.shape, key=k)
        if path in ("speech_embedding.weight", "llm_embedding.weight"):
            return mx.random.normal(p.shape, key=k)
        if path.endswith("norm.weight"):
            return mx.ones(p.shape)
        if path.endswith(".bias"):
            return mx.zeros(p.shape)
        return mx.random.normal(p.shape, key=k) * 0.02

    model.update(tree_map_with_path(init, model.parameters()))
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def model() -> Qwen2LM:
    return random_tiny(0)


def inputs(seed: int, n_text: int = 6, n_prompt_text: int = 7, n_prompt_speech: int = 25):
    rng = np.random.default_rng(seed)
    return (
        rng.integers(0, 151000, n_text),
        rng.integers(0, 151000, n_prompt_text),
        rng.integers(0, S, n_prompt_speech),
    )


class NoStopGreedy:
    """Arg-max over the speech tokens only (no eos, 6562, 6563): runs to max_len."""

    window = 0

    def __call__(self, logp: mx.array, recent: mx.array, key: mx.array) -> mx.array:
        return mx.argmax(logp[:S]).astype(mx.int32)


# ---------------------------------------------------------------------- loading


def to_official_keys(weights: dict[str, mx.array]) -> dict[str, np.ndarray]:
    out = {}
    for k, v in weights.items():
        if k.startswith("llm."):
            k = "llm.model.model." + k[len("llm.") :]
        out[k] = np.array(v)
    out["llm.model.lm_head.weight"] = out["llm.model.model.embed_tokens.weight"]
    out["llm.model.model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    return out


def test_sanitize_and_strict_load(model: Qwen2LM) -> None:
    official = to_official_keys(weights_of(model))
    loaded = Qwen2LM.from_weights(TINY, Qwen2LM.sanitize(official))
    x = model.prompt_input(*inputs(0))
    a = model.forward_one_step(x, model.make_cache())
    b = loaded.forward_one_step(x, loaded.make_cache())
    assert mx.array_equal(a, b)
    assert Qwen2LM.sanitize(Qwen2LM.sanitize(official)).keys() == Qwen2LM.sanitize(official).keys()
    broken = Qwen2LM.sanitize(official)
    broken.pop("llm_decoder.bias")
    with pytest.raises(ValueError, match="Missing"):
        Qwen2LM.from_weights(TINY, broken)


def test_input_layout(model: Qwen2LM) -> None:
    text, prompt_text, prompt_speech = inputs(1)
    x = model.prompt_input(text, prompt_text, prompt_speech)
    assert x.shape == (1, 1 + 7 + 6 + 1 + 25, 64)
    emb = model.llm.embed_tokens.weight
    assert mx.array_equal(x[0, 0], model.llm_embedding.weight[0])
    assert mx.array_equal(x[0, 1], emb[int(prompt_text[0])])
    assert mx.array_equal(x[0, 8], emb[int(text[0])])
    assert mx.array_equal(x[0, 14], model.llm_embedding.weight[1])
    assert mx.array_equal(x[0, 15], model.speech_embedding.weight[int(prompt_speech[0])])
    assert model.prompt_input(text, prompt_text, []).shape == (1, 15, 64)


def test_length_limits_use_float32_like_torch() -> None:
    assert _length_limit(7, 20) == 140
    assert _length_limit(10, 2.3) == int(np.float32(10) * np.float32(2.3))
    assert _length_limit(0, 20) == 0


# --------------------------------------------------------------------- decoding


def reference_decode(
    model: Qwen2LM, x: mx.array, sampler, key: mx.array, min_len: int, max_len: int
):
    """The official loop written plainly (no look-ahead), for checking the pipelined one."""
    cache = model.make_cache()
    recent = empty_recent(sampler.window)
    out = []
    for i in range(max_len):
        logp = model.log_probs(x, cache)
        if i < min_len:
            logp = mx.where(mx.arange(logp.shape[0]) == S, -mx.inf, logp)
        key, sub = mx.random.split(key)
        t = sampler(logp, recent, sub).item()
        if t >= S:
            break
        out.append(t)
        recent = push_recent(recent, mx.array(t))
        x = model.speech_embedding(mx.array([[t]]))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pipelined_decode_equals_plain_loop(model: Qwen2LM, seed: int) -> None:
    text, prompt_text, prompt_speech = inputs(seed, n_text=3)
    sampler = RasSampler(top_k=5)
    ours = list(model.inference(text, prompt_text, prompt_speech, sampling=sampler, key=seed))
    x = model.prompt_input(text, prompt_text, prompt_speech)
    ref = reference_decode(model, x, sampler, mx.random.key(seed), 6, 60)
    assert ours == ref
    assert len(ours) > 6


def test_same_seed_same_tokens(model: Qwen2LM) -> None:
    text, prompt_text, prompt_speech = inputs(3, n_text=3)
    a = list(model.inference(text, prompt_text, prompt_speech, key=11))
    b = list(model.inference(text, prompt_text, prompt_speech, key=mx.random.key(11)))
    c = list(model.inference(text, prompt_text, prompt_speech, key=12))
    assert a == b
    assert a != c
    assert all(0 <= t < S for t in a)


def test_max_len(model: Qwen2LM) -> None:
    text, prompt_text, prompt_speech = inputs(4, n_text=3)
    out = list(model.inference(text, prompt_text, prompt_speech, sampling=NoStopGreedy()))
    assert len(out) == 60
    out = list(
        model.inference(
            text, prompt_text, prompt_speech, sampling=NoStopGreedy(), max_token_text_ratio=2.5
        )
    )
    assert len(out) == 7


@pytest.mark.parametrize("stop", [S, S + 1, S + 2])
def test_stop_tokens_and_min_len(stop: int) -> None:
    model = random_tiny(1)
    text, prompt_text, prompt_speech = inputs(5, n_text=4)
    bias = model.llm_decoder.bias
    model.llm_decoder.bias = bias + mx.where(mx.arange(bias.shape[0]) == stop, 100.0, 0.0)
    out = list(model.inference(text, prompt_text, prompt_speech, sampling=GreedySampler()))
    # upstream: eos is masked below min_len (8); 6562/6563 are not, and stop at once
    assert len(out) == (8 if stop == S else 0)
    assert all(t < S for t in out)


def test_legacy_gives_up_on_eos_below_min_len() -> None:
    model = random_tiny(1)
    text, prompt_text, prompt_speech = inputs(5, n_text=4)
    bias = model.llm_decoder.bias
    model.llm_decoder.bias = bias + mx.where(mx.arange(bias.shape[0]) == S, 100.0, 0.0)
    with pytest.raises(RuntimeError, match="trials"):
        list(
            model.inference(
                text, prompt_text, prompt_speech, sampling=GreedySampler(), decoder=LegacyDecoder
            )
        )


def test_behaviour_accepts_upstream_and_points_legacy_to_the_testing_package() -> None:
    model = random_tiny(1)
    text, prompt_text, prompt_speech = inputs(5, n_text=4)
    default = list(model.inference(text, prompt_text, prompt_speech, sampling=GreedySampler()))
    upstream = model.inference(
        text, prompt_text, prompt_speech, sampling=GreedySampler(), behaviour="upstream"
    )
    assert list(upstream) == default
    for call in (model.inference, model.inference_bistream):
        with pytest.raises(ValueError, match="cosyvoice2_testing.legacy.LegacyDecoder"):
            list(call(text, prompt_text, prompt_speech, behaviour="legacy"))
        with pytest.raises(ValueError, match="must be 'upstream'"):
            list(call(text, prompt_text, prompt_speech, behaviour="upstreem"))
    with pytest.raises(ValueError, match="LegacyDecoder"):
        default_sampler(model.config, "legacy")


# --------------------------------------------------------------------- prefixes


@pytest.mark.parametrize("sampler", [NoStopGreedy(), RasSampler()], ids=["greedy", "ras"])
def test_prefix_reuse_gives_identical_tokens(model: Qwen2LM, sampler, tmp_path) -> None:
    text, prompt_text, prompt_speech = inputs(
        6, n_text=5 if isinstance(sampler, NoStopGreedy) else 3
    )
    fresh = list(model.inference(text, prompt_text, prompt_speech, sampling=sampler, key=5))
    prefix = model.make_prefix(prompt_text)
    assert prefix.length == 1 + len(prompt_text)
    saved_keys = [np.array(c.keys[..., : c.offset, :]) for c in prefix.cache]
    first = list(model.inference(text, None, prompt_speech, sampling=sampler, key=5, prefix=prefix))
    again = list(
        model.inference(text, prompt_text, prompt_speech, sampling=sampler, key=5, prefix=prefix)
    )
    assert first == fresh and again == fresh
    assert len(fresh) >= 100 or not isinstance(sampler, NoStopGreedy)
    for c, k in zip(prefix.cache, saved_keys):  # decoding did not touch the saved prefix
        assert c.offset == len(prompt_text) + 1
        np.testing.assert_array_equal(np.array(c.keys[..., : c.offset, :]), k)
    path = tmp_path / "prefix.safetensors"
    prefix.save(path)
    loaded = PromptPrefix.load(path)
    assert loaded.prompt_text == tuple(int(t) for t in prompt_text)
    assert (
        list(model.inference(text, None, prompt_speech, sampling=sampler, key=5, prefix=loaded))
        == fresh
    )
    other_text = inputs(7, n_text=2)[0]
    with_other = list(
        model.inference(other_text, None, prompt_speech, sampling=sampler, key=5, prefix=prefix)
    )
    assert with_other == list(
        model.inference(other_text, prompt_text, prompt_speech, sampling=sampler, key=5)
    )


def test_prefix_logits_close_to_recomputed(model: Qwen2LM) -> None:
    text, prompt_text, prompt_speech = inputs(8)
    full = model.forward_one_step(
        model.prompt_input(text, prompt_text, prompt_speech), model.make_cache()
    )
    prefix = model.make_prefix(prompt_text)
    rest = mx.concatenate(
        [model.embed_text(text), model.special_embedding(1), model.embed_speech(prompt_speech)],
        axis=1,
    )
    split = model.forward_one_step(rest, prefix.fresh_cache())
    assert float(mx.abs(full - split).max()) <= 1e-5


def test_prefix_for_other_prompt_is_refused(model: Qwen2LM) -> None:
    text, prompt_text, prompt_speech = inputs(9)
    prefix = model.make_prefix(prompt_text)
    with pytest.raises(ValueError, match="different prompt_text"):
        next(model.inference(text, prompt_text[:-1], prompt_speech, prefix=prefix))


# --------------------------------------------------------------------- bistream


def test_bistream_is_seeded_and_capped(model: Qwen2LM) -> None:
    text, prompt_text, prompt_speech = inputs(10, n_text=12)
    chunks = [text[:5], text[5:9], text[9:]]
    no_6562 = model.llm_decoder.bias + mx.where(mx.arange(S + 3) >= S + 1, -100.0, 0.0)
    model.llm_decoder.bias, saved = no_6562, model.llm_decoder.bias
    try:
        kw = dict(key=3, max_token_text_ratio=4)
        a = list(model.inference_bistream(iter(chunks), prompt_text, prompt_speech, **kw))
        b = list(model.inference_bistream(iter(chunks), prompt_text, prompt_speech, **kw))
        c = list(
            model.inference_bistream(iter(chunks), prompt_text, prompt_speech, max_tokens=17, **kw)
        )
    finally:
        model.llm_decoder.bias = saved
    assert a == b and 17 < len(a) <= 12 * 4
    assert c == a[:17]


def test_bistream_raises_on_6562(model: Qwen2LM) -> None:
    text, prompt_text, prompt_speech = inputs(11, n_text=12)
    boost = model.llm_decoder.bias + mx.where(mx.arange(S + 3) == S + 1, 100.0, 0.0)
    model.llm_decoder.bias, saved = boost, model.llm_decoder.bias
    try:
        with pytest.raises(ValueError, match="should not get token 6562"):
            list(model.inference_bistream(iter([text]), prompt_text, prompt_speech, key=0))
    finally:
        model.llm_decoder.bias = saved


# -------------------------------------------------------------------- precision


def teacher_forced_logits(model: Qwen2LM, n_steps: int = 20) -> np.ndarray:
    text, prompt_text, prompt_speech = inputs(12)
    steps = np.random.default_rng(12).integers(0, S, n_steps)
    cache = model.make_cache()
    x = model.prompt_input(text, prompt_text, prompt_speech)
    out = []
    for i in range(n_steps + 1):
        out.append(np.array(model.forward_one_step(x, cache)[0].astype(mx.float32)))
        if i < n_steps:
            x = model.speech_embedding(mx.array([[int(steps[i])]]))
    return np.stack(out)


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return float(cos.min())


def greedy_agreement(a: Qwen2LM, b: Qwen2LM) -> tuple[int, int]:
    """How many leading greedy tokens two models share, out of how many."""
    text, prompt_text, prompt_speech = inputs(13, n_text=4)
    ta = list(a.inference(text, prompt_text, prompt_speech, sampling=NoStopGreedy()))
    tb = list(b.inference(text, prompt_text, prompt_speech, sampling=NoStopGreedy()))
    n = min(len(ta), len(tb))
    return next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), n), n


BACKBONE_SCALE = 0.7


@pytest.fixture(scope="module")
def backbone_model() -> Qwen2LM:
    """Tiny model whose backbone shapes the logits: linear weights N(0, (0.7 / sqrt(fan_in))^2).

    With the official initialisation (std 0.02) the backbone barely changes the
    residual stream, so even removing it keeps the logits cosine above 0.9999 and
    a precision test could not fail; at this scale removing it drops the cosine
    to about 0.93 (checked below), well under the floors.
    """
    model = random_tiny(2)

    def scale(path: str, p: mx.array) -> mx.array:
        if path.startswith("llm.layers.") and path.endswith(".weight") and "norm" not in path:
            return p / 0.02 * BACKBONE_SCALE / math.sqrt(p.shape[-1])
        return p

    model.update(tree_map_with_path(scale, model.parameters()))
    mx.eval(model.parameters())
    return model


def test_precision_test_has_power(backbone_model: Qwen2LM) -> None:
    """Removing the backbone's contribution must break the floors below, or they prove nothing."""
    ablated = Qwen2LM.from_weights(TINY, weights_of(backbone_model))
    for layer in ablated.llm.layers:
        layer.self_attn.o_proj.weight = mx.zeros_like(layer.self_attn.o_proj.weight)
        layer.mlp.down_proj.weight = mx.zeros_like(layer.mlp.down_proj.weight)
    cos = min_cosine(teacher_forced_logits(ablated), teacher_forced_logits(backbone_model))
    assert cos < 0.98, f"the backbone hardly matters (cosine without it {cos:.5f})"


PRECISIONS = {
    # name: (cast dtype, quantisation bits, minimum logits cosine to fp32)
    "bf16": ("bfloat16", None, 0.999),
    "fp16": ("float16", None, 0.999),
    "8bit": (None, 8, 0.999),
    "4bit": (None, 4, 0.99),
}


@pytest.mark.parametrize("name", list(PRECISIONS))
def test_precision_logits_cosine(
    backbone_model: Qwen2LM, name: str, record_property, capsys
) -> None:
    """Min over prefill + 20 cached steps of the logits cosine to fp32; greedy agreement reported."""
    dtype, bits, floor = PRECISIONS[name]
    model = backbone_model
    reference = teacher_forced_logits(model)
    other = Qwen2LM.from_weights(TINY, weights_of(model))
    if dtype:
        cast(other, dtype)
    if bits:
        quantize(other, bits=bits, group_size=64)
    cos = min_cosine(teacher_forced_logits(other), reference)
    agree, n = greedy_agreement(model, other)
    record_property("min_logits_cosine", cos)
    record_property("greedy_agreement_tokens", agree)
    with capsys.disabled():
        print(
            f"\n[llm precision] {name}: min logits cosine {cos:.6f}, greedy agreement {agree}/{n}"
        )
    assert cos >= floor, f"{name}: min logits cosine {cos:.6f} < {floor}"


@pytest.mark.parametrize("include_speech_layers", [False, True])
def test_quantised_weights_load_without_requantising(
    model: Qwen2LM, include_speech_layers: bool
) -> None:
    q = Qwen2LM.from_weights(TINY, weights_of(model))
    record = quantize(q, bits=4, group_size=32, include_speech_layers=include_speech_layers)
    assert record == {"group_size": 32, "bits": 4}
    assert isinstance(q.llm.layers[0].mlp.down_proj, nn.QuantizedLinear)
    assert isinstance(q.llm.embed_tokens, nn.QuantizedEmbedding)
    assert isinstance(q.llm_decoder, nn.QuantizedLinear) == include_speech_layers
    assert isinstance(q.speech_embedding, nn.QuantizedEmbedding) == include_speech_layers
    saved = weights_of(q)
    loaded = Qwen2LM.from_weights(TINY, dict(saved), quantization=record)
    for k, v in weights_of(loaded).items():
        assert v.dtype == saved[k].dtype and mx.array_equal(v, saved[k]), k
    assert type(loaded.llm_decoder) is type(q.llm_decoder)
    x = model.prompt_input(*inputs(14))
    assert mx.array_equal(
        q.forward_one_step(x, q.make_cache()), loaded.forward_one_step(x, loaded.make_cache())
    )
