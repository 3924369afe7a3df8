"""The saved-speaker store against tampered, corrupt and concurrent use (`cosyvoice2.speakers`).

File names come from the whole id (no collision), `index.json` is never followed to
a path, a corrupt index or speaker file ends in one clear error naming it (and a
corrupt speaker file affects only that speaker), declared sizes are checked before
anything is allocated, writers are serialised by a lock and write atomically, and
stores written by earlier versions (`spkNNNNN-<hex>` names) still load.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from cosyvoice2.errors import InputError
from cosyvoice2.speakers import Speaker, SpeakerStore
from tests.bad_inputs import ROOT, bounded, cli_refused, refused

AREA = "speakers"
P16 = "0123456789abcdef"  # 16 bytes: earlier versions named files after an id's first 16 bytes


def hashed(spk_id: str) -> str:
    return hashlib.sha256(spk_id.encode("utf-8")).hexdigest() + ".safetensors"


def make_speaker(spk_id: str, m: int = 4) -> Speaker:
    rng = np.random.default_rng(int(hashlib.sha256(spk_id.encode()).hexdigest()[:8], 16))
    return Speaker(
        spk_id,
        mx.array(rng.standard_normal((1, 192)).astype(np.float32)),
        mx.array(rng.integers(0, 1000, (1, 3)).astype(np.int32)),
        mx.array(rng.integers(0, 6561, (1, m)).astype(np.int32)),
        mx.array(rng.standard_normal((1, 2 * m, 80)).astype(np.float32)),
        f"transcript of {spk_id}",
    )


def assert_same(got: Speaker, want: Speaker) -> None:
    assert got.id == want.id and got.prompt_text_str == want.prompt_text_str
    for name, a in want.arrays().items():
        b = getattr(got, name)
        assert b.dtype == a.dtype, name
        np.testing.assert_array_equal(np.array(b), np.array(a), err_msg=name)


def legacy_save(root: Path, speaker: Speaker) -> str:
    """Save as earlier versions did: `spk{len(index):05d}-{hex[:32]}`, mx.save_safetensors."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "index.json"
    index = json.loads(path.read_text()) if path.is_file() else {}
    name = index.get(speaker.id) or (
        f"spk{len(index):05d}-{speaker.id.encode().hex()[:32]}.safetensors"
    )
    mx.save_safetensors(
        str(root / name),
        speaker.arrays(),
        metadata={"id": speaker.id, "prompt_text": speaker.prompt_text_str},
    )
    index[speaker.id] = name
    path.write_text(json.dumps(index))
    return name


def legacy_remove(root: Path, spk_id: str) -> None:
    path = root / "index.json"
    index = json.loads(path.read_text())
    (root / index.pop(spk_id)).unlink()
    path.write_text(json.dumps(index))


def raw_safetensors(header: dict, body: bytes = b"", declared: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return (len(raw) if declared is None else declared).to_bytes(8, "little") + raw + body


def set_index(root: Path, index: dict) -> None:
    (root / "index.json").write_text(json.dumps(index))


@pytest.fixture
def store(tmp_path: Path) -> SpeakerStore:
    """A store in `tmp_path/model/speakers` holding speakers 'a' and 'b'."""
    s = SpeakerStore(tmp_path / "model" / "speakers")
    s.save(make_speaker("a"))
    s.save(make_speaker("b"))
    return s


# ---------------------------------------------------------------------- names


def test_round_trip_file_named_by_the_whole_id_and_readable_by_mx_load(tmp_path: Path) -> None:
    s = SpeakerStore(tmp_path / "speakers")
    spk = make_speaker("alice/../../x")
    s.save(spk)
    assert_same(s.load(spk.id), spk)
    assert json.loads((tmp_path / "speakers" / "index.json").read_text()) == {
        spk.id: hashed(spk.id)
    }
    arrays, meta = mx.load(str(tmp_path / "speakers" / hashed(spk.id)), return_metadata=True)
    assert meta["id"] == spk.id  # older versions of the package read the new files
    np.testing.assert_array_equal(np.array(arrays["speech_feat"]), np.array(spk.speech_feat))
    sft = Speaker.from_official("sft", {"embedding": np.ones((1, 192), np.float32)})
    s.save(sft)
    assert s.load("sft").speech_token.shape == (1, 0)
    assert s.load("sft").speech_feat.shape == (1, 0, 80)
    assert sorted(p.name for p in (tmp_path / "speakers").iterdir()) == sorted(
        [".lock", "index.json", hashed(spk.id), hashed("sft")]
    )  # no temporary file left


def test_ids_sharing_their_first_16_bytes_never_share_a_file(tmp_path: Path) -> None:
    """Earlier names (`spk{len(index)}-{first 16 bytes}`) collided after a removal."""
    s = SpeakerStore(tmp_path / "speakers")
    first, b, c = make_speaker("first"), make_speaker(P16 + "-b"), make_speaker(P16 + "-c")
    s.save(first)
    s.save(b)
    s.remove("first")
    s.save(c)
    assert s.list() == sorted([b.id, c.id])
    assert_same(s.load(b.id), b)
    assert_same(s.load(c.id), c)


# ---------------------------------------------------------------------- tampered index


def victim_file(tmp_path: Path) -> Path:
    """A valid speaker file for id 'a' outside the store: only the path check may stop a read."""
    victim = tmp_path / "victim.safetensors"
    tmp = SpeakerStore(tmp_path / "elsewhere")
    tmp.save(make_speaker("a"))
    shutil.copy(tmp_path / "elsewhere" / hashed("a"), victim)
    shutil.rmtree(tmp_path / "elsewhere")
    return victim


@pytest.mark.parametrize(
    "what",
    [
        "relative ../../victim",
        "absolute path",
        "another speaker's file",
        "old-style name with a folder",
        "old-style name of another id",
    ],
)
def test_tampered_index_entry_is_refused_and_nothing_is_touched(
    store: SpeakerStore, tmp_path: Path, what: str
) -> None:
    victim = victim_file(tmp_path)
    bad = {
        "relative ../../victim": "../../victim.safetensors",
        "absolute path": str(victim),
        "another speaker's file": hashed("b"),
        "old-style name with a folder": f"../../spk00000-{b'a'.hex()}.safetensors",
        "old-style name of another id": f"spk00001-{b'b'.hex()}.safetensors",
    }[what]
    if what.startswith("old-style name with"):
        shutil.copy(victim, tmp_path / f"spk00000-{b'a'.hex()}.safetensors")
    index = json.loads((store.root / "index.json").read_text())
    set_index(store.root, {**index, "a": bad})
    if what == "old-style name of another id":
        shutil.copy(store.root / hashed("a"), store.root / bad)
    for op, fn in (("load", lambda: store.load("a")), ("remove", lambda: store.remove("a"))):
        refused(
            AREA,
            f"index.json entry names {what} ({op})",
            fn,
            watch=tmp_path,
            match="index.json",
        )
    assert victim.is_file()
    assert_same(store.load("b"), make_speaker("b"))  # the other speakers stay usable
    assert store.list() == ["a", "b"]


def test_cli_remove_on_a_tampered_store_deletes_nothing(mlx_tiny_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(mlx_tiny_dir, model)
    victim = victim_file(tmp_path)
    s = SpeakerStore(model / "speakers")
    s.save(make_speaker("a"))
    set_index(s.root, {"a": "../../victim.safetensors"})
    cli_refused(
        AREA,
        "speakers remove, index.json entry names ../../victim",
        ["speakers", "remove", "--model", str(model), "--id", "a"],
        watch=tmp_path,
        match="index.json",
    )
    assert victim.is_file()


# ---------------------------------------------------------------------- corrupt index


CORRUPT_INDEXES = {
    "index.json not JSON": b'{"a": "x',
    "index.json not UTF-8": b"\xff\xfe{}",
    "index.json a list": b'["a", "b"]',
    "index.json entry not a string": b'{"a": {"file": "x"}}',
    "index.json with an empty id": b'{"": "x.safetensors"}',
    "index.json a symbolic link": None,
}


@pytest.mark.parametrize("what", list(CORRUPT_INDEXES))
def test_corrupt_index_is_refused_naming_it_and_deleting_it_rebuilds(
    store: SpeakerStore, tmp_path: Path, what: str
) -> None:
    path = store.root / "index.json"
    if CORRUPT_INDEXES[what] is None:
        outside = tmp_path / "outside.json"
        outside.write_text(json.dumps({"a": hashed("a")}))
        path.unlink()
        path.symlink_to(outside)
    else:
        path.write_bytes(CORRUPT_INDEXES[what])
    for op, fn in (
        ("list", store.list),
        ("load", lambda: store.load("a")),
        ("save", lambda: store.save(make_speaker("c"))),
        ("remove", lambda: store.remove("a")),
    ):
        refused(AREA, f"{what} ({op})", fn, watch=tmp_path, match="index.json")
    path.unlink()  # the fix the message gives
    assert store.list() == ["a", "b"]
    assert_same(store.load("a"), make_speaker("a"))


def test_missing_index_is_rebuilt_from_the_speaker_files(tmp_path: Path) -> None:
    root = tmp_path / "speakers"
    legacy_save(root, make_speaker("old"))
    s = SpeakerStore(root)
    s.save(make_speaker("a"))
    s.save(make_speaker("b"))
    (root / "junk.safetensors").write_bytes(b"not a speaker")
    (root / ("0" * 64 + ".safetensors")).write_bytes(b"not a speaker either")
    shutil.copy(root / hashed("a"), root / hashed("not-a"))  # a file under another id's name
    (root / "index.json").unlink()
    assert s.list() == ["a", "b", "old"]
    assert_same(s.load("old"), make_speaker("old"))
    s.save(make_speaker("c"))
    assert sorted(json.loads((root / "index.json").read_text())) == ["a", "b", "c", "old"]


# ---------------------------------------------------------------------- corrupt speaker files


def _good_header(m: int = 2) -> tuple[dict, bytes]:
    shapes = {"embedding": [1, 192], "prompt_text": [1, 0], "speech_token": [1, m],
              "speech_feat": [1, 2 * m, 80]}  # fmt: skip
    header, off = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * 4
        dtype = "I32" if name in ("prompt_text", "speech_token") else "F32"
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + n]}
        off += n
    header["__metadata__"] = {"id": "a", "prompt_text": ""}
    return header, b"\0" * off


def _with(change) -> bytes:
    header, body = _good_header()
    change(header)
    return raw_safetensors(header, body)


CORRUPT_FILES = {
    "random bytes": lambda good: np.random.default_rng(0).bytes(len(good)),
    "empty file": lambda good: b"",
    "truncated to half": lambda good: good[: len(good) // 2],
    "header not JSON": lambda good: (9).to_bytes(8, "little") + b"{not json",
    "tensor of dtype F64": lambda good: _with(lambda h: h["embedding"].update(dtype="F64")),
    "an unknown extra tensor": lambda good: _with(
        lambda h: h.update(code={"dtype": "F32", "shape": [0], "data_offsets": [0, 0]})
    ),
    "a missing tensor": lambda good: _with(lambda h: h.pop("speech_token")),
    "mel with 3 bins": lambda good: _with(lambda h: h["speech_feat"].update(shape=[1, 4, 3])),
    "shape as a string": lambda good: _with(lambda h: h["embedding"].update(shape="1,192")),
    "negative offsets": lambda good: _with(lambda h: h["embedding"].update(data_offsets=[-768, 0])),
    "metadata holds another id": lambda good: _with(lambda h: h["__metadata__"].update(id="b")),
}


@pytest.mark.parametrize("what", list(CORRUPT_FILES))
def test_corrupt_speaker_file_affects_only_that_speaker(
    store: SpeakerStore, tmp_path: Path, what: str
) -> None:
    path = store.root / hashed("a")
    path.write_bytes(CORRUPT_FILES[what](path.read_bytes()))
    refused(AREA, f"speaker file: {what}", lambda: store.load("a"), watch=tmp_path, match=path.name)
    assert store.list() == ["a", "b"]
    assert_same(store.load("b"), make_speaker("b"))
    store.remove("a")  # the fix the message gives
    assert not path.exists() and store.list() == ["b"]
    store.save(make_speaker("a"))
    assert_same(store.load("a"), make_speaker("a"))


def test_speaker_file_that_is_a_link_outside_the_store_is_refused(
    store: SpeakerStore, tmp_path: Path
) -> None:
    victim = victim_file(tmp_path)
    path = store.root / hashed("a")
    path.unlink()
    path.symlink_to(victim)
    refused(AREA, "speaker file: a link to a file outside", lambda: store.load("a"),
            watch=tmp_path, match=path.name)  # fmt: skip
    store.remove("a")
    assert victim.is_file() and not path.is_symlink()


def test_missing_speaker_file_is_named(store: SpeakerStore, tmp_path: Path) -> None:
    (store.root / hashed("a")).unlink()
    refused(AREA, "speaker file missing", lambda: store.load("a"), watch=tmp_path,
            match=hashed("a"))  # fmt: skip


def _child_load(root: Path, spk_id: str = "a", op: str = "load") -> str:
    call = f"load({spk_id!r})" if op == "load" else "list()"
    return f"from cosyvoice2.speakers import SpeakerStore\nSpeakerStore({str(root)!r}).{call}\n"


IMPORT_MB = 150  # a child importing mlx and numpy peaks near 40 MB; the files below are larger


def test_speaker_file_bombs_are_refused_before_allocating(tmp_path: Path) -> None:
    s = SpeakerStore(tmp_path / "speakers")
    s.save(make_speaker("a"))
    path = s.root / hashed("a")
    good = path.read_bytes()
    header, body = _good_header()
    bombs = {
        "speaker file declares a 2^62-byte header": raw_safetensors(header, body, 1 << 62),
        "speaker file declares a (1, 2^40, 80) mel": _with(
            lambda h: h["speech_feat"].update(
                shape=[1, 1 << 40, 80], data_offsets=[0, 320 << 40]
            )  # fmt: skip
        ),
        "speaker file header nested 500k deep": (500_000 * 2).to_bytes(8, "little")
        + b"[" * 500_000
        + b"]" * 500_000,
    }
    for what, data in bombs.items():
        path.write_bytes(data)
        bounded(AREA, what, _child_load(s.root), IMPORT_MB, watch=tmp_path, match=path.name)
    with open(path, "wb") as f:  # a valid speaker, then sparse zeros up to 256 MiB: over the cap
        f.write(good)
        f.truncate(256 << 20)
    bounded(AREA, "speaker file of 256 MiB", _child_load(s.root), IMPORT_MB, watch=tmp_path,
            match=path.name)  # fmt: skip
    path.unlink()
    os.mkfifo(path)
    # an open that waits for a writer is killed by the alarm (a failure, not a hang)
    code = "import signal\nsignal.alarm(30)\n" + _child_load(s.root)
    bounded(AREA, "speaker file is a FIFO", code, IMPORT_MB, watch=tmp_path, match=path.name)


def test_index_bombs_are_refused_before_allocating(tmp_path: Path) -> None:
    s = SpeakerStore(tmp_path / "speakers")
    s.save(make_speaker("a"))
    path = s.root / "index.json"
    path.write_bytes(b"[" * 1_000_000 + b"]" * 1_000_000)
    bounded(AREA, "index.json nested 1M deep", _child_load(s.root, op="list"), IMPORT_MB,
            watch=tmp_path, match="index.json")  # fmt: skip
    with open(path, "wb") as f:
        f.truncate(256 << 20)  # sparse, over the 4 MiB cap
    bounded(AREA, "index.json of 256 MiB", _child_load(s.root, op="list"), IMPORT_MB,
            watch=tmp_path, match="index.json")  # fmt: skip


# ---------------------------------------------------------------------- bad speakers, failed writes


@pytest.mark.parametrize(
    "what",
    [
        "empty id",
        "id not valid Unicode",
        "mel with 3 bins",
        "embedding of rank 1",
        "empty embedding",
    ],
)
def test_bad_speaker_is_refused_and_nothing_is_written(
    store: SpeakerStore, tmp_path: Path, what: str
) -> None:
    spk = make_speaker("c")
    if what == "empty id":
        spk.id = "  "
    elif what == "id not valid Unicode":
        spk.id = "c\ud800"
    elif what == "mel with 3 bins":
        spk.speech_feat = mx.zeros((1, 8, 3))
    elif what == "embedding of rank 1":
        spk.embedding = mx.zeros((192,))
    else:
        spk.embedding = mx.zeros((1, 0))
    refused(AREA, f"save: {what}", lambda: store.save(spk), watch=tmp_path)


def test_failed_write_leaves_the_store_as_it_was(
    store: SpeakerStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    for what, target in (("disk full at rename", "os.replace"), ("disk full at fsync", "os.fsync")):
        with monkeypatch.context() as m:
            m.setattr(target, full)
            refused(AREA, f"save, {what}", lambda: store.save(make_speaker("a", m=6)),
                    watch=tmp_path, match="No space left")  # fmt: skip
    assert_same(store.load("a"), make_speaker("a"))


def test_store_that_is_a_link_outside_the_model_dir_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    SpeakerStore(outside).save(make_speaker("a"))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "speakers").symlink_to(outside)
    s = SpeakerStore(tmp_path / "model" / "speakers")
    for op, fn in (("load", lambda: s.load("a")), ("save", lambda: s.save(make_speaker("c")))):
        refused(AREA, f"speakers/ a link to a folder outside ({op})", fn, watch=tmp_path,
                match="symbolic link")  # fmt: skip


def test_unknown_speaker_is_an_input_error(store: SpeakerStore, tmp_path: Path) -> None:
    for op, fn in (("load", lambda: store.load("zz")), ("remove", lambda: store.remove("zz"))):
        rec = refused(AREA, f"unknown speaker id ({op})", fn, watch=tmp_path, match="unknown")
        assert "'a', 'b'" in rec.error
    with pytest.raises(InputError):
        SpeakerStore(tmp_path / "none").remove("a")
    assert not (tmp_path / "none").exists()


# ---------------------------------------------------------------------- concurrent writers

CHILD = """
import sys, time
from pathlib import Path
import mlx.core as mx
from cosyvoice2.speakers import Speaker, SpeakerStore
root, tag, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
store = SpeakerStore(root / "speakers")
(root / f"ready-{tag}").touch()
while not (root / "go").exists():
    time.sleep(0.001)
for i in range(n):
    store.save(Speaker(f"{tag}-{i}", mx.full((1, 192), float(i)), mx.zeros((1, 0), mx.int32),
                       mx.zeros((1, 0), mx.int32), mx.zeros((1, 0, 80))))
"""


def test_two_processes_adding_speakers_at_once_both_end_up_in_the_index(tmp_path: Path) -> None:
    n = 60
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tmp_path), tag, str(n)], env=env, cwd=ROOT
        )
        for tag in ("x", "y")
    ]
    deadline = time.time() + 300
    while not all((tmp_path / f"ready-{t}").exists() for t in "xy"):
        assert time.time() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.01)
    (tmp_path / "go").touch()
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    s = SpeakerStore(tmp_path / "speakers")
    want = sorted(f"{t}-{i}" for t in "xy" for i in range(n))
    assert s.list() == want
    assert float(np.array(s.load("y-7").embedding)[0, 0]) == 7.0
    files = sorted(p.name for p in s.root.iterdir())
    assert files == sorted([".lock", "index.json", *(hashed(i) for i in want)])


# ---------------------------------------------------------------------- stores of earlier versions


def test_store_written_by_an_earlier_version_still_loads_and_migrates(tmp_path: Path) -> None:
    root = tmp_path / "speakers"
    names = {i: legacy_save(root, make_speaker(i)) for i in ("a", "b", "alice/../x")}
    s = SpeakerStore(root)
    assert s.list() == sorted(names)
    for i in names:
        assert_same(s.load(i), make_speaker(i))
    s.save(make_speaker("c"))
    assert_same(s.load("b"), make_speaker("b"))
    s.save(make_speaker("a", m=7))  # saved again: the new name, the old file gone
    assert_same(s.load("a"), make_speaker("a", m=7))
    assert not (root / names["a"]).exists()
    s.remove("b")
    assert not (root / names["b"]).exists()
    assert json.loads((root / "index.json").read_text()) == {
        "a": hashed("a"),
        "alice/../x": names["alice/../x"],
        "c": hashed("c"),
    }


def test_collided_speaker_of_an_earlier_version_is_refused_not_swapped(tmp_path: Path) -> None:
    """An earlier version's collision: the second id's file overwrote the first's."""
    root = tmp_path / "speakers"
    legacy_save(root, make_speaker("first"))
    legacy_save(root, make_speaker(P16 + "-b"))
    legacy_remove(root, "first")
    legacy_save(root, make_speaker(P16 + "-c"))  # same file name as -b
    s = SpeakerStore(root)
    refused(AREA, "old store: file overwritten by a colliding id", lambda: s.load(P16 + "-b"),
            watch=tmp_path, match="holds speaker")  # fmt: skip
    assert_same(s.load(P16 + "-c"), make_speaker(P16 + "-c"))
    s.remove(P16 + "-b")  # the shared file stays: the other id still names it
    assert_same(s.load(P16 + "-c"), make_speaker(P16 + "-c"))
