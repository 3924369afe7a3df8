"""Hostile and broken `.pt` files: the torch-free reader refuses each in one line, allocating
nothing the file only declares.

`cosyvoice2.checkpoint` reads `llm.pt`, `flow.pt`, `hift.pt` and `spk2info.pt` from a
directory the user downloaded. These tests hand it files made to misbehave: zip records
that are compressed, overlap, share a name or lie past the end of the file; pickles over
the size cap, nested a hundred thousand deep, building a million containers or a hundred
thousand tensors, asking for a memo table of gigabytes, or using opcodes torch.save never
writes; tensors that view one element as a terabyte; tensors hidden in dict keys. Each
must end in one clean `CheckpointError` (through `tests.bad_inputs`); the bombs are read
in a child process whose peak memory must stay under `LIMIT_MB`.

The files are crafted with `zipfile`, `pickle` and `struct` (no torch needed), with the
pickle assembler of `tests/test_checkpoint.py`.
"""

from __future__ import annotations

import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from cosyvoice2 import checkpoint, torch_pickle
from cosyvoice2.checkpoint import load_torch_checkpoint, load_torch_file
from tests.bad_inputs import bounded, refused
from tests.test_checkpoint import (
    _call,
    _dict,
    _global,
    _pickle,
    _simple_zip,
    _storage_pid,
    _tensor,
    _value,
    _write_legacy,
    _write_zip,
)

AREA = "checkpoint"
LIMIT_MB = 200
"""Peak memory allowed to a child reading a bomb. The child imports numpy and the reader
(not mlx): about 30 MB; the largest refusal, a legacy pickle over the 64 MiB cap (read up
to the cap to find its end), peaks near 100 MB. Every bomb below would take 512 MB or
more if what it declares were allocated."""

MiB = 1 << 20


def _load_snippet(path: Path, mmap: bool = False) -> str:
    """Child code: read the file (`mmap=False`: every storage read into owned memory)."""
    return (
        "from cosyvoice2.checkpoint import load_torch_file\n"
        f"load_torch_file({str(path)!r}, mmap={mmap})\n"
    )


def _bounded(what: str, path: Path, match: str, mmap: bool = False) -> None:
    bounded(AREA, what, _load_snippet(path, mmap), LIMIT_MB, watch=path.parent, match=match)


def _refused(what: str, path: Path, match: str) -> None:
    refused(AREA, what, lambda: load_torch_file(path), watch=path.parent, match=match)


# --------------------------------------------------------------------------- a raw zip writer


def _local(name: str, size: int, crc: int = 0, method: int = 0) -> bytes:
    n = name.encode()
    return (
        struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0, crc, size, size, len(n), 0) + n
    )


def _raw_zip(blob: bytes, entries: list[tuple[str, int, int, int]]) -> bytes:
    """`blob` (holding the local headers), then a central directory of `entries`
    (name, local header offset, size, crc), then the end record."""
    cd = b""
    for name, offset, size, crc in entries:
        n = name.encode()
        cd += (
            struct.pack(
                "<IHHHHHHIIIHHHHHII",
                0x02014B50,
                20,
                20,
                0,
                0,
                0,
                0,
                crc,
                size,
                size,
                len(n),
                0,
                0,
                0,
                0,
                0,
                offset,
            )
            + n
        )
    end = struct.pack(
        "<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), len(cd), len(blob), 0
    )
    return blob + cd + end


def _zip_of(records: list[tuple[str, bytes]]) -> bytes:
    """A stored zip of `records` in order, names may repeat (zipfile would warn)."""
    blob, entries = b"", []
    for name, data in records:
        crc = zlib.crc32(data)
        entries.append((name, len(blob), len(data), crc))
        blob += _local(name, len(data), crc) + data
    return _raw_zip(blob, entries)


def _central_offset(data: bytes, name: str) -> int:
    """Where the central directory entry of `name` starts."""
    at = data.index(b"PK\x01\x02")
    n = name.encode()
    while True:
        name_len = struct.unpack_from("<H", data, at + 28)[0]
        if data[at + 46 : at + 46 + name_len] == n:
            return at
        extra, comment = struct.unpack_from("<HH", data, at + 30)
        at += 46 + name_len + extra + comment


def _patch(path: Path, offset: int, fmt: str, value: int) -> Path:
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    path.write_bytes(bytes(data))
    return path


# --------------------------------------------------------------------------- zip records


def test_compressed_storage_record_is_refused_before_inflating(tmp_path: Path) -> None:
    """A deflated record of 512 MiB of zeros (half a MiB in the file): refused unread."""
    numel = 128 * MiB  # float32: 512 MiB
    pkl = _pickle(_dict({"w": _tensor("FloatStorage", "0", numel, 0, (numel,), (1,))}))
    path = tmp_path / "llm.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pkl)
        info = zipfile.ZipInfo("archive/data/0")
        info.compress_type = zipfile.ZIP_DEFLATED
        with zf.open(info, "w") as out:
            chunk = bytes(16 * MiB)
            for _ in range(numel * 4 // len(chunk)):
                out.write(chunk)
    assert path.stat().st_size < 2 * MiB
    _bounded("zip storage record deflated, inflating to 512 MiB", path, "compressed")


def test_compressed_data_pkl_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "flow.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", _pickle(_value({"a": 1})))
    _refused("zip data.pkl record deflated", path, "compressed")


def test_record_sizes_and_offsets_past_the_file_are_refused(tmp_path: Path) -> None:
    good = _simple_zip(tmp_path / "good.pt").read_bytes()
    cd = _central_offset(good, "archive/data.pkl")
    cases = [
        ("zip data.pkl declares 2 GiB in a file of 1 KB", cd + 20, "<I", 0x7FFFFFFF, "declares"),
        ("zip data.pkl declares 2 GiB uncompressed", cd + 24, "<I", 0x7FFFFFFF, "declares"),
        (
            "zip record header offset past the end of the file",
            cd + 42,
            "<I",
            0x7FFFFFF0,
            "past the end",
        ),
    ]
    for i, (what, offset, fmt, value, match) in enumerate(cases):
        path = tmp_path / f"p{i}" / "llm.pt"
        path.parent.mkdir()
        path.write_bytes(good)
        _refused(what, _patch(path, offset, fmt, value), match)
    # the local header of data.pkl (at offset 0): an extra field of 64 KiB, a size of 2 GiB,
    # a compression method
    local = [
        (
            "zip local header extra field runs past the end of the file",
            28,
            "<H",
            0xFFFF,
            "past the end",
        ),
        ("zip local header declares 2 GiB", 22, "<I", 0x7FFFFFFF, "declares"),
        ("zip local header says deflated, the directory stored", 8, "<H", 8, "compressed"),
    ]
    for i, (what, offset, fmt, value, match) in enumerate(local):
        path = tmp_path / f"l{i}" / "llm.pt"
        path.parent.mkdir()
        path.write_bytes(good)
        _refused(what, _patch(path, offset, fmt, value), match)


def test_storage_record_past_the_end_is_refused(tmp_path: Path) -> None:
    """A storage record whose directory entry and pickle agree on 2 GiB, in a small file."""
    numel = 512 * MiB  # float32: 2 GiB
    pkl = _pickle(_dict({"w": _tensor("FloatStorage", "0", numel, 0, (numel,), (1,))}))
    path = tmp_path / "llm.pt"
    path.write_bytes(_zip_of([("archive/data.pkl", pkl), ("archive/data/0", bytes(64))]))
    data = path.read_bytes()
    cd = _central_offset(data, "archive/data/0")
    _patch(path, cd + 20, "<I", numel * 4)
    _patch(path, cd + 24, "<I", numel * 4)
    _bounded("zip storage record declares 2 GiB in a file of 1 KB", path, "declares")


def test_overlapping_records_are_refused(tmp_path: Path) -> None:
    """100 storage records that all lie inside one 8 MiB record: read with `mmap=False`,
    each would be its own 8 MiB buffer (800 MB from an 8 MiB file)."""
    size, count = 8 * MiB, 100
    pkl_parts, entries = {}, []
    payload = bytearray(size)
    # the local headers of records 1..99 sit inside record 0's data, 64 bytes apart
    for k in range(1, count):
        name = f"archive/data/{k}"
        at = 64 * (k - 1)
        nbytes = (size - at - 30 - len(name)) // 4 * 4
        payload[at : at + 30 + len(name)] = _local(name, nbytes)
        entries.append((name, at, nbytes))
    pkl_parts["w0"] = _tensor("FloatStorage", "0", size // 4, 0, (size // 4,), (1,))
    for name, _, nbytes in entries:
        key = name.rsplit("/", 1)[1]
        pkl_parts[f"w{key}"] = _tensor("FloatStorage", key, nbytes // 4, 0, (nbytes // 4,), (1,))
    pkl = _pickle(_dict(pkl_parts))
    crc = zlib.crc32(pkl)
    head = _local("archive/data.pkl", len(pkl), crc) + pkl
    data0 = len(head)
    blob = head + _local("archive/data/0", size) + bytes(payload)
    start0 = data0 + 30 + len("archive/data/0")
    central = [("archive/data.pkl", 0, len(pkl), crc), ("archive/data/0", data0, size, 0)]
    central += [(name, start0 + at, nbytes, 0) for name, at, nbytes in entries]
    path = tmp_path / "llm.pt"
    path.write_bytes(_raw_zip(blob, central))
    _bounded("zip: 100 storage records inside one 8 MiB record", path, "overlap")


def test_duplicate_record_names_are_refused(tmp_path: Path) -> None:
    pkl = _pickle(_dict({"w": _tensor("FloatStorage", "0", 2, 0, (2,), (1,))}))
    twice_storage = _zip_of(
        [("archive/data.pkl", pkl), ("archive/data/0", bytes(8)), ("archive/data/0", bytes(8))]
    )
    path = tmp_path / "a" / "llm.pt"
    path.parent.mkdir()
    path.write_bytes(twice_storage)
    _refused("zip with two records named archive/data/0", path, "two records")
    twice_pkl = _zip_of([("archive/data.pkl", _pickle(_value(1))), ("archive/data.pkl", pkl)])
    path = tmp_path / "b" / "llm.pt"
    path.parent.mkdir()
    path.write_bytes(twice_pkl)
    _refused("zip with two records named archive/data.pkl", path, "two records")


def test_zip_directory_over_its_cap_is_refused(tmp_path: Path) -> None:
    """The end record says the directory is 20 MiB (it would be read in one piece)."""
    path = tmp_path / "llm.pt"
    path.write_bytes(_zip_of([("archive/data.pkl", _pickle(_value(1))), ("pad", bytes(24 * MiB))]))
    size = path.stat().st_size
    _patch(path, size - 22 + 12, "<I", 20 * MiB)  # size of the central directory
    _refused("zip directory declared as 20 MiB", path, "larger than")


def test_too_many_zip_records_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checkpoint, "_MAX_ZIP_RECORDS", 10)
    records = [("archive/data.pkl", _pickle(_value(1)))]
    records += [(f"archive/extra/{i}", b"") for i in range(10)]
    path = tmp_path / "llm.pt"
    path.write_bytes(_zip_of(records))
    _refused("zip with more records than allowed", path, "records, more than")


# --------------------------------------------------------------------------- pickle size


def test_data_pkl_over_the_cap_is_refused(tmp_path: Path) -> None:
    """A stored data.pkl of 64 MiB + 1 byte: refused before it is read."""
    n = torch_pickle._MAX_PICKLE_BYTES + 1 - 12
    pkl = b"\x80\x04\x8e" + struct.pack("<Q", n) + bytes(n) + b"."  # BINBYTES8
    assert len(pkl) == torch_pickle._MAX_PICKLE_BYTES + 1
    path = tmp_path / "llm.pt"
    _write_zip(path, pkl, {})
    _bounded("zip data.pkl of 64 MiB + 1 byte", path, "larger than")


def test_legacy_pickle_over_the_cap_is_refused(tmp_path: Path) -> None:
    n = torch_pickle._MAX_PICKLE_BYTES
    pkl = b"\x80\x04\x8e" + struct.pack("<Q", n) + bytes(n) + b"."
    path = _write_legacy(tmp_path / "llm.pt", pkl, [])
    _bounded("legacy main pickle of 64 MiB + 12 bytes", path, "larger than")


def test_pickle_declaring_a_terabyte_is_refused(tmp_path: Path) -> None:
    pkl = b"\x80\x04\x8e" + struct.pack("<Q", 1 << 40) + bytes(16) + b"."
    legacy = _write_legacy(tmp_path / "legacy.pt", pkl, [])
    _bounded("legacy pickle declares bytes of 1 TiB", legacy, "remain")
    zipped = _write_zip(tmp_path / "zip.pt", pkl, {})
    _bounded("zip data.pkl declares bytes of 1 TiB", zipped, "remain")
    frame = b"\x80\x04\x95" + struct.pack("<Q", 1 << 40) + _value(1) + b"."
    framed = _write_zip(tmp_path / "frame.pt", frame, {})
    _refused("pickle frame declared as 1 TiB", framed, "frame")


def test_legacy_storage_declaring_a_terabyte_is_refused(tmp_path: Path) -> None:
    numel = 1 << 38  # float32: 1 TiB, agreed on by the pickle and the record's count
    pkl = _pickle(_dict({"w": _tensor("FloatStorage", "0", numel, 0, (numel,), (1,), True)}))
    path = _write_legacy(tmp_path / "llm.pt", pkl, [("0", bytes(64), numel)])
    _bounded("legacy storage record declares 1 TiB", path, "truncated")


# --------------------------------------------------------------------------- pickle shape


def test_deep_nesting_is_refused_before_it_is_built(tmp_path: Path) -> None:
    n = 100_000
    lists = _write_zip(tmp_path / "lists.pt", _pickle(b"]" * n + b"a" * (n - 1)), {})
    _bounded("pickle of lists nested 100,000 deep", lists, "deeper than")
    # a tuple nested a million deep, used as a dict key: hashing it would recurse in C
    key = b"N" + b"\x85" * 1_000_000
    tuples = _write_zip(tmp_path / "tuples.pt", _pickle(b"}" + key + b"Ns"), {})
    _bounded("dict key of tuples nested 1,000,000 deep", tuples, "deeper than")
    marks = _write_zip(tmp_path / "marks.pt", _pickle(b"(" * n + b"N" + b"t" * n), {})
    _bounded("pickle of 100,000 nested MARKs", marks, "deeper than")


def test_nesting_deepened_through_the_memo_is_refused(tmp_path: Path) -> None:
    """200 lists, each appended to the previous one after both are built: the scan sees
    depth 2, the tree is 200 deep; the walk counts its own depth (no RecursionError)."""
    n = 200
    body = b"".join(b"]" + b"r" + struct.pack("<I", i) + b"0" for i in range(n))
    body += b"".join(
        b"j" + struct.pack("<I", i) + b"j" + struct.pack("<I", i + 1) + b"a0" for i in range(n - 1)
    )
    body += b"j" + struct.pack("<I", 0)
    path = _write_zip(tmp_path / "llm.pt", _pickle(body), {})
    _refused("pickle of lists chained 200 deep through the memo", path, "deeper than")


def test_million_containers_are_refused(tmp_path: Path) -> None:
    n = torch_pickle._MAX_CONTAINERS + 1
    path = _write_zip(tmp_path / "llm.pt", _pickle(b"](" + b"}" * n + b"e"), {})
    _bounded("pickle building 1,000,001 dicts", path, "containers")


def test_opcode_count_over_the_cap_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch_pickle, "_MAX_PICKLE_OPS", 1000)
    path = _write_zip(tmp_path / "llm.pt", _pickle(b"N0" * 600 + b"N"), {})
    _refused("pickle of more opcodes than allowed", path, "opcodes")


def test_too_many_tensors_are_refused(tmp_path: Path) -> None:
    """100,001 tensors of one storage, each 5 bytes of pickle (the call and its arguments
    taken from the memo)."""
    args = (
        b"("
        + _storage_pid("FloatStorage", "0", 1)
        + _value(0)
        + _value((1,))
        + _value((1,))
        + _value(False)
        + _call(_global("collections", "OrderedDict"))
        + b"t"
    )
    fn = _global("torch._utils", "_rebuild_tensor_v2")
    body = b"](" + fn + b"q\x00" + args + b"q\x01R"
    body += b"h\x00h\x01R" * torch_pickle._MAX_TENSORS + b"e"
    path = _write_zip(tmp_path / "llm.pt", _pickle(body), {"0": bytes(4)})
    _bounded("pickle of 100,001 tensors", path, "tensors")


def test_sparse_memo_index_is_refused(tmp_path: Path) -> None:
    """LONG_BINPUT 2**25: the unpickler would size its memo table to 2**26 entries (512 MB)."""
    path = _write_zip(tmp_path / "llm.pt", _pickle(b"Nr" + struct.pack("<I", 1 << 25)), {})
    _bounded("pickle memo index 2**25", path, "memo index")
    unset = _write_zip(tmp_path / "get.pt", _pickle(b"j" + struct.pack("<I", 7)), {})
    _refused("pickle reads memo index 7 before setting it", unset, "memo index")


# --------------------------------------------------------------------------- opcodes


_OPCODES = {
    "INST": b"(" + b"icollections\nOrderedDict\n",
    "OBJ": b"(" + _global("collections", "OrderedDict") + b"o",
    "NEWOBJ": _global("collections", "OrderedDict") + b")\x81",
    "NEWOBJ_EX": _global("collections", "OrderedDict") + b")}\x92",
    "EXT1": b"\x82\x01",
    "EXT2": b"\x83\x01\x00",
    "EXT4": b"\x84\x01\x00\x00\x00",
    "NEXT_BUFFER": b"\x97",
}


@pytest.mark.parametrize("name", list(_OPCODES))
def test_opcodes_torch_never_writes_are_refused(tmp_path: Path, name: str) -> None:
    path = _write_zip(tmp_path / "llm.pt", _pickle(_OPCODES[name]), {})
    _refused(f"pickle opcode {name}", path, f"opcode {name} ")


# --------------------------------------------------------------------------- BUILD


def _ordered_dict_with_state(*states: bytes) -> bytes:
    """An OrderedDict {"a": 1} given each state by BUILD."""
    body = _call(_global("collections", "OrderedDict")) + _value("a") + _value(1) + b"s"
    return _pickle(body + b"".join(state + b"b" for state in states))


def test_build_state_of_a_state_dict_is_dropped(tmp_path: Path) -> None:
    """torch.save writes a state dict's `_metadata` as the BUILD state of its OrderedDict."""
    meta = _value({"_metadata": {"": {"version": 1}}})
    path = _write_zip(tmp_path / "ok.pt", _ordered_dict_with_state(meta), {})
    out = load_torch_checkpoint(path)
    assert out == {"a": 1} and type(out) is dict


def test_build_cannot_plant_setstate_or_attributes(tmp_path: Path) -> None:
    encode = _global("_codecs", "encode")
    cases = {
        # plant `__setstate__` (an allowed callable), then have a second BUILD call it
        "OrderedDict given __setstate__ by BUILD": (
            _ordered_dict_with_state(b"}" + _value("__setstate__") + encode + b"s", _value("x")),
            "__setstate__",
        ),
        "OrderedDict given __class__ by BUILD": (
            _ordered_dict_with_state(b"}" + _value("__class__") + encode + b"s"),
            "__class__",
        ),
        "OrderedDict given slot attributes by BUILD": (
            _ordered_dict_with_state(_value((None, {"x": 1}))),
            "BUILD state of type tuple",
        ),
        "BUILD on a plain dict": (_pickle(_value({"a": 1}) + _value({"x": 1}) + b"b"), "dict"),
    }
    for i, (what, (pkl, match)) in enumerate(cases.items()):
        path = _write_zip(tmp_path / f"b{i}.pt", pkl, {})
        _refused(what, path, match)


# --------------------------------------------------------------------------- tensors


def test_stride_zero_view_of_a_terabyte_is_refused(tmp_path: Path) -> None:
    size = (1 << 20, 1 << 20)  # 4 TiB of float32 from one element
    pkl = _pickle(_dict({"w": _tensor("FloatStorage", "0", 1, 0, size, (0, 0))}))
    path = _write_zip(tmp_path / "llm.pt", pkl, {"0": bytes(4)})
    _bounded("tensor (2**20, 2**20) of stride 0 over one element", path, "broadcast")
    # (1024, 1024) of strides (1, 1) reads only elements 0..2046: inside its storage, but
    # 4 MiB of array from 8 KiB
    t = _tensor("FloatStorage", "0", 2048, 0, (1024, 1024), (1, 1))
    path = _write_zip(tmp_path / "overlap.pt", _pickle(_dict({"w": t})), {"0": bytes(8192)})
    _refused("tensor (1024, 1024) of strides (1, 1) over 2048 elements", path, "broadcast")


def test_small_broadcast_views_are_still_read(tmp_path: Path) -> None:
    """torch.save keeps `expand`ed tensors as stride-0 views; small ones stay readable."""
    pkl = _pickle(_dict({"w": _tensor("FloatStorage", "0", 3, 0, (3, 4), (1, 0))}))
    path = _write_zip(tmp_path / "llm.pt", pkl, {"0": np.arange(3, dtype="<f4").tobytes()})
    np.testing.assert_array_equal(
        load_torch_checkpoint(path)["w"], np.repeat([[0], [1], [2]], 4, 1)
    )


def test_tensors_in_dict_keys_and_sets_are_refused(tmp_path: Path) -> None:
    t = _tensor("FloatStorage", "0", 2, 0, (2,), (1,))
    data = {"0": bytes(8)}
    in_tuple = _pickle(b"}" + _value("a") + t + b"\x86" + _value(1) + b"s")  # {("a", t): 1}
    path = _write_zip(tmp_path / "k.pt", in_tuple, data)
    _refused("tensor inside a tuple dict key", path, "dict key")
    nested = _pickle(b"}" + t + b"\x85\x85" + _value(1) + b"s")  # {((t,),): 1}
    path = _write_zip(tmp_path / "kk.pt", nested, data)
    _refused("tensor inside a nested tuple dict key", path, "dict key")
    in_set = b"\x80\x04" + b"(" + t + b"\x85\x91" + b"."  # frozenset({(t,)})
    path = _write_zip(tmp_path / "s.pt", in_set, data)
    _refused("tensor inside a tuple in a frozenset", path, "set")


def test_error_messages_are_one_line_whatever_the_file(tmp_path: Path) -> None:
    """A global name with a newline (STACK_GLOBAL takes any string)."""
    body = b"\x80\x04" + _value("os\nsystem") + _value("x") + b"\x93" + b"."
    path = _write_zip(tmp_path / "llm.pt", body, {})
    _refused("pickle global whose name holds a newline", path, "refusing to load global")


def test_valid_files_still_read_after_the_limits(tmp_path: Path) -> None:
    """The limits leave ordinary files alone: a state dict, a legacy file, a list."""
    out = load_torch_checkpoint(_simple_zip(tmp_path / "w.pt"))
    assert out["w"].shape == (2, 3)
    pkl = _pickle(_dict({"w": _tensor("LongStorage", "0", 3, 0, (3,), (1,), legacy=True)}))
    legacy = _write_legacy(tmp_path / "l.pt", pkl, [("0", np.arange(3, dtype="<i8").tobytes(), 3)])
    np.testing.assert_array_equal(load_torch_checkpoint(legacy)["w"], [0, 1, 2])
