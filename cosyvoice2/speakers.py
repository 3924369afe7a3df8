"""Saved speakers: what a voice prompt contributes, computed once and stored in the model dir.

A `Speaker` holds the official frontend's prompt-side `model_input`: the prompt
transcript's text tokens, the prompt speech tokens (25 Hz), the prompt mel
(50 Hz, 80 bins) and the CAM++ x-vector. Speakers imported from an official
`spk2info.pt` keep exactly the fields it has (an SFT speaker has only an
embedding).

The store is the `speakers/` folder of a model dir:

    index.json                        {speaker id: file name}, the ids `list()` gives
    <sha256 of the id>.safetensors    one per speaker; its metadata repeats the id
    .lock                             writers hold an exclusive `flock` on it

A model dir may come from anyone, so the store trusts nothing it reads:

- A speaker's file name is derived from its id alone (the SHA-256 of its UTF-8
  bytes, in hex), so any id (with `/`, `..`, any length) is safe and two ids never
  share a file. The name kept in `index.json` is only checked against the derived
  one, never followed: an entry naming another file (`../x`, an absolute path,
  another speaker's file) is refused with `SpeakerStoreError`, and nothing is read
  or deleted.
- Stores written by earlier versions named files `spkNNNNN-<hex of the id's first
  16 bytes>.safetensors`; such an entry still loads when its name has exactly that
  pattern for its own id (so it is a plain file name in the store's folder). Those
  names could collide, so every file's metadata id must equal the id asked for; a
  file that holds another speaker is refused. Saving or removing such a speaker
  drops its old file; the others keep theirs until they are saved again.
- Speaker files are read with O_NOFOLLOW (a symbolic link is refused), their size
  checked against `MAX_SPEAKER_BYTES` and every declared size (header, tensor
  shapes and offsets) against the real file size before anything is allocated;
  only the four known tensors, with their dtypes and ranks, are accepted.
- A corrupt speaker file affects only that speaker: loading it raises a one-line
  `SpeakerStoreError` naming the file; `list()` and the other speakers work, and
  `remove()` deletes it.
- A corrupt `index.json` (not JSON, not a map of ids to names, over
  `MAX_INDEX_BYTES`) is refused by every operation with a `SpeakerStoreError`
  naming it and the fix: delete it. A missing `index.json` is rebuilt from the
  speaker files themselves (a file counts when its name is the one its metadata id
  derives, or that id's old-style name), and the next write saves it again.

Writers (`save`, `remove`) are serialised across processes by `fcntl.flock` on
`.lock`; every file is written to a temporary file in the same folder, fsynced and
renamed into place (`os.replace`), so a reader, or a crash, never sees half a
file, and two processes adding speakers at once both end up in the index. Readers
take no lock (the renames are atomic), so a read-only model dir still loads.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from cosyvoice2.errors import InputError, SpeakerStoreError

INDEX = "index.json"
LOCK = ".lock"
SUFFIX = ".safetensors"
MAX_INDEX_BYTES = 4 << 20  # ~40k speakers; bounds what json.loads may build
MAX_SPEAKER_BYTES = 64 << 20  # a 30 s prompt's mel is ~0.5 MB
MAX_HEADER_BYTES = 1 << 20  # safetensors header: four tensors, the id and the transcript

# tensor name -> (safetensors dtype, numpy dtype, rank); the last axis of the mel is 80
FIELDS: dict[str, tuple[str, str, int]] = {
    "embedding": ("F32", "<f4", 2),
    "prompt_text": ("I32", "<i4", 2),
    "speech_token": ("I32", "<i4", 2),
    "speech_feat": ("F32", "<f4", 3),
}
MEL_BINS = 80

# no link followed, no wait on a FIFO put in place of a file
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | os.O_NONBLOCK
_HASHED = re.compile(r"[0-9a-f]{64}\.safetensors")
_LEGACY = re.compile(r"spk[0-9]{5,}-([0-9a-f]{0,32})\.safetensors")


def _row(x: Any, dtype: Any) -> mx.array:
    a = np.asarray(x)
    if a.ndim == 0:
        a = a.reshape(1)
    return mx.array(a.reshape(1, -1).astype(dtype))


@dataclass
class Speaker:
    """One saved voice (shapes with the leading batch axis of the official tensors)."""

    id: str
    embedding: mx.array  # (1, 192)
    prompt_text: mx.array  # (1, n) int32, may be empty
    speech_token: mx.array  # (1, m) int32, may be empty (SFT speakers)
    speech_feat: mx.array  # (1, 2m, 80) float32, may be empty
    prompt_text_str: str = ""

    @classmethod
    def from_official(cls, spk_id: str, info: dict[str, Any]) -> Speaker:
        """From an official `spk2info.pt` entry (zero-shot `model_input` or SFT `{'embedding': ...}`)."""
        emb = info.get("flow_embedding", info.get("embedding", info.get("llm_embedding")))
        if emb is None:
            raise InputError(f"speaker {spk_id!r}: no embedding in spk2info entry")
        feat = np.asarray(
            info.get("prompt_speech_feat", info.get("speech_feat", np.zeros((1, 0, 80))))
        )
        tokens = info.get("flow_prompt_speech_token", info.get("speech_token", np.zeros((1, 0))))
        return cls(
            id=spk_id,
            embedding=_row(emb, np.float32),
            prompt_text=_row(info.get("prompt_text", np.zeros((1, 0))), np.int32),
            speech_token=_row(tokens, np.int32),
            speech_feat=mx.array(feat.reshape(1, -1, 80).astype(np.float32)),
        )

    def arrays(self) -> dict[str, mx.array]:
        return {
            "embedding": self.embedding,
            "prompt_text": self.prompt_text,
            "speech_token": self.speech_token,
            "speech_feat": self.speech_feat,
        }


# ---------------------------------------------------------------------- names


def _id_bytes(spk_id: Any) -> bytes:
    if not isinstance(spk_id, str):
        raise InputError(f"speaker id {spk_id!r} is not a string")
    if not spk_id.strip():
        raise InputError("speaker id is empty")
    try:
        return spk_id.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"speaker id {spk_id!r} is not valid Unicode text") from None


def file_name(spk_id: str) -> str:
    """The file of speaker `spk_id` in a store: the SHA-256 of the whole id, so distinct ids never share one."""
    return hashlib.sha256(_id_bytes(spk_id)).hexdigest() + SUFFIX


def _is_legacy_name(spk_id: str, name: str) -> bool:
    """`name` is the file name earlier versions gave `spk_id` (`spkNNNNN-<hex of its first 16 bytes>`)."""
    m = _LEGACY.fullmatch(name)
    return m is not None and m.group(1) == _id_bytes(spk_id).hex()[:32]


def _shape_problem(name: str, shape: tuple[int, ...]) -> str | None:
    """Why `shape` cannot be tensor `name` of a speaker (None: it can)."""
    rank = FIELDS[name][2]
    if len(shape) != rank or shape[0] != 1:
        return f"{name} has shape {tuple(shape)}, expected rank {rank} with batch 1"
    if name == "speech_feat" and shape[2] != MEL_BINS:
        return f"speech_feat has {shape[2]} mel bins, expected {MEL_BINS}"
    if name == "embedding" and shape[1] == 0:
        return "embedding is empty"
    return None


# ---------------------------------------------------------------------- file format


def _encode(speaker: Speaker) -> bytes:
    """A speaker as safetensors bytes (readable by `mx.load` too); bad arrays raise InputError."""
    try:
        speaker.prompt_text_str.encode("utf-8")
    except (AttributeError, UnicodeEncodeError):
        raise InputError(f"speaker {speaker.id!r}: prompt text is not valid text") from None
    arrays = {}
    for name, (_, np_dtype, _) in FIELDS.items():
        a = np.ascontiguousarray(np.asarray(getattr(speaker, name)), dtype=np_dtype)
        problem = _shape_problem(name, a.shape)
        if problem is not None:
            raise InputError(f"speaker {speaker.id!r}: {problem}")
        arrays[name] = a
    header: dict[str, Any] = {}
    offset = 0
    for name, a in arrays.items():
        header[name] = {
            "dtype": FIELDS[name][0],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
    header["__metadata__"] = {"id": speaker.id, "prompt_text": speaker.prompt_text_str}
    raw = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    if len(raw) > MAX_HEADER_BYTES or 8 + len(raw) + offset > MAX_SPEAKER_BYTES:
        raise InputError(
            f"speaker {speaker.id!r} is too large to save ({8 + len(raw) + offset} bytes, "
            f"id and transcript {len(raw)} bytes; at most {MAX_SPEAKER_BYTES} and {MAX_HEADER_BYTES})"
        )
    return len(raw).to_bytes(8, "little") + raw + b"".join(a.tobytes() for a in arrays.values())


class _Corrupt(Exception):
    """A speaker file's problem, turned into a SpeakerStoreError naming the file by the caller."""


def _open_regular(path: Path, limit: int) -> tuple[Any, int]:
    """`path` opened for reading without following a link, with its size (at most `limit`)."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _Corrupt("a symbolic link, not a file") from None
        raise
    f = os.fdopen(fd, "rb")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        f.close()
        raise _Corrupt("not a regular file")
    if st.st_size > limit:
        f.close()
        raise _Corrupt(f"{st.st_size} bytes, more than the {limit} allowed")
    return f, st.st_size


def _read_header(f: Any, size: int) -> tuple[dict[str, Any], dict[str, str]]:
    """The checked tensor entries and metadata of a safetensors file of `size` bytes."""
    head = f.read(8)
    if len(head) < 8:
        raise _Corrupt("shorter than a safetensors header")
    n = int.from_bytes(head, "little")
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise _Corrupt(f"declares a {n}-byte header in a {size}-byte file")
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _Corrupt("its header is not JSON") from None
    if not isinstance(header, dict):
        raise _Corrupt("its header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _Corrupt("its metadata is not a map of strings")
    if set(header) != set(FIELDS):
        raise _Corrupt(f"holds tensors {sorted(header)}, expected {sorted(FIELDS)}")
    data_len = size - 8 - n
    for name, (dtype, np_dtype, _) in FIELDS.items():
        t = header[name]
        shape = t.get("shape") if isinstance(t, dict) else None
        offsets = t.get("data_offsets") if isinstance(t, dict) else None
        if (
            not isinstance(shape, list)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(d) is int and d >= 0 for d in shape + offsets)
        ):
            raise _Corrupt(f"tensor {name} has no valid shape and offsets")
        if t.get("dtype") != dtype:
            raise _Corrupt(f"tensor {name} is {t.get('dtype')!r}, expected {dtype}")
        problem = _shape_problem(name, tuple(shape))
        if problem is not None:
            raise _Corrupt(problem)
        start, end = offsets
        if (
            not start <= end <= data_len
            or end - start != math.prod(shape) * np.dtype(np_dtype).itemsize
        ):
            raise _Corrupt(
                f"tensor {name} {tuple(shape)} declares bytes {start}..{end} "
                f"of a {data_len}-byte data section"
            )
    return header, meta


def _read_speaker(path: Path, spk_id: str) -> Speaker:
    """Speaker `spk_id` from its file (checked as the module docstring says)."""
    try:
        f, size = _open_regular(path, MAX_SPEAKER_BYTES)
        with f:
            header, meta = _read_header(f, size)
            data_len = size - f.tell()
            body = f.read(data_len)
            if len(body) != data_len:
                raise _Corrupt("it changed while being read")
    except FileNotFoundError:
        raise SpeakerStoreError(
            f"{path}: the file of speaker {spk_id!r} is missing; remove the speaker and add it again"
        ) from None
    except (OSError, _Corrupt) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise SpeakerStoreError(
            f"{path}: speaker {spk_id!r} cannot be read ({why}); remove the speaker and add it again"
        ) from None
    if meta.get("id") != spk_id:
        raise SpeakerStoreError(
            f"{path}: holds speaker {meta.get('id')!r}, not {spk_id!r} (an older version's file "
            "names could collide); remove the speaker and add it again"
        )
    arrays = {}
    for name, (_, np_dtype, _) in FIELDS.items():
        start, end = header[name]["data_offsets"]
        shape = header[name]["shape"]
        count = math.prod(shape)
        a = np.frombuffer(body, dtype=np_dtype, count=count, offset=start) if count else []
        arrays[name] = mx.array(np.asarray(a, dtype=np_dtype[1:]).reshape(shape))
    return Speaker(id=spk_id, prompt_text_str=meta.get("prompt_text", ""), **arrays)


def _file_id(path: Path) -> str | None:
    """The speaker id a file's metadata names, or None when the file is not a readable speaker."""
    try:
        f, size = _open_regular(path, MAX_SPEAKER_BYTES)
        with f:
            _, meta = _read_header(f, size)
    except (OSError, _Corrupt):
        return None
    spk_id = meta.get("id")
    try:
        _id_bytes(spk_id)
    except InputError:
        return None
    return spk_id


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- the store


class SpeakerStore:
    """The `speakers/` folder of an MLX model dir (see the module docstring for its rules)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # -- reading

    def _check_root(self) -> None:
        if self.root.is_symlink():
            raise SpeakerStoreError(
                f"{self.root}: the speaker store is a symbolic link; it must be a folder of the model dir"
            )

    def _corrupt_index(self, why: str) -> SpeakerStoreError:
        path = self.root / INDEX
        return SpeakerStoreError(
            f"{path} is corrupt ({why}); delete it to rebuild the index from the speaker files"
        )

    def _read_index(self) -> dict[str, str] | None:
        """`index.json` checked as a map of valid ids to strings; None when there is none."""
        self._check_root()
        path = self.root / INDEX
        try:
            f, _ = _open_regular(path, MAX_INDEX_BYTES)
            with f:
                data = f.read(MAX_INDEX_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise SpeakerStoreError(f"{path}: cannot read ({e.strerror or e})") from None
        except _Corrupt as e:
            raise self._corrupt_index(str(e)) from None
        try:
            index = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise self._corrupt_index("not JSON") from None
        if not isinstance(index, dict) or not all(isinstance(v, str) for v in index.values()):
            raise self._corrupt_index("not a map of speaker ids to file names")
        for spk_id in index:
            try:
                _id_bytes(spk_id)
            except InputError:
                raise self._corrupt_index(f"speaker id {spk_id!r} is not valid") from None
        return index

    def _rebuild(self) -> dict[str, str]:
        """The index as the speaker files give it (for a store without `index.json`)."""
        if not self.root.is_dir():
            return {}
        index: dict[str, str] = {}
        for path in sorted(self.root.iterdir()):
            name = path.name
            if not (_HASHED.fullmatch(name) or _LEGACY.fullmatch(name)):
                continue
            spk_id = _file_id(path)
            if spk_id is None or index.get(spk_id) == file_name(spk_id):
                continue
            if name == file_name(spk_id) or _is_legacy_name(spk_id, name):
                index[spk_id] = name
        return index

    def _index(self) -> dict[str, str]:
        index = self._read_index()
        return self._rebuild() if index is None else index

    def _path(self, spk_id: str, name: str) -> Path:
        """The file of `spk_id` given its index entry `name`, which must be the derived (or old-style) name."""
        if name != file_name(spk_id) and not _is_legacy_name(spk_id, name):
            raise SpeakerStoreError(
                f"{self.root / INDEX}: speaker {spk_id!r} names file {name!r}, not its own "
                f"{file_name(spk_id)!r}; the index was edited: delete it to rebuild it from the speaker files"
            )
        return self.root / name

    def _entry(self, spk_id: str, index: dict[str, str]) -> Path:
        if spk_id not in index:
            known = ", ".join(repr(k) for k in sorted(index)) or "none saved"
            raise InputError(f"unknown speaker {spk_id!r} (known: {known})")
        return self._path(spk_id, index[spk_id])

    def list(self) -> list[str]:
        return sorted(self._index())

    def __contains__(self, spk_id: str) -> bool:
        return spk_id in self._index()

    def load(self, spk_id: str) -> Speaker:
        return _read_speaker(self._entry(spk_id, self._index()), spk_id)

    # -- writing

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the store's exclusive writer lock (created on first use)."""
        self._check_root()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o644)
        except OSError as e:
            raise SpeakerStoreError(
                f"{self.root}: cannot lock the speaker store for writing ({e.strerror or e})"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _write(self, name: str, data: bytes) -> None:
        """Write `data` as `name` atomically: a temporary file in the store, fsynced, renamed."""
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.root)
        except OSError as e:
            raise SpeakerStoreError(f"{self.root}: cannot write ({e.strerror or e})") from None
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.root / name)
        except BaseException as e:
            with suppress(OSError):
                os.unlink(tmp)
            if isinstance(e, OSError):
                raise SpeakerStoreError(
                    f"{self.root / name}: cannot write ({e.strerror or e}); the store is unchanged"
                ) from None
            raise
        _fsync_dir(self.root)

    def _write_index(self, index: dict[str, str]) -> None:
        text = json.dumps(index, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        self._write(INDEX, text.encode("utf-8"))

    def _drop(self, name: str, index: dict[str, str]) -> None:
        """Delete file `name` (already checked to be a speaker's) unless an entry still names it."""
        if name not in index.values():
            with suppress(OSError):  # what stays (a folder put there) is ignored: not in the index
                (self.root / name).unlink()

    def save(self, speaker: Speaker) -> None:
        """Save (or replace) a speaker; an old-style or hand-edited entry of its id is replaced."""
        name = file_name(speaker.id)
        data = _encode(speaker)
        self._index()  # a corrupt index is refused before anything is written
        with self._locked():
            index = self._index()
            old = index.get(speaker.id)
            self._write(name, data)
            index[speaker.id] = name
            self._write_index(index)
            if old is not None and old != name and _is_legacy_name(speaker.id, old):
                self._drop(old, index)

    def remove(self, spk_id: str) -> None:
        """Remove a speaker and its file; an entry that names another file is refused."""
        self._entry(spk_id, self._index())  # refused before the lock file is made
        with self._locked():
            index = self._index()
            path = self._entry(spk_id, index)
            del index[spk_id]
            self._write_index(index)
            self._drop(path.name, index)
