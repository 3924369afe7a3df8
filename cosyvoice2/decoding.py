"""The speech LM's step decoder (`TokenDecoder`) and the small helpers its callers share.

`TokenDecoder` feeds `Qwen2LM`'s backbone through one KV cache and draws speech
tokens, keeping one step in flight (the look-ahead described in
`cosyvoice2.llm`). It holds the decoding rules that differ between official
versions as overridable methods, so the older rules can live in the test-support
package as a subclass while the runtime has only the upstream ones.

It lives apart from `cosyvoice2.llm` so that both decode loops, `Qwen2LM.inference`
there and the bistream loop in `cosyvoice2.bistream`, use it without importing
each other. This module needs the model only through its attributes, so it
imports `cosyvoice2.llm` for type checking only; `cosyvoice2.llm` re-exports
every name defined here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np

from cosyvoice2.config import LLMConfig
from cosyvoice2.lm_models import KVCache, trim_prompt_cache
from cosyvoice2.sampling import RasSampler, Sampler, empty_recent, push_recent

if TYPE_CHECKING:
    from cosyvoice2.llm import Qwen2LM

TokenLike = Sequence[int] | np.ndarray | mx.array


def _tokens(x: TokenLike | None) -> mx.array:
    """Token ids as an int32 array of shape (1, T) (T may be 0)."""
    if x is None:
        return mx.zeros((1, 0), dtype=mx.int32)
    if isinstance(x, mx.array):
        arr = x.astype(mx.int32)
    else:
        arr = mx.array(np.asarray(x, dtype=np.int64).astype(np.int32))
    return arr.reshape(1, arr.size)


def _length_limit(n_text: int, ratio: float) -> int:
    """`int(text_len * ratio)` computed in float32, as the official code does with tensors."""
    return int(np.float32(n_text) * np.float32(ratio))


def _as_key(key: mx.array | int | None) -> mx.array:
    """An explicit MLX random key: an int is a seed; None draws fresh entropy from the OS."""
    if key is None:
        return mx.random.key(int.from_bytes(os.urandom(8), "little") >> 1)
    if isinstance(key, int):
        return mx.random.key(key)
    return key


def log_softmax_f32(logits: mx.array) -> mx.array:
    """float32 log-softmax over the last axis (the log-probabilities a draw sees)."""
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def eos_masked(logp: mx.array, eos_token: int) -> mx.array:
    """`logp` with the eos entry at `-inf` (a draw below the minimum length)."""
    return mx.where(mx.arange(logp.shape[-1]) == eos_token, float("-inf"), logp)


def _check_behaviour(behaviour: str) -> None:
    """Accept only "upstream": the older official rules are a decoder class, not a runtime switch."""
    if behaviour == "legacy":
        raise ValueError(
            'behaviour="legacy" is not part of the runtime: the older official decoding rules'
            " are `cosyvoice2_testing.legacy.LegacyDecoder`, passed as `decoder=`"
        )
    if behaviour != "upstream":
        raise ValueError(f"behaviour must be 'upstream', got {behaviour!r}")


@dataclass
class DecodeStep:
    """One scheduled decode step: its input, log-probabilities and drawn token (lazy)."""

    x: mx.array  # the input embeddings fed
    logp: mx.array
    token: mx.array | None  # None when no draw was scheduled (a forced fill step)
    recent: mx.array  # the history the draw saw
    ignore_eos: bool


class TokenDecoder:
    """Feeds the backbone through one KV cache and draws tokens, keeping one step in flight.

    `schedule` builds a step's graph and starts it with `mx.async_eval`;
    `schedule_next` builds the step fed with a step's token before that token
    is known on the host (look-ahead, as mlx-lm's `generate_step`); `resolve`
    reads a token; `discard` undoes a look-ahead step by trimming its one
    position from the cache.

    The decoding rules that differ between official versions are the methods
    `scores`, `resolve`, `after_stop_token`, `first_fill` and `default_sampler`;
    this class has the upstream ones (see the `cosyvoice2.llm` module docstring).
    """

    def __init__(self, model: Qwen2LM, cache: list[KVCache], sampler: Sampler, key: mx.array):
        self.model, self.cache, self.sampler, self.key = model, cache, sampler, key

    @classmethod
    def default_sampler(cls, config: LLMConfig) -> Sampler:
        """The sampler used when the caller passes none: repetition-aware, the config's settings."""
        return RasSampler.from_config(config.sampling)

    def next_key(self) -> mx.array:
        self.key, sub = mx.random.split(self.key)
        return sub

    def scores(self, logp: mx.array, ignore_eos: bool) -> mx.array:
        """The scores a draw sees: eos masked to `-inf` below the minimum length."""
        return eos_masked(logp, self.model.eos_token) if ignore_eos else logp

    def schedule(
        self, x: mx.array, recent: mx.array, ignore_eos: bool, draw: bool = True
    ) -> DecodeStep:
        logp = self.scores(self.model.log_probs(x, self.cache), ignore_eos)
        token = self.sampler(logp, recent, self.next_key()) if draw else None
        mx.async_eval(token if token is not None else [c.state for c in self.cache])
        return DecodeStep(x, logp, token, recent, ignore_eos)

    def schedule_next(self, step: DecodeStep, ignore_eos: bool, draw: bool = True) -> DecodeStep:
        """Schedule the step fed with `step`'s token, before that token is read."""
        x = self.model.speech_embedding(step.token.reshape(1, 1))
        return self.schedule(x, push_recent(step.recent, step.token), ignore_eos, draw)

    def resolve(self, step: DecodeStep, ahead: DecodeStep | None) -> tuple[int, DecodeStep | None]:
        """The step's token on the host, and the look-ahead step that follows it (`ahead` here)."""
        return step.token.item(), ahead

    def after_stop_token(
        self, token: int, step: DecodeStep, ahead: DecodeStep | None, ignore_eos: bool
    ) -> DecodeStep | None:
        """In `inference`, the step to go on with after `step` drew `token` (eos, 6562 or fill;
        `ahead` is its look-ahead step), or None to end decoding: upstream always ends."""
        return None

    def first_fill(self, n_prompt_speech: int, n_speech_mix: int) -> int:
        """In `inference_bistream`, the number of speech tokens after which the first fill token is
        forced (-1: none until the model emits one)."""
        return (n_prompt_speech // n_speech_mix + 1) * n_speech_mix - n_prompt_speech

    def discard(self, ahead: DecodeStep | None) -> None:
        """Undo a look-ahead step (one cache position)."""
        if ahead is not None:
            trim_prompt_cache(self.cache, 1)


def decode_loop(
    dec: TokenDecoder, lm_input: mx.array, min_len: int, max_len: int, eos_token: int
) -> Iterator[int]:
    """The official decode loop (`inference_wrapper`, and the first generation's
    `TransformerLM.inference`), one step scheduled ahead: tokens until one `>= eos_token`
    (eos, or CosyVoice2's 6562 and fill tokens: the end unless `dec`'s rules go on), or
    `max_len` steps."""
    if max_len <= 0:
        return
    i = 0
    step = dec.schedule(lm_input, empty_recent(dec.sampler.window), ignore_eos=0 < min_len)
    while True:
        ahead = None
        if i + 1 < max_len:
            ahead = dec.schedule_next(step, ignore_eos=i + 1 < min_len)
        t, ahead = dec.resolve(step, ahead)
        if t >= eos_token:  # eos, 6562 or fill: the end, unless the rules go on
            i += 1
            if i >= max_len:
                return
            step = dec.after_stop_token(t, step, ahead, ignore_eos=i < min_len)
            if step is None:
                return
            continue
        yield t
        i += 1
        if ahead is None:
            return
        step = ahead
