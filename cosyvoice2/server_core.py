"""The speech server's parts that do not need FastAPI: request checking, audio encoding, the worker.

`cosyvoice2.server` puts these behind HTTP. Kept apart so that they import with the
package alone (FastAPI and uvicorn are an optional extra) and so the rules of a
request are in one place:

- `parse_speech`: the JSON body of `POST /v1/audio/speech` (OpenAI's shape), checked
  field by field; a bad one is an `ApiError` naming it (`param`), as OpenAI reports.
- `encode` / `StreamEncoder`: float32 audio -> the response formats that work here
  (`available_formats`: each is tried once at start; only those that encode are
  offered). `pcm` and `wav` can be sent chunk by chunk; the others are encoded whole.
- `Worker`: ONE thread runs every model call (MLX calls are serialised, one model is
  shared), fed by a bounded queue of waiting jobs. A full queue refuses a job at once
  (`Busy`: HTTP 503 with `Retry-After`). A job whose client went away is cancelled:
  its generator is closed between chunks (and before each text segment), and its
  queue slot is freed.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import queue
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from cosyvoice2.errors import CosyVoiceError, InputError
from cosyvoice2.options import MAX_SEED, MAX_SPEED, MAX_TIMESTEPS, MIN_SPEED

# The aliases `model` may name besides the served model's own name: what OpenAI's
# clients send by default, so they work unchanged, and the project's name.
MODEL_ALIASES = ("cosyvoice2", "tts-1", "tts-1-hd", "gpt-4o-mini-tts")
MAX_INPUT_CHARS = 4096  # as OpenAI's speech endpoint
MAX_BODY_BYTES = 64 * 1024  # a speech request's JSON: 4096 characters and a few fields
MAX_VOICE_ID_CHARS = 256
SAMPLE_RATE = 24000

# format -> (libsndfile format, subtype, media type); `pcm` and `wav` are written here
_SOUNDFILE = {
    "flac": ("FLAC", "PCM_16", "audio/flac"),
    "mp3": ("MP3", "MPEG_LAYER_III", "audio/mpeg"),
    "opus": ("OGG", "OPUS", "audio/ogg"),
}
MEDIA_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", **{k: v[2] for k, v in _SOUNDFILE.items()}}
STREAMABLE = ("pcm", "wav")  # sent as synthesis produces them
FORMAT_ORDER = (
    "mp3",
    "opus",
    "flac",
    "wav",
    "pcm",
)  # OpenAI's order; the first that works is the default
SPEECH_FIELDS = {
    "model", "input", "voice", "response_format", "speed", "stream_format", "instructions",
    "seed", "steps",
}  # fmt: skip


class ApiError(Exception):
    """A request the server refuses: HTTP `status`, OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status,
            message,
            param,
            code,
            type,
        )
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class Busy(ApiError):
    """The queue of waiting jobs is full."""

    def __init__(self, retry_after: int = 1):
        super().__init__(
            503,
            "the server is busy (its queue of waiting requests is full); retry later",
            code="server_busy",
            type="server_error",
            headers={"Retry-After": str(retry_after)},
        )


class Cancelled(Exception):
    """Raised inside a job whose client went away."""


def api_error_of(e: BaseException) -> ApiError:
    """The HTTP error of an exception raised by a job: bad input 400, other model errors 500."""
    if isinstance(e, ApiError):
        return e
    message = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, InputError) and not type(e).__name__.startswith("SpeakerStore"):
        return ApiError(400, message)
    if isinstance(e, CosyVoiceError):
        return ApiError(500, message, type="server_error")
    return ApiError(500, f"internal error: {type(e).__name__}", type="server_error")


# ------------------------------------------------------------------ requests


@dataclass(frozen=True)
class SpeechRequest:
    input: str
    voice: str
    response_format: str
    speed: float
    stream_format: str  # "audio" or "sse"
    instructions: str | None
    seed: int
    steps: int


def _field(body: dict, name: str, kind: type | tuple, default: Any = None) -> Any:
    """`body[name]` checked to be of `kind` (never a bool); absent or null: `default`."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _tuple(kind)):
        expected = {str: "a string", int: "an integer", (int, float): "a number"}.get(kind, "")
        raise ApiError(400, f"'{name}' must be {expected}, got {json.dumps(value)[:40]}", name)
    return value


def _tuple(kind: type | tuple) -> tuple:
    return kind if isinstance(kind, tuple) else (kind,)


def parse_speech(
    raw: bytes,
    served: tuple[str, ...],
    formats: tuple[str, ...],
    voices: list[str],
    default_steps: int,
    max_input_chars: int = MAX_INPUT_CHARS,
) -> SpeechRequest:
    """Check a speech request body; `served`: the accepted `model` names."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise ApiError(400, f"the body is not valid JSON: {' '.join(str(e).split())}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    unknown = sorted(set(body) - SPEECH_FIELDS)
    if unknown:
        raise ApiError(400, f"unrecognized request argument: {unknown[0]!r}", unknown[0])
    for name in ("model", "input", "voice"):
        if body.get(name) is None:
            raise ApiError(400, f"missing required parameter: '{name}'", name)
    model = _field(body, "model", str)
    if model not in served:
        raise ApiError(
            404,
            f"the model {model[:80]!r} is not served here; use one of: {', '.join(served)}",
            "model",
            "model_not_found",
        )
    text = _field(body, "input", str)
    if not text.strip():
        raise ApiError(400, "'input' is empty", "input")
    if len(text) > max_input_chars:
        raise ApiError(
            400,
            f"'input' is too long: {len(text)} characters (at most {max_input_chars})",
            "input",
            "string_above_max_length",
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, "'input' is not valid Unicode text", "input") from None
    voice = _field(body, "voice", str)
    if voice not in voices:
        shown = ", ".join(voices[:20]) or "none: add one with POST /v1/audio/voices"
        raise ApiError(
            400, f"unknown voice {voice[:80]!r}; saved voices: {shown}", "voice", "voice_not_found"
        )
    fmt = _field(body, "response_format", str, formats[0])
    if fmt not in formats:
        raise ApiError(
            400,
            f"unsupported response_format {fmt[:20]!r}; supported: {', '.join(formats)}",
            "response_format",
        )
    speed = _field(body, "speed", (int, float), 1.0)
    if not (math.isfinite(speed) and MIN_SPEED <= speed <= MAX_SPEED):
        raise ApiError(400, f"'speed' must be between 0.25 and 4, got {speed}", "speed")
    stream_format = _field(body, "stream_format", str, "audio")
    if stream_format not in ("audio", "sse"):
        raise ApiError(400, "'stream_format' must be 'audio' or 'sse'", "stream_format")
    instructions = _field(body, "instructions", str, None)
    if instructions is not None and not instructions.strip():
        instructions = None
    if instructions is not None and len(instructions) > max_input_chars:
        raise ApiError(400, "'instructions' is too long", "instructions")
    seed = _field(body, "seed", int, 0)
    if not 0 <= seed <= MAX_SEED:
        raise ApiError(400, "'seed' must be an integer from 0 to 2**62", "seed")
    steps = _field(body, "steps", int, default_steps)
    if not 1 <= steps <= MAX_TIMESTEPS:
        raise ApiError(400, f"'steps' must be an integer from 1 to {MAX_TIMESTEPS}", "steps")
    return SpeechRequest(
        text, voice, fmt, float(speed), stream_format, instructions, int(seed), int(steps)
    )


def check_voice_id(voice_id: str | None) -> str:
    if not voice_id or not voice_id.strip():
        raise ApiError(400, "missing required field: 'id'", "id")
    if len(voice_id) > MAX_VOICE_ID_CHARS:
        raise ApiError(400, f"'id' is longer than {MAX_VOICE_ID_CHARS} characters", "id")
    if any(ord(c) < 32 or ord(c) == 127 for c in voice_id):
        raise ApiError(400, "'id' holds control characters", "id")
    return voice_id


# ------------------------------------------------------------------ audio


def pcm16(audio: np.ndarray) -> bytes:
    x = np.clip(np.asarray(audio, dtype=np.float32).reshape(-1), -1.0, 1.0)
    return (np.round(x * 32767.0)).astype("<i2").tobytes()


def wav_header(frames: int | None, rate: int = SAMPLE_RATE) -> bytes:
    """A 16-bit mono WAV header; `frames=None`: length unknown (streaming), the RIFF and data
    sizes set to their maximum (0xFFFFFFFF), which readers take as "up to the end"."""
    data = 0xFFFFFFFF if frames is None else 2 * frames
    riff = 0xFFFFFFFF if frames is None else 36 + data
    fmt = struct.pack("<IHHIIHH", 16, 1, 1, rate, 2 * rate, 2, 16)
    return (
        b"RIFF"
        + struct.pack("<I", riff)
        + b"WAVE"
        + b"fmt "
        + fmt
        + b"data"
        + struct.pack("<I", data)
    )


def encode(audio: np.ndarray, fmt: str, rate: int = SAMPLE_RATE) -> bytes:
    """The whole of `audio` (float32 mono) in `fmt`."""
    if fmt == "pcm":
        return pcm16(audio)
    if fmt == "wav":
        pcm = pcm16(audio)
        return wav_header(len(pcm) // 2, rate) + pcm
    import soundfile as sf

    container, subtype, _ = _SOUNDFILE[fmt]
    out = io.BytesIO()
    sf.write(
        out,
        np.asarray(audio, dtype=np.float32).reshape(-1),
        rate,
        format=container,
        subtype=subtype,
    )
    return out.getvalue()


def available_formats() -> tuple[str, ...]:
    """The response formats that encode here (libsndfile builds differ: mp3 and opus are optional)."""
    probe = np.zeros(SAMPLE_RATE // 10, dtype=np.float32)
    works = []
    for fmt in FORMAT_ORDER:
        try:
            if encode(probe, fmt):
                works.append(fmt)
        except Exception:  # noqa: BLE001 - a format this libsndfile cannot write is left out
            pass
    return tuple(works)


# ------------------------------------------------------------------ the worker


class Job:
    """One unit of model work: `run()` yields items (audio chunks); they reach the event loop
    through an asyncio queue as ("item", x), then ("done", None) or ("error", exc)."""

    def __init__(self, run: Callable[[], Iterator[Any]], loop: asyncio.AbstractEventLoop):
        self.run = run
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.finished = False  # the event loop has seen its last event
        self.state = "new"  # then "waiting", "running" or "dropped" (cancelled while waiting)
        self.worker: Worker | None = None

    def cancel(self) -> None:
        """Stop the job: a waiting one leaves the queue now, a running one at its next check."""
        self.cancelled.set()
        if self.worker is not None:
            self.worker._drop(self)

    def check(self) -> None:
        """Raise `Cancelled` when the client went away (called by the worker and the model hooks)."""
        if self.cancelled.is_set():
            raise Cancelled

    def _put(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed (shutdown)
            pass

    async def next(self) -> tuple[str, Any]:
        kind, value = await self.events.get()
        if kind != "item":
            self.finished = True
        return kind, value


class Worker:
    """Runs jobs one at a time on one thread; at most `queue_size` jobs wait."""

    def __init__(self, queue_size: int):
        if queue_size < 1:
            raise ValueError("queue_size must be >= 1")
        self.queue_size = queue_size
        self._jobs: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self.waiting = 0
        self.running = 0
        self.counts = {"done": 0, "cancelled": 0, "failed": 0, "refused": 0}
        self._thread = threading.Thread(target=self._loop, name="cosyvoice2-worker", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue `job`, or raise `Busy` when `queue_size` jobs wait already."""
        with self._lock:
            if self.waiting >= self.queue_size:
                self.counts["refused"] += 1
                raise Busy()
            self.waiting += 1
            job.state, job.worker = "waiting", self
        self._jobs.put(job)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the worker thread now (outside the queue's bound) and return its result."""
        done = threading.Event()
        result: dict[str, Any] = {}

        def task() -> None:
            try:
                result["value"] = fn()
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller
                result["error"] = e
            finally:
                done.set()

        self._jobs.put(task)
        done.wait()
        if "error" in result:
            raise result["error"]
        return result.get("value")

    def stop(self) -> None:
        self._jobs.put(None)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "running": self.running,
                "waiting": self.waiting,
                "queue_size": self.queue_size,
                **self.counts,
            }

    def _drop(self, job: Job) -> None:
        with self._lock:
            if job.state != "waiting":
                return
            job.state = "dropped"
            self.waiting -= 1
            self.counts["cancelled"] += 1
        job._put("error", Cancelled())

    def _count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if not isinstance(job, Job):
                job()
                continue
            with self._lock:
                if job.state == "dropped":
                    continue
                job.state = "running"
                self.waiting -= 1
                self.running += 1
            try:
                self._run(job)
            finally:
                with self._lock:
                    self.running -= 1

    def _run(self, job: Job) -> None:
        it = None
        try:
            job.check()
            it = job.run()
            for item in it:
                job.check()
                job._put("item", item)
            job.check()
        except Cancelled:
            self._count("cancelled")
            job._put("error", Cancelled())
        except BaseException as e:  # noqa: BLE001 - reported to the request, the worker goes on
            self._count("failed")
            job._put("error", e)
        else:
            self._count("done")
            job._put("done", None)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # noqa: BLE001 - closing a failed generator
                    pass
