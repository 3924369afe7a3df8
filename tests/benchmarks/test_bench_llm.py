"""Micro-benchmark: one speech-LM decode step (tiny shape), with pytest-benchmark.

One step = backbone forward of one position through the KV cache, `llm_decoder`,
log-softmax and one repetition-aware sampling draw, evaluated. The cache is
trimmed back after each step so every round sees the same length. No timing is
asserted; run with `--benchmark-disable` it only checks that the step works.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import trim_prompt_cache

from cosyvoice2.config import LLMConfig, QwenConfig
from cosyvoice2.llm import Qwen2LM
from cosyvoice2.sampling import RasSampler

pytest.importorskip("pytest_benchmark")

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


def test_bench_llm_decode_step(benchmark) -> None:
    model = Qwen2LM(TINY)
    mx.eval(model.parameters())
    rng = np.random.default_rng(0)
    cache = model.make_cache()
    prompt = model.prompt_input(
        rng.integers(0, 151000, 20), rng.integers(0, 151000, 10), rng.integers(0, 6561, 75)
    )
    mx.eval(model.forward_one_step(prompt, cache))
    sampler = RasSampler()
    recent = mx.array(rng.integers(0, 6561, 10), dtype=mx.int32)
    x = model.speech_embedding(mx.array([[17]]))
    key = mx.random.key(0)

    def step() -> int:
        token = sampler(model.log_probs(x, cache), recent, key)
        mx.eval(token)
        trim_prompt_cache(cache, 1)
        return token.item()

    token = benchmark(step)
    assert 0 <= token < TINY.speech_token_size + 3
    assert cache[0].offset == prompt.shape[1]
