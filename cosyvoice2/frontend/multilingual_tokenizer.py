"""The first generation's text tokenizer: Whisper's multilingual BPE as CosyVoice ships it.

The official code (`cosyvoice/tokenizer/tokenizer.py`, `get_tokenizer(multilingual=True,
num_languages=..., language=..., task=...)`) builds a `tiktoken.Encoding` from
`multilingual_zh_ja_yue_char_del.tiktoken` (base64 byte strings and their ranks: Whisper's
multilingual vocabulary with some CJK characters deleted) plus a fixed list of special
tokens (`specials()`), and encodes with every special token allowed. This module builds the
same tokenizer with `tokenizers` (a runtime dependency already), so token ids are equal
without tiktoken:

- model: byte-level BPE whose merges are recovered from the ranks (each token splits into
  the two parts that BPE with the lower ranks reaches, as tiktoken merges by rank);
- pre-tokeniser: the Encoding's split regex (isolated), then byte-level mapping;
- added tokens: `specials()` at ids `len(ranks)`, `len(ranks) + 1`, ..., never split.

The rank file is not part of a released model dir (it ships with the official code), so
the caller names it. It is read as untrusted data:
size-capped, every line `base64 rank` with ranks 0..n-1 once each, or a
`TokenizerFileError` naming the file and line.
"""

from __future__ import annotations

import base64
import binascii
from functools import cache
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from cosyvoice2.errors import InputError
from cosyvoice2.frontend.tokenizer import TokenizerFileError

RANKS_FILE = "multilingual_zh_ja_yue_char_del.tiktoken"
MAX_RANKS_BYTES = 16 << 20
SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# The official lists (cosyvoice/tokenizer/tokenizer.py), in order: language codes, audio
# events, emotions, the TTS vocal tokens; each special token's id is its place after the ranks.
LANGUAGE_CODES = (
    "en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no "
    "th ur hr bg lt la mi ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw "
    "gl mr pa si km sn yo so af oc ka be tg sd gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl "
    "mg as tt haw ln ha ba jw su yue minnan wuyu dialect zh/en en/zh"
).split()
AUDIO_EVENTS = ("ASR", "AED", "SER", "Speech", "/Speech", "BGM", "/BGM", "Laughter", "/Laughter", "Applause", "/Applause")  # fmt: skip
EMOTIONS = ("HAPPY", "SAD", "ANGRY", "NEUTRAL")
TTS_VOCAL = ("TTS/B", "TTS/O", "TTS/Q", "TTS/A", "TTS/CO", "TTS/CL", "TTS/H") + tuple(
    f"TTS/SP{i:02d}" for i in range(1, 14)
)


def specials(num_languages: int = 100) -> list[str]:
    """The special tokens of `get_encoding(name, num_languages)`, in id order."""
    if not 0 <= num_languages <= len(LANGUAGE_CODES):
        raise ValueError(f"num_languages must be 0..{len(LANGUAGE_CODES)}, got {num_languages}")
    return [
        "<|endoftext|>",
        "<|startoftranscript|>",
        *[f"<|{code}|>" for code in LANGUAGE_CODES[:num_languages]],
        *[f"<|{e}|>" for e in AUDIO_EVENTS],
        *[f"<|{e}|>" for e in EMOTIONS],
        "<|translate|>",
        "<|transcribe|>",
        "<|startoflm|>",
        "<|startofprev|>",
        "<|nospeech|>",
        "<|notimestamps|>",
        *[f"<|SPECIAL_TOKEN_{i}|>" for i in range(1, 31)],
        *[f"<|{t}|>" for t in TTS_VOCAL],
        *[f"<|{i * 0.02:.2f}|>" for i in range(1501)],
    ]


def read_ranks(path: str | Path) -> list[bytes]:
    """The byte strings of a `.tiktoken` file, in rank order (TokenizerFileError if malformed)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_RANKS_BYTES:
            raise TokenizerFileError(f"{path}: {size} bytes, more than {MAX_RANKS_BYTES}")
        text = path.read_bytes().decode("ascii")
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerFileError(f"{path}: cannot read BPE ranks ({e})") from None
    tokens: dict[int, bytes] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:  # "=" is the empty string: the released file has one (never produced)
            token = b"" if parts[0] == "=" else base64.b64decode(parts[0], validate=True)
            rank = int(parts[1])
        except (IndexError, ValueError, binascii.Error):
            raise TokenizerFileError(f"{path}, line {n}: not `base64 rank`") from None
        if len(parts) != 2 or rank in tokens:
            raise TokenizerFileError(f"{path}, line {n}: not `base64 rank` with a new rank")
        tokens[rank] = token
    if sorted(tokens) != list(range(len(tokens))):
        raise TokenizerFileError(f"{path}: ranks are not 0..{len(tokens) - 1}")
    return [tokens[r] for r in range(len(tokens))]


@cache
def _byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the byte-level pre-tokeniser's alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _merges(ranks: list[bytes]) -> list[tuple[bytes, bytes]]:
    """The BPE merge of each multi-byte token, in rank order: the two parts that merging by
    rank (lower ranks only) leaves of its bytes."""
    rank_of = {t: r for r, t in enumerate(ranks)}
    out = []
    for rank, token in enumerate(ranks):
        if len(token) < 2:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best = None
            for i in range(len(parts) - 1):
                r = rank_of.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                break
            i = best[1]
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            out.append((parts[0], parts[1]))
    return out


def build_tokenizer(ranks: list[bytes], num_languages: int = 100) -> Tokenizer:
    """The `tokenizers.Tokenizer` equal to the official multilingual `tiktoken.Encoding`."""
    chars = _byte_chars()

    def text(b: bytes) -> str:
        return "".join(chars[x] for x in b)

    # an empty byte string (never produced) keeps its id under a name no input maps to
    # (outside the byte-level alphabet), so that the special tokens' ids follow all ranks
    vocab = {(text(t) if t else f"\ue000empty{r}"): r for r, t in enumerate(ranks)}
    if len(vocab) != len(ranks):
        raise TokenizerFileError("BPE ranks: one byte string has two ranks")
    merges = [(text(a), text(b)) for a, b in _merges(ranks)]
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    for s in specials(num_languages):
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False)])
    return tok


class MultilingualTokenizer:
    """`encode(text)` / `decode(ids)` as the official `get_tokenizer(multilingual=True, ...)`
    with `allowed_special='all'` (the first generation's frontend)."""

    def __init__(self, ranks_path: str | Path, num_languages: int = 100):
        self.tokenizer = build_tokenizer(read_ranks(ranks_path), num_languages)
        self.n_vocab = self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        try:
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        except Exception as e:  # lone surrogates and the like
            raise InputError(f"text cannot be tokenized: {e}") from None

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)
