"""The first generation's text tokenizer (`MultilingualTokenizer`) against the official
`get_tokenizer(multilingual=True, num_languages=100, ...)` of the installed wheel (a
`tiktoken.Encoding` over the rank file the wheel ships), on the same rank file.

Token ids must be identical on every text of the corpora the CosyVoice2 tokenizer is tested
on (`tests/test_tokenizer.py`, `tests/test_frontend_text.py`), Asterisk transcripts, and texts
with the special tokens the frontend passes (`<|zh|>`, `<|HAPPY|>`, timestamps) and the first
generation's instruction marker `<endofprompt>` (ordinary text there).

Power: the split pattern without its contractions, and one language code missing from the
list (every special token after it one id off), each change many ids. Malformed rank
files are refused with the file and line named.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cosyvoice2.frontend import multilingual_tokenizer as mt
from cosyvoice2.frontend.multilingual_tokenizer import MultilingualTokenizer, TokenizerFileError
from tests.power import assert_power, patched
from tests.test_frontend_text import CORPUS as TEXT_CORPUS
from tests.test_tokenizer import CORPUS as TOKEN_CORPUS

EXTRA = [
    "Hello world, 你好。<|endoftext|> <endofprompt>",
    "A female speaker with normal pitch<endofprompt>Hello.",
    "<|zh|><|en|>mixed<|HAPPY|><|Laughter|>",
    "<|ja|>a<|yue|>b<|de|>c<|fr|>d<|ko|>e<|transcribe|>f<|notimestamps|>",
    "<|0.02|><|30.00|><|TTS/SP13|><|SPECIAL_TOKEN_30|>",
    "今日はいい天気ですね。佢哋喺度食緊飯。",
    "don't can't it's I'll we've THEY'RE",
    "  multiple   spaces\n\nand lines\t tabs ",
    "Émoji 😀 and ünïcödé, 12345 numbers 3.14",
]


@pytest.fixture(scope="module")
def ranks_path() -> Path:
    pytest.importorskip("tiktoken")
    pytest.importorskip("cosyvoice", reason="the official CosyVoice code is not installed")
    from cosyvoice2_testing.shims import install_shims

    install_shims()
    import cosyvoice.tokenizer.tokenizer as official

    return Path(os.path.dirname(official.__file__)) / "assets" / mt.RANKS_FILE


@pytest.fixture(scope="module")
def official(ranks_path):
    from cosyvoice.tokenizer.tokenizer import get_tokenizer

    return get_tokenizer(multilingual=True, num_languages=100, language="en", task="transcribe")


@pytest.fixture(scope="module")
def texts() -> list[str]:
    from eval.realspeech import english_transcripts

    try:
        asterisk = list(english_transcripts().values())[:200]
    except FileNotFoundError:
        asterisk = []  # the corpora below still hold English
    return [*TOKEN_CORPUS, *TEXT_CORPUS, *EXTRA, *asterisk]


def _mismatches(ours: MultilingualTokenizer, official, texts: list[str]) -> float:
    bad = 0
    for t in texts:
        a, b = ours.encode(t), official.encode(t, allowed_special="all")
        bad += sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))
    return float(bad)


def test_ids_equal_the_official_tokenizer(ranks_path: Path, official, texts) -> None:
    ours = MultilingualTokenizer(ranks_path, 100)
    assert ours.n_vocab == official.encoding.n_vocab
    assert len(texts) >= 100
    assert_power(
        "v1 text token ids vs official (all texts)",
        lambda: _mismatches(MultilingualTokenizer(ranks_path, 100), official, texts),
        0,
        patched(mt, "SPLIT_PATTERN", mt.SPLIT_PATTERN.replace("'s|'t|'re|'ve|'m|'ll|'d|", "")),
        "split pattern without the contractions",
    )
    assert_power(
        "v1 text token ids vs official (special tokens)",
        lambda: _mismatches(MultilingualTokenizer(ranks_path, 100), official, EXTRA),
        0,
        patched(mt, "LANGUAGE_CODES", mt.LANGUAGE_CODES[1:]),
        "one language code fewer",
    )
    ids = ours.encode("Hello world.")
    assert ours.decode(ids) == "Hello world."


@pytest.mark.parametrize(
    "content, words",
    [
        ("IQ== 0\nIg== 0\n", "new rank"),
        ("IQ== 0\nIg== 2\n", "ranks are not 0..1"),
        ("IQ== 0\n!!!! 1\n", "line 2"),
        ("IQ==\n", "line 1"),
        ("IQ== x\n", "line 1"),
    ],
)
def test_malformed_rank_files_are_refused(tmp_path: Path, content: str, words: str) -> None:
    path = tmp_path / mt.RANKS_FILE
    path.write_text(content)
    with pytest.raises(TokenizerFileError, match=words):
        MultilingualTokenizer(path)


def test_oversized_rank_file_is_refused_before_reading(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / mt.RANKS_FILE
    path.write_text("IQ== 0\n")
    monkeypatch.setattr(mt, "MAX_RANKS_BYTES", 3)
    with pytest.raises(TokenizerFileError, match="more than 3"):
        MultilingualTokenizer(path)
