"""Read PyTorch `.pt` files without torch, and without running any code they name.

A `.pt` file is a pickle. Unpickling an untrusted pickle can call any importable
function, so this reader uses an unpickler whose `find_class` resolves only the
handful of globals `torch.save` writes for tensors and state dicts
(`torch._utils._rebuild_tensor_v2`, `_rebuild_parameter`, the storage types,
`collections.OrderedDict`, ...) -- each to a function of this module, never to
torch -- and refuses every other global with a `CheckpointError` that names it.
Persistent ids other than tensor storages are refused too. Tensor data is never
interpreted as code: it becomes numpy arrays, with shapes, strides and offsets
checked against the storage they view.

Both formats `torch.save` writes are read:

- the zip layout (torch >= 1.6): `<archive>/data.pkl` (the pickle), `<archive>/data/<key>`
  (one raw record per storage, stored uncompressed), `<archive>/byteorder`, `<archive>/version`;
- the legacy stream (`_use_new_zipfile_serialization=False`, torch < 1.6): pickles of the
  magic number, the protocol version and `sys_info`, then the main pickle, then a pickle of
  the storage keys, then per key an int64 element count and the raw little-endian bytes.

(The even older tar format of torch < 0.4 is refused with a clear error.)

Arrays follow torch's semantics: tensors that share a storage (tied weights,
views) are numpy views of one buffer, so they share memory; non-contiguous
tensors are strided views. By default the file is memory-mapped and arrays are
read-only views of it (no copy; pages are read on first touch, so reading is at
page-cache/disk speed); `mmap=False` reads each storage once, straight into an
owned, writable buffer (`readinto`).
bfloat16, which numpy lacks, is returned as float32 by default (exact: a bf16
value is a float32 with the low 16 bits zero); see `BFloat16Mode`.
"""

from __future__ import annotations

import collections
import io
import mmap as _mmap
import os
import pickle
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np

from cosyvoice2.errors import CheckpointError

__all__ = [
    "ALLOWED_GLOBALS",
    "BFloat16Mode",
    "LEGACY_MAGIC_NUMBER",
    "LEGACY_PROTOCOL_VERSION",
    "load_torch_checkpoint",
    "load_torch_file",
]

BFloat16Mode = Literal["float32", "uint16", "ml_dtypes"]
"""How bfloat16 tensors come back: `float32` (default, exact, twice the memory), `uint16`
(the raw bit patterns, e.g. for `mx.array(a).view(mx.bfloat16)`), or `ml_dtypes`
(numpy arrays of `ml_dtypes.bfloat16`; needs that package)."""

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001
_ZIP_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
_ZIP_LOCAL_SIGNATURE = 0x04034B50
_READ_CHUNK = 1 << 30  # read(2) moves at most ~2 GiB per call on Linux


class _FormatError(Exception):
    """Internal: a problem in the file; re-raised as `CheckpointError` with the path."""


# --------------------------------------------------------------------------- dtypes


@dataclass(frozen=True, slots=True)
class _DType:
    """A torch dtype as stored: its torch name and the little-endian numpy dtype of its bytes."""

    name: str
    code: str  # numpy dtype string, little-endian; bfloat16 is stored as '<u2'

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(self.code)

    @property
    def itemsize(self) -> int:
        return np.dtype(self.code).itemsize


_DTYPES: dict[str, _DType] = {
    d.name: d
    for d in (
        _DType("float64", "<f8"),
        _DType("float32", "<f4"),
        _DType("float16", "<f2"),
        _DType("bfloat16", "<u2"),
        _DType("int64", "<i8"),
        _DType("int32", "<i4"),
        _DType("int16", "<i2"),
        _DType("int8", "i1"),
        _DType("uint8", "u1"),
        _DType("uint16", "<u2"),
        _DType("uint32", "<u4"),
        _DType("uint64", "<u8"),
        _DType("bool", "?"),
        _DType("complex64", "<c8"),
        _DType("complex128", "<c16"),
    )
}

# Legacy typed storage classes (what `_rebuild_tensor_v2` pickles reference) -> dtype.
_STORAGE_TYPES: dict[str, _DType] = {
    "DoubleStorage": _DTYPES["float64"],
    "FloatStorage": _DTYPES["float32"],
    "HalfStorage": _DTYPES["float16"],
    "BFloat16Storage": _DTYPES["bfloat16"],
    "LongStorage": _DTYPES["int64"],
    "IntStorage": _DTYPES["int32"],
    "ShortStorage": _DTYPES["int16"],
    "CharStorage": _DTYPES["int8"],
    "ByteStorage": _DTYPES["uint8"],
    "BoolStorage": _DTYPES["bool"],
    "ComplexFloatStorage": _DTYPES["complex64"],
    "ComplexDoubleStorage": _DTYPES["complex128"],
    "UntypedStorage": _DTYPES["uint8"],
}


# --------------------------------------------------------------------------- pickle objects
#
# Everything the unpickler can produce besides plain data is one of the frozen,
# slotted classes below: a pickle cannot set attributes on them (BUILD fails), and
# `find_class` hands out fresh instances, so one file cannot alter what another sees.


class _Frozen:
    __slots__ = ()

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only")


class _Global(_Frozen):
    """An allowed pickle global that is callable: our own implementation of a torch function."""

    __slots__ = ("qualname", "fn")

    def __init__(self, qualname: str, fn: Callable[..., Any]) -> None:
        object.__setattr__(self, "qualname", qualname)
        object.__setattr__(self, "fn", fn)

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)

    def __repr__(self) -> str:
        return f"<global {self.qualname}>"


class _Marker(_Frozen):
    """An allowed pickle global that is only a value: a storage type, a dtype, a tensor class."""

    __slots__ = ("qualname", "kind", "dtype")

    def __init__(self, qualname: str, kind: str, dtype: _DType | None = None) -> None:
        object.__setattr__(self, "qualname", qualname)
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "dtype", dtype)

    def __repr__(self) -> str:
        return f"<{self.qualname}>"


class _StorageRef(_Frozen):
    """A storage named by a persistent id: elements [start, start + length) of record `key`."""

    __slots__ = ("key", "dtype", "numel", "start", "length")

    def __init__(self, key: str, dtype: _DType, numel: int, start: int, length: int) -> None:
        for name, value in (
            ("key", key),
            ("dtype", dtype),
            ("numel", numel),
            ("start", start),
            ("length", length),
        ):
            object.__setattr__(self, name, value)


class _TensorRef(_Frozen):
    """A tensor to build once the storages are read: a strided view of a storage."""

    __slots__ = ("storage", "dtype", "offset", "shape", "strides", "neg", "conj")

    def __init__(
        self,
        storage: _StorageRef,
        dtype: _DType,
        offset: int,
        shape: tuple[int, ...],
        strides: tuple[int, ...],
        neg: bool,
        conj: bool,
    ) -> None:
        for name, value in (
            ("storage", storage),
            ("dtype", dtype),
            ("offset", offset),
            ("shape", shape),
            ("strides", strides),
            ("neg", neg),
            ("conj", conj),
        ):
            object.__setattr__(self, name, value)


def _int(value: Any, what: str, minimum: int = 0) -> int:
    if type(value) is not int or value < minimum:
        raise _FormatError(f"bad {what}: {value!r}")
    return value


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)):
        raise _FormatError(f"bad {what}: {value!r}")
    return tuple(_int(v, what) for v in value)


def _make_tensor(
    storage: Any, offset: Any, size: Any, stride: Any, dtype: _DType | None, metadata: Any
) -> _TensorRef:
    """Check a tensor's geometry against its storage and return the placeholder."""
    if not isinstance(storage, _StorageRef):
        raise _FormatError(f"tensor rebuilt from {type(storage).__name__}, not a storage")
    dtype = storage.dtype if dtype is None else dtype
    offset = _int(offset, "storage offset")
    shape = _int_tuple(size, "tensor size")
    strides = _int_tuple(stride, "tensor stride")
    if len(shape) != len(strides):
        raise _FormatError(f"tensor size {shape} and stride {strides} differ in length")
    nbytes = storage.length * storage.dtype.itemsize
    if nbytes % dtype.itemsize:
        raise _FormatError(f"storage of {nbytes} bytes does not hold whole {dtype.name} elements")
    available = nbytes // dtype.itemsize
    if all(shape):  # a tensor with a zero-length axis reads nothing
        last = offset + sum((n - 1) * s for n, s in zip(shape, strides))
        if last >= available:
            raise _FormatError(
                f"tensor of size {shape}, stride {strides}, offset {offset} reaches element "
                f"{last} of a storage of {available} {dtype.name} elements"
            )
    neg = conj = False
    if metadata:
        if not isinstance(metadata, dict) or not set(metadata) <= {"neg", "conj"}:
            raise _FormatError(f"unsupported tensor metadata {metadata!r}")
        neg, conj = bool(metadata.get("neg", False)), bool(metadata.get("conj", False))
    return _TensorRef(storage, dtype, offset, shape, strides, neg, conj)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> _TensorRef:
    """`torch._utils._rebuild_tensor` (old files)."""
    return _make_tensor(storage, storage_offset, size, stride, None, None)


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> _TensorRef:
    """`torch._utils._rebuild_tensor_v2`: the dtype is the typed storage's; hooks are ignored."""
    return _make_tensor(storage, storage_offset, size, stride, None, metadata)


def _rebuild_tensor_v3(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    backward_hooks: Any,
    dtype: Any,
    metadata: Any = None,
) -> _TensorRef:
    """`torch._utils._rebuild_tensor_v3`: an untyped storage read as `dtype` (e.g. uint16)."""
    if not (isinstance(dtype, _Marker) and dtype.kind == "dtype"):
        raise _FormatError(f"tensor dtype {dtype!r} is not a torch dtype")
    return _make_tensor(storage, storage_offset, size, stride, dtype.dtype, metadata)


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any) -> _TensorRef:
    """`torch._utils._rebuild_parameter`: a Parameter is its data."""
    if not isinstance(data, _TensorRef):
        raise _FormatError(f"parameter rebuilt from {type(data).__name__}, not a tensor")
    return data


def _rebuild_parameter_with_state(
    data: Any, requires_grad: Any, backward_hooks: Any, state: Any
) -> _TensorRef:
    """`torch._utils._rebuild_parameter_with_state`: Python attributes on a Parameter are dropped."""
    return _rebuild_parameter(data, requires_grad, backward_hooks)


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> _TensorRef:
    """`torch._tensor._rebuild_from_type_v2`: a Tensor or Parameter with extra Python state."""
    if not (isinstance(func, _Global) and func.fn in _TENSOR_BUILDERS):
        raise _FormatError(f"_rebuild_from_type_v2 with function {func!r}")
    if not (isinstance(new_type, _Marker) and new_type.kind == "tensor class"):
        raise _FormatError(f"_rebuild_from_type_v2 with type {new_type!r}")
    if not isinstance(args, tuple):
        raise _FormatError("_rebuild_from_type_v2 with non-tuple arguments")
    return func(*args)


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """`_codecs.encode`, which protocol-2 pickles use for `bytes`; only text codecs."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise _FormatError(f"_codecs.encode with {type(text).__name__}, {encoding!r}")
    return text.encode(encoding)


def _ordered_dict(*args: Any) -> collections.OrderedDict:
    if args:
        raise _FormatError("OrderedDict rebuilt with arguments")
    return collections.OrderedDict()


_TENSOR_BUILDERS = (
    _rebuild_tensor,
    _rebuild_tensor_v2,
    _rebuild_tensor_v3,
    _rebuild_parameter,
    _rebuild_parameter_with_state,
)

_CALLABLE_GLOBALS: dict[tuple[str, str], Callable[..., Any]] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("collections", "OrderedDict"): _ordered_dict,
    ("_codecs", "encode"): _codecs_encode,
}

ALLOWED_GLOBALS: frozenset[str] = frozenset(
    [f"{m}.{n}" for m, n in _CALLABLE_GLOBALS]
    + [f"torch.{n}" for n in _STORAGE_TYPES]
    + [f"torch.cuda.{n}" for n in _STORAGE_TYPES if n != "UntypedStorage"]
    + ["torch.storage.UntypedStorage"]
    + [f"torch.{n}" for n in _DTYPES]
    + ["torch.Tensor", "torch.nn.parameter.Parameter"]
)
"""Every pickle global a checkpoint may name; anything else is refused."""


def _find_global(module: str, name: str) -> Any:
    """Resolve an allowed global to a fresh object of ours, or refuse it."""
    qualname = f"{module}.{name}"
    if (module, name) in _CALLABLE_GLOBALS:
        return _Global(qualname, _CALLABLE_GLOBALS[(module, name)])
    if name in _STORAGE_TYPES and qualname in ALLOWED_GLOBALS:
        return _Marker(qualname, "storage type", _STORAGE_TYPES[name])
    if module == "torch" and name in _DTYPES:
        return _Marker(qualname, "dtype", _DTYPES[name])
    if qualname in ("torch.Tensor", "torch.nn.parameter.Parameter"):
        return _Marker(qualname, "tensor class")
    raise CheckpointError(
        f"refusing to load global '{qualname}': only tensor-rebuild globals are allowed "
        "(the file is not a plain state dict, or it carries code)"
    )


def _ascii(value: Any) -> Any:
    """Persistent-id fields may be bytes in files written by Python 2."""
    return value.decode("ascii") if isinstance(value, bytes) else value


class _SafeUnpickler(pickle.Unpickler):
    """An unpickler that builds only plain data and tensor placeholders.

    `storages` maps the persistent-id key of each storage to its root `_StorageRef`;
    with `allow_storages=False` (the small header pickles) any persistent id is refused.
    """

    def __init__(self, file: BinaryIO, allow_storages: bool, legacy: bool) -> None:
        super().__init__(file)
        self.allow_storages = allow_storages
        self.legacy = legacy
        self.storages: dict[str, _StorageRef] = {}
        self.views: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:  # noqa: D102 - pickle API
        return _find_global(module, name)

    def persistent_load(self, pid: Any) -> Any:  # noqa: D102 - pickle API
        if not self.allow_storages:
            raise _FormatError(f"unexpected persistent id {pid!r}")
        if not isinstance(pid, tuple) or not pid:
            raise _FormatError(f"refusing persistent id {pid!r}")
        kind = _ascii(pid[0])
        if kind != "storage":
            raise CheckpointError(
                f"refusing persistent id of kind {kind!r}: only tensor storages are allowed"
            )
        if self.legacy:
            if len(pid) != 6:
                raise _FormatError(f"bad storage persistent id {pid!r}")
            _, storage_type, key, location, numel, view = pid
        else:
            if len(pid) != 5:
                raise _FormatError(f"bad storage persistent id {pid!r}")
            _, storage_type, key, location, numel = pid
            view = None
        if not (isinstance(storage_type, _Marker) and storage_type.kind == "storage type"):
            raise _FormatError(f"storage persistent id with type {storage_type!r}")
        key, location = _ascii(key), _ascii(location)
        if not isinstance(key, str) or not isinstance(location, str):
            raise _FormatError(f"bad storage persistent id {pid!r}")
        dtype = storage_type.dtype
        numel = _int(numel, "storage size")
        root = self.storages.get(key)
        if root is None:
            root = self.storages[key] = _StorageRef(key, dtype, numel, 0, numel)
        elif root.dtype != dtype or root.numel != numel:
            raise _FormatError(
                f"storage {key!r} is named as {root.numel} {root.dtype.name} and as "
                f"{numel} {dtype.name} elements"
            )
        if view is None:
            return root
        # Pre-1.0 files could name a slice of a storage: (view key, offset, size).
        if not (isinstance(view, tuple) and len(view) == 3):
            raise _FormatError(f"bad storage view {view!r}")
        view_key, start, length = _ascii(view[0]), _int(view[1], "view"), _int(view[2], "view")
        if start + length > numel:
            raise _FormatError(f"storage view {view!r} exceeds its storage of {numel} elements")
        ref = self.views.get(view_key)
        if ref is None:
            ref = self.views[view_key] = _StorageRef(key, dtype, numel, start, length)
        return ref


def _unpickle(data: BinaryIO, allow_storages: bool, legacy: bool) -> tuple[Any, _SafeUnpickler]:
    unpickler = _SafeUnpickler(data, allow_storages, legacy)
    return unpickler.load(), unpickler


# --------------------------------------------------------------------------- file formats


def _read_into(fh: BinaryIO, start: int, nbytes: int) -> np.ndarray:
    """Read `nbytes` at `start` straight into a new uint8 array (one copy, no temporaries)."""
    out = np.empty(nbytes, dtype=np.uint8)
    view = memoryview(out)
    fh.seek(start)
    done = 0
    while done < nbytes:
        n = fh.readinto(view[done : min(nbytes, done + _READ_CHUNK)])
        if not n:
            raise _FormatError(f"file is truncated: expected {nbytes} bytes at offset {start}")
        done += n
    return out


class _Source:
    """Raw bytes of the open file, read into memory or mapped."""

    def __init__(self, fh: BinaryIO, size: int, use_mmap: bool) -> None:
        self.fh = fh
        self.size = size
        self.map = _mmap.mmap(fh.fileno(), 0, access=_mmap.ACCESS_READ) if use_mmap else None

    def bytes_at(self, start: int, nbytes: int) -> np.ndarray:
        if start < 0 or start + nbytes > self.size:
            raise _FormatError(
                f"file is truncated: {nbytes} bytes at offset {start} lie past its end ({self.size})"
            )
        if self.map is not None:
            return np.frombuffer(self.map, dtype=np.uint8, count=nbytes, offset=start)
        return _read_into(self.fh, start, nbytes)


def _read_zip(fh: BinaryIO, source: _Source) -> tuple[Any, dict[str, np.ndarray], str]:
    """The torch zip layout: returns the unpickled tree, the storage buffers and the byte order."""
    try:
        zf = zipfile.ZipFile(fh)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise _FormatError(f"corrupt or truncated zip archive ({e})") from None
    with zf:
        names = zf.namelist()
        if not names:
            raise _FormatError("empty zip archive")
        prefix = names[0].split("/", 1)[0] + "/"
        if prefix + "data.pkl" not in names:
            found = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
            if len(found) != 1:
                raise _FormatError("zip archive has no data.pkl record (not a torch.save file)")
            prefix = found[0][: -len("data.pkl")]

        def record(name: str) -> bytes:
            try:
                return zf.read(prefix + name)
            except KeyError:
                raise _FormatError(f"missing record {prefix + name!r}") from None
            except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
                raise _FormatError(f"corrupt record {prefix + name!r} ({e})") from None

        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = record("byteorder").decode("ascii", "replace")
            if byteorder not in ("little", "big"):
                raise _FormatError(f"unknown byte order {byteorder!r}")
        tree, unpickler = _unpickle(io.BytesIO(record("data.pkl")), True, legacy=False)

        buffers: dict[str, np.ndarray] = {}
        for key, ref in unpickler.storages.items():
            name = f"{prefix}data/{key}"
            try:
                info = zf.getinfo(name)
            except KeyError:
                raise _FormatError(f"missing storage record {name!r}") from None
            nbytes = ref.numel * ref.dtype.itemsize
            if info.file_size != nbytes:
                raise _FormatError(
                    f"storage record {name!r} has {info.file_size} bytes, expected {nbytes}"
                )
            if info.flag_bits & 0x1:
                raise _FormatError(f"storage record {name!r} is encrypted")
            if info.compress_type != zipfile.ZIP_STORED:
                # Not written by torch (it stores records), e.g. re-zipped: decompress it.
                out = np.empty(nbytes, dtype=np.uint8)
                with zf.open(info) as member:
                    if member.readinto(memoryview(out)) != nbytes:
                        raise _FormatError(f"storage record {name!r} is truncated")
                buffers[key] = out
                continue
            header = source.bytes_at(info.header_offset, _ZIP_LOCAL_HEADER.size).tobytes()
            fields = _ZIP_LOCAL_HEADER.unpack(header)
            if fields[0] != _ZIP_LOCAL_SIGNATURE:
                raise _FormatError(f"corrupt zip local header for {name!r}")
            start = info.header_offset + _ZIP_LOCAL_HEADER.size + fields[9] + fields[10]
            buffers[key] = source.bytes_at(start, nbytes)
    return tree, buffers, byteorder


def _read_legacy(fh: BinaryIO, source: _Source) -> tuple[Any, dict[str, np.ndarray], str]:
    """The pre-1.6 stream: magic, protocol, sys_info, pickle, storage keys, raw storages."""
    try:
        magic, _ = _unpickle(fh, False, legacy=True)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, _FormatError):
        raise _FormatError(
            "not a PyTorch checkpoint (neither a zip archive nor a pickle with torch's magic number)"
        ) from None
    if type(magic) is not int or magic != LEGACY_MAGIC_NUMBER:
        raise _FormatError("wrong magic number: not a PyTorch checkpoint")
    protocol, _ = _unpickle(fh, False, legacy=True)
    if protocol != LEGACY_PROTOCOL_VERSION:
        raise _FormatError(f"unsupported legacy protocol version {protocol!r}")
    sys_info, _ = _unpickle(fh, False, legacy=True)
    if not isinstance(sys_info, dict):
        raise _FormatError("bad sys_info record")
    tree, unpickler = _unpickle(fh, True, legacy=True)
    keys, _ = _unpickle(fh, False, legacy=True)
    if not isinstance(keys, list) or not all(isinstance(_ascii(k), str) for k in keys):
        raise _FormatError("bad storage key list")
    keys = [_ascii(k) for k in keys]
    missing = set(unpickler.storages) - set(keys)
    if missing:
        raise _FormatError(f"missing storage records for keys {sorted(missing)}")
    offset = fh.tell()
    buffers: dict[str, np.ndarray] = {}
    for key in keys:
        ref = unpickler.storages.get(key)
        if ref is None:
            raise _FormatError(f"storage record {key!r} is not referenced by the pickle")
        (count,) = struct.unpack("<q", source.bytes_at(offset, 8).tobytes())
        if count != ref.numel:
            raise _FormatError(
                f"storage record {key!r} holds {count} elements, expected {ref.numel}"
            )
        nbytes = count * ref.dtype.itemsize
        buffers[key] = source.bytes_at(offset + 8, nbytes)
        offset += 8 + nbytes
    # Storage data are always written little-endian in this format.
    return tree, buffers, "little"


# --------------------------------------------------------------------------- materialising


def _materialize(
    ref: _TensorRef, buffers: dict[str, np.ndarray], byteorder: str, bfloat16: BFloat16Mode
) -> np.ndarray:
    storage = ref.storage
    dtype = ref.dtype
    raw = buffers[storage.key]
    itemsize = storage.dtype.itemsize
    raw = raw[storage.start * itemsize : (storage.start + storage.length) * itemsize]
    stored = dtype.numpy_dtype.newbyteorder("<" if byteorder == "little" else ">")
    base = raw.view(stored)
    step = stored.itemsize
    arr = np.lib.stride_tricks.as_strided(
        base[ref.offset :], shape=ref.shape, strides=tuple(s * step for s in ref.strides)
    )
    if not stored.isnative and stored.itemsize > 1:
        arr = arr.astype(stored.newbyteorder("="))
    if dtype.name == "bfloat16":
        if bfloat16 == "float32":
            widened = arr.astype(np.uint32)
            widened <<= 16
            arr = widened.view(np.float32)
        elif bfloat16 == "ml_dtypes":
            import ml_dtypes

            arr = arr.view(ml_dtypes.bfloat16)
    if ref.conj:
        arr = np.conj(arr)
    if ref.neg:
        arr = np.negative(arr)
    return arr


def _resolve(tree: Any, build: Callable[[_TensorRef], np.ndarray]) -> Any:
    """Replace tensor placeholders by arrays throughout the unpickled tree (shared objects once)."""
    memo: dict[int, Any] = {}

    def walk(obj: Any) -> Any:
        oid = id(obj)
        if oid in memo:
            return memo[oid]
        if isinstance(obj, _TensorRef):
            out = memo[oid] = build(obj)
            return out
        if isinstance(obj, _StorageRef):  # a bare storage: its elements as a 1-D array
            t = _TensorRef(obj, obj.dtype, 0, (obj.length,), (1,), False, False)
            out = memo[oid] = build(t)
            return out
        if isinstance(obj, dict):  # dict and OrderedDict become plain dicts, order kept
            out = memo[oid] = {}
            for k, v in obj.items():
                if isinstance(k, (_Frozen, np.ndarray)):
                    raise _FormatError("a tensor or torch object used as a dict key")
                out[k] = walk(v)
            return out
        if isinstance(obj, list):
            out = memo[oid] = []
            out.extend(walk(v) for v in obj)
            return out
        if isinstance(obj, tuple):
            out = memo[oid] = tuple(walk(v) for v in obj)
            return out
        if isinstance(obj, (set, frozenset)):
            if any(isinstance(v, _Frozen) for v in obj):
                raise _FormatError("a tensor or torch object inside a set")
            return obj
        if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, bytearray)):
            return obj
        if isinstance(obj, _Frozen):
            raise _FormatError(f"unsupported object {obj!r} in the checkpoint")
        raise _FormatError(f"unsupported object of type {type(obj).__name__} in the checkpoint")

    return walk(tree)


# --------------------------------------------------------------------------- public API


def load_torch_file(
    path: str | os.PathLike[str], *, bfloat16: BFloat16Mode = "float32", mmap: bool = True
) -> Any:
    """Read any `torch.save` file of plain data and tensors, without torch and without running code.

    Returns the saved object with tensors as numpy arrays, dicts (and OrderedDicts) as
    plain dicts, lists, tuples and Python scalars as they are. `bfloat16` picks the
    representation of bf16 tensors (`BFloat16Mode`; converted bf16 arrays are owned).
    With `mmap=True` (default) the arrays are read-only views of a memory map of the
    file: no copy, and the file must not be truncated or rewritten while they live.
    With `mmap=False` storage bytes are read into owned, writable buffers.

    Raises `CheckpointError` (naming the file) for a missing, truncated, corrupt or
    unrecognised file, and for any pickle global outside `ALLOWED_GLOBALS`, before
    anything the file names is called.
    """
    if bfloat16 not in ("float32", "uint16", "ml_dtypes"):
        raise ValueError(f"bfloat16 must be 'float32', 'uint16' or 'ml_dtypes', got {bfloat16!r}")
    path = Path(path)
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open ({e.strerror or e})") from None
    try:
        with fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(512)
            fh.seek(0)
            if not head:
                raise _FormatError("file is empty")
            source = _Source(fh, size, mmap and size > 0)
            if head.startswith(b"PK\x03\x04"):
                tree, buffers, byteorder = _read_zip(fh, source)
            elif head[257:262] == b"ustar":
                raise _FormatError("the tar format of torch < 0.4 is not supported")
            else:
                tree, buffers, byteorder = _read_legacy(fh, source)

            def build(ref: _TensorRef) -> np.ndarray:
                return _materialize(ref, buffers, byteorder, bfloat16)

            return _resolve(tree, build)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except _FormatError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except EOFError:
        raise CheckpointError(f"{path}: file is truncated (pickle data ran out)") from None
    except (pickle.UnpicklingError, ValueError, TypeError, AttributeError, KeyError) as e:
        raise CheckpointError(
            f"{path}: corrupt or unsupported pickle ({type(e).__name__}: {e})"
        ) from None
    except (RecursionError, MemoryError, IndexError, struct.error, OverflowError) as e:
        raise CheckpointError(f"{path}: corrupt checkpoint ({type(e).__name__}: {e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: read error ({e})") from None


def load_torch_checkpoint(
    path: str | os.PathLike[str], *, bfloat16: BFloat16Mode = "float32", mmap: bool = True
) -> dict[str, Any]:
    """Read a `.pt` state dict (`llm.pt`, `flow.pt`, `hift.pt`, `spk2info.pt`) as numpy arrays.

    The file must hold a dict with string keys. For a state dict every value is an
    `np.ndarray` (torch layout and dtype; bf16 per `bfloat16`); nested dicts are kept
    as dicts (`spk2info.pt`: speaker id -> {"embedding": ..., "speech_token": ..., ...}).
    Tied weights share memory, as in torch. See `load_torch_file` for `mmap` and errors.
    """
    obj = load_torch_file(path, bfloat16=bfloat16, mmap=mmap)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a dict (state dict)")
    bad = [k for k in obj if not isinstance(k, str)]
    if bad:
        raise CheckpointError(f"{path}: state dict has non-string keys, e.g. {bad[0]!r}")
    return obj
