"""Read PyTorch `.pt` files without torch, and without running any code they name.

A `.pt` file is a pickle plus raw storage bytes. The pickle is read by the restricted
unpickler of `cosyvoice2.torch_pickle`, which resolves only the globals `torch.save`
writes for tensors and state dicts (`ALLOWED_GLOBALS`, re-exported here) and refuses
every other global, and every persistent id but tensor storages, with a
`CheckpointError` that names it. Tensor data is never interpreted as code: this module
reads the storage bytes and turns the unpickler's tensor placeholders into numpy arrays.

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

import io
import mmap as _mmap
import os
import pickle
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np

from cosyvoice2.errors import CheckpointError
from cosyvoice2.torch_pickle import (
    ALLOWED_GLOBALS,
    _ascii,
    _FormatError,
    _Frozen,
    _StorageRef,
    _TensorRef,
    _unpickle,
)

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
