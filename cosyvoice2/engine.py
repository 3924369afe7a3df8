"""The engine: speech tokens -> 24 kHz audio, whole or streamed, for every mode.

The flow (the official `flow.inference`: tokens after the prompt -> mel), the
speed change, HiFT (mel -> waveform) and the streaming schedule
(`cosyvoice2.streaming`). The modes (`cosyvoice2.model`) turn text and prompts
into speech tokens and a `Prompt`; everything after the tokens is here. The
engine also keeps the streaming flow's prompt states of saved speakers (a flow
pass over the prompt's frames, worth computing once per speaker).

Timing: with a timing hook (`SynthesisOptions.timings`, a
`cosyvoice2.streaming.TimingHook`), the flow and HiFT work is evaluated inside
the hook's `flow` and `hift` stages, and latency events are marked; without
one, nothing extra is evaluated.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from cosyvoice2.errors import CosyVoiceError, InputError
from cosyvoice2.flow.cache import FlowState
from cosyvoice2.flow.length_regulator import interpolate_linear as resample_frames
from cosyvoice2.options import SynthesisOptions
from cosyvoice2.streaming import FlowCursor, evaluated, stream_chunks

__all__ = ["Engine", "Prompt", "interpolate_linear", "source_noise_key"]


@dataclass
class Prompt:
    """The prompt side of a request (the official frontend's `model_input` minus the target text).

    The modes build it (`cosyvoice2.model`) and read its LLM fields; the engine reads
    the flow's: its speech tokens, mel and x-vector.
    """

    embedding: mx.array  # (1, 192)
    prompt_text: mx.array  # (1, n) int32 text tokens for the LLM (transcript or instruction)
    llm_speech_token: (
        mx.array
    )  # (1, m) prompt speech tokens for the LLM (empty: cross-lingual, instruct2)
    flow_speech_token: mx.array  # (1, m) prompt speech tokens for the flow
    speech_feat: mx.array  # (1, 2m, 80) prompt mel for the flow


def source_noise_key(seed: int) -> mx.array:
    """The key of HiFT's source noise for a request seed (independent of the LLM's draws)."""
    return mx.random.key(seed + 1_000_003)


def interpolate_linear(x: mx.array, size: int) -> mx.array:
    """`F.interpolate(x, size, mode='linear', align_corners=False)` over the last axis of
    (B, C, T): the flow's channels-last `cosyvoice2.flow.length_regulator.interpolate_linear`."""
    return resample_frames(x.swapaxes(1, 2), size).swapaxes(1, 2)


class Engine:
    """Tokens -> audio with a loaded flow (`CausalMaskedDiffWithXvec`) and HiFT (`HiFTGenerator`)."""

    def __init__(self, flow: Any, hift: Any):
        self.flow, self.hift = flow, hift
        self.flow_states: dict[tuple[str, int], FlowState] = {}  # (speaker id, n_timesteps)

    # ------------------------------------------------------------------ the stages

    def mel(
        self,
        tokens: mx.array,
        prompt: Prompt,
        n_timesteps: int = 10,
        streaming: bool = False,
        finalize: bool = True,
        start: int = 0,
        cursor: FlowCursor | None = None,
    ) -> mx.array:
        """Mel (1, 80, T) of `tokens` (1, N) after the prompt (official `flow.inference`), from frame `start`.

        `cursor`: the streaming flow's cache (`streaming.FlowCursor`); the frames are
        then computed by the O(n) flow from its committed state (the same values as
        the recompute).
        """
        if cursor is not None:
            if not streaming:
                raise ValueError("the flow cache is for the streaming (chunk-masked) flow")
            return cursor.mel(tokens, finalize, start)
        mel = self.flow.inference(
            token=tokens,
            prompt_token=prompt.flow_speech_token,
            prompt_feat=prompt.speech_feat,
            embedding=prompt.embedding,
            streaming=streaming,
            finalize=finalize,
            n_timesteps=n_timesteps,
        )
        return mel.transpose(0, 2, 1)[:, :, start:]

    def vocode(
        self, mel: mx.array, key: mx.array, cache_source: mx.array | None = None
    ) -> tuple[mx.array, mx.array]:
        """HiFT: (speech (1, samples), source) of mel (1, 80, T); `cache_source` continues a stream."""
        return self.hift.inference(mel, cache_source=cache_source, key=key)

    # ------------------------------------------------------------------ prompt states

    def prompt_state(
        self, prompt: Prompt, n_timesteps: int, spk_id: str | None = None
    ) -> FlowState:
        """The streaming flow's committed prompt state (`flow.cache.prompt_state`), kept per saved speaker."""
        from cosyvoice2.flow import cache

        key = (spk_id, n_timesteps) if spk_id is not None else None
        state = self.flow_states.get(key) if key is not None else None
        if state is None:
            state = cache.prompt_state(
                self.flow, prompt.flow_speech_token, prompt.speech_feat, prompt.embedding,
                n_timesteps,
            )  # fmt: skip
            if key is not None:
                self.flow_states[key] = state
        return state

    def forget(self, spk_id: str) -> None:
        """Drop a speaker's prompt states (its prompt changed)."""
        for k in [k for k in self.flow_states if k[0] == spk_id]:
            del self.flow_states[k]

    # ------------------------------------------------------------------ tokens -> audio

    def audio(
        self,
        tokens: Iterator[int],
        prompt: Prompt,
        stream: bool,
        options: SynthesisOptions,
        spk_id: str | None = None,
    ) -> Iterator[dict[str, mx.array]]:
        """Tokens -> `{"tts_speech": (1, samples)}`, whole (one item) or in chunks (`stream`).

        `spk_id`: a saved speaker whose streaming prompt state is kept in memory.
        """
        key = source_noise_key(options.seed)
        if not stream:
            yield self._whole(tokens, prompt, options, key)
            return
        if options.speed != 1.0:
            raise InputError(
                "speed change is only supported without streaming (as the official code)"
            )
        sched = options.stream_schedule
        state = None
        if sched.flow_cache and spk_id is not None and prompt.flow_speech_token.shape[1]:
            state = self.prompt_state(prompt, options.n_timesteps, spk_id)
        yield from stream_chunks(
            self, tokens, prompt, options.n_timesteps, key, sched, state, options.timings
        )

    def _whole(
        self, tokens: Iterator[int], prompt: Prompt, options: SynthesisOptions, key: mx.array
    ) -> dict[str, mx.array]:
        timings = options.timings
        all_tokens = list(tokens)
        if not all_tokens:
            raise CosyVoiceError("the speech LM produced no speech tokens")
        if timings is not None:
            timings.mark("first_token")
        toks = mx.array([all_tokens], dtype=mx.int32)
        mel = evaluated(timings, "flow", self.mel, toks, prompt, options.n_timesteps)
        if options.speed != 1.0:
            mel = interpolate_linear(mel, int(mel.shape[2] / options.speed))
        if timings is not None:
            mx.eval(mel)
            timings.mark("mel", chunk=0, frames=mel.shape[2])
        speech, _ = evaluated(timings, "hift", self.vocode, mel, key)
        mx.eval(speech)
        if timings is not None:
            timings.mark("audio", chunk=0, samples=speech.shape[1])
        return {"tts_speech": speech}
