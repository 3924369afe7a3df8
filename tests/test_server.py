"""`cosyvoice2 serve`: a real server process on the tiny model, real HTTP clients (openai, httpx).

One server per module (`--queue-size 2 --steps 2`); a saved speaker `alice` is added
to its model dir before it starts, so it is prepared at start.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

ROOT = Path(__file__).resolve().parents[1]
TEXT = "Hello there."
LONG = (
    "Hello there. This is the second sentence of the test. And here is a third one, a bit longer."
)
SLOW = dict(input=LONG * 6, steps=40, response_format="pcm")  # runs for minutes, a chunk a second


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(mlx_tiny_dir: Path, prompt_wav: Path, tmp_path_factory: pytest.TempPathFactory):
    import cosyvoice2

    model_dir = tmp_path_factory.mktemp("serve") / "tiny"
    shutil.copytree(mlx_tiny_dir, model_dir)
    cosyvoice2.load(model_dir).add_zero_shot_spk("A short prompt.", prompt_wav, "alice")
    port = _free_port()
    log = (tmp_path_factory.mktemp("serve-log") / "server.log").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cosyvoice2", "serve", "--model", str(model_dir),
         "--port", str(port), "--queue-size", "2", "--steps", "2"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            log.seek(0)
            pytest.fail(f"the server did not start:\n{log.read()[-3000:]}")
        time.sleep(0.2)
    yield url
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def speech(url: str, **body) -> httpx.Response:
    body = {"model": "tts-1", "input": TEXT, "voice": "alice", **body}
    return httpx.post(url + "/v1/audio/speech", json=body, timeout=120)


def health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=10).json()


def decode(data: bytes, fmt: str) -> tuple[np.ndarray, int]:
    if fmt == "pcm":
        return np.frombuffer(data, "<i2").astype(np.float32) / 32767, 24000
    return sf.read(io.BytesIO(data), dtype="float32")


def is_openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_models_and_health(server: str) -> None:
    r = httpx.get(server + "/v1/models")
    assert r.status_code == 200 and r.headers["x-cosyvoice2-weights"] == "synthetic"
    body = r.json()
    assert body["object"] == "list"
    assert {m["id"] for m in body["data"]} >= {"tiny", "tts-1", "cosyvoice2"}
    assert all(m["object"] == "model" for m in body["data"])
    h = health(server)
    assert h["status"] == "ok" and h["weights"] == "synthetic"
    assert set(h["formats"]) >= {"wav", "pcm", "flac"}


def test_openai_client_speech(server: str) -> None:
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    response = client.audio.speech.create(
        model="tts-1", voice="alice", input=TEXT, response_format="wav"
    )
    audio, sr = sf.read(io.BytesIO(response.content), dtype="float32")
    assert sr == 24000 and audio.ndim == 1 and audio.shape[0] > 0 and audio.shape[0] % 480 == 0
    assert response.response.headers["x-cosyvoice2-weights"] == "synthetic"


def test_openai_client_streams_chunks(server: str) -> None:
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="alice", input=LONG, response_format="pcm"
    ) as response:
        assert response.headers.get("transfer-encoding") == "chunked"
        pieces = [p for p in response.iter_bytes() if p]
    assert len(pieces) > 1
    whole = b"".join(pieces)
    assert len(whole) % 2 == 0 and len(whole) > 24000  # several seconds of 16-bit audio
    # the same request again, as a streamed wav: the header says "length unknown"
    wav = speech(server, input=LONG, response_format="wav")
    assert wav.content[4:8] == b"\xff\xff\xff\xff" and wav.content[40:44] == b"\xff\xff\xff\xff"
    assert wav.content[44:] == whole
    audio, sr = decode(wav.content, "wav")
    assert sr == 24000 and audio.shape[0] == len(whole) // 2
    # as events: one per chunk of the synthesis (a whole synthesis would be one event)
    sse = speech(server, input=LONG, response_format="pcm", stream_format="sse")
    events = [json.loads(line[6:]) for line in sse.text.splitlines() if line.startswith("data: ")]
    assert len(events) > 2 and events[-1]["type"] == "speech.audio.done"
    assert b"".join(base64.b64decode(e["audio"]) for e in events[:-1]) == whole


def test_every_format_decodes_to_the_same_audio(server: str) -> None:
    """At speed 1.25 every format is synthesised whole: the same audio in each (same seed)."""
    formats = health(server)["formats"]
    assert set(formats) >= {"wav", "pcm", "flac"}
    decoded = {}
    for fmt in formats:
        r = speech(server, response_format=fmt, speed=1.25, seed=3)
        assert r.status_code == 200, r.text
        audio, sr = decoded[fmt] = decode(r.content, fmt)
        assert sr == 24000, fmt
    ref = decoded["pcm"][0]
    assert ref.shape[0] > 0
    for fmt, (audio, _) in decoded.items():
        assert audio.shape == ref.shape, fmt
        if fmt in ("wav", "flac"):  # lossless: the same 16-bit samples
            np.testing.assert_allclose(audio, ref, atol=1e-4)
    sse = speech(server, response_format="pcm", speed=1.25, seed=3, stream_format="sse")
    events = [json.loads(line[6:]) for line in sse.text.splitlines() if line.startswith("data: ")]
    assert events[-1]["type"] == "speech.audio.done"
    data = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    np.testing.assert_array_equal(decode(data, "pcm")[0], ref)


def test_concurrent_requests_match_sequential(server: str) -> None:
    seeds = [11, 12, 13]
    sequential = {s: speech(server, seed=s, response_format="pcm").content for s in seeds}
    assert len(set(sequential.values())) == len(seeds)  # the seeds matter
    results: dict[int, httpx.Response] = {}

    def one(seed: int) -> None:
        results[seed] = speech(server, seed=seed, response_format="pcm")

    threads = [threading.Thread(target=one, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in seeds:
        assert results[s].status_code == 200, results[s].text
        assert results[s].content == sequential[s]


def _slow_stream(server: str, opened: list, started: threading.Event) -> None:
    body = {"model": "tts-1", "voice": "alice", **SLOW}
    client = httpx.Client(timeout=120)
    opened.append(client)
    try:
        with client.stream("POST", server + "/v1/audio/speech", json=body) as r:
            opened.append(r)
            started.set()
            for _ in r.iter_bytes():
                pass
    except (httpx.HTTPError, RuntimeError):
        pass  # closed by the test


def _wait_for(server: str, condition, seconds: float = 20) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        h = health(server)["worker"]
        if condition(h):
            return h
        assert time.monotonic() < deadline, f"worker stuck: {h}"
        time.sleep(0.05)


def test_full_queue_is_503_and_disconnects_free_the_worker(server: str) -> None:
    before = health(server)["worker"]
    opened: list = []
    threads = []
    # one running, two waiting: the queue (size 2) is full. One at a time: three requests
    # at once may all reach the queue before the worker takes the first out of it.
    for running, waiting in ((1, 0), (1, 1), (1, 2)):
        t = threading.Thread(target=_slow_stream, args=(server, opened, threading.Event()))
        t.start()
        threads.append(t)
        _wait_for(server, lambda h, r=running, w=waiting: h["running"] == r and h["waiting"] == w)
    body = {"model": "tts-1", "input": TEXT, "voice": "alice"}
    r = httpx.post(server + "/v1/audio/speech", json=body, timeout=10)  # refused at once
    error = is_openai_error(r, 503)
    assert r.headers["retry-after"] and error["type"] == "server_error"
    for c in opened:  # the clients go away: running and waiting jobs are cancelled
        c.close()
    t0 = time.monotonic()
    after = _wait_for(server, lambda h: h["running"] == 0 and h["waiting"] == 0)
    assert time.monotonic() - t0 < 15
    assert after["cancelled"] - before["cancelled"] == 3, after
    assert after["refused"] - before["refused"] == 1
    for t in threads:
        t.join(30)
    assert speech(server).status_code == 200  # the worker is free again


def test_disconnect_mid_stream_stops_synthesis(server: str) -> None:
    before = health(server)["worker"]
    with httpx.Client(timeout=120) as client:
        body = {"model": "tts-1", "voice": "alice", **SLOW}
        with client.stream("POST", server + "/v1/audio/speech", json=body) as r:
            assert r.status_code == 200
            next(r.iter_raw())  # the first chunk came: synthesis is running
    t0 = time.monotonic()
    after = _wait_for(server, lambda h: h["cancelled"] > before["cancelled"] and h["running"] == 0)
    assert time.monotonic() - t0 < 15
    assert after["done"] == before["done"]


BAD = {
    "unknown voice": ({"voice": "nobody"}, 400, "voice"),
    "empty input": ({"input": "   "}, 400, "input"),
    "nothing to speak": ({"input": "?!"}, 400, "input"),
    "bad format": ({"response_format": "aiff"}, 400, "response_format"),
    "speed too low": ({"speed": 0.1}, 400, "speed"),
    "speed too high": ({"speed": 4.5}, 400, "speed"),
    "speed not a number": ({"speed": "fast"}, 400, "speed"),
    "oversized input": ({"input": "word " * 1000}, 400, "input"),
    "unknown model": ({"model": "whisper-1"}, 404, "model"),
    "unknown field": ({"temperature": 1}, 400, "temperature"),
    "missing voice": ({"voice": None}, 400, "voice"),
    "input not text": ({"input": 5}, 400, "input"),
    "bad stream format": ({"stream_format": "ws"}, 400, "stream_format"),
    "steps out of range": ({"steps": 0}, 400, "steps"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_speech_requests(server: str, case: str) -> None:
    change, status, param = BAD[case]
    error = is_openai_error(speech(server, **change), status)
    assert error["param"] == param and error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "body, status",
    [(b'{"model": "tts-1", "input": ', 400), (b"[1, 2]", 400), (b"\xff\xfe", 400),
     (b" " * (70 * 1024), 413)],
)  # fmt: skip
def test_malformed_bodies(server: str, body: bytes, status: int) -> None:
    r = httpx.post(
        server + "/v1/audio/speech", content=body, headers={"content-type": "application/json"}
    )
    is_openai_error(r, status)


def test_unknown_route_is_an_openai_error(server: str) -> None:
    is_openai_error(httpx.get(server + "/v1/nothing"), 404)


def test_add_a_voice(server: str, prompt_wav: Path) -> None:
    files = {"prompt_wav": ("p.wav", prompt_wav.read_bytes(), "audio/wav")}
    form = {"id": "bob", "prompt_text": "A short prompt."}
    r = httpx.post(server + "/v1/audio/voices", data=form, files=files, timeout=60)
    assert r.status_code == 201, r.text
    voices = httpx.get(server + "/v1/audio/voices").json()
    assert {"alice", "bob"} <= {v["id"] for v in voices["data"]}
    assert speech(server, voice="bob").status_code == 200
    again = httpx.post(server + "/v1/audio/voices", data=form, files=files, timeout=60)
    assert is_openai_error(again, 409)["param"] == "id"
    bad = {"prompt_wav": ("p.wav", b"RIFF not audio at all", "audio/wav")}
    error = is_openai_error(
        httpx.post(server + "/v1/audio/voices", data={"id": "c"}, files=bad), 400
    )
    assert error["param"] == "prompt_wav" and "/tmp" not in error["message"]
    is_openai_error(httpx.post(server + "/v1/audio/voices", data={"id": "d"}), 400)
    big = {"prompt_wav": ("p.wav", b"\0" * (17 * 2**20), "audio/wav")}
    is_openai_error(httpx.post(server + "/v1/audio/voices", data={"id": "e"}, files=big), 413)
    ids = {v["id"] for v in httpx.get(server + "/v1/audio/voices").json()["data"]}
    assert not ids & {"c", "d", "e"}


# ------------------------------------------------------------------ the command line


def test_serve_help_and_bad_arguments(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "cosyvoice2", "serve"]
    ok = subprocess.run([*cmd, "--help"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert ok.returncode == 0 and "--queue-size" in ok.stdout
    bad = subprocess.run(
        [*cmd, "--model", str(tmp_path / "missing")], capture_output=True, text=True, env=env
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "missing" in bad.stderr, bad.stderr


def test_serve_without_fastapi_says_what_to_install(monkeypatch, capsys) -> None:
    from cosyvoice2.cli import main

    monkeypatch.setitem(sys.modules, "fastapi", None)  # `import fastapi` raises ImportError
    assert main(["serve", "--model", "unused"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cosyvoice2-mlx[serve]" in err
