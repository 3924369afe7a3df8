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
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers import processors as tk_processors

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
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            line = line.strip()
            if (i == 0 and line.startswith("#version:")) or not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{path}: line {i + 1} is not a merge of two symbols: {line!r}")
            merges.setdefault((parts[0], parts[1]), None)
    return list(merges)


def _configured_added_tokens(token_dir: Path) -> list[tuple[int, AddedToken]]:
    """The added tokens of `tokenizer_config.json` (`added_tokens_decoder`), sorted by id."""
    cfg_path = token_dir / "tokenizer_config.json"
    if not cfg_path.is_file():
        return []
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    out = []
    for idx, spec in (cfg.get("added_tokens_decoder") or {}).items():
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
            return cls(Tokenizer.from_file(str(tj)), skip_special_tokens)
        vocab_path, merges_path = token_dir / "vocab.json", token_dir / "merges.txt"
        for p in (vocab_path, merges_path):
            if not p.is_file():
                raise FileNotFoundError(f"tokenizer file missing: {p}")
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
        tok = build_qwen2_tokenizer(vocab, read_merges(merges_path))
        for want_id, added in _configured_added_tokens(token_dir):
            if added.special:
                tok.add_special_tokens([added])
            else:
                tok.add_tokens([added])
            got = tok.token_to_id(added.content)
            if got != want_id:
                raise ValueError(
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
        """Token ids of `text`. Extra keyword arguments (the official `allowed_special`) are ignored."""
        return self.tokenizer.encode(text, add_special_tokens=True).ids

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
