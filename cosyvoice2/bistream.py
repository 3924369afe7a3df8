"""Speech tokens while the text arrives in chunks: the loop of `Qwen2LM.inference_bistream`.

A port of the official `Qwen2LM.inference_bistream`. The LM input interleaves
text and speech by `mix_ratio` (5 text : 15 speech tokens):

    [sos, 5 prompt text, 15 prompt speech, 5 prompt text, 15 prompt speech, ...,
     5 text, up to 15 speech, fill, 5 text, up to 15 speech, fill, ...,
     the remaining text, task_id, speech ... eos]

The prompt text and prompt speech are paired first, as far as the text received
allows; then each block of 5 text tokens is followed by speech tokens until a
fill token (6563) hands over to the next block. When the text stream ends, the
text still held back and the task id are fed and decoding runs to eos.

`BistreamDecoder` holds one such decoding: the input being built, the text and
prompt speech not fed yet, and the tokens drawn so far. Its methods are the
steps of the official loop, in the official order; the draws, the random keys
and the KV cache go through a `cosyvoice2.decoding.TokenDecoder`, which also
holds the rule for when fill tokens are forced (`first_fill`).

This module needs the model only through its attributes and imports
`cosyvoice2.llm` for type checking only (`cosyvoice2.llm` imports this module).
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Iterator
from typing import TYPE_CHECKING

import mlx.core as mx

from cosyvoice2.decoding import TokenDecoder, TokenLike, _length_limit, _tokens
from cosyvoice2.sampling import empty_recent, push_recent

if TYPE_CHECKING:
    from cosyvoice2.llm import Qwen2LM


class BistreamDecoder:
    """One bistream decoding of `model` through `dec`, from the prompt to eos.

    Construct it with the prompt, then iterate `tokens(text)`. Fill tokens are
    not yielded but are recorded in `out_tokens` and in the history the
    repetition check sees (`recent`), as in the official code.

    Bounds (not in the official code, whose loop can run forever with random or
    badly matched weights): the number of yielded tokens is kept to
    `max_token_text_ratio` times the number of target text tokens received so
    far, and to `max_tokens` if given.
    """

    def __init__(
        self,
        model: Qwen2LM,
        dec: TokenDecoder,
        prompt_text: TokenLike | None,
        prompt_speech_token: TokenLike | None,
        max_token_text_ratio: float,
        max_tokens: int | None,
    ):
        self.model, self.dec = model, dec
        self.max_token_text_ratio, self.max_tokens = max_token_text_ratio, max_tokens
        self.n_text_mix, self.n_speech_mix = model.mix_ratio
        self.eos, self.fill = model.eos_token, model.fill_token
        self.recent = empty_recent(dec.sampler.window)
        speech_tokens = _tokens(prompt_speech_token)
        n_prompt_speech = speech_tokens.shape[1]
        # prompt speech embeddings not fed yet
        self.prompt_speech = (
            model.embed_speech(speech_tokens)
            if n_prompt_speech
            else mx.zeros(
                (1, 0, model.config.llm_input_size), dtype=model.speech_embedding.weight.dtype
            )
        )
        self.lm_input = model.special_embedding(model.sos)  # what the next step feeds
        self.text_cache = model.embed_text(_tokens(prompt_text))  # text embeddings not fed yet
        # the length of `out_tokens` at which a fill token is forced (-1: none)
        self.next_fill = dec.first_fill(n_prompt_speech, self.n_speech_mix)
        self.out_tokens: list[int] = []  # every token drawn or forced, fill tokens included
        self.n_text = 0  # target text tokens received
        self.n_yielded = 0  # speech tokens yielded

    # ------------------------------------------------------------- bounds

    def _over_text_cap(self, n: int) -> bool:
        """`n` yielded tokens reach `max_token_text_ratio` times the text received so far."""
        return n >= _length_limit(self.n_text, self.max_token_text_ratio)

    def _at_max_tokens(self, n: int) -> bool:
        """`n` yielded tokens reach the caller's hard cap `max_tokens`."""
        return self.max_tokens is not None and n >= self.max_tokens

    def _fill_forced(self, n_out: int, n: int) -> bool:
        """With `n_out` tokens drawn and `n` yielded, the next token is a forced fill: the text
        cap is reached (decoding waits for more text) or the fill schedule says so."""
        return self._over_text_cap(n) or (self.next_fill != -1 and n_out == self.next_fill)

    # ------------------------------------------------------------- input

    def _receive_text(self, chunk: TokenLike) -> None:
        """Append a text chunk's embeddings to the text not fed yet."""
        chunk_t = _tokens(chunk)
        self.n_text += chunk_t.shape[1]
        self.text_cache = mx.concatenate([self.text_cache, self.model.embed_text(chunk_t)], axis=1)

    def _mix_prompt_speech(self) -> bool:
        """Feed `n_text_mix` text and `n_speech_mix` prompt speech tokens at a time while both
        are there; True when no prompt speech is left (decoding may start)."""
        n_text_mix, n_speech_mix = self.n_text_mix, self.n_speech_mix
        while self.prompt_speech.shape[1] != 0:
            if self.text_cache.shape[1] < n_text_mix:
                break
            self.lm_input = mx.concatenate(
                [
                    self.lm_input,
                    self.text_cache[:, :n_text_mix],
                    self.prompt_speech[:, :n_speech_mix],
                ],
                axis=1,
            )
            self.text_cache = self.text_cache[:, n_text_mix:]
            self.prompt_speech = self.prompt_speech[:, n_speech_mix:]
        return self.prompt_speech.shape[1] == 0

    def _feed_text_block(self) -> bool:
        """At a hand-over (after a fill token, or at the start when no prompt speech was mixed),
        the next input is the next `n_text_mix` text tokens; False when they have not all
        arrived yet. After a fill token they replace the input (the last speech token, already
        fed); at the start they follow sos and the prompt text."""
        after_fill = bool(self.out_tokens) and self.out_tokens[-1] == self.fill
        if after_fill or (not self.out_tokens and self.lm_input.shape[1] == 1):
            if self.text_cache.shape[1] < self.n_text_mix:
                return False
            head = self.text_cache[:, : self.n_text_mix]
            self.lm_input = head if after_fill else mx.concatenate([self.lm_input, head], axis=1)
            self.text_cache = self.text_cache[:, self.n_text_mix :]
        return True

    def _record(self, token: int) -> None:
        """Add a drawn or forced token to `out_tokens` and to the repetition history."""
        self.out_tokens.append(token)
        self.recent = push_recent(self.recent, mx.array(token, dtype=mx.int32))

    # ------------------------------------------------------------ decoding

    def tokens(self, text: Iterable[TokenLike]) -> Iterator[int]:
        """Yield speech tokens while the chunks of `text` arrive, then until eos.

        Raises `ValueError` on a 6562 drawn while text is still arriving and on a 6562
        or fill token after the text ended, as the official code does.
        """
        for chunk in text:
            self._receive_text(chunk)
            if not self._mix_prompt_speech():
                continue  # prompt speech left: wait for text to pair it with
            if not self._feed_text_block():
                continue  # wait for a full block of text
            finished = yield from self._decode_until_fill()
            if finished:
                return
        yield from self._decode_after_text()

    def _decode_until_fill(self) -> Generator[int, None, bool]:
        """Decode speech tokens from `lm_input` until a fill token (drawn or forced).

        Returns True when `max_tokens` ends the stream, False at the fill token. One
        step is scheduled ahead; when the next token is known to be a forced fill,
        that step only feeds its input (no draw, no key used).
        """
        dec = self.dec
        step = None  # the step feeding `lm_input`, when already scheduled
        while True:
            if self._at_max_tokens(self.n_yielded):
                return True
            if self._fill_forced(len(self.out_tokens), self.n_yielded):
                if step is None:
                    dec.schedule(self.lm_input, self.recent, ignore_eos=True, draw=False)
                top = self.fill
                ahead = None
            else:
                if step is None:
                    step = dec.schedule(self.lm_input, self.recent, ignore_eos=True)
                ahead = None
                if not self._at_max_tokens(self.n_yielded + 1):
                    draw = not self._fill_forced(len(self.out_tokens) + 1, self.n_yielded + 1)
                    ahead = dec.schedule_next(step, ignore_eos=True, draw=draw)
                top, ahead = dec.resolve(step, ahead)
                if top >= self.eos:
                    dec.discard(ahead)
                    ahead = None
            if top == self.fill:
                self.next_fill = len(self.out_tokens) + self.n_speech_mix + 1
            self._record(top)
            if top >= self.eos:
                if top == self.fill:
                    return False
                raise ValueError(f"should not get token {top} while text is still arriving")
            yield top
            self.n_yielded += 1
            self.lm_input = self.model.speech_embedding(mx.array([[top]], dtype=mx.int32))
            step = ahead

    def _decode_after_text(self) -> Iterator[int]:
        """The text has ended: feed the text held back and the task id, then decode to eos
        (or to the text cap or `max_tokens`). Prompt speech not fed yet is dropped, and after
        a fill token the last speech token is fed again, as in the official code."""
        dec = self.dec
        self.lm_input = mx.concatenate(
            [self.lm_input, self.text_cache, self.model.special_embedding(self.model.task_id)],
            axis=1,
        )
        step = None
        while True:
            if self._at_max_tokens(self.n_yielded) or self._over_text_cap(self.n_yielded):
                return
            if step is None:
                step = dec.schedule(self.lm_input, self.recent, ignore_eos=False)
            ahead = None
            if not (
                self._at_max_tokens(self.n_yielded + 1) or self._over_text_cap(self.n_yielded + 1)
            ):
                ahead = dec.schedule_next(step, ignore_eos=False)
            top, ahead = dec.resolve(step, ahead)
            self._record(top)
            if top >= self.eos:
                if top == self.eos:
                    return
                raise ValueError(f"should not get token {top} after the text ended")
            yield top
            self.n_yielded += 1
            step = ahead
