"""Text normalisation and splitting with the official CosyVoice2 `text_normalize` behaviour.

Ported from the official `cosyvoice/utils/frontend_utils.py` (the same in the mid-2025 wheel and
the latest upstream) and the latest upstream `CosyVoiceFrontEnd.text_normalize`
(`cosyvoice/cli/frontend.py`). The wheel used as the parity reference (MiniCPM-o's
`cosyvoice-minicpmo`) has the normalisers commented out; upstream composes:

1. a generator (text-in streaming) is passed through untouched;
2. text containing both `<|` and `|>` (special-token markup such as `<|endofprompt|>`) is not
   normalised; nor is anything when `text_frontend=False`, nor the empty string;
3. otherwise the text is stripped, and
   - if it contains a CJK ideograph (`contains_chinese`): the Chinese FST normaliser, newlines
     removed, `replace_blank`, `replace_corner_mark`, `.` -> `。`, ` - ` -> `，`,
     `remove_bracket`, trailing commas -> `。`, then `split_paragraph(..., "zh")` (lengths in
     characters);
   - else: the English FST normaliser, `spell_out_number` (inflect), then
     `split_paragraph(..., "en")` (lengths in text tokens of our tokenizer);
4. segments that are only punctuation/symbols are dropped.

The FST normaliser is `wetext` (the WeTextProcessing runtime; its FSTs ship inside the wheel,
so it works offline), built exactly as upstream: `Normalizer(remove_erhua=False)` for Chinese
and `Normalizer()` for English, both with automatic language detection. Upstream prefers
`ttsfrd` (Alibaba's closed resource package, not on PyPI) and falls back to no FST
normalisation when neither is installed; we do the same without `ttsfrd`. Without `wetext`
numbers in Chinese text stay as digits, and dates, units, currency and abbreviations are left as
written in both languages (English digits are still spelled out by inflect); a
`TextNormalizationWarning` says so when the frontend is built.

Deliberate differences from upstream, each only where upstream fails:
- `wetext`'s English grammar raises on some whitespace runs (`"a  b"`, `"a\\n\\nc"`); upstream
  then crashes. We retry with whitespace runs collapsed to one space (what the grammar does
  with single newlines and tabs), and if that fails too keep the text un-normalised, with a warning.
- `split_paragraph` raises `IndexError` upstream when a closing quote follows a sentence mark
  before any sentence was collected (e.g. `'..."'`); we then keep the quote for the next sentence.
- `replace_blank` raises `IndexError` upstream on a trailing space (unreachable after `strip`);
  ours drops it.
Known quirks kept for parity: `wetext` escapes double quotes (`"a"` -> `\\"a\\"`); a text of
digits only takes the Chinese reading even on the English path (`wetext`'s automatic language
detection); `spell_out_number` reads every run of digits as one integer ("3.5" -> "three.five"
when `wetext` is absent).

On top of the official behaviour, `TextFrontend.normalize_tts_text` rejects bad input with a
one-line `InputError`, and `IncrementalNormalizer` normalises text that arrives in pieces.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import regex

from cosyvoice2.errors import InputError
from cosyvoice2.frontend.tokenizer import ENDOFPROMPT, QwenTokenizer


class TextNormalizationWarning(UserWarning):
    """Text normalisation is reduced: no FST normaliser, or it failed on an input."""


# ---- the official helpers (cosyvoice/utils/frontend_utils.py) -------------------------------

_CHINESE_CHAR = re.compile(r"[\u4e00-\u9fff]+")
_ONLY_PUNCTUATION = regex.compile(r"^[\p{P}\p{S}]*$")
_HAS_LETTER_OR_DIGIT = regex.compile(r"[\p{L}\p{N}]")


def contains_chinese(text: str) -> bool:
    """Whether `text` has a CJK unified ideograph (U+4E00..U+9FFF): the official language test."""
    return bool(_CHINESE_CHAR.search(text))


def replace_corner_mark(text: str) -> str:
    """Read superscript 2 and 3 as 平方 / 立方 (square / cubic), for Chinese text."""
    return text.replace("²", "平方").replace("³", "立方")


def remove_bracket(text: str) -> str:
    """Drop full-width parentheses, 【】 and backticks; an em-dash pair becomes a space."""
    text = text.replace("（", "").replace("）", "")
    text = text.replace("【", "").replace("】", "")
    text = text.replace("`", "")
    return text.replace("——", " ")


class LazyInflect:
    """`inflect.engine()` created on first use: importing inflect takes seconds (typeguard
    instruments it at import), and most texts have no digits to spell out."""

    def __init__(self) -> None:
        self._engine = None

    def number_to_words(self, num: str) -> str:
        if self._engine is None:
            import inflect

            self._engine = inflect.engine()
        return self._engine.number_to_words(num)


def spell_out_number(text: str, inflect_parser: Any) -> str:
    """Replace every run of `str.isdigit` characters by inflect's words for it (English)."""
    out: list[str] = []
    start: int | None = None
    for i, c in enumerate(text):
        if c.isdigit():
            if start is None:
                start = i
            continue
        if start is not None:
            out.append(inflect_parser.number_to_words(text[start:i]))
            start = None
        out.append(c)
    if start is not None:
        out.append(inflect_parser.number_to_words(text[start:]))
    return "".join(out)


def replace_blank(text: str) -> str:
    """Remove spaces except those between two ASCII non-space characters (Chinese text)."""
    out = []
    for i, c in enumerate(text):
        if c == " ":
            # Upstream reads text[i - 1] (wrapping at 0) and text[i + 1] (IndexError at the end).
            nxt = text[i + 1] if i + 1 < len(text) else " "
            prev = text[i - 1]
            if nxt.isascii() and nxt != " " and prev.isascii() and prev != " ":
                out.append(c)
        else:
            out.append(c)
    return "".join(out)


def is_only_punctuation(text: str) -> bool:
    """Whether `text` is empty or only Unicode punctuation (P*) and symbols (S*)."""
    return bool(_ONLY_PUNCTUATION.fullmatch(text))


def split_paragraph(
    text: str,
    tokenize: Callable[[str], list[int]],
    lang: str = "zh",
    token_max_n: int = 80,
    token_min_n: int = 60,
    merge_len: int = 20,
    comma_split: bool = False,
) -> list[str]:
    """Split `text` at sentence marks and regroup the sentences into segments, as upstream.

    Sentences end at a mark of `pounc` (plus a directly following `"`/`”`). They are
    accumulated into a segment until adding the next would exceed `token_max_n` while the
    segment already exceeds `token_min_n`; a final segment shorter than `merge_len` joins the
    previous one. Lengths count characters for `lang == "zh"` and `tokenize` tokens otherwise.
    A missing final mark is added (`。` or `.`). `text` must not be empty.
    """

    def length(t: str) -> int:
        return len(t) if lang == "zh" else len(tokenize(t))

    if lang == "zh":
        pounc = ["。", "？", "！", "；", "：", "、", ".", "?", "!", ";"]
    else:
        pounc = [".", "?", "!", ";", ":"]
    if comma_split:
        pounc.extend(["，", ","])

    if text[-1] not in pounc:
        text += "。" if lang == "zh" else "."

    st = 0
    utts: list[str] = []
    for i, c in enumerate(text):
        if c in pounc:
            if len(text[st:i]) > 0:
                utts.append(text[st:i] + c)
            if i + 1 < len(text) and text[i + 1] in ['"', "”"] and utts:
                utts.append(utts.pop(-1) + text[i + 1])
                st = i + 2
            else:
                st = i + 1

    final_utts: list[str] = []
    cur = ""
    for utt in utts:
        if length(cur + utt) > token_max_n and length(cur) > token_min_n:
            final_utts.append(cur)
            cur = ""
        cur = cur + utt
    if len(cur) > 0:
        if length(cur) < merge_len and len(final_utts) != 0:
            final_utts[-1] = final_utts[-1] + cur
        else:
            final_utts.append(cur)
    return final_utts


# ---- the frontend ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TextFrontendConfig:
    """Segmenting limits (official values) and our input limits.

    `max_chars` bounds one request's text; `max_segment_tokens` bounds one segment (a run
    without sentence marks), so that text + up to 20 speech tokens per text token stay well
    inside the LLM's 32768 positions.
    """

    token_max_n: int = 80
    token_min_n: int = 60
    merge_len: int = 20
    comma_split: bool = False
    max_chars: int = 20_000
    max_segment_tokens: int = 1_000


def _wetext_normalizers() -> tuple[object, object] | None:
    try:
        from wetext import Normalizer
    except ImportError:
        return None
    return Normalizer(remove_erhua=False), Normalizer()


def _snippet(text: str, n: int = 40) -> str:
    """A short one-line rendering of `text` for error messages."""
    s = text if len(text) <= n else text[: n - 3] + "..."
    return repr(s)


class TextFrontend:
    """The official text frontend: normalisation, splitting and text tokens.

    `backend`: `"auto"` (wetext when installed, else none with a warning), `"wetext"` (required)
    or `"none"` (no FST normalisation, no warning).
    """

    def __init__(
        self,
        tokenizer: QwenTokenizer,
        backend: str = "auto",
        config: TextFrontendConfig | None = None,
        allowed_special: str = "all",
    ) -> None:
        if backend not in ("auto", "wetext", "none"):
            raise ValueError(f"backend must be 'auto', 'wetext' or 'none', got {backend!r}")
        self.tokenizer = tokenizer
        self.config = config or TextFrontendConfig()
        self.allowed_special = allowed_special
        self.inflect_parser = LazyInflect()
        normalizers = None if backend == "none" else _wetext_normalizers()
        if normalizers is None and backend == "wetext":
            raise ImportError("text normalisation backend 'wetext' requested but not installed")
        if normalizers is None and backend == "auto":
            warnings.warn(
                "wetext is not installed: text is normalised without FSTs (no Chinese number "
                "reading; dates, units, currency and abbreviations left as written); "
                "`pip install wetext` for the official normalisation",
                TextNormalizationWarning,
                stacklevel=2,
            )
        self.zh_tn_model, self.en_tn_model = normalizers or (None, None)
        self.text_frontend = "wetext" if normalizers else ""

    # -- pieces --------------------------------------------------------------------------

    def _fst(self, model, text: str) -> str:
        """Run a wetext normaliser; on its internal failure retry with collapsed whitespace."""
        try:
            return model.normalize(text)
        except Exception:  # wetext raises AssertionError (and others) on some input
            pass
        collapsed = re.sub(r"\s+", " ", text)
        try:
            return model.normalize(collapsed)
        except Exception:
            warnings.warn(
                f"wetext failed on {_snippet(text)}; that text is left un-normalised",
                TextNormalizationWarning,
                stacklevel=3,
            )
            return text

    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, allowed_special=self.allowed_special)

    def _split(self, text: str, lang: str) -> list[str]:
        c = self.config
        return split_paragraph(
            text,
            self._tokenize,
            lang,
            token_max_n=c.token_max_n,
            token_min_n=c.token_min_n,
            merge_len=c.merge_len,
            comma_split=c.comma_split,
        )

    # -- the official entry point ----------------------------------------------------------

    def text_normalize(
        self, text: str | Generator, split: bool = True, text_frontend: bool = True
    ) -> list[str] | str | list[Generator]:
        """The official `CosyVoiceFrontEnd.text_normalize` (latest upstream).

        Returns the list of segments when `split`, else the normalised text before splitting.
        """
        if isinstance(text, Generator):
            return [text]
        if "<|" in text and "|>" in text:
            text_frontend = False
        if text_frontend is False or text == "":
            return [text] if split is True else text
        text = text.strip()
        if contains_chinese(text):
            if self.zh_tn_model is not None:
                text = self._fst(self.zh_tn_model, text)
            text = text.replace("\n", "")
            text = replace_blank(text)
            text = replace_corner_mark(text)
            text = text.replace(".", "。")
            text = text.replace(" - ", "，")
            text = remove_bracket(text)
            text = re.sub(r"[，,、]+$", "。", text)
            lang = "zh"
        else:
            if self.en_tn_model is not None:
                text = self._fst(self.en_tn_model, text)
            text = spell_out_number(text, self.inflect_parser)
            lang = "en"
        if not split:
            return text
        texts = self._split(text, lang) if text else []
        return [t for t in texts if not is_only_punctuation(t)]

    # -- checked entry points for the pipeline ----------------------------------------------

    def check_text(self, text: object, what: str = "text") -> str:
        """Reject text that cannot be spoken with a one-line `InputError`; return it unchanged."""
        if not isinstance(text, str):
            raise InputError(f"{what} must be a string, got {type(text).__name__}")
        if text == "":
            raise InputError(f"{what} is empty")
        if text.strip() == "":
            raise InputError(f"{what} is only whitespace")
        if len(text) > self.config.max_chars:
            raise InputError(
                f"{what} is too long: {len(text)} characters (limit {self.config.max_chars}); "
                "split it into several requests"
            )
        if not _HAS_LETTER_OR_DIGIT.search(text):
            raise InputError(
                f"{what} has nothing to speak (only punctuation or symbols): {_snippet(text)}"
            )
        return text

    def normalize_tts_text(self, text: str, text_frontend: bool = True) -> list[str]:
        """Check, normalise and split the text to synthesise; each segment is synthesised in turn."""
        self.check_text(text)
        segments = self.text_normalize(text, split=True, text_frontend=text_frontend)
        if not segments:
            raise InputError(
                f"text has nothing to speak after normalisation (only punctuation): {_snippet(text)}"
            )
        limit = self.config.max_segment_tokens
        for seg in segments:
            n = len(self._tokenize(seg))
            if n > limit:
                raise InputError(
                    f"text segment too long: {n} tokens without a sentence mark (limit {limit}): "
                    f"{_snippet(seg)}; add punctuation"
                )
        return segments

    def normalize_prompt_text(self, prompt_text: str, text_frontend: bool = True) -> str:
        """The zero-shot prompt transcript, normalised without splitting (official)."""
        if not isinstance(prompt_text, str):
            raise InputError(f"prompt text must be a string, got {type(prompt_text).__name__}")
        return self.text_normalize(prompt_text, split=False, text_frontend=text_frontend)

    @staticmethod
    def instruct_prompt(instruct_text: str) -> str:
        """CosyVoice2's instruct2 prompt: the instruction (not normalised) + `<|endofprompt|>`."""
        if not isinstance(instruct_text, str) or instruct_text.strip() == "":
            raise InputError("instruct text is empty")
        return instruct_text + ENDOFPROMPT

    def text_tokens(self, text: str) -> list[int]:
        """Text-token ids of one segment (the official `_extract_text_token`)."""
        return self._tokenize(text)

    def stream(self, text_frontend: bool = True) -> IncrementalNormalizer:
        """An `IncrementalNormalizer` over this frontend."""
        return IncrementalNormalizer(self, text_frontend=text_frontend)


# ---- incremental normalisation for text-in streaming ----------------------------------------

# Sentence marks: ASCII ones end a sentence only before whitespace (so "3.5", "10:30", "e.g"
# do not split), full-width ones end it at once. Closers directly after a mark stay with it.
_ASCII_ENDS = frozenset(".?!;:")
_WIDE_ENDS = frozenset("。？！；：…")
_CLOSERS = frozenset('"”’」』）)]')


class IncrementalNormalizer:
    """Normalise text that arrives in pieces, emitting whole sentences as soon as they are safe.

    `push(piece)` returns the normalised sentences completed so far; `flush()` returns the
    rest. A sentence ends after a sentence mark (and any closing quotes/brackets after it):
    full-width marks end it at once, ASCII marks only when whitespace follows. Past
    `max_chars` without a mark the text is cut after the last whitespace (or at the limit).
    Every decision depends only on the characters up to one past the boundary, so the
    sentences, and hence the output, do not depend on how the text was cut into pieces.

    Each sentence goes through `text_normalize(..., split=False)` (language chosen per
    sentence); punctuation-only results are dropped; a sentence that followed whitespace and
    does not start with a CJK ideograph gets one leading space, so that joining the outputs
    keeps words apart. With `text_frontend=False` the sentences pass unchanged.
    """

    def __init__(
        self, frontend: TextFrontend, text_frontend: bool = True, max_chars: int = 400
    ) -> None:
        if max_chars < 2:
            raise ValueError("max_chars must be at least 2")
        self.frontend = frontend
        self.text_frontend = text_frontend
        self.max_chars = max_chars
        self._buf = ""
        self._scan = 0  # no sentence end before this index of _buf
        self._emitted = False

    def push(self, piece: str) -> list[str]:
        """Add a piece of text; return the normalised sentences it completed."""
        if not isinstance(piece, str):
            raise InputError(f"streamed text pieces must be strings, got {type(piece).__name__}")
        self._buf += piece
        return self._drain(final=False)

    def flush(self) -> list[str]:
        """Return the normalised rest of the text and reset for a new stream."""
        out = self._drain(final=True)
        if self._buf:
            out.extend(self._emit(self._buf))
        self._buf, self._scan, self._emitted = "", 0, False
        return out

    def _drain(self, final: bool) -> list[str]:
        out: list[str] = []
        while True:
            cut = self._next_cut(final)
            if cut is None:
                return out
            sentence, self._buf, self._scan = self._buf[:cut], self._buf[cut:], 0
            out.extend(self._emit(sentence))

    def _next_cut(self, final: bool) -> int | None:
        """Index just past the first sentence in `_buf`, or None if not yet decidable."""
        buf, n = self._buf, len(self._buf)
        i = self._scan
        while i < n:
            c = buf[i]
            if c in _ASCII_ENDS or c in _WIDE_ENDS:
                j = i + 1
                wide = c in _WIDE_ENDS
                while j < n and (
                    buf[j] in _ASCII_ENDS or buf[j] in _WIDE_ENDS or buf[j] in _CLOSERS
                ):
                    wide = wide or buf[j] in _WIDE_ENDS
                    j += 1
                if j >= self.max_chars:
                    return self._forced_cut()
                if j == n:
                    if final:
                        return None  # the rest is flushed whole
                    self._scan = i
                    return None
                if wide or buf[j].isspace():
                    return j
                i = j
                continue
            if i + 1 >= self.max_chars:
                return self._forced_cut()
            i += 1
        self._scan = n
        return None

    def _forced_cut(self) -> int:
        """Cut a sentence that reached `max_chars`: after its last whitespace, else at the limit."""
        head = self._buf[: self.max_chars]
        k = max(head.rfind(" "), head.rfind("\n"), head.rfind("\t"))
        return k + 1 if k > 0 else self.max_chars

    def _emit(self, sentence: str) -> list[str]:
        if not self.text_frontend:
            self._emitted = True
            return [sentence]
        if sentence.strip() == "":
            return []
        text = self.frontend.text_normalize(sentence, split=False, text_frontend=True)
        if text.strip() == "" or is_only_punctuation(text.strip()):
            return []
        if self._emitted and sentence[:1].isspace() and not contains_chinese(text[:1]):
            text = " " + text
        self._emitted = True
        return [text]


def normalize_stream(
    frontend: TextFrontend, pieces: Iterable[str], text_frontend: bool = True
) -> Iterator[str]:
    """Normalised sentences of a stream of text pieces (e.g. an LLM reply), as they complete."""
    inc = IncrementalNormalizer(frontend, text_frontend=text_frontend)
    for piece in pieces:
        yield from inc.push(piece)
    yield from inc.flush()
