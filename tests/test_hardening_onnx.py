"""Hostile and broken ONNX files: the reader refuses them in one line and never looks elsewhere.

`cosyvoice2.onnx_weights.read_onnx_weights` reads `campplus.onnx` and
`speech_tokenizer_v2.onnx` from a directory the user downloaded. These tests hand
it files made to misbehave: an initializer whose data is "stored" in another file
(`../../etc/passwd`, or a file beside it), truncated files, flipped bits, tensors
whose dims do not match the data they hold, a shape of 2^50 elements, a file
over the size cap. Each must end in one clean `CheckpointError` (through
`tests.bad_inputs`), and a file named by external data must never be opened.
"""

from __future__ import annotations

import builtins
import io
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cosyvoice2.errors import CheckpointError, CosyVoiceError
from cosyvoice2.onnx_weights import MAX_ONNX_BYTES, read_onnx_weights, weights_from_graph
from tests.bad_inputs import bounded, refused

AREA = "onnx"


def _weight(name: str = "onnx::Conv_1") -> TensorProto:
    return numpy_helper.from_array(np.arange(24, dtype=np.float32).reshape(4, 2, 3) / 10, name)


def _model(weight: TensorProto | None = None, extra_nodes: list | None = None) -> onnx.ModelProto:
    """One `Conv` of module `head.conv1`: weight (4, 2, 3) and bias (4,) as initializers."""
    weight = _weight() if weight is None else weight
    bias = numpy_helper.from_array(np.ones(4, np.float32), "onnx::Conv_2")
    nodes = [
        *(extra_nodes or []),
        helper.make_node("Conv", ["x", weight.name, bias.name], ["y"], name="/head/conv1/Conv"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[weight, bias],
    )
    return helper.make_model(graph)


def _write(path: Path, model: onnx.ModelProto | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model if isinstance(model, bytes) else model.SerializeToString())
    return path


def _external(name: str, location: str, dims: tuple[int, ...] = (4, 2, 3)) -> TensorProto:
    """A float initializer whose data is said to be in `location` (as `onnx.save` writes it)."""
    t = TensorProto()
    t.name = name
    t.data_type = TensorProto.FLOAT
    t.dims.extend(dims)
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "96")):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


class Opens:
    """The paths opened through `open`, `io.open` or `os.open` inside `during(fn)` calls
    (not those the harness opens to snapshot the watched files)."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.active = False

    def during(self, fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            self.active = True
            try:
                return fn()
            finally:
                self.active = False

        return run

    def matching(self, *parts: str) -> list[str]:
        return [p for p in self.paths if any(part in p for part in parts)]


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> Iterator[Opens]:
    opens = Opens()

    def recording(original: Callable) -> Callable:
        def wrapper(file, *args, **kwargs):
            if opens.active:
                name = file if isinstance(file, (str, bytes, os.PathLike)) else ""
                opens.paths.append(os.fsdecode(name))
            return original(file, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(builtins, "open", recording(builtins.open))
    monkeypatch.setattr(io, "open", recording(io.open))
    monkeypatch.setattr(os, "open", recording(os.open))
    yield opens


class Tripwire:
    """A file that notices being read by anyone, C code included (`open` patched in Python
    misses the ONNX library's own C++ file reading): armed, its access time is set before its
    modification time, which the next read moves (relatime, the usual mount option)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(np.zeros(24, np.float32).tobytes())  # a readable 96-byte tensor
        self.path = path
        self.arm()
        with open(path, "rb") as f:
            f.read(1)
        self.works = self.fired()  # False where the file system does not record reads
        self.arm()

    def arm(self) -> None:
        st = os.stat(self.path)
        os.utime(self.path, ns=(st.st_mtime_ns - 10**10, st.st_mtime_ns))
        self._armed = os.stat(self.path).st_atime_ns

    def fired(self) -> bool:
        return os.stat(self.path).st_atime_ns != self._armed


def _read_by(
    fn: Callable[[], object], wires: list[Tripwire], fired: list[str]
) -> Callable[[], object]:
    """`fn` with the wires armed just before it and checked just after it (the harness reads
    every watched file before and after); the paths of those read go into `fired`."""

    def run() -> object:
        for w in wires:
            w.arm()
        try:
            return fn()
        finally:
            fired.extend(str(w.path) for w in wires if w.works and w.fired())

    return run


def test_a_clean_file_is_read(tmp_path: Path) -> None:
    got = read_onnx_weights(_write(tmp_path / "ok.onnx", _model()))
    assert sorted(got) == ["head.conv1.bias", "head.conv1.weight"]
    np.testing.assert_array_equal(got["head.conv1.weight"], numpy_helper.to_array(_weight()))


# ---------------------------------------------------------------- external data


@pytest.mark.parametrize(
    "location",
    ["../../etc/passwd", "/etc/passwd", "weights.bin"],
    ids=["dotdot-passwd", "absolute-passwd", "sibling-file"],
)
def test_external_data_is_refused_and_never_opened(
    location: str, tmp_path: Path, opened: Opens
) -> None:
    official = tmp_path / "a" / "b" / "official"
    path = _write(official / "campplus.onnx", _model(_external("onnx::Conv_1", location)))
    # the relative targets resolve into tmp_path, to files that notice being read
    wires = [Tripwire(tmp_path / "a" / "etc" / "passwd"), Tripwire(official / "weights.bin")]
    fired: list[str] = []
    rec = refused(
        AREA,
        f"initializer with external data at {location}",
        _read_by(opened.during(lambda: read_onnx_weights(path)), wires, fired),
        watch=tmp_path,
        match="external",
    )
    assert "onnx::Conv_1" in rec.error and str(path) in rec.error
    assert opened.paths and opened.matching("passwd", "weights.bin") == []
    assert fired == [] and (all(w.works for w in wires) or sys.platform != "linux")
    with pytest.raises(CheckpointError):  # the error is the checkpoint kind
        read_onnx_weights(path)


def test_external_data_in_a_constant_node_is_refused(tmp_path: Path, opened: Opens) -> None:
    const = helper.make_node(
        "Constant",
        [],
        ["c"],
        name="/head/Constant",
        value=_external("const_value", "../../etc/passwd", (2,)),
    )
    path = _write(tmp_path / "m.onnx", _model(extra_nodes=[const]))
    refused(
        AREA,
        "Constant node value with external data at ../../etc/passwd",
        opened.during(lambda: read_onnx_weights(path)),
        watch=tmp_path,
        match="external",
    )
    assert opened.paths and opened.matching("passwd") == []


def test_external_data_in_a_graph_object_is_refused() -> None:
    """`weights_from_graph` (given a parsed graph, not a file) refuses it as well."""
    graph = _model(_external("onnx::Conv_1", "../../etc/passwd")).graph
    refused(
        AREA,
        "graph object with an external-data initializer",
        lambda: weights_from_graph(graph),
        match="external",
    )


@pytest.mark.parametrize(
    "location", ["../../etc/passwd", "weights.bin"], ids=["dotdot-passwd", "sibling-file"]
)
def test_converter_refuses_external_data_in_campplus(
    location: str, tiny_official_dir: Path, tmp_path: Path, opened: Opens
) -> None:
    """Through `convert`: nothing is written, the named file is never opened."""
    from cosyvoice2.convert import convert

    official = shutil.copytree(tiny_official_dir, tmp_path / "a" / "b" / "official")
    _write(official / "campplus.onnx", _model(_external("onnx::Conv_1", location)))
    wires = [Tripwire(tmp_path / "a" / "etc" / "passwd"), Tripwire(official / "weights.bin")]
    fired: list[str] = []
    refused(
        AREA,
        f"convert: campplus.onnx initializer with external data at {location}",
        _read_by(opened.during(lambda: convert(official, tmp_path / "mlx")), wires, fired),
        watch=tmp_path,
        match="campplus.onnx",
    )
    assert not (tmp_path / "mlx").exists()
    assert opened.paths and opened.matching("passwd", "weights.bin") == []
    assert fired == [] and (all(w.works for w in wires) or sys.platform != "linux")


# ---------------------------------------------------------------- declared sizes


def _mismatched(kind: str) -> TensorProto:
    t = _weight()
    if kind == "raw-short":
        t.raw_data = t.raw_data[:-4]
    elif kind == "raw-long":
        t.raw_data = t.raw_data + b"\0" * 4
    elif kind == "dims-larger":
        t.dims[0] = 5
    elif kind == "negative-dim":
        t.dims[0] = -4
    elif kind == "typed-short":
        values = numpy_helper.to_array(t).reshape(-1)[:-1]
        t.ClearField("raw_data")
        t.float_data.extend(values.tolist())
    elif kind == "no-data":
        t.ClearField("raw_data")
    elif kind == "string-type":
        t.data_type = TensorProto.STRING
    elif kind == "zero-and-huge":
        del t.dims[:]
        t.dims.extend([0, 1 << 62])  # no data needed, but no array of that shape exists
        t.raw_data = b""
    return t


@pytest.mark.parametrize(
    ("kind", "what"),
    [
        ("raw-short", "dims (4, 2, 3) float32 with raw_data 4 bytes short"),
        ("raw-long", "dims (4, 2, 3) float32 with raw_data 4 bytes too long"),
        ("dims-larger", "dims (5, 2, 3) over raw_data of (4, 2, 3)"),
        ("negative-dim", "negative dim (-4, 2, 3)"),
        ("typed-short", "dims (4, 2, 3) with 23 float_data values"),
        ("no-data", "dims (4, 2, 3) with no data at all"),
        ("string-type", "initializer of data type STRING"),
        ("zero-and-huge", "dims (0, 2^62): empty, but beyond any array"),
    ],
)
def test_dims_that_do_not_match_the_data_are_refused(kind: str, what: str, tmp_path: Path) -> None:
    path = _write(tmp_path / "m.onnx", _model(_mismatched(kind)))
    rec = refused(AREA, what, lambda: read_onnx_weights(path), watch=tmp_path, match=str(path))
    assert "onnx::Conv_1" in rec.error


def test_a_declared_size_of_2_to_the_50_is_refused_without_allocating(tmp_path: Path) -> None:
    t = _weight()
    del t.dims[:]
    t.dims.extend([1 << 20, 1 << 20, 1 << 10])  # 2^50 float32: 4 PiB declared, 96 bytes held
    path = _write(tmp_path / "bomb.onnx", _model(t))
    bounded(
        AREA,
        "initializer declares 2^50 float32 (4 PiB) over 96 bytes",
        f"from cosyvoice2.onnx_weights import read_onnx_weights\nread_onnx_weights({str(path)!r})",
        limit_mb=200,
        watch=tmp_path,
        match="declares dims",
    )


def test_a_file_over_the_size_cap_is_not_read(tmp_path: Path) -> None:
    path = tmp_path / "big" / "speech_tokenizer_v2.onnx"
    path.parent.mkdir()
    with open(path, "wb") as f:  # sparse: no disk used, but 1 GiB + 1 byte long
        f.truncate(MAX_ONNX_BYTES + 1)
    bounded(
        AREA,
        "ONNX file of 1 GiB + 1 byte (over the cap)",
        f"from cosyvoice2.onnx_weights import read_onnx_weights\nread_onnx_weights({str(path)!r})",
        limit_mb=200,
        match="limit",
    )
    small = _write(tmp_path / "m.onnx", _model())
    refused(
        AREA,
        "ONNX file over a lowered max_bytes",
        lambda: read_onnx_weights(small, max_bytes=100),
        watch=tmp_path / "m.onnx",
        match="limit",
    )


# ---------------------------------------------------------------- truncation and corruption


def _cuts(data: bytes, model: onnx.ModelProto) -> dict[str, int]:
    no_opset = onnx.ModelProto()
    no_opset.CopyFrom(model)
    del no_opset.opset_import[:]
    return {
        "empty": 0,
        "1 byte": 1,
        "a third": len(data) // 3,
        "half": len(data) // 2,
        "all but the last byte": len(data) - 1,
        "cut at the end of the graph (no opset)": len(no_opset.SerializeToString()),
    }


@pytest.mark.parametrize(
    "cut",
    [
        "empty",
        "1 byte",
        "a third",
        "half",
        "all but the last byte",
        "cut at the end of the graph (no opset)",
    ],
)
def test_truncated_files_are_refused(cut: str, tmp_path: Path) -> None:
    model = _model()
    data = model.SerializeToString()
    n = _cuts(data, model)[cut]
    assert 0 <= n < len(data)
    path = _write(tmp_path / "campplus.onnx", data[:n])
    refused(
        AREA,
        f"ONNX file truncated: {cut}",
        lambda: read_onnx_weights(path),
        watch=tmp_path,
        match="cannot read ONNX file",
    )


def test_garbage_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "campplus.onnx", b"\xff\xfe not a protobuf \x00\x01" * 8)
    refused(
        AREA,
        "ONNX file of random bytes",
        lambda: read_onnx_weights(path),
        watch=tmp_path,
        match="cannot read ONNX file",
    )


def test_every_single_bit_flip_is_read_or_cleanly_refused(tmp_path: Path) -> None:
    """One bit flipped per byte, over the whole file (the hand-made graph of every rule of
    `tests/test_onnx_weights.py`): each read returns weights or raises a `CosyVoiceError`;
    none raises anything else. A sample of the refused ones is recorded."""
    from tests.test_onnx_weights import _handmade_graph

    data = helper.make_model(_handmade_graph()[0]).SerializeToString()
    path = tmp_path / "campplus.onnx"
    refused_at, other = [], []
    for i in range(len(data)):
        flipped = bytearray(data)
        flipped[i] ^= 1 << (i % 8)
        _write(path, bytes(flipped))
        try:
            read_onnx_weights(path)
        except CosyVoiceError as e:
            assert "\n" not in str(e)
            refused_at.append(i)
        except Exception as e:  # noqa: BLE001 - the point: nothing else may escape
            other.append(f"byte {i}: {type(e).__name__}: {e}")
    assert other == [], other[:5]
    assert len(refused_at) >= 10, refused_at
    for i in (refused_at[0], refused_at[len(refused_at) // 2], refused_at[-1]):
        flipped = bytearray(data)
        flipped[i] ^= 1 << (i % 8)
        _write(path, bytes(flipped))
        refused(
            AREA,
            f"ONNX file with bit {i % 8} of byte {i} (of {len(data)}) flipped",
            lambda: read_onnx_weights(path),
            watch=tmp_path,
        )
