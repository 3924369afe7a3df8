"""Fixed-length decoding, done on the harness side through the LLM's public sampling hook.

On random weights the speech LM stops whenever it happens to sample end-of-speech,
so two runs (or two commits) would time different amounts of work. The harness
fixes the output length the way `mlx_lm/benchmark.py` does, without asking the LLM
for a special mode:

- `FixedLengthSampler` wraps the sampler the LLM is given (the `cosyvoice2.sampling.Sampler`
  protocol: `(weighted_scores, recent, key) -> token`, with a `window` attribute) and
  sets the scores of every id `>= speech_token_size` (end-of-speech 6561 and the two
  unused ids 6562/6563 of Qwen2LM's decoder) to -inf before the wrapped sampler draws,
  so only speech tokens can come out;
- `take_exact` reads exactly `n` tokens from the LLM's token generator and closes it,
  which ends the decode loop (the generator's own maximum length must be >= n).

The sampler still runs its full computation (nucleus sort, repetition check), so
the timed work is the real per-step work.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import mlx.core as mx


class FixedLengthSampler:
    """A sampler that can only return speech tokens (ids `< speech_token_size`)."""

    def __init__(self, inner: Any, speech_token_size: int):
        self.inner = inner
        self.speech_token_size = int(speech_token_size)

    @property
    def window(self) -> int:
        return int(getattr(self.inner, "window", 0))

    def mask(self, weighted_scores: mx.array) -> mx.array:
        ids = mx.arange(weighted_scores.shape[-1])
        return mx.where(
            ids >= self.speech_token_size,
            mx.array(float("-inf"), dtype=weighted_scores.dtype),
            weighted_scores,
        )

    def __call__(self, weighted_scores: mx.array, recent: mx.array, key: mx.array) -> mx.array:
        return self.inner(self.mask(weighted_scores), recent, key)


class TooFewTokens(RuntimeError):
    """The token generator ended before the requested length (fixed-length mode failed)."""


def take_exact(tokens: Iterable[Any], n: int) -> Iterator[Any]:
    """Yield exactly `n` items of `tokens`, then close the generator.

    Raises `TooFewTokens` if it ends early: in fixed-length mode that means the
    LLM stopped on its own, i.e. the masking did not reach its sampler.
    """
    it = iter(tokens)
    count = 0
    try:
        while count < n:
            try:
                tok = next(it)
            except StopIteration:
                raise TooFewTokens(
                    f"the LLM stopped after {count} of {n} speech tokens in fixed-length mode"
                ) from None
            count += 1
            yield tok
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
