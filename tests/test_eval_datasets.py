"""Test-set readers: meta.lst, CSV, folder; clear errors for malformed input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from eval.datasets import (
    TestSetError,
    detect_lang,
    load_test_set,
    read_csv,
    read_folder,
    read_meta_lst,
    subset,
)


def _wav(path: Path, seconds: float = 0.2, sr: int = 16000) -> Path:
    sf = pytest.importorskip("soundfile")
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    sf.write(str(path), (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), sr)
    return path


@pytest.fixture
def seed_set(tmp_path: Path) -> Path:
    """A Seed-TTS-eval style folder: <set>/meta.lst with prompt-wavs/ beside it."""
    root = tmp_path / "en"
    _wav(root / "prompt-wavs" / "p1.wav")
    _wav(root / "prompt-wavs" / "p2.wav")
    _wav(root / "wavs" / "u2.wav")
    (root / "meta.lst").write_text(
        "u1|Hello there.|prompt-wavs/p1.wav|Good morning, everyone.\n"
        "\n"
        "u2|你好。|prompt-wavs/p2.wav|今天天气很好。|wavs/u2.wav\n",
        encoding="utf-8",
    )
    return root


def test_meta_lst(seed_set: Path) -> None:
    ts = read_meta_lst(seed_set / "meta.lst")
    assert ts.name == "en" and ts.format == "meta.lst" and len(ts) == 2
    u1, u2 = ts.utterances
    assert (u1.id, u1.prompt_text, u1.target_text, u1.lang) == (
        "u1",
        "Hello there.",
        "Good morning, everyone.",
        "en",
    )
    assert u1.prompt_wav == (seed_set / "prompt-wavs" / "p1.wav").resolve()
    assert u1.reference_wav is None
    assert u2.lang == "zh" and u2.reference_wav == (seed_set / "wavs" / "u2.wav").resolve()
    assert ts.describe()["languages"] == ["en", "zh"]
    # a folder holding meta.lst is read the same way; the language can be forced
    forced = load_test_set(seed_set, lang="en")
    assert [u.lang for u in forced] == ["en", "en"]


def test_meta_lst_malformed_line(seed_set: Path) -> None:
    (seed_set / "meta.lst").write_text(
        "u1|Hello.|prompt-wavs/p1.wav|Good morning.\nu2|only three|fields\n", encoding="utf-8"
    )
    with pytest.raises(TestSetError, match=r"meta\.lst:2: expected 4 or 5"):
        read_meta_lst(seed_set / "meta.lst")


def test_meta_lst_missing_wav(seed_set: Path) -> None:
    (seed_set / "meta.lst").write_text(
        "u1|Hello.|prompt-wavs/p1.wav|Good morning.\nu9|Hi.|prompt-wavs/nope.wav|Bye.\n",
        encoding="utf-8",
    )
    with pytest.raises(TestSetError, match=r"1 prompt wav\(s\) not found:\n  u9: .*nope\.wav"):
        read_meta_lst(seed_set / "meta.lst")
    # without the file check the set reads (for inspecting a set without its audio)
    assert len(read_meta_lst(seed_set / "meta.lst", check_files=False)) == 2


def test_meta_lst_duplicate_and_empty(seed_set: Path) -> None:
    meta = seed_set / "meta.lst"
    meta.write_text("u1|a|prompt-wavs/p1.wav|x\nu1|b|prompt-wavs/p2.wav|y\n", encoding="utf-8")
    with pytest.raises(TestSetError, match="duplicate id 'u1'"):
        read_meta_lst(meta)
    meta.write_text("u1|a|prompt-wavs/p1.wav|   \n", encoding="utf-8")
    with pytest.raises(TestSetError, match=r"meta\.lst:1: empty id, prompt_wav or target_text"):
        read_meta_lst(meta)
    meta.write_text("\n\n", encoding="utf-8")
    with pytest.raises(TestSetError, match="no utterances"):
        read_meta_lst(meta)


def test_csv(tmp_path: Path) -> None:
    _wav(tmp_path / "a.wav")
    _wav(tmp_path / "b.wav")
    path = tmp_path / "mine.csv"
    path.write_text(
        "id,prompt_text,prompt_wav,target_text,lang\n"
        'a,"Hi, there.",a.wav,"One, two.",\n'
        "b,prompt,b.wav,你好,zh\n",
        encoding="utf-8",
    )
    ts = load_test_set(path)
    assert ts.format == "csv" and ts.name == "mine"
    assert [(u.id, u.prompt_text, u.target_text, u.lang) for u in ts] == [
        ("a", "Hi, there.", "One, two.", "en"),
        ("b", "prompt", "你好", "zh"),
    ]


def test_csv_errors(tmp_path: Path) -> None:
    _wav(tmp_path / "a.wav")
    path = tmp_path / "bad.csv"
    path.write_text("id,prompt_wav,target_text\na,a.wav,x\n", encoding="utf-8")
    with pytest.raises(
        TestSetError, match=r"bad\.csv:1: header lacks column\(s\) \['prompt_text'\]"
    ):
        read_csv(path)
    path.write_text("id,prompt_text,prompt_wav,target_text\na,p,a.wav\n", encoding="utf-8")
    with pytest.raises(TestSetError, match=r"bad\.csv:2: wrong number of fields"):
        read_csv(path)
    path.write_text(
        "id,prompt_text,prompt_wav,target_text,lang\na,p,a.wav,x,fr\n", encoding="utf-8"
    )
    with pytest.raises(TestSetError, match="language 'fr' is not en or zh"):
        read_csv(path)


def test_folder(tmp_path: Path) -> None:
    for uid, prompt, target in (("s1", "Hello.", "Bye now."), ("s2", "Hi.", "See you.")):
        _wav(tmp_path / f"{uid}.wav")
        (tmp_path / f"{uid}.prompt.txt").write_text(prompt + "\n", encoding="utf-8")
        (tmp_path / f"{uid}.target.txt").write_text(target + "\n", encoding="utf-8")
    ts = load_test_set(tmp_path)
    assert ts.format == "folder"
    assert [(u.id, u.prompt_text, u.target_text) for u in ts] == [
        ("s1", "Hello.", "Bye now."),
        ("s2", "Hi.", "See you."),
    ]
    assert [u.id for u in subset(ts, ids=["s2"])] == ["s2"]
    assert len(subset(ts, limit=1)) == 1
    with pytest.raises(TestSetError, match="unknown id"):
        subset(ts, ids=["zz"])
    (tmp_path / "s2.prompt.txt").unlink()
    with pytest.raises(TestSetError, match=r"s2\.wav has no s2\.prompt\.txt"):
        read_folder(tmp_path)


def test_detect_lang() -> None:
    assert detect_lang("Hello, world") == "en"
    assert detect_lang("Hello 世界") == "zh"
    assert detect_lang("〇") == "zh"


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(TestSetError, match="no such file"):
        load_test_set(tmp_path / "absent.lst")
