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

Every size the file declares is checked against the file's real size, and against a
stated limit, before anything is allocated: zip records must be stored (torch never
compresses them; a compressed record is refused before it is inflated), lie inside the
file and not overlap one another, and their names must be unique; the zip directory may
be at most `_MAX_ZIP_DIRECTORY` bytes, and each pickle at most 64 MiB
(`torch_pickle._MAX_PICKLE_BYTES`). The limits on what a pickle may build (opcodes,
containers, nesting, tensors, broadcast views) are those of `cosyvoice2.torch_pickle`.

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
    _MAX_DEPTH,
    _MAX_PICKLE_BYTES,
    _MAX_TENSORS,
    ALLOWED_GLOBALS,
    _ascii,
    _FormatError,
    _Frozen,
    _scan_pickle,
    _short,
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
_MAX_ZIP_DIRECTORY = 16 << 20
"""The largest zip directory read (torch writes about 100 bytes per tensor)."""
_MAX_ZIP_RECORDS = _MAX_TENSORS + 64
"""The most records in a zip archive: one per storage, and a few more."""
_MAX_BYTEORDER = 16


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

    def read_bytes(self, start: int, nbytes: int) -> bytes:
        """`nbytes` at `start` as bytes (for headers and pickles; checked against the size)."""
        if start < 0 or nbytes < 0 or start + nbytes > self.size:
            raise _FormatError(
                f"file is truncated: {nbytes} bytes at offset {start} lie past its end ({self.size})"
            )
        if self.map is not None:
            return self.map[start : start + nbytes]
        self.fh.seek(start)
        data = self.fh.read(nbytes)
        if len(data) != nbytes:
            raise _FormatError(f"file is truncated: expected {nbytes} bytes at offset {start}")
        return data


class _CappedFile:
    """The open file as `zipfile` sees it: each read is cut at the file's real size and
    refused beyond `_MAX_ZIP_DIRECTORY`, before anything is allocated (`zipfile` reads the
    central directory in one read of the size the archive declares)."""

    def __init__(self, fh: BinaryIO, size: int) -> None:
        self.fh = fh
        self.size = size

    def read(self, n: int | None = -1) -> bytes:
        pos = self.fh.tell()
        left = max(self.size - pos, 0)
        n = left if n is None or n < 0 else min(n, left)
        if n > _MAX_ZIP_DIRECTORY:
            raise _FormatError(
                f"zip directory of {n} bytes at offset {pos} is larger than the "
                f"{_MAX_ZIP_DIRECTORY} bytes allowed"
            )
        return self.fh.read(n)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.fh.seek(offset, whence)

    def tell(self) -> int:
        return self.fh.tell()

    def seekable(self) -> bool:
        return True


class _Window:
    """Reads of the open file cut at `end` (for scanning a legacy pickle of unknown length)."""

    def __init__(self, fh: BinaryIO, end: int) -> None:
        self.fh = fh
        self.end = end

    def _left(self) -> int:
        return max(self.end - self.fh.tell(), 0)

    def read(self, n: int = -1) -> bytes:
        left = self._left()
        return self.fh.read(left if n < 0 else min(n, left))

    def readline(self) -> bytes:
        return self.fh.readline(self._left())

    def tell(self) -> int:
        return self.fh.tell()


def _record_span(info: zipfile.ZipInfo, source: _Source) -> tuple[int, int, int]:
    """Where a stored zip record lies: (local header offset, data start, data end), every
    size and offset checked against the file's real size before anything is read."""
    name = info.filename
    size = source.size
    if info.flag_bits & 0x1:
        raise _FormatError(f"record {name!r} is encrypted")
    if info.compress_type != zipfile.ZIP_STORED:
        raise _FormatError(
            f"record {name!r} is compressed (method {info.compress_type}, declaring "
            f"{info.file_size} bytes); torch.save stores its records uncompressed"
        )
    if info.compress_size != info.file_size or info.file_size > size:
        raise _FormatError(
            f"record {name!r} declares {info.file_size} bytes ({info.compress_size} stored) "
            f"in a file of {size} bytes"
        )
    offset = info.header_offset
    if offset < 0 or offset + _ZIP_LOCAL_HEADER.size > size:
        raise _FormatError(
            f"record {name!r} has its header at offset {offset}, past the end of the file "
            f"({size} bytes)"
        )
    fields = _ZIP_LOCAL_HEADER.unpack(source.read_bytes(offset, _ZIP_LOCAL_HEADER.size))
    if fields[0] != _ZIP_LOCAL_SIGNATURE:
        raise _FormatError(f"corrupt zip local header for {name!r}")
    if fields[3] != zipfile.ZIP_STORED:
        raise _FormatError(
            f"record {name!r} is compressed (method {fields[3]} in its local header); "
            "torch.save stores its records uncompressed"
        )
    for local in (fields[7], fields[8]):  # sizes, when the local header gives them
        if local != 0xFFFFFFFF and local > size:
            raise _FormatError(
                f"record {name!r} declares {local} bytes in its local header, in a file of "
                f"{size} bytes"
            )
    start = offset + _ZIP_LOCAL_HEADER.size + fields[9] + fields[10]
    end = start + info.file_size
    if end > size:
        raise _FormatError(
            f"record {name!r} of {info.file_size} bytes at offset {start} runs past the end "
            f"of the file ({size} bytes)"
        )
    encoding = "utf-8" if info.flag_bits & 0x800 else "cp437"
    try:
        expected = info.orig_filename.encode(encoding)
    except UnicodeEncodeError:
        expected = None
    if source.read_bytes(offset + _ZIP_LOCAL_HEADER.size, fields[9]) != expected:
        raise _FormatError(f"record {name!r} has another name in its local header")
    return offset, start, end


def _read_zip(fh: BinaryIO, source: _Source) -> tuple[Any, dict[str, np.ndarray], str]:
    """The torch zip layout: returns the unpickled tree, the storage buffers and the byte order."""
    try:
        with zipfile.ZipFile(_CappedFile(fh, source.size)) as zf:  # type: ignore[arg-type]
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        raise _FormatError(f"corrupt or truncated zip archive ({e})") from None
    if not infos:
        raise _FormatError("empty zip archive")
    if len(infos) > _MAX_ZIP_RECORDS:
        raise _FormatError(
            f"zip archive has {len(infos)} records, more than the {_MAX_ZIP_RECORDS} allowed"
        )
    by_name: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        if info.filename in by_name:
            raise _FormatError(f"zip archive has two records named {info.filename!r}")
        by_name[info.filename] = info
    names = list(by_name)
    prefix = names[0].split("/", 1)[0] + "/"
    if prefix + "data.pkl" not in by_name:
        found = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(found) != 1:
            raise _FormatError("zip archive has no data.pkl record (not a torch.save file)")
        prefix = found[0][: -len("data.pkl")]

    spans: list[tuple[int, int, str]] = []  # (header offset, data end, name) of records read

    def locate(name: str, missing: str = "missing record") -> tuple[int, int]:
        info = by_name.get(prefix + name)
        if info is None:
            raise _FormatError(f"{missing} {_short(prefix + name)}")
        offset, start, end = _record_span(info, source)
        spans.append((offset, end, info.filename))
        return start, end - start

    byteorder = "little"
    if prefix + "byteorder" in by_name:
        start, n = locate("byteorder")
        if n > _MAX_BYTEORDER:
            raise _FormatError(f"byteorder record of {n} bytes")
        byteorder = source.read_bytes(start, n).decode("ascii", "replace")
        if byteorder not in ("little", "big"):
            raise _FormatError(f"unknown byte order {byteorder!r}")
    start, n = locate("data.pkl")
    if n > _MAX_PICKLE_BYTES:
        raise _FormatError(
            f"data.pkl of {n} bytes is larger than the {_MAX_PICKLE_BYTES} bytes allowed"
        )
    tree, unpickler = _unpickle(source.read_bytes(start, n), True, False, source.size)

    records: dict[str, tuple[int, int]] = {}
    for key, ref in unpickler.storages.items():
        start, n = locate(f"data/{key}", "missing storage record")
        nbytes = ref.numel * ref.dtype.itemsize
        if n != nbytes:
            raise _FormatError(
                f"storage record {_short(prefix + 'data/' + key)} has {n} bytes, expected {nbytes}"
            )
        records[key] = (start, nbytes)
    spans.sort()
    for (_, end, name), (offset, _, other) in zip(spans, spans[1:]):
        if offset < end:
            raise _FormatError(f"zip records {name!r} and {other!r} overlap")
    buffers = {key: source.bytes_at(start, n) for key, (start, n) in records.items()}
    return tree, buffers, byteorder


def _legacy_pickle(fh: BinaryIO, source: _Source, allow_storages: bool = False) -> tuple[Any, Any]:
    """The next pickle of the legacy stream: its extent found by a scan that reads at most
    `_MAX_PICKLE_BYTES` (and never past the file's end), then scanned and unpickled."""
    start = fh.tell()
    avail = min(source.size - start, _MAX_PICKLE_BYTES)
    try:
        n = _scan_pickle(_Window(fh, start + avail), avail)
    except _FormatError:
        if avail == _MAX_PICKLE_BYTES:
            fh.seek(start + avail)
            raise _FormatError(
                f"pickle at offset {start} is larger than the {_MAX_PICKLE_BYTES} bytes allowed"
            ) from None
        raise
    data = source.read_bytes(start, n)
    fh.seek(start + n)
    return _unpickle(data, allow_storages, True, source.size)


def _read_legacy(fh: BinaryIO, source: _Source) -> tuple[Any, dict[str, np.ndarray], str]:
    """The pre-1.6 stream: magic, protocol, sys_info, pickle, storage keys, raw storages."""
    try:
        magic, _ = _legacy_pickle(fh, source)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, _FormatError):
        raise _FormatError(
            "not a PyTorch checkpoint (neither a zip archive nor a pickle with torch's magic number)"
        ) from None
    if type(magic) is not int or magic != LEGACY_MAGIC_NUMBER:
        raise _FormatError("wrong magic number: not a PyTorch checkpoint")
    protocol, _ = _legacy_pickle(fh, source)
    if type(protocol) is not int or protocol != LEGACY_PROTOCOL_VERSION:
        raise _FormatError(f"unsupported legacy protocol version {_short(protocol)}")
    sys_info, _ = _legacy_pickle(fh, source)
    if not isinstance(sys_info, dict):
        raise _FormatError("bad sys_info record")
    tree, unpickler = _legacy_pickle(fh, source, allow_storages=True)
    keys, _ = _legacy_pickle(fh, source)
    if not isinstance(keys, list) or not all(isinstance(_ascii(k), str) for k in keys):
        raise _FormatError("bad storage key list")
    keys = [_ascii(k) for k in keys]
    if len(set(keys)) != len(keys):
        raise _FormatError("storage key list names a storage twice")
    missing = set(unpickler.storages) - set(keys)
    if missing:
        raise _FormatError(f"missing storage records for keys {_short(sorted(missing))}")
    offset = fh.tell()
    buffers: dict[str, np.ndarray] = {}
    for key in keys:
        ref = unpickler.storages.get(key)
        if ref is None:
            raise _FormatError(f"storage record {_short(key)} is not referenced by the pickle")
        (count,) = struct.unpack("<q", source.read_bytes(offset, 8))
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


def _plain_key(key: Any, depth: int = 0) -> bool:
    """Whether a dict key or set element is plain data (tuples of scalars included)."""
    if key is None or isinstance(key, (bool, int, float, complex, str, bytes)):
        return not isinstance(key, _Frozen)
    if isinstance(key, (tuple, frozenset)) and depth < _MAX_DEPTH:
        return all(_plain_key(k, depth + 1) for k in key)
    return False


def _resolve(tree: Any, build: Callable[[_TensorRef], np.ndarray]) -> Any:
    """Replace tensor placeholders by arrays throughout the unpickled tree (shared objects once).

    Nesting deeper than `_MAX_DEPTH` is refused here too: the opcode scan bounds it as the
    pickle is built, but a pickle can still deepen a container after nesting it (through
    the memo), so the walk counts its own depth rather than meet Python's recursion limit.
    """
    memo: dict[int, Any] = {}

    def walk(obj: Any, depth: int) -> Any:
        oid = id(obj)
        if oid in memo:
            return memo[oid]
        if depth > _MAX_DEPTH:
            raise _FormatError(f"containers nested deeper than {_MAX_DEPTH} levels")
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
                if not _plain_key(k):
                    raise _FormatError("a tensor or torch object used in a dict key")
                out[k] = walk(v, depth + 1)
            return out
        if isinstance(obj, list):
            out = memo[oid] = []
            out.extend(walk(v, depth + 1) for v in obj)
            return out
        if isinstance(obj, tuple):
            out = memo[oid] = tuple(walk(v, depth + 1) for v in obj)
            return out
        if isinstance(obj, (set, frozenset)):
            if not all(_plain_key(v) for v in obj):
                raise _FormatError("a tensor or torch object inside a set")
            return obj
        if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, bytearray)):
            return obj
        if isinstance(obj, _Frozen):
            raise _FormatError(f"unsupported object {_short(obj)} in the checkpoint")
        raise _FormatError(f"unsupported object of type {type(obj).__name__} in the checkpoint")

    return walk(tree, 0)


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
    unrecognised file, for any pickle global outside `ALLOWED_GLOBALS`, before
    anything the file names is called, and for a file past the limits above, before
    anything it declares is allocated. The message is one line.
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
    except (CheckpointError, _FormatError) as e:
        message = str(e)
    except EOFError:
        message = "file is truncated (pickle data ran out)"
    except (pickle.UnpicklingError, ValueError, TypeError, AttributeError, KeyError) as e:
        message = f"corrupt or unsupported pickle ({type(e).__name__}: {e})"
    except (RecursionError, MemoryError, IndexError, struct.error, OverflowError) as e:
        message = f"corrupt checkpoint ({type(e).__name__}: {e})"
    except OSError as e:
        message = f"read error ({e})"
    message = message.replace("\r", "\\r").replace("\n", "\\n")  # one line, whatever the file
    raise CheckpointError(f"{path}: {message}")


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
