"""The MLX model dir: its format, its validation, and the loading of each component.

`cosyvoice2.convert` writes this format and `CosyVoice2.load` reads it; both take
the names below from here, so the runtime never imports the converter. A dir
holds:

    config.json                   model_type, format_version, every hyperparameter
                                  (`ModelConfig`, plus the `campplus` and
                                  `speech_tokenizer` sections), `llm_precision`
    llm.safetensors               speech LM (fp32/bf16/fp16, or mlx's quantised layout)
    flow.safetensors              flow matching (token -> mel)
    hift.safetensors              vocoder (mel -> 24 kHz)
    campplus.safetensors          speaker embedding (CAM++)
    speech_tokenizer.safetensors  S3 tokenizer v2
    tokenizer/                    Qwen2 BPE files
    speakers/                     saved speakers

Every problem with a dir is a `ModelDirError` whose one-line message names the
file and what is wrong with it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from cosyvoice2.config import ModelConfig
from cosyvoice2.errors import CosyVoiceError
from cosyvoice2.flow.flow import CausalMaskedDiffWithXvec
from cosyvoice2.frontend.campplus import CAMPPlus, CAMPPlusConfig
from cosyvoice2.frontend.speech_tokenizer import SpeechTokenizerConfig, SpeechTokenizerV2
from cosyvoice2.frontend.text import TextFrontend
from cosyvoice2.frontend.tokenizer import QwenTokenizer
from cosyvoice2.hift import HiFTGenerator
from cosyvoice2.llm import Qwen2LM, cast, quantize
from cosyvoice2.speakers import SpeakerStore

FORMAT_VERSION = 1
MODEL_TYPE = "cosyvoice2"
CONFIG_FILE = "config.json"
COMPONENTS = ("llm", "flow", "hift", "campplus", "speech_tokenizer")
WEIGHT_FILES = tuple(f"{name}.safetensors" for name in COMPONENTS)
CONFIG_SECTIONS = COMPONENTS  # each component has an object of settings in config.json
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")
SPEAKERS_DIR = "speakers"
LLM_DTYPES = ("float32", "bfloat16", "float16")
FLOAT32 = {"dtype": "float32"}  # the `llm_precision` record of a dir that has none


class ModelDirError(CosyVoiceError):
    """The MLX model dir is missing, incomplete, of another model or of another format version."""


def weights_file(component: str) -> str:
    """The weights file of a component (one of `COMPONENTS`)."""
    return f"{component}.safetensors"


def llm_precision_name(record: dict[str, Any]) -> str:
    """A short label for an `llm_precision` record: fp32, bf16, fp16, 8bit, 4bit."""
    q = record.get("quantization")
    if q:
        return f"{q['bits']}bit"
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[
        record.get("dtype", "float32")
    ]


# ---------------------------------------------------------------------- validation


def read_config(path: Path) -> tuple[dict[str, Any], ModelConfig]:
    """`config.json` of the dir `path` (as a dict and as `ModelConfig`), after checking
    that the dir is this model's, of this format version, and has every weights file."""
    if not path.is_dir():
        raise ModelDirError(f"model dir not found: {path}")
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise ModelDirError(f"{path}: no {CONFIG_FILE} (not an MLX model dir; convert it first)")
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelDirError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ModelDirError(f"{cfg_path}: not a JSON object")
    if meta.get("model_type") != MODEL_TYPE:
        raise ModelDirError(
            f"{cfg_path}: model_type is {meta.get('model_type')!r}, not {MODEL_TYPE!r}"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise ModelDirError(
            f"{cfg_path}: format version {meta.get('format_version')!r}, this package reads {FORMAT_VERSION}"
        )
    bad = [k for k in CONFIG_SECTIONS if not isinstance(meta.get(k), dict)]
    if not isinstance(meta.get("llm_precision", FLOAT32), dict):
        bad.append("llm_precision")
    if bad:
        raise ModelDirError(f"{cfg_path}: {', '.join(bad)} missing or not an object")
    missing = [f for f in WEIGHT_FILES if not (path / f).is_file()]
    if missing:
        raise ModelDirError(f"{path}: missing {', '.join(missing)}")
    try:
        config = ModelConfig.from_dict(meta)
    except (TypeError, ValueError) as e:
        raise ModelDirError(f"{cfg_path}: {e}") from None
    return meta, config


def read_weights(path: Path, component: str) -> dict[str, mx.array]:
    """The weights of a component, as stored."""
    file = path / weights_file(component)
    try:
        return mx.load(str(file))
    except Exception as e:  # truncated or corrupt safetensors
        raise ModelDirError(f"{file}: cannot read ({e})") from None


def _mismatch(path: Path, component: str, e: Exception) -> ModelDirError:
    return ModelDirError(f"{path / weights_file(component)}: does not match {CONFIG_FILE} ({e})")


def _bad_settings(path: Path, component: str, e: Exception) -> ModelDirError:
    return ModelDirError(f"{path / CONFIG_FILE}: bad {component} settings ({e!s})")


def _component(path: Path, component: str, build: Callable[[], nn.Module]) -> Any:
    """Build a component from its settings and load its weights into it, strictly."""
    try:
        model = build()
    except (TypeError, ValueError, KeyError) as e:
        raise _bad_settings(path, component, e) from None
    try:
        model.load_weights(list(read_weights(path, component).items()), strict=True)
    except ValueError as e:
        raise _mismatch(path, component, e) from None
    return model


# ---------------------------------------------------------------------- components


def load_llm(
    path: Path,
    meta: dict[str, Any],
    config: ModelConfig,
    dtype: str | None = None,
    bits: int | None = None,
    group_size: int = 64,
) -> tuple[Qwen2LM, dict[str, Any]]:
    """The speech LM and its precision record: the dir's own, or `dtype`/`bits` applied
    at load time (only from a float dir: quantised weights cannot be requantised)."""
    record = meta.get("llm_precision", FLOAT32)
    if (dtype is not None or bits is not None) and record.get("quantization"):
        raise ModelDirError(f"{path}: the speech LM is already quantised; convert a float dir")
    weights = read_weights(path, "llm")
    try:
        llm = Qwen2LM.from_weights(config.llm, weights, quantization=record.get("quantization"))
    except ValueError as e:  # mlx's strict load: missing, unexpected or misshapen weights
        raise _mismatch(path, "llm", e) from None
    except (TypeError, KeyError) as e:  # a setting of the wrong type, a partial quantisation record
        raise _bad_settings(path, "llm", e) from None
    if dtype is not None:
        cast(llm, dtype)
        record = {"dtype": dtype}
    if bits is not None:
        record = {**record, "quantization": quantize(llm, bits=bits, group_size=group_size)}
    return llm, record


def load_flow(path: Path, config: ModelConfig) -> CausalMaskedDiffWithXvec:
    return _component(path, "flow", lambda: CausalMaskedDiffWithXvec(config.flow))


def load_hift(path: Path, config: ModelConfig) -> HiFTGenerator:
    return _component(path, "hift", lambda: HiFTGenerator(config.hift))


def load_campplus(path: Path, meta: dict[str, Any]) -> CAMPPlus:
    return _component(
        path, "campplus", lambda: CAMPPlus(CAMPPlusConfig.from_dict(meta["campplus"]))
    )


def load_speech_tokenizer(path: Path, meta: dict[str, Any]) -> SpeechTokenizerV2:
    return _component(
        path,
        "speech_tokenizer",
        lambda: SpeechTokenizerV2(SpeechTokenizerConfig.from_dict(meta["speech_tokenizer"])),
    )


def load_text_frontend(path: Path, backend: str = "auto") -> TextFrontend:
    """The text frontend over the dir's Qwen2 tokenizer (`backend` as `TextFrontend`)."""
    try:
        tokenizer = QwenTokenizer.from_dir(path / TOKENIZER_DIR)
    except (OSError, ValueError) as e:
        raise ModelDirError(f"{path / TOKENIZER_DIR}: cannot load the tokenizer ({e})") from None
    return TextFrontend(tokenizer, backend=backend)


def speaker_store(path: Path) -> SpeakerStore:
    """The dir's saved speakers (the folder may not exist yet)."""
    return SpeakerStore(path / SPEAKERS_DIR)
