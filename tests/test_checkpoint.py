"""The torch-free `.pt` reader: formats, dtypes, views, safety against hostile pickles, bad files.

Files are written by real `torch.save` where torch is installed (those tests skip
without it), and crafted byte by byte where the point is a malformed or hostile
file, so the safety tests run without torch.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import subprocess
import sys
import tarfile
import time
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cosyvoice2.checkpoint import (
    ALLOWED_GLOBALS,
    LEGACY_MAGIC_NUMBER,
    LEGACY_PROTOCOL_VERSION,
    load_torch_checkpoint,
    load_torch_file,
)
from cosyvoice2.errors import CheckpointError, CosyVoiceError

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- crafting files
#
# A tiny pickle assembler: protocol-2 opcodes for globals, persistent ids and calls,
# with plain values taken from `pickle.dumps` (memo opcodes stripped by `optimize`).


def _value(x: Any) -> bytes:
    """Opcodes that push the plain value `x` (no PROTO/STOP, no memo)."""
    return pickletools.optimize(pickle.dumps(x, protocol=2))[2:-1]


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _call(func: bytes, *args: bytes) -> bytes:
    """func(*args) via MARK ... TUPLE REDUCE."""
    return func + b"(" + b"".join(args) + b"tR"


def _storage_pid(
    storage_type: str, key: str, numel: int, legacy_view: bytes | None = None
) -> bytes:
    fields = _value("storage") + _global("torch", storage_type) + _value(key) + _value("cpu")
    fields += _value(numel)
    if legacy_view is not None:
        fields += legacy_view
    return b"(" + fields + b"tQ"  # MARK ... TUPLE BINPERSID


def _tensor(
    storage_type: str,
    key: str,
    numel: int,
    offset: Any,
    size: Any,
    stride: Any,
    legacy: bool = False,
    view: tuple[str, int, int] | None = None,
) -> bytes:
    """`_rebuild_tensor_v2` of a storage; legacy persistent ids carry a sixth field (view)."""
    hooks = _call(_global("collections", "OrderedDict"))
    return _call(
        _global("torch._utils", "_rebuild_tensor_v2"),
        _storage_pid(storage_type, key, numel, _value(view) if legacy else None),
        _value(offset),
        _value(tuple(size)),
        _value(tuple(stride)),
        _value(False),
        hooks,
    )


def _dict(items: dict[str, bytes]) -> bytes:
    """A dict whose values are the given opcode fragments."""
    body = b"".join(_value(k) + v for k, v in items.items())
    return b"}(" + body + b"u"


def _pickle(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."


def _write_zip(
    path: Path,
    data_pkl: bytes,
    records: dict[str, bytes],
    prefix: str = "archive",
    byteorder: bytes | None = b"little",
) -> Path:
    """A file in torch's zip layout (records stored uncompressed, as torch writes them)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{prefix}/data.pkl", data_pkl)
        if byteorder is not None:
            zf.writestr(f"{prefix}/byteorder", byteorder)
        for key, data in records.items():
            zf.writestr(f"{prefix}/data/{key}", data)
        zf.writestr(f"{prefix}/version", b"3\n")
    return path


def _write_legacy(path: Path, main_pickle: bytes, storages: list[tuple[str, bytes, int]]) -> Path:
    """A file in the legacy stream format; `storages` is (key, little-endian bytes, numel)."""
    out = io.BytesIO()
    for header in (
        LEGACY_MAGIC_NUMBER,
        LEGACY_PROTOCOL_VERSION,
        {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2}},
    ):
        out.write(pickle.dumps(header, protocol=2))
    out.write(main_pickle)
    out.write(pickle.dumps([k for k, _, _ in storages], protocol=2))
    for _, data, numel in storages:
        out.write(np.int64(numel).astype("<i8").tobytes())
        out.write(data)
    path.write_bytes(out.getvalue())
    return path


def _simple_zip(path: Path, values: np.ndarray | None = None) -> Path:
    """A hand-made zip checkpoint {"w": float32 (2, 3) tensor}, written without torch."""
    values = np.arange(6, dtype="<f4") / 4 if values is None else values
    pkl = _pickle(_dict({"w": _tensor("FloatStorage", "0", 6, 0, (2, 3), (3, 1))}))
    return _write_zip(path, pkl, {"0": values.astype("<f4").tobytes()})


# --------------------------------------------------------------------------- torch-free format tests


def test_handmade_zip_reads_without_torch(tmp_path: Path) -> None:
    out = load_torch_checkpoint(_simple_zip(tmp_path / "w.pt"))
    assert list(out) == ["w"]
    np.testing.assert_array_equal(out["w"], (np.arange(6, dtype=np.float32) / 4).reshape(2, 3))


def test_handmade_legacy_with_storage_view(tmp_path: Path) -> None:
    """Pre-1.0 legacy ids may name a slice of a storage: (view key, offset, size)."""
    data = np.arange(10, dtype="<i8")
    view = ("view1", 4, 5)
    pkl = _pickle(
        _dict(
            {
                "whole": _tensor("LongStorage", "root", 10, 0, (10,), (1,), legacy=True),
                "part": _tensor("LongStorage", "root", 10, 1, (2, 2), (1, 2), True, view),
            }
        )
    )
    out = load_torch_checkpoint(
        _write_legacy(tmp_path / "l.pt", pkl, [("root", data.tobytes(), 10)])
    )
    np.testing.assert_array_equal(out["whole"], data)
    # the view starts at element 4; the tensor starts at 1 within it: elements 5, 6, 7, 8
    np.testing.assert_array_equal(out["part"], np.array([[5, 7], [6, 8]]))


def test_big_endian_records_are_converted(tmp_path: Path) -> None:
    values = np.array([1.5, -2.25, 3e10, 0.0], dtype=">f4")
    pkl = _pickle(_dict({"w": _tensor("FloatStorage", "0", 4, 0, (4,), (1,))}))
    path = _write_zip(tmp_path / "be.pt", pkl, {"0": values.tobytes()}, byteorder=b"big")
    out = load_torch_checkpoint(path)
    assert out["w"].dtype == np.float32 and out["w"].dtype.isnative
    np.testing.assert_array_equal(out["w"], values.astype(np.float32))


def test_records_under_any_archive_prefix(tmp_path: Path) -> None:
    pkl = _pickle(_dict({"w": _tensor("IntStorage", "7", 2, 0, (2,), (1,))}))
    path = _write_zip(tmp_path / "p.pt", pkl, {"7": np.array([3, 4], "<i4").tobytes()}, "llm")
    np.testing.assert_array_equal(load_torch_checkpoint(path)["w"], [3, 4])


def test_mmap_gives_read_only_views_of_the_file(tmp_path: Path) -> None:
    path = _simple_zip(tmp_path / "w.pt")
    owned = load_torch_checkpoint(path, mmap=False)["w"]
    mapped = load_torch_checkpoint(path)["w"]  # mmap=True is the default
    np.testing.assert_array_equal(owned, mapped)
    assert owned.flags.writeable and not mapped.flags.writeable


def test_importing_and_loading_does_not_import_torch(tmp_path: Path) -> None:
    files = [_simple_zip(tmp_path / "w.pt")]
    if _have_torch():
        import torch

        sd = {"a": torch.randn(3, 2), "b": torch.randn(4).bfloat16()}
        torch.save(sd, tmp_path / "t.pt")
        torch.save(sd, tmp_path / "tl.pt", _use_new_zipfile_serialization=False)
        files += [tmp_path / "t.pt", tmp_path / "tl.pt"]
    code = (
        "import sys\n"
        "from cosyvoice2.checkpoint import load_torch_checkpoint\n"
        "for f in sys.argv[1:]:\n"
        "    d = load_torch_checkpoint(f)\n"
        "    assert d, f\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, *map(str, files)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]", f"torch modules were imported: {res.stdout}"


# --------------------------------------------------------------------------- hostile pickles


def _marker_cases(marker: Path) -> dict[str, tuple[bytes, str]]:
    """Pickle bodies that would create `marker` if run, and the global each must be refused as."""
    m = str(marker)
    return {
        "os.system": (_call(_global("os", "system"), _value(f"touch {m}")), "os.system"),
        "posix.system": (_call(_global("posix", "system"), _value(f"touch {m}")), "posix.system"),
        "builtins.eval": (
            _call(_global("builtins", "eval"), _value(f"open({m!r}, 'w').close()")),
            "builtins.eval",
        ),
        "builtins.exec": (
            _call(_global("builtins", "exec"), _value(f"open({m!r}, 'w').close()")),
            "builtins.exec",
        ),
        "subprocess.Popen": (
            _call(_global("subprocess", "Popen"), _value(["touch", m])),
            "subprocess.Popen",
        ),
        # dotted names reach attributes of an allowed object: must not pass as allowed
        "dotted": (
            _call(_global("torch._utils", "_rebuild_tensor_v2.__globals__"), _value(1)),
            "torch._utils._rebuild_tensor_v2.__globals__",
        ),
        "torch.load": (_call(_global("torch", "load"), _value(m)), "torch.load"),
    }


class _Payload:
    """An object whose pickle runs a shell command on load (the classic `__reduce__` exploit)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("case", list(_marker_cases(Path("x"))))
@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_hostile_global_is_refused_and_nothing_runs(tmp_path: Path, case: str, layout: str) -> None:
    marker = tmp_path / "pwned"
    body, qualname = _marker_cases(marker)[case]
    # the payload sits after a valid tensor, inside the state dict, as in a tampered llm.pt
    tensor = _tensor("FloatStorage", "0", 6, 0, (2, 3), (3, 1), legacy=layout == "legacy")
    pkl = _pickle(_dict({"w": tensor, "evil": body}))
    data = np.zeros(6, "<f4").tobytes()
    path = tmp_path / "llm.pt"
    if layout == "zip":
        _write_zip(path, pkl, {"0": data})
    else:
        _write_legacy(path, pkl, [("0", data, 6)])
    with pytest.raises(CheckpointError) as err:
        load_torch_checkpoint(path)
    assert f"'{qualname}'" in str(err.value) and str(path) in str(err.value)
    assert not marker.exists(), "the hostile pickle ran"


def test_reduce_payload_via_real_pickler_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    pkl = pickle.dumps({"evil": _Payload(marker)}, protocol=2)
    path = _write_zip(tmp_path / "llm.pt", pkl, {})
    with pytest.raises(CheckpointError, match=rf"'{os.system.__module__}\.system'"):
        load_torch_checkpoint(path)
    assert not marker.exists()
    # and with the newer pickle protocols (STACK_GLOBAL, FRAME)
    for protocol in (4, 5):
        path = _write_zip(
            tmp_path / f"p{protocol}.pt", pickle.dumps(_Payload(marker), protocol), {}
        )
        with pytest.raises(CheckpointError, match=r"\.system'"):
            load_torch_file(path)
        assert not marker.exists()


def test_hostile_payload_in_the_header_pickles_of_the_legacy_format(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "llm.pt"
    path.write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    with pytest.raises(CheckpointError, match=r"\.system'"):
        load_torch_checkpoint(path)
    assert not marker.exists()


def test_torch_saved_file_with_embedded_payload_is_refused(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    marker = tmp_path / "pwned"
    for new in (True, False):
        path = tmp_path / f"llm-{new}.pt"
        torch.save(
            {"w": torch.randn(3), "evil": _Payload(marker)},
            path,
            _use_new_zipfile_serialization=new,
        )
        with pytest.raises(CheckpointError, match=rf"'{os.system.__module__}\.system'"):
            load_torch_checkpoint(path)
        assert not marker.exists()


def test_unknown_persistent_id_kind_is_refused(tmp_path: Path) -> None:
    pid = b"(" + _value("module") + _value("Linear") + _value(None) + _value(None) + b"tQ"
    path = _write_zip(tmp_path / "m.pt", _pickle(pid), {})
    with pytest.raises(CheckpointError, match="persistent id of kind 'module'"):
        load_torch_file(path)
    path = _write_zip(tmp_path / "s.pt", _pickle(_value("just a string") + b"Q"), {})
    with pytest.raises(CheckpointError, match="persistent id"):
        load_torch_file(path)


def test_allowed_markers_cannot_be_called_or_modified(tmp_path: Path) -> None:
    # calling a storage type (not a function) fails
    path = _write_zip(tmp_path / "a.pt", _pickle(_call(_global("torch", "FloatStorage"))), {})
    with pytest.raises(CheckpointError):
        load_torch_file(path)
    # BUILD on an allowed function, trying to replace what it calls, fails ...
    state = _value((None, {"fn": 1}))
    body = _global("torch._utils", "_rebuild_tensor_v2") + state + b"b"
    path = _write_zip(tmp_path / "b.pt", _pickle(body), {})
    with pytest.raises(CheckpointError):
        load_torch_file(path)
    # ... and the reader still works afterwards
    assert load_torch_checkpoint(_simple_zip(tmp_path / "ok.pt"))["w"].shape == (2, 3)


def test_allowlist_is_only_tensor_rebuild_globals() -> None:
    modules = {name.rsplit(".", 1)[0] for name in ALLOWED_GLOBALS}
    assert modules == {
        "torch",
        "torch.cuda",
        "torch.storage",
        "torch._utils",
        "torch._tensor",
        "torch.nn.parameter",
        "collections",
        "_codecs",
    }
    assert "collections.OrderedDict" in ALLOWED_GLOBALS
    assert not {"torch.load", "builtins.eval", "os.system"} & ALLOWED_GLOBALS


# --------------------------------------------------------------------------- malformed files


def _load_error(path: Path) -> str:
    with pytest.raises(CheckpointError) as err:
        load_torch_checkpoint(path)
    assert isinstance(err.value, CosyVoiceError)
    assert str(path) in str(err.value)
    return str(err.value)


@pytest.mark.parametrize(
    ("offset", "size", "stride", "message"),
    [
        (0, (7,), (1,), "reaches element 6"),  # one past the end of 6 elements
        (6, (1,), (1,), "reaches element 6"),
        (0, (2, 3), (5, 1), "reaches element 7"),  # 1 * 5 + 2 * 1
        (0, (3,), (-1,), "bad tensor stride"),
        (-1, (1,), (1,), "bad storage offset"),
        (0, (2, 3), (1,), "differ in length"),
        (0.5, (1,), (1,), "bad storage offset"),
    ],
)
def test_tensor_geometry_outside_its_storage_is_refused(
    tmp_path: Path, offset: Any, size: Any, stride: Any, message: str
) -> None:
    pkl = _pickle(_dict({"w": _tensor("FloatStorage", "0", 6, offset, size, stride)}))
    path = _write_zip(tmp_path / "g.pt", pkl, {"0": np.zeros(6, "<f4").tobytes()})
    assert message in _load_error(path)


def test_missing_or_wrong_size_storage_records(tmp_path: Path) -> None:
    pkl = _pickle(_dict({"w": _tensor("FloatStorage", "0", 6, 0, (6,), (1,))}))
    assert "missing storage record 'archive/data/0'" in _load_error(
        _write_zip(tmp_path / "a.pt", pkl, {})
    )
    assert "has 20 bytes, expected 24" in _load_error(
        _write_zip(tmp_path / "b.pt", pkl, {"0": bytes(20)})
    )
    legacy = _pickle(_dict({"w": _tensor("FloatStorage", "0", 6, 0, (6,), (1,), legacy=True)}))
    assert "missing storage records" in _load_error(_write_legacy(tmp_path / "c.pt", legacy, []))
    wrong = _write_legacy(tmp_path / "d.pt", legacy, [("0", bytes(20), 5)])
    assert "holds 5 elements, expected 6" in _load_error(wrong)
    # one storage key named with two dtypes
    two = _pickle(
        _dict(
            {
                "a": _tensor("FloatStorage", "0", 6, 0, (6,), (1,)),
                "b": _tensor("IntStorage", "0", 6, 0, (6,), (1,)),
            }
        )
    )
    assert "named as" in _load_error(_write_zip(tmp_path / "e.pt", two, {"0": bytes(24)}))


def test_unrecognised_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert "empty" in _load_error(empty)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00\x01not a checkpoint" * 10)
    assert "not a PyTorch checkpoint" in _load_error(junk)
    not_torch = tmp_path / "plain.pt"
    not_torch.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    assert "wrong magic number" in _load_error(not_torch)
    no_pkl = tmp_path / "nopkl.pt"
    with zipfile.ZipFile(no_pkl, "w") as zf:
        zf.writestr("archive/version", b"3\n")
    assert "no data.pkl" in _load_error(no_pkl)
    tar = tmp_path / "old.pt"
    with tarfile.open(tar, "w") as tf:
        info = tarfile.TarInfo("storages")
        info.size = 4
        tf.addfile(info, io.BytesIO(b"abcd"))
    assert "tar format" in _load_error(tar)
    missing = tmp_path / "nope.pt"
    assert "no such file" in _load_error(missing)
    a_list = _write_zip(tmp_path / "list.pt", _pickle(_value([1, 2])), {})
    assert "expected a dict" in _load_error(a_list)
    assert load_torch_file(a_list) == [1, 2]


def test_truncated_handmade_files(tmp_path: Path) -> None:
    full = _simple_zip(tmp_path / "w.pt").read_bytes()
    for n in (len(full) - 1, len(full) // 2, 40, 4):
        cut = tmp_path / f"zip{n}.pt"
        cut.write_bytes(full[:n])
        _load_error(cut)
    pkl = _pickle(_dict({"w": _tensor("FloatStorage", "0", 6, 0, (6,), (1,), legacy=True)}))
    legacy = _write_legacy(tmp_path / "l.pt", pkl, [("0", np.ones(6, "<f4").tobytes(), 6)])
    data = legacy.read_bytes()
    for n in (len(data) - 1, len(data) - 24, len(data) - 40, 60, 3):
        cut = tmp_path / f"legacy{n}.pt"
        cut.write_bytes(data[:n])
        assert "truncated" in _load_error(cut) or "corrupt" in _load_error(cut)


# --------------------------------------------------------------------------- torch round trips


def _have_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _reference(t: Any, bfloat16: str = "float32") -> np.ndarray:
    """What the reader must return for the torch tensor `t`."""
    import torch

    t = t.detach().resolve_neg().resolve_conj()
    if t.dtype == torch.bfloat16:
        if bfloat16 == "uint16":
            return t.view(torch.int16).numpy().view(np.uint16)
        return t.float().numpy()
    return t.numpy()


def _state_dict() -> OrderedDict:
    import torch

    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    bf = torch.randn(4, 5, generator=g).bfloat16()
    sd: OrderedDict[str, Any] = OrderedDict()
    sd["f32"] = torch.randn(3, 4, generator=g)
    sd["f64"] = torch.randn(3, generator=g).double()
    sd["f16"] = torch.randn(2, 5, generator=g).half()
    sd["bf16"] = bf
    sd["bf16_t"] = bf.t()
    sd["i64"] = torch.randint(-(2**40), 2**40, (7,), generator=g)
    sd["i32"] = torch.randint(-(2**30), 2**30, (2, 3), generator=g, dtype=torch.int32)
    sd["i16"] = torch.randint(-(2**14), 2**14, (5,), generator=g, dtype=torch.int16)
    sd["i8"] = torch.randint(-128, 127, (5,), generator=g, dtype=torch.int8)
    sd["u8"] = torch.randint(0, 255, (2, 2), generator=g, dtype=torch.uint8)
    sd["bool"] = torch.randn(3, 3, generator=g) > 0
    sd["scalar"] = torch.tensor(2.5)
    sd["scalar_int"] = torch.tensor(6561)
    sd["empty"] = torch.empty(0, 3)
    sd["base"] = base
    sd["tied"] = base  # the same tensor under two keys (tied weights)
    sd["transposed"] = base.t()
    sd["block"] = base[2:5, 1:7]  # offset and non-contiguous
    sd["every_other"] = base[::2, ::3]
    sd["row"] = base[3]
    sd["element"] = base[5, 7]  # zero-dim view at the very end of the storage
    sd["broadcast"] = torch.randn(3, 1, generator=g).expand(3, 4)  # stride 0
    sd["param"] = torch.nn.Parameter(torch.randn(3, generator=g))
    sd["neg_view"] = torch.randn(4, generator=g)._neg_view()
    sd["conj_view"] = torch.randn(3, generator=g, dtype=torch.complex64).conj()
    with_attr = torch.randn(2, generator=g)
    with_attr.note = "kept by torch, dropped here"  # pickled via _rebuild_from_type_v2
    sd["with_attr"] = with_attr
    return sd


@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("new_format", [True, False], ids=["zip", "legacy"])
def test_round_trip_torch_save(tmp_path: Path, new_format: bool, mmap: bool) -> None:
    torch = pytest.importorskip("torch")
    sd = _state_dict()
    path = tmp_path / "sd.pt"
    torch.save(sd, path, _use_new_zipfile_serialization=new_format)
    out = load_torch_checkpoint(path, mmap=mmap)
    assert list(out) == list(sd)
    for key, t in sd.items():
        want = _reference(t)
        got = out[key]
        assert isinstance(got, np.ndarray), key
        assert got.dtype == want.dtype and got.shape == want.shape, (key, got.dtype, got.shape)
        np.testing.assert_array_equal(got, want, err_msg=key)
    # shared storage stays shared, as in torch
    assert out["tied"] is out["base"]
    for view in ("transposed", "block", "every_other", "row", "element"):
        assert np.shares_memory(out[view], out["base"]), view
    if not mmap:
        out["base"][3, 0] = 123.0
        assert out["row"][0] == 123.0 and out["transposed"][0, 3] == 123.0


@pytest.mark.parametrize("new_format", [True, False], ids=["zip", "legacy"])
def test_bfloat16_modes(tmp_path: Path, new_format: bool) -> None:
    torch = pytest.importorskip("torch")
    ml_dtypes = pytest.importorskip("ml_dtypes")
    sd = _state_dict()
    path = tmp_path / "sd.pt"
    torch.save(sd, path, _use_new_zipfile_serialization=new_format)
    raw = load_torch_checkpoint(path, bfloat16="uint16")
    ml = load_torch_checkpoint(path, bfloat16="ml_dtypes")
    for key in ("bf16", "bf16_t"):
        assert raw[key].dtype == np.uint16
        np.testing.assert_array_equal(raw[key], _reference(sd[key], "uint16"))
        assert ml[key].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(ml[key].astype(np.float32), _reference(sd[key]))
    assert raw["f32"].dtype == np.float32  # other dtypes are untouched
    with pytest.raises(ValueError, match="bfloat16"):
        load_torch_checkpoint(path, bfloat16="float16")  # type: ignore[arg-type]


def test_v3_dtypes_round_trip(tmp_path: Path) -> None:
    """Dtypes without a legacy storage class are written with `_rebuild_tensor_v3`."""
    torch = pytest.importorskip("torch")
    sd = {
        "u16": torch.arange(0, 60000, 997).to(torch.uint16),
        "u32": torch.arange(5).to(torch.uint32) * 1_000_000_000,
        "u64": torch.arange(3).to(torch.uint64),
    }
    path = tmp_path / "v3.pt"
    torch.save(sd, path)
    out = load_torch_checkpoint(path)
    for key, t in sd.items():
        np.testing.assert_array_equal(out[key], t.numpy())
        assert out[key].dtype == t.numpy().dtype


@pytest.mark.parametrize("new_format", [True, False], ids=["zip", "legacy"])
def test_nested_speaker_dict(tmp_path: Path, new_format: bool) -> None:
    """`spk2info.pt`: speaker id -> dict of tensors (and plain values)."""
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(1)
    spk2info = {
        f"spk{i}": {
            "embedding": torch.randn(1, 192, generator=g),
            "speech_token": torch.randint(0, 6561, (1, 30 + i), generator=g, dtype=torch.int32),
            "speech_token_len": torch.tensor([30 + i], dtype=torch.int32),
            "speech_feat": torch.randn(1, 60 + 2 * i, 80, generator=g),
            "prompt_text": torch.randint(0, 151000, (1, 9), generator=g),
            "text": "希望你以后能够做的比我还好呦。",
            "meta": [1, 2.5, None, ("a", b"raw")],
        }
        for i in range(3)
    }
    path = tmp_path / "spk2info.pt"
    torch.save(spk2info, path, _use_new_zipfile_serialization=new_format)
    out = load_torch_checkpoint(path)
    assert list(out) == list(spk2info)
    for spk, info in spk2info.items():
        assert list(out[spk]) == list(info)
        for key, value in info.items():
            if isinstance(value, torch.Tensor):
                np.testing.assert_array_equal(out[spk][key], value.numpy())
                assert out[spk][key].dtype == value.numpy().dtype
            else:
                assert out[spk][key] == value


@pytest.mark.parametrize("new_format", [True, False], ids=["zip", "legacy"])
def test_truncated_torch_files(tmp_path: Path, new_format: bool) -> None:
    torch = pytest.importorskip("torch")
    path = tmp_path / "sd.pt"
    torch.save(_state_dict(), path, _use_new_zipfile_serialization=new_format)
    data = path.read_bytes()
    for n in (len(data) - 1, len(data) - 100, len(data) // 2, 200, 10):
        cut = tmp_path / f"cut{n}.pt"
        cut.write_bytes(data[:n])
        _load_error(cut)


@pytest.mark.parametrize("part", ["llm", "flow", "hift"])
def test_equals_torch_load_on_the_synthetic_official_dir(tiny_pt_dir: Path, part: str) -> None:
    import torch

    path = tiny_pt_dir / f"{part}.pt"
    ref = torch.load(path, map_location="cpu", weights_only=True)
    out = load_torch_checkpoint(path)
    assert list(out) == list(ref)
    for key, t in ref.items():
        want = _reference(t)
        assert out[key].dtype == want.dtype and out[key].shape == want.shape, key
        np.testing.assert_array_equal(out[key], want, err_msg=key)


@pytest.mark.full
def test_full_size_llm_matches_torch_and_reads_at_disk_speed() -> None:
    """The 0.5B `llm.pt` (about 2 GB): every tensor equal to torch.load; the time is printed."""
    torch = pytest.importorskip("torch")
    from cosyvoice2_testing.synthetic import cached_official_dir

    path = cached_official_dir("full", onnx=False) / "llm.pt"
    gb = path.stat().st_size / 1e9
    for mmap in (True, False):
        start = time.perf_counter()
        out = load_torch_checkpoint(path, mmap=mmap)
        opened = time.perf_counter() - start
        checksum = sum(float(v.sum(dtype=np.float64)) for v in out.values())  # touch every byte
        seconds = time.perf_counter() - start
        print(
            f"mmap={mmap}: {gb:.2f} GB, load {opened:.2f} s, load + read all "
            f"{seconds:.2f} s ({gb / seconds:.2f} GB/s), checksum {checksum:.6g}"
        )
    ref = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    assert list(out) == list(ref)
    for key, t in ref.items():
        np.testing.assert_array_equal(out[key], _reference(t), err_msg=key)
