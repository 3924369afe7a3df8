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

Before the unpickler runs, `_scan_pickle` walks the pickle's opcodes without building
anything (`pickletools.genops`) and refuses what could make the unpickler allocate or
recurse beyond the file: opcodes `torch.save` never writes (`INST`, `OBJ`, `NEWOBJ`,
`NEWOBJ_EX`, `EXT1/2/4`, out-of-band buffers), a declared length past the end of the
pickle, a sparse memo index (the unpickler sizes its memo table by the largest index),
more than `_MAX_PICKLE_OPS` opcodes or `_MAX_CONTAINERS` containers and calls, and
containers nested deeper than `_MAX_DEPTH`. While it runs, the unpickler admits at most
`_MAX_TENSORS` tensors, and views that read a storage element more than once (stride 0
or overlapping strides: a broadcast) only up to the file's own size in all.

This is a module of its own so that the security boundary (what a pickle may name and
build) can be read and audited apart from the file-format readers.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import pickletools
import reprlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from cosyvoice2.errors import CheckpointError

__all__ = ["ALLOWED_GLOBALS"]


class _FormatError(Exception):
    """Internal: a problem in the file; re-raised as `CheckpointError` with the path."""


# --------------------------------------------------------------------------- limits
#
# What one file may make the unpickler build, stated apart from the file's size (which
# bounds the pickle's bytes). A state dict of the official models holds a few hundred
# tensors, some 35 opcodes and 8 containers or calls each, nested 4 deep at most
# (spk2info.pt: speaker -> dict -> list -> tuple), in a pickle of about 100 KB: the
# limits leave ample room, and at them the unpickler's objects stay within a few
# hundred MB whatever the file holds.

_MAX_PICKLE_BYTES = 64 << 20
"""The largest pickle read: `data.pkl`, or one pickle of the legacy stream."""
_MAX_PICKLE_OPS = 4_000_000
"""The most opcodes in one pickle."""
_MAX_CONTAINERS = 1_000_000
"""The most containers and calls (tuples, lists, dicts, sets, `REDUCE`, ...) in one pickle."""
_MAX_TENSORS = 100_000
"""The most tensors in one pickle."""
_MAX_DEPTH = 100
"""The deepest nesting of containers (and of open `MARK`s) in a pickle."""

_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = _SHORT.maxlong = 60
_SHORT.maxlevel = 3


def _short(value: Any) -> str:
    """A bounded, one-line repr of a value taken from the file (for error messages)."""
    return _SHORT.repr(value).replace("\n", "\\n")


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

    __slots__ = ("qualname", "fn", "owner")

    def __init__(
        self, qualname: str, fn: Callable[..., Any], owner: _SafeUnpickler | None = None
    ) -> None:
        object.__setattr__(self, "qualname", qualname)
        object.__setattr__(self, "fn", fn)
        object.__setattr__(self, "owner", owner)

    def __call__(self, *args: Any) -> Any:
        out = self.fn(*args)
        if self.owner is not None and self.fn in _NEW_TENSOR_BUILDERS:
            self.owner.admit(out)
        return out

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
        raise _FormatError(f"bad {what}: {_short(value)}")
    return value


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or len(value) > 64:
        raise _FormatError(f"bad {what}: {_short(value)}")
    return tuple(_int(v, what) for v in value)


def _reads_an_element_twice(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """Whether a strided view may read some storage element more than once: a stride 0
    (`expand`) or overlapping strides. Exact for the layouts torch's own views make
    (permutations and slices of a contiguous tensor); any other layout counts as such."""
    if not all(shape):
        return False
    reach = 0  # the largest offset the axes of smaller stride reach together
    for stride, n in sorted((s, n) for n, s in zip(shape, strides) if n > 1):
        if stride <= reach:
            return True
        reach += stride * (n - 1)
    return False


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
        raise _FormatError(
            f"tensor size {_short(shape)} and stride {_short(strides)} differ in length"
        )
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
            raise _FormatError(f"unsupported tensor metadata {_short(metadata)}")
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
        raise _FormatError(f"tensor dtype {_short(dtype)} is not a torch dtype")
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
        raise _FormatError(f"_rebuild_from_type_v2 with function {_short(func)}")
    if not (isinstance(new_type, _Marker) and new_type.kind == "tensor class"):
        raise _FormatError(f"_rebuild_from_type_v2 with type {_short(new_type)}")
    if not isinstance(args, tuple):
        raise _FormatError("_rebuild_from_type_v2 with non-tuple arguments")
    return func(*args)


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """`_codecs.encode`, which protocol-2 pickles use for `bytes`; only text codecs."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise _FormatError(f"_codecs.encode with {type(text).__name__}, {_short(encoding)}")
    return text.encode(encoding)


class _PickledOrderedDict(collections.OrderedDict):
    """The OrderedDict a pickle builds. `torch.save` pickles a state dict's Python
    attributes (`_metadata`: per-module versions) as the BUILD state of its OrderedDict;
    here they are checked and dropped, so BUILD sets no attribute (no `__setstate__` of
    the file's choosing, no `__class__`), and the reader returns plain dicts anyway."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        if state is None:
            return
        if type(state) is not dict:
            raise _FormatError(f"OrderedDict given a BUILD state of type {type(state).__name__}")
        for key in state:
            if type(key) is not str or key.startswith("__"):
                raise _FormatError(f"OrderedDict given the attribute {_short(key)} by BUILD")


def _ordered_dict(*args: Any) -> collections.OrderedDict:
    if args:
        raise _FormatError("OrderedDict rebuilt with arguments")
    return _PickledOrderedDict()


_NEW_TENSOR_BUILDERS = (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3)

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


def _find_global(module: str, name: str, owner: _SafeUnpickler | None = None) -> Any:
    """Resolve an allowed global to a fresh object of ours, or refuse it."""
    qualname = f"{module}.{name}"
    if (module, name) in _CALLABLE_GLOBALS:
        return _Global(qualname, _CALLABLE_GLOBALS[(module, name)], owner)
    if name in _STORAGE_TYPES and qualname in ALLOWED_GLOBALS:
        return _Marker(qualname, "storage type", _STORAGE_TYPES[name])
    if module == "torch" and name in _DTYPES:
        return _Marker(qualname, "dtype", _DTYPES[name])
    if qualname in ("torch.Tensor", "torch.nn.parameter.Parameter"):
        return _Marker(qualname, "tensor class")
    if not (qualname.isprintable() and len(qualname) <= 200):
        qualname = _short(qualname)
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
    `broadcast_budget` is how many bytes of array the views that read a storage element
    more than once may make in all (the file's size).
    """

    def __init__(
        self, file: BinaryIO, allow_storages: bool, legacy: bool, broadcast_budget: int = 0
    ) -> None:
        super().__init__(file)
        self.allow_storages = allow_storages
        self.legacy = legacy
        self.storages: dict[str, _StorageRef] = {}
        self.views: dict[str, _StorageRef] = {}
        self.tensors = 0
        self.broadcast_budget = broadcast_budget
        self.broadcast_bytes = 0

    def find_class(self, module: str, name: str) -> Any:  # noqa: D102 - pickle API
        return _find_global(module, name, self)

    def admit(self, tensor: _TensorRef) -> None:
        """Count a new tensor against `_MAX_TENSORS` and its broadcast against the budget.

        A view that reads storage elements more than once (`expand`, stride 0) is a numpy
        view here too, but whoever copies it allocates its full size: (2**20, 2**20) of one
        element is 4 TiB of float32. Such views are kept (torch writes them for expanded
        tensors) as long as they make no more bytes of array, together, than the file has.
        """
        self.tensors += 1
        if self.tensors > _MAX_TENSORS:
            raise _FormatError(f"more than {_MAX_TENSORS} tensors in the pickle")
        if _reads_an_element_twice(tensor.shape, tensor.strides):
            nbytes = math.prod(tensor.shape) * tensor.dtype.itemsize
            self.broadcast_bytes += nbytes
            if self.broadcast_bytes > self.broadcast_budget:
                raise _FormatError(
                    f"tensor of size {_short(tensor.shape)}, stride {_short(tensor.strides)} "
                    f"reads storage elements more than once (a broadcast or overlapping view) "
                    f"and would make {nbytes} bytes of array; such views may make at most "
                    f"{self.broadcast_budget} bytes in all (the file's size)"
                )

    def persistent_load(self, pid: Any) -> Any:  # noqa: D102 - pickle API
        if not self.allow_storages:
            raise _FormatError(f"unexpected persistent id {_short(pid)}")
        if not isinstance(pid, tuple) or not pid:
            raise _FormatError(f"refusing persistent id {_short(pid)}")
        kind = _ascii(pid[0])
        if kind != "storage":
            raise CheckpointError(
                f"refusing persistent id of kind {_short(kind)}: only tensor storages are allowed"
            )
        if self.legacy:
            if len(pid) != 6:
                raise _FormatError(f"bad storage persistent id {_short(pid)}")
            _, storage_type, key, location, numel, view = pid
        else:
            if len(pid) != 5:
                raise _FormatError(f"bad storage persistent id {_short(pid)}")
            _, storage_type, key, location, numel = pid
            view = None
        if not (isinstance(storage_type, _Marker) and storage_type.kind == "storage type"):
            raise _FormatError(f"storage persistent id with type {_short(storage_type)}")
        key, location = _ascii(key), _ascii(location)
        if not isinstance(key, str) or not isinstance(location, str):
            raise _FormatError(f"bad storage persistent id {_short(pid)}")
        dtype = storage_type.dtype
        numel = _int(numel, "storage size")
        root = self.storages.get(key)
        if root is None:
            root = self.storages[key] = _StorageRef(key, dtype, numel, 0, numel)
        elif root.dtype != dtype or root.numel != numel:
            raise _FormatError(
                f"storage {_short(key)} is named as {root.numel} {root.dtype.name} and as "
                f"{numel} {dtype.name} elements"
            )
        if view is None:
            return root
        # Pre-1.0 files could name a slice of a storage: (view key, offset, size).
        if not (isinstance(view, tuple) and len(view) == 3):
            raise _FormatError(f"bad storage view {_short(view)}")
        view_key, start, length = _ascii(view[0]), _int(view[1], "view"), _int(view[2], "view")
        if start + length > numel:
            raise _FormatError(
                f"storage view {_short(view)} exceeds its storage of {numel} elements"
            )
        ref = self.views.get(view_key)
        if ref is None:
            ref = self.views[view_key] = _StorageRef(key, dtype, numel, start, length)
        return ref


# --------------------------------------------------------------------------- the opcode scan

# Opcodes by their effect on the unpickler's stack (pickletools names).
_ATOMS = frozenset(
    "INT BININT BININT1 BININT2 LONG LONG1 LONG4 STRING BINSTRING SHORT_BINSTRING BINBYTES "
    "SHORT_BINBYTES BINBYTES8 BYTEARRAY8 NONE NEWTRUE NEWFALSE UNICODE SHORT_BINUNICODE "
    "BINUNICODE BINUNICODE8 FLOAT BINFLOAT GLOBAL".split()
)
_EMPTY = frozenset({"EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET", "EMPTY_TUPLE"})
_FROM_MARK = frozenset({"TUPLE", "LIST", "DICT", "FROZENSET"})
_TUPLE_N = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}
_EXTEND = frozenset({"APPENDS", "SETITEMS", "ADDITEMS"})
_PUT = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"})
_GET = frozenset({"GET", "BINGET", "LONG_BINGET"})
_REFUSED_OPCODES = frozenset(
    {"INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4", "NEXT_BUFFER", "READONLY_BUFFER"}
)


def _scan_pickle(f: Any, size: int) -> int:
    """Check the pickle at `f`'s position, of at most `size` bytes, without building it.

    Follows the unpickler's stack with the nesting depth of each entry in place of the
    object, and refuses (`_FormatError`) a refused opcode, a length or frame past `size`,
    a memo index that skips ahead, an opcode or container count over its limit, and a
    nesting deeper than `_MAX_DEPTH`. Returns the pickle's length, through its STOP.
    """
    start = f.tell()
    stack: list[int] = []  # the nesting depth of each stack entry
    marks: list[int] = []  # stack heights at each open MARK
    memo: dict[int, int] = {}
    ops = containers = 0

    def floor() -> int:
        return marks[-1] if marks else 0

    def pop(n: int) -> list[int]:
        if len(stack) - n < floor():
            raise _FormatError("corrupt pickle: stack underflow")
        items = stack[len(stack) - n :]
        del stack[len(stack) - n :]
        return items

    def pop_mark() -> list[int]:
        if not marks:
            raise _FormatError("corrupt pickle: no MARK to pop")
        m = marks.pop()
        items = stack[m:]
        del stack[m:]
        return items

    def push(depth: int) -> None:
        if depth > _MAX_DEPTH:
            raise _FormatError(f"pickle nests containers deeper than {_MAX_DEPTH} levels")
        stack.append(depth)

    def deepen(depth: int) -> None:  # an item added to the container on top
        if len(stack) <= floor():
            raise _FormatError("corrupt pickle: stack underflow")
        push(max(stack.pop(), depth))

    try:
        for op, arg, pos in pickletools.genops(f):
            name = op.name
            ops += 1
            if ops > _MAX_PICKLE_OPS:
                raise _FormatError(f"pickle has more than {_MAX_PICKLE_OPS} opcodes")
            if name in _ATOMS:
                push(0)
            elif name in _GET:
                if arg not in memo:
                    raise _FormatError(f"corrupt pickle: memo index {arg} read before it is set")
                push(memo[arg])
            elif name in _PUT:
                index = len(memo) if name == "MEMOIZE" else arg
                if index > len(memo):  # picklers number memo entries 0, 1, 2, ...
                    raise _FormatError(
                        f"pickle memo index {index} skips ahead of the {len(memo)} entries set"
                    )
                if len(stack) <= floor():
                    raise _FormatError("corrupt pickle: stack underflow")
                memo[index] = stack[-1]
            elif name == "MARK":
                if len(marks) >= _MAX_DEPTH:
                    raise _FormatError(f"pickle nests containers deeper than {_MAX_DEPTH} levels")
                marks.append(len(stack))
            elif name == "APPEND":
                deepen(1 + pop(1)[0])
            elif name == "SETITEM":
                deepen(1 + max(pop(2)))
            elif name in _EXTEND:
                deepen(1 + max(pop_mark(), default=0))
            elif name == "BUILD":
                deepen(1 + pop(1)[0])
            elif name == "DUP":
                push(pop(1)[0])
                push(stack[-1])
            elif name == "POP":
                if len(stack) > floor():
                    stack.pop()
                elif marks:
                    marks.pop()
                else:
                    raise _FormatError("corrupt pickle: stack underflow")
            elif name == "POP_MARK":
                pop_mark()
            elif name == "STACK_GLOBAL":
                pop(2)
                push(0)
            elif name == "FRAME":
                if pos - start + 9 + arg > size:
                    raise _FormatError(f"pickle frame of {arg} bytes runs past the pickle's end")
            elif name == "PROTO":
                if arg > pickle.HIGHEST_PROTOCOL:
                    raise _FormatError(f"unsupported pickle protocol {arg}")
            elif name == "STOP":
                pop(1)
            elif name in _REFUSED_OPCODES:
                raise _FormatError(
                    f"pickle opcode {name} at byte {pos - start} is not one torch.save writes"
                )
            else:  # containers and calls
                containers += 1
                if containers > _MAX_CONTAINERS:
                    raise _FormatError(
                        f"pickle builds more than {_MAX_CONTAINERS} containers and calls"
                    )
                if name in _EMPTY:
                    push(1)
                elif name in _FROM_MARK:
                    push(1 + max(pop_mark(), default=0))
                elif name in _TUPLE_N:
                    push(1 + max(pop(_TUPLE_N[name])))
                elif name == "REDUCE":
                    pop(2)
                    push(1)
                elif name == "BINPERSID":
                    pop(1)
                    push(1)
                elif name == "PERSID":
                    push(1)
                else:
                    raise _FormatError(f"pickle opcode {name} is not supported")
    except (ValueError, struct.error, OverflowError) as e:
        # genops: a declared length past the end, an unknown opcode, no STOP
        raise _FormatError(
            f"corrupt or truncated pickle ({' '.join(str(e).split())[:200]})"
        ) from None
    return f.tell() - start


def _unpickle(
    data: bytes, allow_storages: bool, legacy: bool, broadcast_budget: int = 0
) -> tuple[Any, _SafeUnpickler]:
    """Scan, then unpickle the pickle `data` (a whole pickle, at most `_MAX_PICKLE_BYTES`)."""
    if len(data) > _MAX_PICKLE_BYTES:
        raise _FormatError(
            f"pickle of {len(data)} bytes is larger than the {_MAX_PICKLE_BYTES} bytes allowed"
        )
    _scan_pickle(io.BytesIO(data), len(data))
    unpickler = _SafeUnpickler(io.BytesIO(data), allow_storages, legacy, broadcast_budget)
    return unpickler.load(), unpickler
