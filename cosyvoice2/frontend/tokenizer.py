"""The CosyVoice2 text tokenizer: Qwen2's byte-level BPE plus CosyVoice2's special tokens.

The official code (`cosyvoice/tokenizer/tokenizer.py`, `get_qwen_tokenizer`) loads
`CosyVoice-BlankEN/` with transformers' `AutoTokenizer` (which converts `vocab.json` +
`merges.txt` into a `tokenizers` pipeline through `Qwen2Converter`) and then calls
`add_special_tokens` with the CosyVoice2 tokens. This module builds the same
`tokenizers.Tokenizer` directly, so token ids are identical without transformers at run time:

- model: BPE over `vocab.json`/`merges.txt`, no unknown token, no byte fallback;
- normaliser: Unicode NFC;
- pre-tokeniser: the Qwen2 split regex (isolated), then byte-level mapping without a prefix space;
- decoder and post-processor: byte level;
- added tokens: those of `tokenizer_config.json` (`<|endoftext|>`, `<|im_start|>`,
  `<|im_end|>` in the released dir), then `SPECIAL_TOKENS` in the official order, all
  `special=True, normalized=False, lstrip=rstrip=False`, so they are never split and
  `skip_special_tokens` drops them when decoding.

The files are read as untrusted data: each is size-capped before it is read, and a
file that is not UTF-8, not JSON of the expected shape, or that `tokenizers` refuses
is a `TokenizerFileError` (a `CheckpointError`, and a `ValueError` as before) naming
the file; text that cannot be encoded (lone surrogates) is an `InputError`.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers import processors as tk_processors

from cosyvoice2.errors import CheckpointError, InputError

# The pre-tokenisation regex of Qwen2 (transformers' `Qwen2Converter` / `PRETOKENIZE_REGEX`).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The Qwen2 tokens used when the dir has no `tokenizer_config.json` (the released
# `CosyVoice-BlankEN/tokenizer_config.json` lists exactly these, at ids 151643-151645).
QWEN2_SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# CosyVoice2's `additional_special_tokens` after the Qwen2 ones, in the official order
# (`cosyvoice/tokenizer/tokenizer.py`, CosyVoice2Tokenizer / QwenTokenizer).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endofprompt|>",
    "[breath]",
    "<strong>",
    "</strong>",
    "[noise]",
    "[laughter]",
    "[cough]",
    "[clucking]",
    "[accent]",
    "[quick_breath]",
    "<laughter>",
    "</laughter>",
    "[hissing]",
    "[sigh]",
    "[vocalized-noise]",
    "[lipsmack]",
    "[mn]",
)

ENDOFPROMPT = "<|endofprompt|>"
TOKENIZER_DIRNAME = "CosyVoice-BlankEN"
# A tokenizer file larger than this is refused before it is read (Qwen2's
# tokenizer.json is about 11 MB, vocab.json 3 MB, merges.txt 2 MB).
MAX_TOKENIZER_FILE_BYTES = 64 * 2**20
MAX_TOKEN_ID = 2**31 - 1


class TokenizerFileError(CheckpointError, ValueError):
    """A tokenizer file that cannot be used: too large, not UTF-8, not JSON of the
    expected shape, or refused by `tokenizers`."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _read_text(path: Path) -> str:
    """The UTF-8 text of a tokenizer file, after its size check."""
    size = path.stat().st_size
    if size > MAX_TOKENIZER_FILE_BYTES:
        raise TokenizerFileError(
            f"{path}: {size} bytes, more than a tokenizer file may hold ({MAX_TOKENIZER_FILE_BYTES})"
        )
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerFileError(f"{path}: not UTF-8 (byte at offset {e.start})") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise TokenizerFileError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise TokenizerFileError(f"{path}: not valid JSON (nested too deeply)") from None


def _special(content: str) -> AddedToken:
    """An added token with the flags transformers gives special tokens (never split, not normalised)."""
    return AddedToken(
        content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True
    )


def read_merges(path: str | Path) -> list[tuple[str, str]]:
    """Read `merges.txt` as transformers' `Qwen2Tokenizer` does.

    A first line starting with `#version:` and blank lines are skipped; duplicate merges
    keep their first rank (transformers builds `bpe_ranks` with `dict(zip(merges, ...))` and
    passes its keys, in first-insertion order, to the converter).
    """
    merges: dict[tuple[str, str], None] = {}
    text = _read_text(Path(path)).replace("\r\n", "\n").replace("\r", "\n")  # as open() reads
    for i, line in enumerate(text.split("\n")):
        line = line.strip()
        if (i == 0 and line.startswith("#version:")) or not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            shown = line if len(line) <= 40 else line[:37] + "..."
            raise TokenizerFileError(
                f"{path}: line {i + 1} is not a merge of two symbols: {shown!r}"
            )
        merges.setdefault((parts[0], parts[1]), None)
    return list(merges)


def _configured_added_tokens(token_dir: Path) -> list[tuple[int, AddedToken]]:
    """The added tokens of `tokenizer_config.json` (`added_tokens_decoder`), sorted by id."""
    cfg_path = token_dir / "tokenizer_config.json"
    if not cfg_path.is_file():
        return []
    cfg = _read_json(cfg_path)
    decoder = cfg.get("added_tokens_decoder") if isinstance(cfg, dict) else None
    if not isinstance(cfg, dict) or not isinstance(decoder, (dict, type(None))):
        raise TokenizerFileError(f"{cfg_path}: not a tokenizer config (added_tokens_decoder)")
    out = []
    for idx, spec in (decoder or {}).items():
        ok = isinstance(spec, dict) and isinstance(spec.get("content"), str)
        if not ok or not (idx.isascii() and idx.isdigit()) or int(idx) > MAX_TOKEN_ID:
            raise TokenizerFileError(f"{cfg_path}: bad added token {idx!r}")
        out.append(
            (
                int(idx),
                AddedToken(
                    spec["content"],
                    single_word=bool(spec.get("single_word", False)),
                    lstrip=bool(spec.get("lstrip", False)),
                    rstrip=bool(spec.get("rstrip", False)),
                    normalized=bool(spec.get("normalized", False)),
                    special=bool(spec.get("special", True)),
                ),
            )
        )
    return sorted(out, key=lambda p: p[0])


def build_qwen2_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    """The `tokenizers` pipeline of transformers' `Qwen2Converter` for a vocab and merges."""
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = tk_processors.ByteLevel(trim_offsets=False)
    return tok


class QwenTokenizer:
    """Encode text to CosyVoice2 text-token ids and decode them back.

    Built with `from_dir` (a `CosyVoice-BlankEN`-style dir, or a dir with a `tokenizer.json`
    written by `save`). `skip_special_tokens` is the default for `decode`, as the official
    `get_qwen_tokenizer(token_path, skip_special_tokens)` (the CosyVoice2 yaml sets True).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._add_cosyvoice_specials()

    def _add_cosyvoice_specials(self) -> None:
        """Add `QWEN2_SPECIAL_TOKENS` + `SPECIAL_TOKENS` as special tokens (no-op for those present)."""
        self.tokenizer.add_special_tokens([_special(t) for t in QWEN2_SPECIAL_TOKENS])
        self.tokenizer.add_special_tokens([_special(t) for t in SPECIAL_TOKENS])

    @classmethod
    def from_dir(cls, token_dir: str | Path, skip_special_tokens: bool = True) -> QwenTokenizer:
        """Load from `tokenizer.json`, or else from `vocab.json` + `merges.txt` (+ `tokenizer_config.json`)."""
        token_dir = Path(token_dir)
        if (token_dir / TOKENIZER_DIRNAME).is_dir() and not (token_dir / "vocab.json").exists():
            token_dir = token_dir / TOKENIZER_DIRNAME
        tj = token_dir / "tokenizer.json"
        if tj.is_file():
            text = _read_text(tj)
            try:
                tokenizer = Tokenizer.from_str(text)
            except Exception as e:  # tokenizers raises a plain Exception
                raise TokenizerFileError(
                    f"{tj}: not a tokenizers file ({_first_line(e)})"
                ) from None
            return cls(tokenizer, skip_special_tokens)
        vocab_path, merges_path = token_dir / "vocab.json", token_dir / "merges.txt"
        for p in (vocab_path, merges_path):
            if not p.is_file():
                raise FileNotFoundError(f"tokenizer file missing: {p}")
        vocab = _read_json(vocab_path)
        ok = isinstance(vocab, dict) and all(
            isinstance(k, str) and type(v) is int and 0 <= v <= MAX_TOKEN_ID
            for k, v in vocab.items()
        )
        if not ok:
            raise TokenizerFileError(f"{vocab_path}: not a map of tokens to ids")
        merges = read_merges(merges_path)
        try:
            tok = build_qwen2_tokenizer(vocab, merges)
        except Exception as e:  # tokenizers raises a plain Exception (a merge of unknown tokens)
            raise TokenizerFileError(
                f"{token_dir}: vocab.json and merges.txt do not make a BPE model ({_first_line(e)})"
            ) from None
        for want_id, added in _configured_added_tokens(token_dir):
            if added.special:
                tok.add_special_tokens([added])
            else:
                tok.add_tokens([added])
            got = tok.token_to_id(added.content)
            if got != want_id:
                raise TokenizerFileError(
                    f"{token_dir}/tokenizer_config.json: added token {added.content!r} should have "
                    f"id {want_id} but gets {got} (vocab.json has {len(vocab)} entries)"
                )
        return cls(tok, skip_special_tokens)

    def save(self, out_dir: str | Path) -> Path:
        """Write the whole pipeline, CosyVoice2 tokens included, as `out_dir/tokenizer.json`."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "tokenizer.json"
        self.tokenizer.save(str(path))
        return path

    def encode(self, text: str, **kwargs: object) -> list[int]:
        """Token ids of `text`. Extra keyword arguments (the official `allowed_special`) are ignored.

        Text holding lone surrogates (bytes that were not UTF-8, decoded with Python's
        `surrogateescape`) is an `InputError`: no tokenizer can encode it."""
        try:
            return self.tokenizer.encode(text, add_special_tokens=True).ids
        except (TypeError, ValueError):
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise InputError(
                        f"text is not valid Unicode: a lone surrogate at character {e.start} "
                        "(bytes that were not UTF-8?)"
                    ) from None
            raise

    def decode(self, tokens: list[int], skip_special_tokens: bool | None = None) -> str:
        """Text of `tokens`; special tokens are dropped when `skip_special_tokens` (default: the instance's)."""
        skip = self.skip_special_tokens if skip_special_tokens is None else skip_special_tokens
        return self.tokenizer.decode([int(t) for t in tokens], skip_special_tokens=skip)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        return self.tokenizer.id_to_token(idx)

    @property
    def special_tokens(self) -> dict[str, int]:
        """Every special token and its id (Qwen2's and CosyVoice2's)."""
        return {t: self.tokenizer.token_to_id(t) for t in (*QWEN2_SPECIAL_TOKENS, *SPECIAL_TOKENS)}

    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)


@cache
def get_qwen_tokenizer(token_path: str, skip_special_tokens: bool = True) -> QwenTokenizer:
    """Cached `QwenTokenizer.from_dir`, named and called as the official function."""
    return QwenTokenizer.from_dir(token_path, skip_special_tokens=skip_special_tokens)
