"""`CallClock`: per-stage timing of one synthesis call, shared by the targets.

The token generator is pulled by the code that turns tokens into audio. When
that happens in the calling thread, the LLM, the flow and HiFT interleave: the
clock records when each token and each audio chunk arrives and how much flow/HiFT
time had been spent by then, which separates the stages: LLM decode time = time
between the first and last token minus the flow and HiFT time spent in between.
When the tokens are pulled by another thread (streaming with the LLM overlapped,
`cosyvoice2.streaming.prefetch`), the stages run at the same time: the LLM's
figures are then its own wall times (prefill: call start to the first token;
decode: first to last token), slowed by the flow sharing the cores, and the
stage times add up to more than the wall time.

A pipeline that reports its stages itself is given the clock as its timing hook
(`cosyvoice2.streaming.TimingHook`: `stage(name)` contexts around work it evaluates
inside them, `mark(event)` for latency events, not needed here). Stage functions of
other pipelines are wrapped with `clock.timed(stage, fn, evaluate)`; for MLX,
`evaluate` is `mx.eval`, so the lazily built result is computed inside the timed
region (an un-evaluated timing measures nothing).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from bench.interface import CallTimings


class CallClock:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.spent: dict[str, float] = {"flow": 0.0, "hift": 0.0}  # seconds per stage
        self.token_times: list[float] = []
        self.stage_at_token: list[float] = []
        self.chunk_times: list[float] = []
        self.chunk_audio: list[float] = []
        self.caller = threading.get_ident()
        self.concurrent = False  # tokens stamped by another thread than the caller's

    def start(self) -> None:
        """Reset the clock: the call starts now."""
        self.__init__()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def _stage_total(self) -> float:
        return sum(self.spent.values())

    def timed(
        self, stage: str, fn: Callable[..., Any], evaluate: Callable[[Any], Any] | None = None
    ) -> Callable[..., Any]:
        """`fn` wrapped so that its time (result evaluated) counts towards `stage`."""

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self.stage(stage):
                out = fn(*args, **kwargs)
                if evaluate is not None:
                    evaluate(out)
            return out

        return wrapper

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Count the time spent in the block towards stage `name` (the timing hook's stage)."""
        a = time.perf_counter()
        try:
            yield
        finally:
            self.spent[name] = self.spent.get(name, 0.0) + time.perf_counter() - a

    def mark(self, event: str, **info: Any) -> None:
        """A latency event of the timing hook: tokens and chunks are stamped by the clock itself."""

    def tokens(self, gen: Iterable[Any]) -> Iterator[Any]:
        """Pass a token generator through, stamping each token's arrival."""
        for tok in gen:
            self.concurrent = threading.get_ident() != self.caller
            self.token_times.append(self.now())
            self.stage_at_token.append(self._stage_total())
            yield tok

    def chunk(self, audio_s: float) -> None:
        """An audio chunk (evaluated) is in hand."""
        self.chunk_times.append(self.now())
        self.chunk_audio.append(audio_s)

    def timings(self, stream: bool, extra: dict[str, float] | None = None) -> CallTimings:
        """The call's `CallTimings`; call when the last chunk is in hand."""
        wall = self.now()
        n = len(self.token_times)
        tt, st = self.token_times, self.stage_at_token
        if self.concurrent:  # the stages overlapped: the LLM's own wall times
            st = [0.0] * n
        decode = None
        if n > 1:
            decode = (tt[-1] - tt[0]) - (st[-1] - st[0])
        llm = (tt[-1] - st[-1]) if n else None
        return CallTimings(
            wall_s=wall,
            audio_s=sum(self.chunk_audio),
            speech_tokens=n,
            ttft_s=tt[0] if n else None,
            prefill_s=(tt[0] - st[0]) if n else None,
            decode_s=decode,
            llm_s=llm,
            flow_s=self.spent.get("flow"),
            hift_s=self.spent.get("hift"),
            first_chunk_s=self.chunk_times[0] if stream and self.chunk_times else None,
            chunk_times_s=list(self.chunk_times) if stream else None,
            chunk_audio_s=list(self.chunk_audio) if stream else None,
            extra={**({"llm_overlapped": 1.0} if self.concurrent else {}), **(extra or {})},
        )
