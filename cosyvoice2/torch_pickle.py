"""The restricted unpickler behind `cosyvoice2.checkpoint`: turns a `.pt` pickle into plain data
and tensor placeholders, without torch and without running any code the pickle names.

A `.pt` file is a pickle. Unpickling an untrusted pickle can call any importable
function, so `_SafeUnpickler.find_class` resolves only the handful of globals
`torch.save` writes for tensors and state dicts (`torch._utils._rebuild_tensor_v2`,
`_rebuild_parameter`, the storage types, `collections.OrderedDict`, ...) -- each to a
function of this module, never to torch -- and refuses every other global with a
`CheckpointError` that names it. Persistent ids other than tensor storages are refused
too. Tensors come out as `_TensorRef` placeholders whose shape, strides and offset are
checked against the storage they view; `cosyvoice2.checkpoint` reads the storage bytes
(zip or legacy layout) and turns the placeholders into numpy arrays.

This is a module of its own so that the security boundary (what a pickle may name and
build) can be read and audited apart from the file-format readers.
"""

from __future__ import annotations

import collections
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from cosyvoice2.errors import CheckpointError

__all__ = ["ALLOWED_GLOBALS"]


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
