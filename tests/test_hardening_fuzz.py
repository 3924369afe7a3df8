"""Property-based fuzzing of every untrusted file the package reads.

Valid files (a `.pt` checkpoint, an ONNX model, a model dir's `config.json` and
safetensors, a saved speaker and the store's index, a bench results file) are
mutated by hypothesis: truncated, bit-flipped, with a byte range swapped with
another, with a size-like field overwritten by a huge value, or (JSON) with a
value replaced. Each mutated file must either load correctly or be refused with a
clean one-line error (a `CosyVoiceError`; a `ValueError` for the bench's results
reader, which is not part of the package), never another exception. The process's
peak memory must not grow by more than a bound over the whole run: no mutated size
is ever allocated.
"""

from __future__ import annotations

import json
import resource
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cosyvoice2.errors import CosyVoiceError

EXAMPLES = 60
MEMORY_GROWTH_MB = 400  # over all examples of one file kind
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@st.composite
def byte_mutation(draw: st.DrawFn, size: int) -> tuple[str, int, int, int]:
    """(kind, offset, length or value, second offset)."""
    kind = draw(st.sampled_from(["truncate", "flip", "swap", "huge", "zero"]))
    offset = draw(st.integers(0, max(0, size - 1)))
    n = draw(st.integers(1, 64))
    other = draw(st.integers(0, max(0, size - 1)))
    return kind, offset, n, other


def mutate(data: bytes, m: tuple[str, int, int, int]) -> bytes:
    kind, offset, n, other = m
    b = bytearray(data)
    if kind == "truncate":
        return bytes(b[:offset])
    if kind == "flip":
        b[offset] ^= 1 << (n % 8)
    elif kind == "swap":
        n = min(n, len(b) - offset, len(b) - other)
        b[offset : offset + n], b[other : other + n] = b[other : other + n], b[offset : offset + n]
    elif kind == "huge":  # a little-endian size field set to a huge value
        width = 8 if n % 2 else 4
        end = min(len(b), offset + width)
        b[offset:end] = b"\xff" * (end - offset - 1) + b"\x7f"
    else:
        end = min(len(b), offset + n)
        b[offset:end] = bytes(end - offset)
    return bytes(b)


@st.composite
def json_mutation(draw: st.DrawFn) -> tuple[str, int, Any]:
    kind = draw(st.sampled_from(["drop", "replace", "truncate"]))
    index = draw(st.integers(0, 10_000))
    value = draw(
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(min_value=-(2**70), max_value=2**70),
            st.floats(allow_nan=True, allow_infinity=True),
            st.text(max_size=20),
            st.lists(st.integers(), max_size=3),
            st.just("../../../etc/passwd"),
        )
    )
    return kind, index, value


def _leaves(doc: Any, path: tuple = ()) -> list[tuple]:
    if isinstance(doc, dict):
        out = [path + (k,) for k in doc]
        for k, v in doc.items():
            out += _leaves(v, path + (k,))
        return out
    if isinstance(doc, list):
        out = [path + (i,) for i in range(len(doc))]
        for i, v in enumerate(doc):
            out += _leaves(v, path + (i,))
        return out
    return []


def mutate_json(text: str, m: tuple[str, int, Any]) -> str:
    kind, index, value = m
    if kind == "truncate":
        return text[: index % max(1, len(text))]
    doc = json.loads(text)
    paths = _leaves(doc)
    if not paths:
        return json.dumps(value)
    path = paths[index % len(paths)]
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if kind == "drop":
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return json.dumps(doc)


def _clean(fn, allowed: tuple[type[BaseException], ...] = (CosyVoiceError,)) -> None:
    """`fn()` loads, or raises one of `allowed` with a one-line message."""
    try:
        fn()
    except allowed as e:
        message = str(e).strip()
        assert message and "\n" not in message, f"not a one-line error: {message!r}"


def _touch(tree: Any) -> None:
    """Read every array of a loaded tree (a lazy view must hold up too)."""
    if isinstance(tree, dict):
        for v in tree.values():
            _touch(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            _touch(v)
    elif isinstance(tree, np.ndarray):
        np.asarray(tree, dtype=np.float64).sum() if tree.dtype.kind in "fiub" else tree.tobytes()


class _Growth:
    """Peak-memory growth of this process over a fuzz run (`ru_maxrss` is a high-water mark)."""

    def __enter__(self) -> _Growth:
        self.start = _peak_mb()
        return self

    def __exit__(self, *exc: Any) -> None:
        grown = _peak_mb() - self.start
        assert grown <= MEMORY_GROWTH_MB, f"peak memory grew by {grown:.0f} MB while fuzzing"


# ---------------------------------------------------------------------- the files


def test_checkpoint(tiny_official_dir: Path, tmp_path: Path) -> None:
    from cosyvoice2.checkpoint import load_torch_checkpoint

    data = (tiny_official_dir / "hift.pt").read_bytes()
    target = tmp_path / "hift.pt"

    @FUZZ
    @given(byte_mutation(len(data)))
    def run(m) -> None:
        target.write_bytes(mutate(data, m))
        _clean(lambda: _touch(load_torch_checkpoint(target)))

    with _Growth():
        run()


def test_onnx(tiny_official_dir: Path, tmp_path: Path) -> None:
    from cosyvoice2.onnx_weights import read_onnx_weights

    data = (tiny_official_dir / "campplus.onnx").read_bytes()
    target = tmp_path / "campplus.onnx"

    @FUZZ
    @given(byte_mutation(len(data)))
    def run(m) -> None:
        target.write_bytes(mutate(data, m))
        _clean(lambda: _touch(read_onnx_weights(target)))

    with _Growth():
        run()


def _model_copy(mlx_tiny_dir: Path, tmp_path: Path) -> Path:
    d = tmp_path / "model"
    shutil.copytree(mlx_tiny_dir, d)
    return d


def test_config_json(mlx_tiny_dir: Path, tmp_path: Path) -> None:
    from cosyvoice2 import model_dir

    d = _model_copy(mlx_tiny_dir, tmp_path)
    text = (d / model_dir.CONFIG_FILE).read_text()

    @FUZZ
    @given(json_mutation())
    def run(m) -> None:
        (d / model_dir.CONFIG_FILE).write_text(mutate_json(text, m))
        _clean(lambda: model_dir.read_config(d))

    with _Growth():
        run()


def test_safetensors(mlx_tiny_dir: Path, tmp_path: Path) -> None:
    from cosyvoice2 import model_dir

    d = _model_copy(mlx_tiny_dir, tmp_path)
    name = model_dir.weights_file("hift")
    data = (d / name).read_bytes()

    @FUZZ
    @given(byte_mutation(len(data)))
    def run(m) -> None:
        (d / name).write_bytes(mutate(data, m))
        _clean(
            lambda: _touch({k: np.asarray(v) for k, v in model_dir.read_weights(d, "hift").items()})
        )

    with _Growth():
        run()


def _store_with_speaker(mlx_tiny_dir: Path, tmp_path: Path):
    import mlx.core as mx

    from cosyvoice2.speakers import Speaker, SpeakerStore

    store = SpeakerStore(tmp_path / "speakers")
    store.save(
        Speaker(
            "alice",
            mx.ones((1, 192)),
            mx.array([[1, 2, 3]], dtype=mx.int32),
            mx.array([[4, 5]], dtype=mx.int32),
            mx.zeros((1, 4, 80)),
            "hello",
        )
    )
    return store


def test_speaker_file(mlx_tiny_dir: Path, tmp_path: Path) -> None:
    from cosyvoice2.speakers import SpeakerStore

    store = _store_with_speaker(mlx_tiny_dir, tmp_path)
    files = [p for p in store.root.iterdir() if p.suffix == ".safetensors"]
    assert len(files) == 1
    data = files[0].read_bytes()

    @FUZZ
    @given(byte_mutation(len(data)))
    def run(m) -> None:
        files[0].write_bytes(mutate(data, m))
        _clean(lambda: SpeakerStore(store.root).load("alice"))

    with _Growth():
        run()


def test_speaker_index(mlx_tiny_dir: Path, tmp_path: Path) -> None:
    from cosyvoice2.speakers import SpeakerStore

    store = _store_with_speaker(mlx_tiny_dir, tmp_path)
    index = store.root / "index.json"
    text = index.read_text()

    @FUZZ
    @given(json_mutation())
    def run(m) -> None:
        index.write_text(mutate_json(text, m))
        fresh = SpeakerStore(store.root)
        _clean(lambda: [fresh.load(s) for s in fresh.list()])

    with _Growth():
        run()


@pytest.fixture(scope="module")
def results_text() -> str:
    runs = sorted((Path(__file__).resolve().parent.parent / "bench" / "runs").glob("*.json"))
    assert runs, "no kept bench run to start from"
    return runs[0].read_text()


def test_bench_results(results_text: str, tmp_path: Path) -> None:
    from bench import results

    target = tmp_path / "run.json"

    @FUZZ
    @given(json_mutation())
    def run(m) -> None:
        target.write_text(mutate_json(results_text, m))
        _clean(lambda: results.load(target), (ValueError,))

    with _Growth():
        run()
