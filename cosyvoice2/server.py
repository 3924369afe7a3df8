"""OpenAI-compatible speech server (`cosyvoice2 serve`), on FastAPI and uvicorn (the `serve` extra).

Endpoints, in the shapes of OpenAI's audio API:

- `POST /v1/audio/speech`: JSON `{model, input, voice, response_format, speed,
  stream_format, instructions}` plus two extensions, `seed` and `steps` (flow-matching
  steps; the server's `--steps` by default). `voice` is a saved speaker of the model
  dir; `instructions`, when given, selects the instruct2 mode in that voice.
  `model` must be the served model's name (the model dir's name, or the hub id it was
  given as) or one of `MODEL_ALIASES` (`cosyvoice2`, and OpenAI's `tts-1`, `tts-1-hd`,
  `gpt-4o-mini-tts`, so OpenAI clients work unchanged); another name is a 404.
  `response_format`: those of `wav`, `pcm` (16-bit little-endian mono, 24 kHz),
  `flac`, `mp3` and `opus` (Ogg) that libsndfile encodes here (`GET /health` lists
  them); the default is the first of mp3, opus, flac, wav, pcm that works (mp3, as
  OpenAI's, where libsndfile has it).
  Streaming: `pcm` and `wav` at speed 1 are synthesised with `stream=True` and sent
  with chunked transfer encoding as the chunks come; the wav header then gives the
  RIFF and data sizes as 0xFFFFFFFF (unknown length: readers take the data up to the
  end). Other formats, and any speed but 1 (the model changes speed on the whole
  utterance only), are synthesised whole and sent at once. `stream_format: "sse"`
  sends the same bytes as server-sent events, `speech.audio.delta` with base64
  `audio`, then `speech.audio.done`.
- `GET /v1/models` (OpenAI's list), `GET /v1/audio/voices`, `POST /v1/audio/voices`
  (multipart: `id`, `prompt_text`, file `prompt_wav`; at most `--max-upload-mb`;
  saved in the model dir's speaker store, then prepared; an existing id is a 409),
  `GET /health` (the worker's counters: running, waiting, done, cancelled, failed,
  refused).

One model serves every request; its calls run on one worker thread
(`cosyvoice2.server_core.Worker`) fed by a bounded queue of waiting requests: when it
is full a request gets 503 with `Retry-After`. A client that disconnects has its job
cancelled (the model's generator is closed between chunks and before each text
segment), which frees its place. Errors are JSON `{"error": {message, type, param,
code}}` as OpenAI's, validation errors included (400, not FastAPI's 422). Every
response says how real the weights are in `X-CosyVoice2-Weights` (`synthetic`,
`real` or `unknown`: `CosyVoice2.weights_label`).

FastAPI and uvicorn are imported only when the server is created, so the package and
its command line import without them.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations
# (`request: Request`, a name local to `create_app`) at run time.

import argparse
import asyncio
import base64
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from cosyvoice2.errors import InputError
from cosyvoice2.options import MAX_TIMESTEPS
from cosyvoice2.server_core import (
    MAX_BODY_BYTES,
    MEDIA_TYPES,
    MODEL_ALIASES,
    STREAMABLE,
    ApiError,
    Cancelled,
    Job,
    Worker,
    api_error_of,
    available_formats,
    check_voice_id,
    encode,
    parse_speech,
    pcm16,
    wav_header,
)

__all__ = ["add_arguments", "create_app", "main"]

log = logging.getLogger("cosyvoice2.server")

INSTALL_HINT = "the server needs FastAPI and uvicorn: pip install 'cosyvoice2-mlx[serve]'"
WEIGHTS_HEADER = "X-CosyVoice2-Weights"
_UPLOAD_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus")


class _TooLarge(Exception):
    pass


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help="MLX model dir, or a Hugging Face id (downloaded, cached)"
    )
    parser.add_argument("--revision", help="hub revision (branch, tag or commit) of a hub id")
    parser.add_argument(
        "--name", help="the served model's name (default: the dir's name or hub id)"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument(
        "--queue-size",
        type=int,
        default=8,
        help="requests that may wait while one is synthesised; more get 503 (default 8)",
    )
    parser.add_argument(
        "--steps", type=int, default=10, help="flow-matching steps of a request (default 10)"
    )
    parser.add_argument(
        "--llm-dtype", choices=("float32", "bfloat16", "float16"), help="speech LM precision"
    )
    parser.add_argument("--llm-bits", type=int, choices=(4, 8), help="quantise the speech LM")
    parser.add_argument(
        "--prepare",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="prepare the saved speakers at start, for a fast first chunk (default on)",
    )
    parser.add_argument(
        "--max-upload-mb", type=float, default=16, help="largest voice upload (default 16 MiB)"
    )
    parser.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error")
    )


def _check_args(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be from 0 to 65535, got {args.port}")
    if args.queue_size < 1:
        raise InputError(f"--queue-size must be at least 1, got {args.queue_size}")
    if not 1 <= args.steps <= MAX_TIMESTEPS:
        raise InputError(f"--steps must be from 1 to {MAX_TIMESTEPS}, got {args.steps}")
    if not args.max_upload_mb > 0:
        raise InputError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")


def main(args: argparse.Namespace) -> int:
    """`cosyvoice2 serve`: load the model, prepare its speakers, serve until interrupted."""
    try:
        import fastapi  # noqa: F401
        import multipart  # noqa: F401  (python-multipart: the voice upload form)
        import uvicorn
    except ImportError:
        print(f"cosyvoice2: error: {INSTALL_HINT}", file=sys.stderr)
        return 2
    import cosyvoice2

    _check_args(args)
    from cosyvoice2.hub import hub_id

    name = args.name or hub_id(args.model) or Path(args.model).name
    kwargs = {"llm_dtype": args.llm_dtype, "llm_bits": args.llm_bits}
    if args.revision is not None:
        kwargs["revision"] = args.revision
    model = cosyvoice2.load(args.model, **kwargs)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    app = create_app(
        model,
        name=name,
        queue_size=args.queue_size,
        steps=args.steps,
        prepare=args.prepare,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def create_app(
    model: Any,
    name: str | None = None,
    queue_size: int = 8,
    steps: int = 10,
    prepare: bool = True,
    max_upload_bytes: int = 16 * 2**20,
) -> Any:
    """The FastAPI app serving `model` (a loaded `CosyVoice2`); see the module docstring.

    `prepare`: compute the saved speakers' prompt states now (on the worker), so
    their first requests do not pay for them; a speaker that cannot be prepared
    (a corrupt file) is logged and the server starts without it prepared.
    """
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException

    name = name or (model.path.name if getattr(model, "path", None) else "cosyvoice2")
    served = (name, *[a for a in MODEL_ALIASES if a != name])
    formats = available_formats()
    label = model.weights_label
    created = int(time.time())
    worker = Worker(queue_size)
    if prepare:
        for spk in model.list_available_spks():
            try:
                worker.call(lambda spk=spk: model.prepare_speaker(spk, n_timesteps=steps))
            except Exception as e:  # noqa: BLE001 - one bad speaker does not stop the server
                log.warning("speaker %r not prepared: %s", spk, " ".join(str(e).split()))

    @asynccontextmanager
    async def lifespan(app: Any):
        yield
        worker.stop()

    app = FastAPI(title="cosyvoice2-mlx speech server", lifespan=lifespan)
    app.state.worker = worker
    app.state.formats = formats
    headers = {WEIGHTS_HEADER: label}

    def json_response(obj: Any, status: int = 200, extra: dict | None = None) -> Any:
        return JSONResponse(obj, status_code=status, headers={**headers, **(extra or {})})

    def error_response(e: ApiError) -> Any:
        return json_response(e.body(), e.status, e.headers)

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, e: ApiError) -> Any:
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, e: RequestValidationError) -> Any:
        first = (e.errors() or [{}])[0]
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        message = first.get("msg", "invalid request")
        return error_response(ApiError(400, message, ".".join(loc) or None))

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, e: HTTPException) -> Any:
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return error_response(ApiError(e.status_code, str(e.detail), type=kind))

    @app.exception_handler(Exception)
    async def on_error(request: Request, e: Exception) -> Any:
        log.error("request failed: %s: %s", type(e).__name__, " ".join(str(e).split()))
        return error_response(api_error_of(e))

    async def read_body(request: Request, limit: int) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body is larger than {limit} bytes")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise ApiError(413, f"the request body is larger than {limit} bytes")
        return bytes(body)

    async def watch_disconnect(request: Request, job: Job) -> None:
        """Cancel `job` when the client goes away (the body has been read already)."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                if not job.finished:
                    log.info("client disconnected: job cancelled")
                job.cancel()
                return

    async def wait(job: Job) -> None:
        kind, value = await job.next()
        if kind == "error":
            raise api_error_of(value)

    @app.get("/health")
    async def health() -> Any:
        return json_response(
            {
                "status": "ok",
                "model": name,
                "weights": label,
                "formats": list(formats),
                "voices": len(model.list_available_spks()),
                "worker": worker.stats(),
            }
        )

    @app.get("/v1/models")
    async def models() -> Any:
        data = [
            {"id": m, "object": "model", "created": created, "owned_by": "cosyvoice2-mlx"}
            for m in served
        ]
        return json_response({"object": "list", "data": data})

    @app.get("/v1/audio/voices")
    async def voices() -> Any:
        data = [{"id": v, "object": "voice"} for v in model.list_available_spks()]
        return json_response({"object": "list", "data": data})

    @app.post("/v1/audio/voices")
    async def add_voice(request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_upload_bytes:
            raise ApiError(413, f"the upload is larger than {max_upload_bytes} bytes", "prompt_wav")
        received = 0

        async def capped() -> dict:
            nonlocal received
            message = await request.receive()
            received += len(message.get("body", b""))
            if received > max_upload_bytes:
                raise _TooLarge
            return message

        try:
            form = await Request(request.scope, capped).form(max_files=1, max_fields=4)
        except _TooLarge:
            raise ApiError(
                413, f"the upload is larger than {max_upload_bytes} bytes", "prompt_wav"
            ) from None
        except Exception as e:  # noqa: BLE001 - python-multipart's and starlette's parse errors
            detail = getattr(e, "detail", None) or str(e)
            raise ApiError(
                400, f"not a valid multipart form: {' '.join(str(detail).split())}"
            ) from None
        voice_id = form.get("id")
        prompt_text = form.get("prompt_text") or ""
        upload = form.get("prompt_wav")
        if not isinstance(voice_id, str) or not isinstance(prompt_text, str):
            raise ApiError(400, "'id' and 'prompt_text' must be text fields")
        check_voice_id(voice_id)
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "missing required file: 'prompt_wav'", "prompt_wav")
        if voice_id in model.list_available_spks():
            raise ApiError(409, f"voice {voice_id[:80]!r} exists already", "id", "voice_exists")
        data = await upload.read()
        suffix = Path(upload.filename or "").suffix.lower()
        suffix = suffix if suffix in _UPLOAD_SUFFIXES else ""
        fd, tmp = tempfile.mkstemp(prefix="cosyvoice2-voice-", suffix=suffix)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)

            def run() -> Any:
                model.add_zero_shot_spk(prompt_text, tmp, voice_id)
                model.prepare_speaker(voice_id, n_timesteps=steps)
                return iter(())

            job = Job(run, asyncio.get_running_loop())
            worker.submit(job)
            try:
                await wait(job)
            except ApiError as e:  # the temporary file's name is the upload's
                if tmp in e.message:
                    e.message, e.param = e.message.replace(tmp, "prompt_wav"), "prompt_wav"
                raise
        finally:
            os.unlink(tmp)
        return json_response({"id": voice_id, "object": "voice"}, 201)

    def synthesis(req: Any, stream: bool, job: Job) -> Any:
        options = dict(
            stream=stream,
            speed=req.speed,
            seed=req.seed,
            n_timesteps=req.steps,
            progress=lambda i, n, segment: job.check(),
        )
        if req.instructions is not None:
            it = model.inference_instruct2(req.input, req.instructions, None, req.voice, **options)
        else:
            it = model.inference_zero_shot(req.input, "", None, req.voice, **options)
        try:
            for out in it:
                yield np.asarray(out["tts_speech"], dtype=np.float32).reshape(-1)
        finally:
            it.close()

    def sse(data: bytes) -> bytes:
        event = {"type": "speech.audio.delta", "audio": base64.b64encode(data).decode("ascii")}
        return b"data: " + json.dumps(event).encode() + b"\n\n"

    SSE_DONE = b'data: {"type": "speech.audio.done"}\n\n'

    @app.post("/v1/audio/speech")
    async def speech(request: Request) -> Any:
        raw = await read_body(request, MAX_BODY_BYTES)
        req = parse_speech(raw, served, formats, model.list_available_spks(), steps)
        try:
            model.frontend.check_text(req.input, "'input'")
        except InputError as e:
            raise ApiError(400, str(e), "input") from None
        stream = req.response_format in STREAMABLE and req.speed == 1.0
        job = Job(lambda: synthesis(req, stream, job), asyncio.get_running_loop())
        worker.submit(job)
        watcher = asyncio.create_task(watch_disconnect(request, job))
        media = (
            "text/event-stream" if req.stream_format == "sse" else MEDIA_TYPES[req.response_format]
        )
        try:
            kind, first = await job.next()
            if kind == "error":
                raise (
                    api_error_of(first)
                    if not isinstance(first, Cancelled)
                    else ApiError(499, "the client closed the request", code="cancelled")
                )
            if not stream:
                parts = [first] if kind == "item" else []
                while kind == "item":
                    kind, value = await job.next()
                    if kind == "item":
                        parts.append(value)
                    elif kind == "error":
                        raise api_error_of(value)
                audio = np.concatenate(parts) if parts else np.zeros(0, np.float32)
                data = await asyncio.to_thread(encode, audio, req.response_format)
                watcher.cancel()
                if req.stream_format == "sse":
                    return Response(sse(data) + SSE_DONE, media_type=media, headers=headers)
                return Response(data, media_type=media, headers=headers)
        except BaseException:
            job.cancel()
            watcher.cancel()
            raise

        async def chunks() -> Any:
            try:
                if req.response_format == "wav":
                    yield wav_header(None)
                if kind == "item":
                    yield pcm16(first)
                done = kind == "done"
                while not done:
                    k, value = await job.next()
                    if k == "item":
                        yield pcm16(value)
                    elif k == "error":
                        if isinstance(value, Cancelled):
                            return
                        e = api_error_of(value)
                        log.error("synthesis failed mid-stream: %s", e.message)
                        raise RuntimeError(f"synthesis failed mid-stream: {e.message}")
                    else:
                        done = True
            finally:
                job.cancel()
                watcher.cancel()

        async def events() -> Any:
            async for data in chunks():
                yield sse(data)
            yield SSE_DONE

        body = events() if req.stream_format == "sse" else chunks()
        return StreamingResponse(body, media_type=media, headers=headers)

    return app
