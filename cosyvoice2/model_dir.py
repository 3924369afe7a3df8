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

`CosyVoice2.load` also reads the dirs of mlx-audio-plus 0.1.x (mlx-community's
CosyVoice2-0.5B-4bit/-8bit/-fp16...): `read_config` tells them by their config.json
and `model.safetensors`, and every loader below reads them through
`cosyvoice2.mlx_audio_plus` (`docs/mlx-community-weights.md` says what they lack).

What a loaded model holds: the speech LM without its text embedding, which is read from
`llm.safetensors` row by row (`MappedEmbedding`, where the dir's own precision is used);
the flow and HiFT; CAM++ and the speech tokenizer built and checked against their files
but read on first use (`Deferred`: only a new prompt wav needs them).

Every problem with a dir is a `ModelDirError` whose one-line message names the
file and what is wrong with it. The files are read as untrusted data: `config.json`
and the safetensors headers have size caps checked before they are read, every
setting is checked for its type and against a cap before any part is built (a
layer count of a billion would otherwise build a billion layers), and every tensor
a safetensors header declares must lie inside the file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
import threading
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

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
QUANT_BITS = (2, 3, 4, 5, 6, 8)  # mlx's affine quantisation
QUANT_GROUP_SIZES = (32, 64, 128)

# Caps on what the files may declare, checked before anything is read or built.
MAX_CONFIG_BYTES = 16 * 2**20  # config.json (a few kB in practice)
MAX_SAFETENSORS_HEADER_BYTES = 100 * 2**20  # the JSON header of a weights file
MAX_COUNT = 4096  # a count setting: layers, blocks, heads, harmonics, FSQ levels
MAX_SIZE = 2**20  # any other integer setting: widths, vocabularies, rates, kernel sizes
MAX_ITEMS = 64  # the items of a list setting
MAX_TEXT = 256  # the characters of a string setting
_COUNT_SETTING = re.compile(r"^(num|n|nb|fsq)_|_(blocks|layers|heads)$")
_MAY_BE_NEGATIVE = frozenset({"num_decoding_left_chunks"})  # -1: all left chunks
# safetensors dtypes and their sizes in bytes
SAFETENSORS_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2,
    "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip


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
    size = cfg_path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ModelDirError(
            f"{cfg_path}: {size} bytes, more than a config file may hold ({MAX_CONFIG_BYTES})"
        )
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelDirError(f"{cfg_path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ModelDirError(f"{cfg_path}: not valid JSON (nested too deeply)") from None
    if not isinstance(meta, dict):
        raise ModelDirError(f"{cfg_path}: not a JSON object")
    from cosyvoice2 import mlx_audio_plus

    if mlx_audio_plus.is_layout(path, meta) and not (path / weights_file("llm")).is_file():
        return _read_mlx_audio_plus(path, meta)
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
    _check_config(path, config)
    try:
        _check_precision(meta.get("llm_precision", FLOAT32))
    except ValueError as e:
        raise _bad_settings(path, "llm", e) from None
    return meta, config


def _check_config(path: Path, config: ModelConfig) -> None:
    """Every setting of `config` of its type and within the caps, before anything is built."""
    cfg_path = path / CONFIG_FILE
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        try:
            if dataclasses.is_dataclass(value):
                check_settings(value, f.name)
            else:
                _check_value(value, typing.get_type_hints(ModelConfig)[f.name], f.name)
        except ValueError as e:
            if dataclasses.is_dataclass(value):
                raise _bad_settings(path, f.name, e) from None
            raise ModelDirError(f"{cfg_path}: {e}") from None


def _is_mlx_audio_plus(path: Path) -> bool:
    """A dir `read_config` read as mlx-audio-plus's (one `model.safetensors`, none of ours)."""
    from cosyvoice2 import mlx_audio_plus

    return (path / mlx_audio_plus.WEIGHTS_FILE).is_file() and not (
        path / weights_file("llm")
    ).is_file()


def _read_mlx_audio_plus(path: Path, theirs: dict[str, Any]) -> tuple[dict[str, Any], ModelConfig]:
    """`read_config` of an mlx-audio-plus dir: its config.json translated (strictly) to ours,
    and its `model.safetensors` header checked: every tensor inside the file, under a known
    component, of the dtype config.json says."""
    from cosyvoice2 import mlx_audio_plus as layout

    cfg_path = path / CONFIG_FILE
    try:
        cfg, record = layout.translate(theirs)
        config = ModelConfig.from_dict(cfg)
    except (TypeError, ValueError) as e:
        raise ModelDirError(
            f"{cfg_path}: not an mlx-audio-plus config ({_first_line(e)})"
        ) from None
    _check_config(path, config)
    file = path / layout.WEIGHTS_FILE
    try:
        header = check_safetensors(file)
        names = [k for k in header if k != "__metadata__"]
        layout.check_names(names)
    except (OSError, ValueError) as e:
        raise ModelDirError(f"{file}: cannot read ({_first_line(e)})") from None
    want = layout.STORED_DTYPE[theirs.get("dtype", "float16")]
    for name in names:
        dtype = header[name]["dtype"]
        quantised = record.get("quantization") and dtype == "U32" and name.endswith(".weight")
        if dtype != want and not quantised and not name.startswith("campplus."):
            raise ModelDirError(
                f"{file}: tensor {name[:60]!r} is {dtype}, config.json's dtype says {want}"
            )
    meta = {
        "model_type": MODEL_TYPE,
        "layout": layout.LAYOUT,
        "weights": "unknown",
        **config.to_dict(),
        "llm_precision": record,
        "mlx_audio_plus": {
            "dtype": theirs.get("dtype", "float16"),
            "campplus": any(n.startswith("campplus.") for n in names),
        },
    }
    return meta, config


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_value(value: object, hint: Any, where: str) -> None:
    """`value` is of type `hint` (int, float, bool, str, a tuple of them or a settings
    dataclass) and within the caps; a ValueError naming `where` otherwise."""
    name = re.sub(r"(\[\d+\])+$", "", where).rsplit(".", 1)[-1]
    if dataclasses.is_dataclass(hint):
        if not dataclasses.is_dataclass(value):
            raise ValueError(f"`{where}` must be an object, got {_show(value)}")
        check_settings(value, where)
    elif typing.get_origin(hint) is tuple:
        if not isinstance(value, (tuple, list)) or len(value) > MAX_ITEMS:
            raise ValueError(
                f"`{where}` must be a list of at most {MAX_ITEMS} items, got {_show(value)}"
            )
        args = typing.get_args(hint)
        items = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(items) != len(value):
            raise ValueError(f"`{where}` must have {len(items)} items, got {_show(value)}")
        for i, (item, item_hint) in enumerate(zip(value, items)):
            _check_value(item, item_hint, f"{where}[{i}]")
    elif hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"`{where}` must be true or false, got {_show(value)}")
    elif hint is int:
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise ValueError(f"`{where}` must be an integer, got {_show(value)}")
        low = -1 if name in _MAY_BE_NEGATIVE else 0
        high = MAX_COUNT if _COUNT_SETTING.search(name) else MAX_SIZE
        if not low <= value <= high:
            raise ValueError(f"`{where}` is {_show(value)}, outside {low}..{high}")
    elif hint is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if not ok or not math.isfinite(value):
            raise ValueError(f"`{where}` must be a finite number, got {_show(value)}")
    elif hint is str:
        if not isinstance(value, str) or len(value) > MAX_TEXT:
            raise ValueError(
                f"`{where}` must be a string of at most {MAX_TEXT} characters, got {_show(value)}"
            )


def check_settings(settings: Any, where: str) -> None:
    """Check every field of a settings dataclass (`ModelConfig`'s sections,
    `CAMPPlusConfig`, `SpeechTokenizerConfig`) for its type and caps; a ValueError
    naming the first bad field (`where.field`) otherwise."""
    hints = typing.get_type_hints(type(settings))
    for f in dataclasses.fields(settings):
        _check_value(getattr(settings, f.name), hints[f.name], f"{where}.{f.name}")


def _check_precision(record: dict[str, Any]) -> None:
    """The `llm_precision` record: a known dtype and, when quantised, mlx's bits and group size."""
    dtype = record.get("dtype", "float32")
    if dtype not in LLM_DTYPES:
        raise ValueError(
            f"`llm_precision.dtype` must be one of {', '.join(LLM_DTYPES)}, got {_show(dtype)}"
        )
    q = record.get("quantization")
    if not q:
        return
    if not isinstance(q, dict):
        raise ValueError(f"`llm_precision.quantization` must be an object, got {_show(q)}")
    for key, allowed in (("bits", QUANT_BITS), ("group_size", QUANT_GROUP_SIZES)):
        value = q.get(key)
        if isinstance(value, bool) or value not in allowed:
            raise ValueError(
                f"`llm_precision.quantization.{key}` must be one of "
                f"{', '.join(map(str, allowed))}, got {_show(value)}"
            )


def check_safetensors(file: Path) -> dict[str, Any]:
    """Check a safetensors file's header before it is read: a declared header length
    within the file and `MAX_SAFETENSORS_HEADER_BYTES`, a JSON object, and for every
    tensor a known dtype, a shape and a byte range that matches the shape and lies
    inside the file. A ValueError says what is wrong; the header is returned."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{size} bytes, too short for a safetensors file")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise ValueError(f"the header declares {n} bytes, the file has {size} (truncated?)")
        if n > MAX_SAFETENSORS_HEADER_BYTES:
            raise ValueError(
                f"the header declares {n} bytes, more than {MAX_SAFETENSORS_HEADER_BYTES}"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ValueError("the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    data_size = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise ValueError(f"tensor {_show(name)}: not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        itemsize = SAFETENSORS_DTYPES.get(dtype) if isinstance(dtype, str) else None
        if itemsize is None:
            raise ValueError(f"tensor {_show(name)}: unknown dtype {_show(dtype)}")
        ints = isinstance(shape, list) and all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        )
        if not ints:
            raise ValueError(f"tensor {_show(name)}: bad shape {_show(shape)}")
        ok = (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        )
        if not ok or not 0 <= offsets[0] <= offsets[1] <= data_size:
            raise ValueError(
                f"tensor {_show(name)}: data {_show(offsets)} not inside the file's "
                f"{data_size} data bytes (truncated?)"
            )
        if offsets[1] - offsets[0] != math.prod(shape) * itemsize:
            raise ValueError(
                f"tensor {_show(name)}: {offsets[1] - offsets[0]} bytes for shape {shape} of {dtype}"
            )
    return header


def read_weights(path: Path, component: str) -> dict[str, mx.array]:
    """The weights of a component, as stored (under our names), after `check_safetensors`."""
    file = _file_of(path, component)
    try:
        check_safetensors(file)
        weights = mx.load(str(file))
    except Exception as e:  # truncated or corrupt safetensors
        raise ModelDirError(f"{file}: cannot read ({_first_line(e)})") from None
    if file.name == weights_file(component):
        return weights
    from cosyvoice2 import mlx_audio_plus

    return mlx_audio_plus.component_weights(weights, component)


def _file_of(path: Path, component: str) -> Path:
    """The file that holds a component's weights (mlx-audio-plus: one file for all)."""
    if _is_mlx_audio_plus(path):
        from cosyvoice2 import mlx_audio_plus

        return path / mlx_audio_plus.WEIGHTS_FILE
    return path / weights_file(component)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _mismatch(path: Path, component: str, e: Exception) -> ModelDirError:
    return ModelDirError(
        f"{_file_of(path, component)}: does not match {CONFIG_FILE} ({_first_line(e)})"
    )


def _bad_settings(path: Path, component: str, e: Exception) -> ModelDirError:
    return ModelDirError(f"{path / CONFIG_FILE}: bad {component} settings ({_first_line(e)})")


def _component(
    path: Path, component: str, build: Callable[[], nn.Module], deferred: bool = False
) -> Any:
    """Build a component from its settings and load its weights into it, strictly.

    `deferred`: check the weights file's header against the built module (every name and
    shape, as the strict load would) and return a `Deferred` that reads the weights on
    first use: a dir that cannot serve the component still fails here, and a call that
    never needs it never holds its weights.
    """
    try:
        model = build()
    except (TypeError, ValueError, KeyError, ArithmeticError) as e:
        raise _bad_settings(path, component, e) from None
    if deferred:
        file = _file_of(path, component)
        try:
            header = check_safetensors(file)
        except Exception as e:
            raise ModelDirError(f"{file}: cannot read ({_first_line(e)})") from None
        try:
            _check_declared(model, header)
        except ValueError as e:
            raise _mismatch(path, component, e) from None
        return Deferred(path, component, model)
    try:
        model.load_weights(list(read_weights(path, component).items()), strict=True)
    except ValueError as e:
        raise _mismatch(path, component, e) from None
    if _is_mlx_audio_plus(path):  # stored in the one dtype of the whole file
        model.set_dtype(mx.float32)
    return model


def _check_declared(model: nn.Module, header: dict[str, Any]) -> None:
    """The tensors a safetensors header declares are the module's parameters, shape for shape."""
    want = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    have = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    missing = sorted(set(want) - set(have))
    if missing:
        raise ValueError(f"missing parameters: {', '.join(missing[:5])}")
    extra = sorted(set(have) - set(want))
    if extra:
        raise ValueError(f"parameters not in the model: {', '.join(extra[:5])}")
    for k in sorted(want):
        if want[k] != have[k]:
            raise ValueError(f"expected shape {want[k]} but the file has {have[k]} for {k}")


class Deferred:
    """A component built and checked at load whose weights are read on first use (`get`).

    The prompt side (CAM++, the speech tokenizer: about a sixth of the model's bytes) is
    needed only to turn a new prompt wav into a speaker; a call with a saved or prepared
    speaker never reads it. `get` is thread-safe and loads once.
    """

    def __init__(self, path: Path, component: str, module: nn.Module):
        self.path, self.component, self.module = path, component, module
        self.loaded = False
        self._lock = threading.Lock()

    def get(self) -> nn.Module:
        with self._lock:
            if not self.loaded:
                weights = read_weights(self.path, self.component)
                try:
                    self.module.load_weights(list(weights.items()), strict=True)
                except ValueError as e:  # the file changed since load
                    raise _mismatch(self.path, self.component, e) from None
                mx.eval(self.module.parameters())
                self.loaded = True
        return self.module


def ready(component: Any) -> Any:
    """A component itself, its weights read first if it is `Deferred`."""
    return component.get() if isinstance(component, Deferred) else component


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
    if meta.get("layout") is not None:
        from cosyvoice2 import mlx_audio_plus

        try:
            mlx_audio_plus.check_quantised(weights, record)
        except ValueError as e:
            raise _mismatch(path, "llm", e) from None
    quantization = record.get("quantization")
    text_embedding = None
    if dtype is None and bits is None and meta.get("layout") is None:
        text_embedding = _mapped_text_embedding(path, weights, quantization)
    try:
        llm = Qwen2LM.from_weights(
            config.llm, weights, quantization=quantization, text_embedding=text_embedding
        )
    except ValueError as e:  # mlx's strict load: missing, unexpected or misshapen weights
        raise _mismatch(path, "llm", e) from None
    except (TypeError, KeyError, ArithmeticError) as e:  # a setting the checks let through
        raise _bad_settings(path, "llm", e) from None
    if dtype is not None:
        cast(llm, dtype)
        record = {"dtype": dtype}
    if bits is not None:
        record = {**record, "quantization": quantize(llm, bits=bits, group_size=group_size)}
    return llm, record


def _mapped_text_embedding(
    path: Path, weights: dict[str, mx.array], quantization: dict[str, Any] | None
) -> nn.Module | None:
    """The text embedding as a `MappedEmbedding` of `llm.safetensors`, its tensors taken out
    of `weights` (which `mx.load` has not read: they are never read whole). None where the
    stored table is not one it can map (then it loads with the rest)."""
    from cosyvoice2.mapped_embedding import MappedEmbedding

    prefix = "llm.embed_tokens"
    file = _file_of(path, "llm")
    header = check_safetensors(file)  # read_weights checked it: the header again, small
    names = [f"{prefix}.{n}" for n in ("weight", "scales", "biases")]
    quantised = names[1] in header
    try:
        table = MappedEmbedding(
            file,
            header,
            prefix,
            quantization["group_size"] if quantised and quantization else None,
            quantization["bits"] if quantised and quantization else None,
        )
    except (KeyError, ValueError):
        return None
    for n in names:
        weights.pop(n, None)
    return table


def load_flow(path: Path, config: ModelConfig) -> CausalMaskedDiffWithXvec:
    return _component(path, "flow", lambda: CausalMaskedDiffWithXvec(config.flow))


def load_hift(path: Path, config: ModelConfig) -> HiFTGenerator:
    return _component(path, "hift", lambda: HiFTGenerator(config.hift))


def _checked(settings: Any, where: str) -> Any:
    check_settings(settings, where)
    return settings


def _missing(path: Path, part: str, why: str) -> nn.Module:
    from cosyvoice2 import mlx_audio_plus

    return mlx_audio_plus.Missing(
        ModelDirError(
            f"{path}: no {part} ({why}); a prompt wav needs it: use saved speakers, or a dir"
            " converted from the official files by `cosyvoice2 convert`"
        )
    )


def load_campplus(path: Path, meta: dict[str, Any]) -> CAMPPlus:
    if meta.get("layout") is not None:
        has = meta.get("mlx_audio_plus", {}).get("campplus")
        why = (
            "its campplus.* tensors are not CosyVoice2's CAM++ layout"
            if has
            else "none in model.safetensors"
        )
        return _missing(path, "CAM++ speaker encoder", f"mlx-audio-plus dir, {why}")
    return _component(
        path,
        "campplus",
        lambda: CAMPPlus(_checked(CAMPPlusConfig.from_dict(meta["campplus"]), "campplus")),
        deferred=True,
    )


def load_speech_tokenizer(path: Path, meta: dict[str, Any]) -> SpeechTokenizerV2:
    if meta.get("layout") is not None:
        return _missing(path, "speech tokenizer", "mlx-audio-plus dirs have none")
    return _component(
        path,
        "speech_tokenizer",
        lambda: SpeechTokenizerV2(
            _checked(SpeechTokenizerConfig.from_dict(meta["speech_tokenizer"]), "speech_tokenizer")
        ),
        deferred=True,
    )


def load_text_frontend(path: Path, backend: str = "auto") -> TextFrontend:
    """The text frontend over the dir's Qwen2 tokenizer (`backend` as `TextFrontend`)."""
    token_dir = path if _is_mlx_audio_plus(path) else path / TOKENIZER_DIR
    try:
        tokenizer = QwenTokenizer.from_dir(token_dir)
    except (OSError, ValueError, CosyVoiceError) as e:
        # the inner message names the file: shorten its path to the name inside the folder
        reason = _first_line(e).replace(f"{token_dir}/", "")
        raise ModelDirError(f"{token_dir}: cannot load the tokenizer ({reason})") from None
    return TextFrontend(tokenizer, backend=backend)


def speaker_store(path: Path) -> SpeakerStore:
    """The dir's saved speakers (the folder may not exist yet)."""
    return SpeakerStore(path / SPEAKERS_DIR)
