"""Text frontend: the official `text_normalize` behaviour, bad input, incremental normalisation.

The reference is the official code itself: the helpers of the wheel's
`cosyvoice/utils/frontend_utils.py` (identical to the latest upstream) and the body of the
wheel's `CosyVoiceFrontEnd.text_normalize`, taken from `cosyvoice/cli/frontend.py` by its
syntax tree and run against a stand-in `self` (so the module's torch/onnx/whisper imports are
not needed). The wheel's method differs from the latest upstream in two places, which the
reference wrapper applies as upstream does: text with `<|` and `|>` is not normalised, and with
no FST backend the normaliser step is skipped (here: an identity normaliser).
"""

from __future__ import annotations

import ast
import json
import logging
import random
import re
from collections.abc import Generator
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest

from cosyvoice2.errors import InputError
from cosyvoice2.frontend import text as ft
from cosyvoice2.frontend.text import (
    IncrementalNormalizer,
    TextFrontend,
    TextFrontendConfig,
    TextNormalizationWarning,
    normalize_stream,
)
from cosyvoice2.frontend.tokenizer import QwenTokenizer

EN_LONG = (
    "The quick brown fox jumps over the lazy dog. It was 7 o'clock on a cold morning; the "
    "streets were empty! Did anyone notice? Nobody did: the city slept. Then, at 8:15, 23 "
    "buses rolled out of the depot, each carrying 40 passengers. By noon the square was full "
    "of people, music and noise. Vendors sold coffee for $3 and bread for $2. Children ran "
    "between the stalls, laughing. An old man fed the pigeons, as he had done for 35 years. "
    "Finally the sun set, and the square emptied again. Tomorrow it would all start over."
)
ZH_LONG = (
    "收到好友从远方寄来的生日礼物，那份意外的惊喜与深深的祝福让我心中充满了甜蜜的快乐，笑容如花儿般绽放。"
    "今天是2024年11月25日，气温只有-3.5°C，我们一共走了12.5公里！你相信吗？"
    "他说：“这是我见过最美的风景。”然后我们在山顶待了3个小时；直到太阳落山。"
    "这家店的面积是120m²，体积约为30m³，价格是¥1999，折扣率达到25%。"
    "（注：以上数据仅供参考）【重要】请注意——这不是演习。A - B 两队比分为3:2，"
)
CORPUS = [
    "Hello, world! This is CosyVoice2 speaking.",
    "I have 3 apples and 12 oranges, 1999 was a good year.",
    "It costs $3.50 on Jan 5, 2024 at 10:30am. Dr. Smith has 1,234 cats.",
    "The room is 20m² and the box 2m³; e.g. 3.5kg, 10km/h, 1st and 2nd place.",
    "2024",
    "42",
    "收到好友从远方寄来的生日礼物，那份意外的惊喜与深深的祝福让我心中充满了甜蜜的快乐。",
    "我有3个苹果和25%的把握，电话是13800138000。",
    "你好 世界 hello world 你好 ABC 测试.",
    "这是第一句.这是第二句 - 第三句，",
    "今天天气很好，\n我们去公园吧。\n\n好的！",
    "面积120m²，体积30m³。",
    "（括号）【方括号】`反引号`——破折号。",
    "他说：“你好。”她回答：“再见！”",
    "今日はいい天気ですね。カタカナとひらがな、漢字3つ。",
    "안녕하세요, 만나서 반갑습니다. 123 한국어 텍스트입니다.",
    "日本語と中文の混合テキスト、100円です。",
    "Emoji 👍🏽 and 🎉🎉 in a sentence, 5 of them!",
    "今天很开心😀，明天也会开心🎉。",
    "Speak softly[breath] and then <strong>loudly</strong>[laughter] haha.",
    "你好[breath]，我是<strong>小明</strong>[laughter]。",
    "You are a helpful assistant.<|endofprompt|>Say it 3 times.",
    "用四川话说这句话<|endofprompt|>今天是3号。",
    "Compare a <| b with 3 apples.",
    "Then 3 |> 4 holds.",
    "Hello world.  How are you?   Fine, thanks.",
    "   padded text with spaces   ",
    "Line one.\nLine two.\n",
    'What?! Really... yes. "Quoted." Done',
    "...",
    "Hi.",
    "A",
    EN_LONG,
    EN_LONG + " " + EN_LONG,
    ZH_LONG,
    ZH_LONG + ZH_LONG,
]


# ---- the official reference -------------------------------------------------------------


def _official_text_normalize_fn():
    """The wheel's `CosyVoiceFrontEnd.text_normalize`, compiled from its source on its own."""
    fu = pytest.importorskip("cosyvoice.utils.frontend_utils")
    path = Path(fu.__file__).parent.parent / "cli" / "frontend.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    cls = next(
        n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CosyVoiceFrontEnd"
    )
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "text_normalize")
    namespace = {
        "json": json,
        "re": re,
        "partial": partial,
        "Generator": Generator,
        "logging": logging,
        **{name: getattr(fu, name) for name in dir(fu) if not name.startswith("_")},
    }
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["text_normalize"], fu


class _Identity:
    def normalize(self, text: str) -> str:
        return text


def _official_normalizer(official_tokenizer, backend: str):
    """`text_normalize(text, split, text_frontend)` as the latest upstream composes it."""
    import inflect

    fn, _ = _official_text_normalize_fn()
    if backend == "wetext":
        wetext = pytest.importorskip("wetext")
        zh, en = wetext.Normalizer(remove_erhua=False), wetext.Normalizer()
    else:
        zh, en = _Identity(), _Identity()
    self = SimpleNamespace(
        use_ttsfrd=False,
        zh_tn_model=zh,
        en_tn_model=en,
        inflect_parser=inflect.engine(),
        tokenizer=official_tokenizer,
        allowed_special="all",
    )

    def text_normalize(text, split=True, text_frontend=True):
        if isinstance(text, str) and "<|" in text and "|>" in text:  # upstream, not in the wheel
            text_frontend = False
        return fn(self, text, split=split, text_frontend=text_frontend)

    return text_normalize


@pytest.fixture(scope="module")
def token_dir(tiny_pt_dir: Path) -> Path:
    return tiny_pt_dir / "CosyVoice-BlankEN"


@pytest.fixture(scope="module")
def official_tokenizer(token_dir: Path):
    from tests.official import install_shims

    install_shims()
    pytest.importorskip("whisper", reason="the official tokenizer module imports openai-whisper")
    from cosyvoice.tokenizer.tokenizer import get_qwen_tokenizer

    return get_qwen_tokenizer(token_path=str(token_dir), skip_special_tokens=True)


@pytest.fixture(scope="module")
def tokenizer(token_dir: Path) -> QwenTokenizer:
    return QwenTokenizer.from_dir(token_dir)


@pytest.fixture(scope="module")
def frontend(tokenizer: QwenTokenizer) -> TextFrontend:
    pytest.importorskip("wetext")
    return TextFrontend(tokenizer, backend="wetext")


# ---- parity with the official code ------------------------------------------------------


def test_helpers_equal_official() -> None:
    """Each helper against the official one on the corpus and on seeded random strings."""
    import inflect

    _, fu = _official_text_normalize_fn()
    engine = inflect.engine()
    rng = random.Random(7)
    alphabet = list('ab Z09 ,.?!;:、。，！？“”"（）【】`—-²³\n①٣你好') + ["——", " - "]
    texts = CORPUS[:-4] + [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(300)
    ]
    for t in texts:
        assert ft.contains_chinese(t) == fu.contains_chinese(t), t
        assert ft.replace_corner_mark(t) == fu.replace_corner_mark(t), t
        assert ft.remove_bracket(t) == fu.remove_bracket(t), t
        assert ft.is_only_punctuation(t) == fu.is_only_punctuation(t), t
        assert ft.spell_out_number(t, engine) == fu.spell_out_number(t, engine), t
        s = t.strip()
        if s:  # upstream only calls it on stripped text (it indexes past a trailing space)
            assert ft.replace_blank(s) == fu.replace_blank(s), s
        for lang in ("zh", "en"):
            try:
                want = fu.split_paragraph(s, str.split, lang, 8, 5, 3) if s else None
            except IndexError:  # upstream fails on a quote after a mark that opens the text
                continue
            if s:
                assert ft.split_paragraph(s, str.split, lang, 8, 5, 3) == want, (lang, s)
    # Where upstream raises IndexError, ours keeps the quote for the next sentence.
    with pytest.raises(IndexError):
        fu.split_paragraph('..."', str.split, "en")
    assert ft.split_paragraph('..."', str.split, "en") == ['".']


@pytest.mark.parity
@pytest.mark.parametrize("backend", ["wetext", "none"])
def test_text_normalize_equals_official(
    backend: str, tokenizer: QwenTokenizer, official_tokenizer
) -> None:
    official = _official_normalizer(official_tokenizer, backend)
    ours = TextFrontend(tokenizer, backend=backend)
    for text in CORPUS:
        for split in (True, False):
            for text_frontend in (True, False):
                want = official(text, split=split, text_frontend=text_frontend)
                got = ours.text_normalize(text, split=split, text_frontend=text_frontend)
                assert got == want, (
                    f"{backend} split={split} text_frontend={text_frontend} on {text!r}:\n"
                    f"ours     {got!r}\nofficial {want!r}"
                )


@pytest.mark.parity
def test_long_text_is_split_as_official(frontend: TextFrontend, official_tokenizer) -> None:
    """The corpus' long texts really exercise the 80/60/20 grouping (several segments)."""
    official = _official_normalizer(official_tokenizer, "wetext")
    for text in (EN_LONG + " " + EN_LONG, ZH_LONG + ZH_LONG):
        segments = frontend.text_normalize(text)
        assert len(segments) >= 3, segments
        assert segments == official(text)
        assert frontend.normalize_tts_text(text) == segments


# Inputs on which wetext, and so the official frontend, raises.
OFFICIAL_FAILS = ["a  b", "I have  2 cats", "a \n b", "!!! ??? ..."]


@pytest.mark.parity
def test_wetext_failure_is_recovered(frontend: TextFrontend, official_tokenizer) -> None:
    """wetext raises on some whitespace runs; we retry with them collapsed, else keep the text."""
    official = _official_normalizer(official_tokenizer, "wetext")
    for text in OFFICIAL_FAILS:
        with pytest.raises(AssertionError):
            official(text)
    with pytest.warns(TextNormalizationWarning, match="left un-normalised"):
        assert frontend.text_normalize("!!! ??? ...", split=False) == "!!! ??? ..."
    assert frontend.text_normalize("I have  2 cats", split=False) == "I have two cats"
    assert frontend.text_normalize("a \n b", split=True) == ["a b."]


def test_generator_passes_through(frontend: TextFrontend) -> None:
    gen = (t for t in ["a", "b"])
    assert frontend.text_normalize(gen) == [gen]


def test_no_backend_warns(tokenizer: QwenTokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ft, "_wetext_normalizers", lambda: None)
    tok = tokenizer
    with pytest.warns(TextNormalizationWarning, match="wetext is not installed"):
        fe = TextFrontend(tok)
    assert fe.text_frontend == ""
    assert fe.text_normalize("我有3个苹果") == ["我有3个苹果。"]
    assert fe.text_normalize("I have 3 apples") == ["I have three apples."]
    with pytest.raises(ImportError, match="wetext"):
        TextFrontend(tok, backend="wetext")


# ---- checked entry points: bad input ----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "text is empty"),
        ("   \n\t ", "text is only whitespace"),
        ("...!?", "nothing to speak"),
        ("。，！？…… 😀 ©", "nothing to speak"),
        (b"bytes", "must be a string"),
        ("a" * 20_001, "too long: 20001 characters"),
        ("word " * 60, "segment too long: 61 tokens"),
    ],
)
def test_bad_text_is_rejected(tokenizer: QwenTokenizer, text, message: str) -> None:
    pytest.importorskip("wetext")
    config = TextFrontendConfig(max_segment_tokens=59)
    frontend = TextFrontend(tokenizer, backend="wetext", config=config)
    with pytest.raises(InputError, match=message) as info:
        frontend.normalize_tts_text(text)
    assert "\n" not in str(info.value)


def test_checked_entry_points_accept_good_text(frontend: TextFrontend) -> None:
    assert frontend.normalize_tts_text("Hello 2 you!") == ["Hello two you!"]
    assert frontend.normalize_tts_text("[laughter]") == ["[laughter]."]
    assert frontend.normalize_tts_text("Hi <|endofprompt|>", text_frontend=True) == [
        "Hi <|endofprompt|>"
    ]
    assert frontend.normalize_prompt_text("希望你以后能够做的比我还好呦。") == (
        "希望你以后能够做的比我还好呦。"
    )
    assert frontend.instruct_prompt("用四川话说") == "用四川话说<|endofprompt|>"
    with pytest.raises(InputError, match="instruct text is empty"):
        frontend.instruct_prompt("  ")
    ids = frontend.text_tokens("你好<|endofprompt|>")
    assert ids[-1] == frontend.tokenizer.token_to_id("<|endofprompt|>")


# ---- incremental normalisation ----------------------------------------------------------

STREAM_TEXTS = [
    EN_LONG,
    ZH_LONG,
    "Mixed text. 中文句子，有3个数字。 Then English again: 10:30 and 3.5 kg! "
    '"Quoted." (Bracketed.) Final words without a mark',
    "今天天气很好。。。我们去公园吧！？ 好的……走吧「出发」。",
    "no marks at all " * 60,
    "...!!! ??? Hello",
]


def _irregular_pieces(text: str, rng: random.Random) -> list[str]:
    pieces, i = [], 0
    while i < len(text):
        n = rng.choice([0, 1, 1, 2, 3, 5, 8, 13, 40])
        pieces.append(text[i : i + n])
        i += n
    return pieces


def test_incremental_is_independent_of_chunking(frontend: TextFrontend) -> None:
    rng = random.Random(2024)
    for text in STREAM_TEXTS:
        inc = IncrementalNormalizer(frontend, max_chars=200)
        whole = inc.push(text) + inc.flush()
        assert whole, text
        for _ in range(3):
            inc = IncrementalNormalizer(frontend, max_chars=200)
            got = []
            for piece in _irregular_pieces(text, rng):
                got += inc.push(piece)
            got += inc.flush()
            assert got == whole, f"chunked {got!r}\nwhole {whole!r}"
        one_char = list(normalize_stream(frontend, iter(text)))
        assert one_char == list(normalize_stream(frontend, [text]))


def test_incremental_emits_early_and_normalises(frontend: TextFrontend) -> None:
    inc = frontend.stream()
    assert inc.push("I have 3 cats. They are 2") == ["I have three cats."]
    assert inc.push(" years old") == []  # no mark yet
    assert inc.push(".") == []  # an ASCII mark needs the next character
    assert inc.push(" 你好，我有5本书。") == [" They are two years old."]
    assert inc.push("再见") == ["你好，我有五本书。"]
    assert inc.flush() == ["再见"]
    # The per-sentence outputs equal the official normalisation of each sentence.
    assert frontend.text_normalize("I have 3 cats.", split=False) == "I have three cats."
    # 3.5 and 10:30 are not sentence ends.
    inc = frontend.stream()
    assert inc.push("Pi is 3.14 and it is 10:30 now") == []
    assert inc.flush() == ["Pi is three point one four and it is ten thirty now"]


def test_incremental_without_frontend_passes_text(frontend: TextFrontend) -> None:
    text = "I have 3 cats. 你好。 x"
    inc = frontend.stream(text_frontend=False)
    out = inc.push(text) + inc.flush()
    assert "".join(out) == text and out[0] == "I have 3 cats."


def test_incremental_cuts_long_runs(frontend: TextFrontend) -> None:
    inc = IncrementalNormalizer(frontend, max_chars=50)
    out = inc.push("word " * 40)
    assert out and all(len(s) <= 50 for s in out)
    with pytest.raises(InputError, match="must be strings"):
        inc.push(3)
