"""The Qwen2 + CosyVoice2 tokenizer: ids identical to the official `get_qwen_tokenizer`."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from cosyvoice2.frontend.tokenizer import (
    QWEN2_SPECIAL_TOKENS,
    SPECIAL_TOKENS,
    QwenTokenizer,
    get_qwen_tokenizer,
    read_merges,
)

# English, Chinese, Japanese, Korean, digits, special tokens, emoji, whitespace runs, newlines,
# combining characters (NFC), contractions, full-width forms, look-alikes of special tokens.
CORPUS = [
    "Hello, world! This is CosyVoice2 speaking.",
    "I'LL say it: don't, won't, they're, we've, I'm, she'd, it's.",
    "收到好友从远方寄来的生日礼物，那份意外的惊喜与深深的祝福让我心中充满了甜蜜的快乐。",
    "今日はいい天気ですね。カタカナとひらがな、漢字。",
    "안녕하세요, 만나서 반갑습니다. 한국어 텍스트입니다.",
    "Digits 0123456789, 3.14159, 1,000,000 and 2024-11-25 at 10:30.",
    "１２３ＡＢＣ（全角）【括号】——破折号",
    "<|endofprompt|>You are a helpful assistant.<|endofprompt|>",
    "Speak softly[breath] and then <strong>loudly</strong>[laughter] haha [cough][noise]",
    "[clucking][accent][quick_breath]<laughter>lol</laughter>[hissing][sigh][vocalized-noise][lipsmack][mn]",
    "<|endoftext|><|im_start|>user<|im_end|>",
    "Look-alikes: <|endofprompt [Breath] <STRONG> < strong> [mn ] <|im_start",
    "Emoji 👍🏽 👨‍👩‍👧 🇨🇳 🎉🎉🎉 ❤️ and symbols ©®™ ∑∫√ €£¥",
    "   leading and trailing spaces   ",
    "tabs\tand\t\tmultiple     spaces    inside",
    "line one\nline two\n\n\nline five\r\nwindows\r\n",
    "\n\n\n",
    "e\u0301 cafe\u0301 vs é café (NFD vs NFC), Å A\u030a, 한 \u1112\u1161\u11ab",
    "Mixed 中文 and English 混合 text，with 标点！？and numbers 42个。",
    "Ελληνικά, русский текст, العربية, עברית, हिन्दी, ไทย",
    "x" * 300,
    "",
]


def _check_same_ids(ours: QwenTokenizer, official, texts: list[str]) -> None:
    for text in texts:
        want = official.encode(text)
        got = ours.encode(text)
        assert got == want, f"ids differ for {text!r}:\nours     {got}\nofficial {want}"


@pytest.fixture(scope="module")
def token_dir(tiny_pt_dir: Path) -> Path:
    return tiny_pt_dir / "CosyVoice-BlankEN"


@pytest.fixture(scope="module")
def official_tokenizer(token_dir: Path):
    import tests.official  # noqa: F401  (import shims)

    pytest.importorskip("whisper", reason="the official tokenizer module imports openai-whisper")
    from cosyvoice.tokenizer.tokenizer import get_qwen_tokenizer as official_get

    return official_get(token_path=str(token_dir), skip_special_tokens=True)


@pytest.mark.parity
def test_pipeline_equals_official(token_dir: Path, official_tokenizer) -> None:
    """The whole `tokenizers` pipeline (model, normaliser, pre-tokeniser, added tokens) is the official one."""
    ours = json.loads(QwenTokenizer.from_dir(token_dir).tokenizer.to_str())
    official = json.loads(official_tokenizer.tokenizer.backend_tokenizer.to_str())
    for key in sorted(set(ours) | set(official)):
        assert ours.get(key) == official.get(key), f"tokenizer.json section {key!r} differs"


@pytest.mark.parity
def test_ids_equal_official_on_corpus(token_dir: Path, official_tokenizer) -> None:
    ours = QwenTokenizer.from_dir(token_dir)
    _check_same_ids(ours, official_tokenizer, CORPUS)
    # All special tokens, each alone and glued to text on both sides.
    for t in (*QWEN2_SPECIAL_TOKENS, *SPECIAL_TOKENS):
        _check_same_ids(ours, official_tokenizer, [t, f"a{t}b", f"中{t}文", f" {t} "])
        assert ours.encode(t) == [official_tokenizer.tokenizer.convert_tokens_to_ids(t)]


@pytest.mark.parity
def test_ids_equal_official_on_random_strings(token_dir: Path, official_tokenizer) -> None:
    """Seeded random strings over a mixed alphabet (scripts, digits, punctuation, whitespace, specials)."""
    rng = random.Random(1234)
    pieces = list(
        "abcXYZ019 .,;:!?'\"-\n\t\r　。，、！？「」你好世界日本語한국어😀👍🏽\u0301\u200d"
    ) + [
        "'s",
        "'ll",
        "  ",
        "\n\n",
        "<|endofprompt|>",
        "[breath]",
        "<strong>",
        "</strong>",
        "[laughter]",
    ]
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 60))) for _ in range(300)]
    _check_same_ids(QwenTokenizer.from_dir(token_dir), official_tokenizer, texts)


@pytest.mark.parity
def test_decode_equals_official(token_dir: Path, official_tokenizer) -> None:
    ours = QwenTokenizer.from_dir(token_dir, skip_special_tokens=True)
    hf = official_tokenizer.tokenizer
    for text in CORPUS:
        ids = official_tokenizer.encode(text)
        assert ours.decode(ids) == official_tokenizer.decode(ids), f"skip=True decode of {text!r}"
        keep = hf.batch_decode([ids], skip_special_tokens=False)[0]
        assert ours.decode(ids, skip_special_tokens=False) == keep, f"skip=False decode of {text!r}"
    # An id sequence that splits a multi-byte character decodes with replacement, as official.
    ids = official_tokenizer.encode("😀你")
    for cut in range(1, len(ids)):
        assert ours.decode(ids[:cut]) == official_tokenizer.decode(ids[:cut])


# ---- without the official code: a small byte-level vocab written here ----------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the byte-level alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1))
    keep += list(range(0xAE, 0xFF + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _write_small_dir(path: Path, with_config: bool = True, bad_id: bool = False) -> Path:
    alphabet = list(_bytes_to_unicode().values())
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("Ġ", "w"), ("Ġw", "o")]
    vocab = {s: i for i, s in enumerate(alphabet)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    path.mkdir(parents=True)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges] + ["h e", ""]
    (path / "merges.txt").write_text("\n".join(lines), encoding="utf-8")
    if with_config:
        first = len(vocab) + (1 if bad_id else 0)
        added = {
            str(first + i): {"content": t, "special": True, "normalized": False}
            for i, t in enumerate(QWEN2_SPECIAL_TOKENS)
        }
        cfg = {"added_tokens_decoder": added, "tokenizer_class": "Qwen2Tokenizer"}
        (path / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return path


def test_special_tokens_in_official_order(tmp_path: Path) -> None:
    d = _write_small_dir(tmp_path / "tok")
    tok = QwenTokenizer.from_dir(d)
    n_vocab = len(json.loads((d / "vocab.json").read_text(encoding="utf-8")))
    ordered = (*QWEN2_SPECIAL_TOKENS, *SPECIAL_TOKENS)
    assert tok.special_tokens == {t: n_vocab + i for i, t in enumerate(ordered)}
    assert len(tok) == n_vocab + len(ordered)
    # The official order puts <|endofprompt|> right after <|im_end|>, then [breath].
    assert tok.token_to_id("<|endofprompt|>") == tok.token_to_id("<|im_end|>") + 1
    assert tok.token_to_id("[breath]") == tok.token_to_id("<|endofprompt|>") + 1


def test_encode_decode_small_vocab(tmp_path: Path) -> None:
    tok = QwenTokenizer.from_dir(_write_small_dir(tmp_path / "tok"))
    ids = tok.encode("hello world[breath]")
    assert ids[:2] == [tok.token_to_id("hello"), tok.token_to_id("Ġwo")]
    assert ids[-1] == tok.token_to_id("[breath]")
    assert tok.decode(ids) == "hello world"
    assert tok.decode(ids, skip_special_tokens=False) == "hello world[breath]"
    # NFC: a decomposed accent encodes as the composed character.
    assert tok.encode("cafe\u0301") == tok.encode("café")
    assert tok.decode(tok.encode("日本 😀\n\n x")) == "日本 😀\n\n x"


def test_merges_reader_skips_header_blank_and_duplicates(tmp_path: Path) -> None:
    d = _write_small_dir(tmp_path / "tok")
    merges = read_merges(d / "merges.txt")
    assert merges[0] == ("h", "e") and merges.count(("h", "e")) == 1 and len(merges) == 6
    (d / "merges.txt").write_text("#version: 0.2\na b c\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not a merge of two symbols"):
        read_merges(d / "merges.txt")


def test_save_and_reload_tokenizer_json(tmp_path: Path) -> None:
    tok = QwenTokenizer.from_dir(_write_small_dir(tmp_path / "tok"))
    path = tok.save(tmp_path / "out")
    again = QwenTokenizer.from_dir(path.parent)
    for text in ["hello world", "<|endofprompt|>he[mn]ll", "你好\n"]:
        assert again.encode(text) == tok.encode(text)
    assert again.special_tokens == tok.special_tokens
    assert len(again) == len(tok)


def test_model_dir_with_subdir_is_accepted(tmp_path: Path) -> None:
    _write_small_dir(tmp_path / "model" / "CosyVoice-BlankEN")
    tok = get_qwen_tokenizer(str(tmp_path / "model"))
    assert tok.decode(tok.encode("hello")) == "hello"


def test_bad_tokenizer_dirs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="should have id"):
        QwenTokenizer.from_dir(_write_small_dir(tmp_path / "bad", bad_id=True))
    d = _write_small_dir(tmp_path / "nomerges")
    (d / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        QwenTokenizer.from_dir(d)
