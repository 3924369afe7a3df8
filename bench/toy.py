"""A toy target: a small MLX workload shaped like the pipeline, to test the harness itself.

It has the pipeline's stages and interfaces at a small size: a "speech LM" that
prefills the work's input positions and then decodes token by token through the
`cosyvoice2.sampling.Sampler` protocol (its end-of-speech logit is biased up, so left
alone it stops after a few tokens and only fixed-length mode gives the requested
length), a "flow" that runs `steps` matmul passes over two mel frames per token, a
"vocoder" that turns each frame into 480 samples, and streaming by the official hop
(25 tokens plus 3 look-ahead). Its weights are random from a fixed seed and it
honours the precision settings (the LLM's weights quantised with `mx.quantize` for
8-bit/4-bit). Timings are real; the figures mean nothing about CosyVoice2.

Test hooks, read from the environment of the worker: `BENCH_TOY_LOG` (a file to which
each `run` call appends its case id), `BENCH_TOY_SLEEP` (seconds to sleep per call),
`BENCH_TOY_FAIL` (a substring of case ids whose calls raise).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from bench.cases import Case, Work
from bench.fixed_length import FixedLengthSampler, take_exact
from bench.interface import CallTimings, Prepared
from bench.timing import CallClock

HIDDEN = 128
SPEECH_TOKEN_SIZE = 256  # ids 256 (end of speech), 257, 258 are not speech (CosyVoice2: 6561)
TEXT_VOCAB = 151643
SAMPLES_PER_FRAME = 480
SAMPLE_RATE = 24000
HOP = 25
LOOKAHEAD = 3
EOS_BIAS = 12.0

_DTYPES = {"fp32": mx.float32, "bf16": mx.bfloat16, "fp16": mx.float16}


def _sampler() -> Any:
    try:
        from cosyvoice2.sampling import RasSampler

        return RasSampler()
    except ImportError:  # the harness does not need the package to test itself
        return _CategoricalSampler()


@dataclass(frozen=True)
class _CategoricalSampler:
    window: int = 0

    def __call__(self, weighted_scores: mx.array, recent: mx.array, key: mx.array) -> mx.array:
        return mx.random.categorical(weighted_scores, key=key).astype(mx.int32)


class ToyLM(nn.Module):
    """Embeddings, two MLP layers over a running state, and a decoder head with a biased EOS."""

    def __init__(self) -> None:
        super().__init__()
        self.text_embedding = nn.Embedding(TEXT_VOCAB // 64, HIDDEN)
        self.speech_embedding = nn.Embedding(SPEECH_TOKEN_SIZE + 3, HIDDEN)
        self.layer1 = nn.Linear(HIDDEN, 4 * HIDDEN)
        self.layer2 = nn.Linear(4 * HIDDEN, HIDDEN)
        self.llm_decoder = nn.Linear(HIDDEN, SPEECH_TOKEN_SIZE + 3)

    def step(self, x: mx.array, state: mx.array) -> tuple[mx.array, mx.array]:
        h = self.layer2(nn.silu(self.layer1(x))).astype(mx.float32)
        state = mx.tanh(state + h.mean(axis=0))
        logits = self.llm_decoder(state.astype(x.dtype)).astype(mx.float32)
        eos = mx.arange(logits.shape[-1]) == SPEECH_TOKEN_SIZE
        return nn.log_softmax(logits + EOS_BIAS * eos, axis=-1), state

    def inference(self, inputs: dict[str, Any], sampler: Any, key: mx.array, max_len: int):
        """Yield speech tokens (ints) until end-of-speech or `max_len`, like `Qwen2LM.inference`."""
        text = mx.array(inputs["text_all"]) % self.text_embedding.weight.shape[0]
        prompt = mx.array(inputs["prompt_speech_token"]) % SPEECH_TOKEN_SIZE
        x = mx.concatenate([self.text_embedding(text), self.speech_embedding(prompt)], axis=0)
        state = mx.zeros((HIDDEN,))
        recent = mx.full((max(sampler.window, 1),), -1, dtype=mx.int32)
        for _ in range(max_len):
            logp, state = self.step(x, state)
            key, sub = mx.random.split(key)
            tok = sampler(logp, recent, sub)
            mx.eval(tok, state)
            t = int(tok.item())
            if t >= SPEECH_TOKEN_SIZE:
                return
            yield t
            recent = mx.concatenate([recent[1:], tok.reshape(1)])
            x = self.speech_embedding(tok.reshape(1))


class ToyFlow(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(SPEECH_TOKEN_SIZE, 80)
        self.estimator = nn.Linear(80, 80)

    def __call__(self, tokens: mx.array, steps: int) -> mx.array:
        mu = mx.repeat(self.embed(tokens), 2, axis=0)  # two mel frames per token
        x = mx.zeros_like(mu)
        for _ in range(steps):
            x = x + (1.0 / steps) * mx.tanh(self.estimator(x + mu))
        return x


class ToyHiFT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(80, SAMPLES_PER_FRAME)

    def __call__(self, mel: mx.array) -> mx.array:
        return mx.tanh(self.up(mel)).reshape(-1)


@dataclass
class _Handle:
    llm: ToyLM
    flow: ToyFlow
    hift: ToyHiFT
    dtype: Any


class ToyTarget:
    name = "toy"
    backend = "mlx"

    def env(self) -> dict[str, str | None]:
        return {}

    def supports(self, case: Case) -> str | None:
        return None

    def prepare(self, cases: list[Case], options: dict[str, Any]) -> Prepared:
        return Prepared(weights={"label": "synthetic", "size": "toy", "seed": 0})

    def load(self, case: Case, prepared: Prepared) -> _Handle:
        mx.random.seed(0)
        llm, flow, hift = ToyLM(), ToyFlow(), ToyHiFT()
        dtype = _DTYPES[case.dtype]
        if case.llm in ("8bit", "4bit"):
            nn.quantize(llm, group_size=64, bits=int(case.llm[0]))
        else:
            llm.set_dtype(_DTYPES[case.llm])
        flow.set_dtype(dtype)
        hift.set_dtype(dtype)
        mx.eval(llm.parameters(), flow.parameters(), hift.parameters())
        return _Handle(llm, flow, hift, dtype)

    def unload(self, handle: Any) -> None:
        mx.clear_cache()

    def run(self, handle: _Handle, case: Case, work: Work) -> CallTimings:
        log = os.environ.get("BENCH_TOY_LOG")
        if log:
            with open(log, "a", encoding="utf-8") as f:
                f.write(case.id + "\n")
        fail = os.environ.get("BENCH_TOY_FAIL")
        if fail and fail in case.id:
            raise RuntimeError(f"toy failure injected for {case.id}")
        sleep = float(os.environ.get("BENCH_TOY_SLEEP", "0"))

        inputs = work.inputs()
        inputs["text_all"] = inputs["prompt_text"][0].tolist() + inputs["text"][0].tolist()
        inputs["prompt_speech_token"] = inputs["prompt_speech_token"][0]
        sampler = _sampler()
        n = work.speech_tokens
        if work.fixed_length:
            sampler = FixedLengthSampler(sampler, SPEECH_TOKEN_SIZE)
        key = mx.random.key(work.seed)

        clock = CallClock()
        flow = clock.timed("flow", handle.flow, mx.eval)
        hift = clock.timed("hift", handle.hift, mx.eval)

        def to_audio(toks: list[int]) -> None:
            wav = hift(flow(mx.array(toks, dtype=mx.int32), case.steps)).astype(mx.float32)
            mx.eval(wav)
            clock.chunk(wav.shape[0] / SAMPLE_RATE)

        clock.start()
        if sleep:
            time.sleep(sleep)
        gen = handle.llm.inference(inputs, sampler, key, max_len=n)
        if work.fixed_length:
            gen = take_exact(gen, n)
        tokens: list[int] = []
        done = 0  # tokens already turned into audio (streaming)
        hop = case.first_hop or HOP
        for tok in clock.tokens(gen):
            tokens.append(tok)
            if case.stream and len(tokens) - done >= hop + LOOKAHEAD:
                to_audio(tokens[done : done + hop])
                done += hop
                hop = HOP
        if tokens[done:] or not clock.chunk_times:
            to_audio(tokens[done:] or [0])
        return clock.timings(case.stream)
