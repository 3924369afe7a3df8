"""The decoding rules of the older official code, for parity tests against the installed wheel.

The parity reference that tests execute is the `cosyvoice-minicpmo` wheel, which
carries the official code as of mid-2025. Its `Qwen2LM` decodes by different rules
from the latest upstream code that the runtime (`cosyvoice2.llm.TokenDecoder`)
follows. `LegacyDecoder` overrides just those rules and reuses everything else
(scheduling, look-ahead, the decode loops of `Qwen2LM`); pass it as
`Qwen2LM.inference(..., decoder=LegacyDecoder)` (or `inference_bistream`):

1. End of speech below the minimum length: eos is not masked; a drawn eos is
   drawn again from the same scores, up to `MAX_EOS_TRIALS` times, then
   `RuntimeError` (the wheel's `sampling_ids`).
2. Stop tokens in `inference`: only eos ends decoding; a drawn 6562 or 6563 is
   not yielded and the previous input is fed again (a quirk of the wheel's
   `continue`, reproduced; at the very first step that input is the whole
   prompt, which the wheel itself cannot re-feed: its attention mask has the
   wrong size and torch raises).
3. Repetition-aware sampling's fallback may return the repeated token
   (`RasSampler(exclude_repeated=False)`).
4. `inference_bistream` forces no fill token until the model emits one itself.

A re-draw (rule 1) needs the look-ahead step, built from the discarded token,
built again; `resolve` does that only when the new token continues decoding
(below eos), since a stop token's look-ahead step is discarded by the loop.
"""

from __future__ import annotations

import mlx.core as mx

from cosyvoice2.config import LLMConfig
from cosyvoice2.llm import DecodeStep, TokenDecoder
from cosyvoice2.sampling import RasSampler, Sampler

MAX_EOS_TRIALS = 100  # the wheel's `sampling_ids` bound on re-draws


class LegacyDecoder(TokenDecoder):
    """`TokenDecoder` with the wheel's rules (see the module docstring)."""

    @classmethod
    def default_sampler(cls, config: LLMConfig) -> Sampler:
        return RasSampler.from_config(config.sampling, exclude_repeated=False)

    def scores(self, logp: mx.array, ignore_eos: bool) -> mx.array:
        return logp

    def resolve(self, step: DecodeStep, ahead: DecodeStep | None) -> tuple[int, DecodeStep | None]:
        t = step.token.item()
        eos = self.model.eos_token
        if not (step.ignore_eos and t == eos):
            return t, ahead
        for _ in range(MAX_EOS_TRIALS):
            step.token = self.sampler(step.logp, step.recent, self.next_key())
            t = step.token.item()
            if t != eos:
                if t < eos and ahead is not None:
                    self.discard(ahead)
                    ahead = self.schedule_next(step, ahead.ignore_eos, draw=ahead.token is not None)
                return t, ahead
        raise RuntimeError(
            f"sampling reached {MAX_EOS_TRIALS} trials and still got eos below the minimum length"
        )

    def after_stop_token(
        self, token: int, step: DecodeStep, ahead: DecodeStep | None, ignore_eos: bool
    ) -> DecodeStep | None:
        if token == self.model.eos_token:
            return None
        self.discard(ahead)
        return self.schedule(step.x, step.recent, ignore_eos)  # the same input, the same history

    def first_fill(self, n_prompt_speech: int, n_speech_mix: int) -> int:
        return -1
