"""Audio-out streaming: speech tokens in, 24 kHz chunks out, on the official CosyVoice2 schedule.

One generator pipeline (tokens -> chunker -> flow -> HiFT -> cross-fade), no
thread and no per-request state on the model: the state of a request (tokens so
far, offset, the flow's cache, HiFT's mel/source/speech caches) lives in the
generator.

The schedule (`StreamSchedule`, official `CosyVoice2Model.tts(stream=True)` of
the installed reference wheel): a chunk is emitted when `hop + pre_lookahead_len`
tokens are available after the offset; the flow encodes the tokens up to
`offset + hop` with the 3 look-ahead tokens as context (`finalize=False`); the
first hop is padded so that prompt + hop is a multiple of the hop (the flow's
chunk size), unless `first_hop_len` is given (then the second hop returns to that
grid, `hop_to_grid`, not an official option); when the LLM is done, one
`finalize=True` call renders the remaining tokens. HiFT keeps the last 8 mel
frames and 3840 source samples of each chunk and holds back the last 3840
samples of audio, cross-faded (Hamming window of 7680) into the next chunk.

Differences with the official code, each an option:

- the flow: by default the O(n) cache (`cosyvoice2.flow.cache`) computes each
  chunk once; `flow_cache=False` re-runs the flow over prompt + all tokens for
  each chunk, as the official code does (the reference the cache is tested
  against). A prompt whose mel is not 2 frames per token (the official voice
  conversion keeps it as extracted) always takes the re-running path: the cache
  commits whole tokens and cannot emit a chunk from an odd frame;
- the final call: the official code runs it without the streaming flag (full
  attention over everything, a whole non-streaming flow pass at the end). That
  is the default here too (`final_full_attention=True`), so the stream equals the
  official one chunk by chunk. `final_full_attention=False` ends with the
  chunk-masked `finalize=True` step instead: with the cache the whole stream is
  then O(n) (no full pass, about half the flow work of a stream), and the final
  chunk differs from the official one by about 1e-3 to 2e-3 (measured on tiny
  random weights);
- overlap (opt-in, `overlap_llm=True` or `COSYVOICE2_STREAM_LLM_THREAD=1`): the
  LLM decodes in its own thread (`prefetch`) while the flow and HiFT render
  chunks, as the official `tts` runs its LLM in a thread; and as soon as the
  first `pre_lookahead_len` speech tokens exist, the prompt's last block is
  committed in the flow cache (`FlowCursor.advance`), so that work overlaps the
  rest of the first chunk's decode. The chunks are the same (tested). Off by
  default: on the 2-core machine the flow already uses both cores and the LLM
  thread only competes with it (`overlap_enabled`);
- the growing hop (`stream_scale_factor` > 1, up to `token_max_hop_len`): the v1
  model class of the reference wheel; the latest upstream `CosyVoice2Model.tts`
  also doubles the hop after each chunk up to 100 (not the reference); off by
  default here.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import mlx.core as mx
import numpy as np

from cosyvoice2 import branches, settings
from cosyvoice2.errors import CosyVoiceError
from cosyvoice2.flow.cache import FlowState, block_tokens, flow_step


@dataclass(frozen=True)
class StreamSchedule:
    """Audio-out streaming schedule (official CosyVoice2 values by default).

    `token_hop_len` tokens per chunk plus the flow's look-ahead as context; the first
    hop is padded so prompt + hop is a multiple of the hop, unless `first_hop_len`
    sets it (smaller: earlier first chunk, no padding). `stream_scale_factor` > 1
    grows the hop after each chunk up to `token_max_hop_len` (the v1 schedule).
    HiFT keeps `mel_cache_len` mel frames and their source between chunks and
    cross-fades `2 * mel_cache_len * 480` samples with a Hamming window.
    `flow_cache`: the O(n) flow (else the official recompute); `final_full_attention`:
    see the module doc. `align_after_first`: after a `first_hop_len` off the hop grid,
    the second chunk ends on the grid again (prompt + tokens a multiple of
    `token_hop_len`, at least half a hop on), so later chunks fall on the flow cache's
    block boundaries and none recomputes a block. `overlap_llm`: the LLM decodes in a
    thread of its own while the flow and HiFT render chunks (`prefetch`), and the
    prompt's last block is committed as soon as its look-ahead tokens exist; None:
    as `overlap_enabled()` (off unless asked for).
    """

    token_hop_len: int = 25
    first_hop_len: int | None = None
    stream_scale_factor: float = 1.0
    token_max_hop_len: int = 100
    mel_cache_len: int = 8
    flow_cache: bool = True
    final_full_attention: bool = True
    align_after_first: bool = True
    overlap_llm: bool | None = None

    def __post_init__(self) -> None:
        if self.token_hop_len < 1 or (self.first_hop_len is not None and self.first_hop_len < 1):
            raise ValueError("hop lengths must be at least 1")


class FlowCursor:
    """The flow's incremental state for one streaming request (see `cosyvoice2.flow.cache`)."""

    def __init__(self, flow: Any, prompt: Any, n_timesteps: int, state: FlowState | None = None):
        self.flow = flow
        self.prompt = prompt
        self.n_timesteps = n_timesteps
        self.state = state or FlowState()
        self.spks = flow.speaker(prompt.embedding)

    def _with_prompt(self, tokens: mx.array) -> mx.array:
        return mx.concatenate([self.prompt.flow_speech_token.astype(mx.int32), tokens], axis=1)

    def mel(self, tokens: mx.array, finalize: bool, start: int) -> mx.array:
        """Mel `(1, 80, T)` of generated frames `start...` for speech tokens `(1, N)` so far."""
        p = self.prompt
        c = self.state.tokens
        mel, self.state = flow_step(
            self.flow, self.state, self._with_prompt(tokens), p.speech_feat, self.spks,
            self.n_timesteps, finalize,
        )  # fmt: skip
        skip = p.speech_feat.shape[1] + start - self.flow.config.token_mel_ratio * c
        if skip < 0:
            raise ValueError("the prompt mel must have token_mel_ratio frames per prompt token")
        return mel[:, skip:].transpose(0, 2, 1)

    def advance(self, tokens: mx.array) -> bool:
        """Commit the whole blocks whose look-ahead is among speech tokens `(1, N)`, emitting nothing.

        The prompt's last block depends on the first `pre_lookahead_len` speech tokens
        only; committing it when they exist moves its flow work ahead of the first
        chunk (useful while the LLM decodes the rest of that chunk in its own thread).
        False when no new block can be committed.
        """
        look = self.flow.config.pre_lookahead_len
        n = self.prompt.flow_speech_token.shape[1] + tokens.shape[1] - look
        m = block_tokens(self.flow)
        commit = n // m * m
        if commit <= self.state.tokens:
            return False
        # Cut at the boundary (plus its look-ahead): flow_step then commits everything it computes.
        _, self.state = flow_step(
            self.flow, self.state, self._with_prompt(tokens)[:, : commit + look],
            self.prompt.speech_feat, self.spks, self.n_timesteps, False,
        )  # fmt: skip
        mx.eval(self.state.encoder, self.state.steps)
        return True


def overlap_enabled() -> bool:
    """Whether streaming runs the LLM in its own thread by default: only when
    `COSYVOICE2_STREAM_LLM_THREAD=1` (and on a CPU device with >= 2 cores).

    Off by default because on a 2-core machine it was slower, for the first chunk
    and the whole stream: the flow's two branch threads already use both cores, so
    the LLM thread only competes with them. It can pay where the flow leaves cores
    idle (more cores than its two threads use); measure it with the bench
    (`bench/README.md`) before turning it on.
    """
    if not settings.flag("COSYVOICE2_STREAM_LLM_THREAD"):
        return False
    return branches.enabled()


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


_END = object()
_LLM_STREAM = mx.new_thread_local_stream(mx.cpu)


def prefetch(tokens: Iterator[int]) -> Iterator[int]:
    """The items of `tokens`, pulled by a thread of their own as fast as it yields them.

    Why: streaming on CPU otherwise alternates between LLM decode (memory-bound)
    and flow (compute-bound) on the same cores; overlapped, the flow of chunk `k`
    runs while the LLM decodes chunk `k + 1`. The thread evaluates on its own MLX
    stream (a thread-local one); the arrays the generator reads must already be
    evaluated. Errors in the generator are raised here; closing this iterator
    stops the thread after its current token. A daemon thread: it never blocks exit.
    """
    q: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()

    def produce() -> None:
        try:
            with mx.stream(_LLM_STREAM):
                for t in tokens:
                    q.put(int(t))
                    if stop.is_set():
                        break
        except BaseException as e:  # handed to the consumer
            q.put(_Failed(e))
            return
        finally:
            close = getattr(tokens, "close", None)
            if close is not None:
                close()
        q.put(_END)

    # the caller's context goes with it: its backend (`cosyvoice2.backend`) is the thread's
    run = contextvars.copy_context().run
    threading.Thread(target=run, args=(produce,), name="cosyvoice2-llm", daemon=True).start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()


def hop_to_grid(position: int, grid: int) -> int:
    """Tokens from `position` to the next multiple of `grid` at least `grid / 2` away.

    The hop after an off-grid first chunk: a chunk ending on the grid lets the flow
    cache commit it whole (`cosyvoice2.flow.cache`), and half a hop at least keeps
    that chunk from being too short to cover the next one's compute time.
    """
    hop = -position % grid
    return hop + grid if 2 * hop < grid else hop


def fade_in_out(fade_in: mx.array, fade_out: mx.array, window: mx.array) -> mx.array:
    """The official cross-fade: the head of `fade_in` mixed with the tail of `fade_out`."""
    n = window.shape[0] // 2
    head = fade_in[:, :n] * window[:n] + fade_out[:, -n:] * window[n:]
    return mx.concatenate([head, fade_in[:, n:]], axis=1)


class TimingHook(Protocol):
    """What the engine and the stream report to, when a request is given one (`timings=`).

    `mark(event, **info)`: a latency event as it happens (`first_token`, then per
    chunk `mel` and `audio`; `text` per sentence in bistream). `stage(name)`: a
    context around the work of a stage (`flow`, `hift`); with a hook, that work is
    evaluated (`mx.eval`) inside the context, so the time spent in it is the
    stage's own (MLX builds lazily: an unevaluated stage would time nothing).
    """

    def mark(self, event: str, **info: Any) -> None: ...

    def stage(self, name: str) -> AbstractContextManager[Any]: ...


def evaluated(
    timings: TimingHook | None, stage: str, fn: Callable[..., Any], *args: Any, **kwargs: Any
) -> Any:
    """`fn(*args, **kwargs)`; with a timing hook, computed and evaluated inside `timings.stage(stage)`."""
    if timings is None:
        return fn(*args, **kwargs)
    with timings.stage(stage):
        out = fn(*args, **kwargs)
        mx.eval(out)
    return out


class Timings:
    """Latency events of one request, in seconds since the request started (a `TimingHook`).

    `events` holds dicts `{"event", "t", ...}`: `first_token`, then per chunk `mel`
    (flow done) and `audio` (HiFT done, with `chunk`, `samples`); `on_event`, when
    given, is called with each dict as it happens. `stages` sums the seconds spent
    in each stage (`flow`, `hift`).
    """

    def __init__(self, on_event: Callable[[dict], None] | None = None):
        self.t0 = time.perf_counter()
        self.events: list[dict] = []
        self.stages: defaultdict[str, float] = defaultdict(float)
        self.on_event = on_event

    def mark(self, event: str, **info: Any) -> None:
        e = {"event": event, "t": time.perf_counter() - self.t0, **info}
        self.events.append(e)
        if self.on_event is not None:
            self.on_event(e)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Add the seconds the block takes to `stages[name]`."""
        start = time.perf_counter()
        yield
        self.stages[name] += time.perf_counter() - start

    def first(self, event: str) -> float | None:
        return next((e["t"] for e in self.events if e["event"] == event), None)

    def summary(self) -> dict[str, Any]:
        audio = [e for e in self.events if e["event"] == "audio"]
        return {
            "first_token_s": self.first("first_token"),
            "first_mel_s": self.first("mel"),
            "first_audio_s": self.first("audio"),
            "chunk_s": [e["t"] for e in audio],
            "chunk_samples": [e["samples"] for e in audio],
        }


def stream_chunks(
    engine: Any,
    tokens: Iterator[int],
    prompt: Any,
    n_timesteps: int,
    key: mx.array,
    sched: StreamSchedule,
    flow_state: FlowState | None = None,
    timings: TimingHook | None = None,
) -> Iterator[dict[str, mx.array]]:
    """Speech tokens -> audio chunks (see module doc), the flow and HiFT run by `engine`
    (a `cosyvoice2.engine.Engine`: its `flow`, `mel` and `vocode`).

    `flow_state` is a committed prompt state to start the flow cache from; with
    `timings`, the flow and HiFT work of each chunk is timed as the `flow` and `hift`
    stages. HiFT's source noise of chunk `i` is drawn with `split(key, offset + 2)[-1]`.
    """
    config = engine.flow.config
    lookahead, ratio = config.pre_lookahead_len, config.token_mel_ratio
    source_cache_len = sched.mel_cache_len * 480
    window = mx.array(np.hamming(2 * source_cache_len).astype(np.float32))
    n_prompt = prompt.flow_speech_token.shape[1]
    hop = sched.token_hop_len
    first = sched.first_hop_len if sched.first_hop_len is not None else hop
    prompt_pad = math.ceil(n_prompt / hop) * hop - n_prompt if sched.first_hop_len is None else 0
    full_final = sched.final_full_attention
    aligned = prompt.speech_feat.shape[1] == ratio * n_prompt  # not so in voice conversion
    use_cache = sched.flow_cache and aligned
    cursor = FlowCursor(engine.flow, prompt, n_timesteps, flow_state) if use_cache else None
    got: list[int] = []
    offset = 0
    n_chunk = 0
    cache: dict[str, mx.array] | None = None

    def chunk(finalize: bool, upto: int | None = None) -> mx.array:
        nonlocal cache, n_chunk
        toks = mx.array([got[:upto] if upto is not None else got], dtype=mx.int32)
        streaming = not (finalize and full_final)  # the official final call: full attention
        mel = evaluated(
            timings, "flow", engine.mel, toks, prompt, n_timesteps, streaming, finalize,
            start=offset * ratio, cursor=cursor if streaming else None,
        )  # fmt: skip
        if timings is not None:
            timings.mark("mel", chunk=n_chunk, frames=mel.shape[2])
        if cache is not None:
            mel = mx.concatenate([cache["mel"], mel], axis=2)
            src = cache["source"]
        else:
            src = mx.zeros((1, 1, 0))
        speech, source = evaluated(
            timings, "hift", engine.vocode, mel, mx.random.split(key, offset + 2)[-1], src
        )
        if cache is not None:
            speech = fade_in_out(speech, cache["speech"], window)
        if not finalize:
            cache = {
                "mel": mel[:, :, -sched.mel_cache_len :],
                "source": source[:, :, -source_cache_len:],
                "speech": speech[:, -source_cache_len:],
            }
            speech = speech[:, :-source_cache_len]
        mx.eval(speech)
        if timings is not None:
            timings.mark("audio", chunk=n_chunk, samples=speech.shape[1])
        n_chunk += 1
        return speech

    this_hop = first + prompt_pad
    realign = sched.first_hop_len is not None and sched.align_after_first
    overlap = overlap_enabled() if sched.overlap_llm is None else sched.overlap_llm
    if overlap:
        tokens = prefetch(tokens)
    for t in tokens:
        if not got and timings is not None:
            timings.mark("first_token")
        got.append(int(t))
        if overlap and cursor is not None and offset == 0 and len(got) == lookahead:
            # commits the prompt's last block while the LLM decodes the rest of the chunk
            evaluated(timings, "flow", cursor.advance, mx.array([got], dtype=mx.int32))
        if len(got) - offset >= this_hop + lookahead:
            yield {"tts_speech": chunk(False, offset + this_hop + lookahead)}
            offset += this_hop
            hop = min(sched.token_max_hop_len, int(hop * sched.stream_scale_factor))
            this_hop = hop
            if realign:
                this_hop = hop_to_grid(n_prompt + offset, sched.token_hop_len)
                realign = False
    if not got:
        raise CosyVoiceError("the speech LM produced no speech tokens")
    yield {"tts_speech": chunk(True)}
