"""The model dirs of mlx-audio-plus 0.1.x (mlx-community's CosyVoice2-0.5B-4bit/-8bit/-fp16...).

mlx-audio-plus's converter (`mlx_audio.tts.models.cosyvoice2.scripts.convert`) writes:

    config.json            {"model_type": "cosyvoice2", "version": "0.5B", "sample_rate",
                           "mel_channels", "speech_token_size", "dtype"} and, when it
                           quantised, {"quantization": {"bits", "group_size",
                           "quantized_components": ["tokenizer/model.layers"]}}
    model.safetensors      every component in one file: `llm.` (the speech layers),
                           `qwen2.` (the Qwen2 backbone, `qwen2.model.*`, plus the unused
                           tied `qwen2.lm_head.weight` when not quantised), `flow.`, `hift.`
                           and, when it could fetch it, `campplus.`
    tokenizer.json         the Qwen2 BPE (`tokenizer_config.json` beside it; or, when
                           transformers failed, `vocab.json` + `merges.txt`)

Its config.json has no module shapes: its loader uses the 0.5B shapes unless the
`llm`, `flow` (with `encoder`/`decoder`) and `hifigan` (or `hift`) sections of its
`CosyVoice2Config` are present; the Qwen2 shapes come from its `llm` section's
Qwen2 fields. This module reads that schema, strictly: an unknown key, an unknown
quantisation or a tensor outside the known prefixes is a `ModelDirError`.

Tensor names are the official ones apart from a few renames (module lists written
`encoders_0` for `encoders.0`, the estimator's blocks by role, HiFT's `condnet_0`), which
`rename` undoes. What that converter writes differs from ours in content too
(`docs/mlx-community-weights.md`): one dtype for all components (bfloat16 stored as
float16), HiFT's weight norm folded with an epsilon, only the backbone's
decoder-layer projections quantised, no speech tokenizer, and a CAM++ of another
layout or none. The flow and HiFT are loaded in float32 (their stored values),
the speech LM at its stored precision. Without a speech tokenizer or CAM++ the
modes that take a prompt wav raise a `ModelDirError` naming what is missing; saved
speakers still work.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

LAYOUT = "mlx-audio-plus"
WEIGHTS_FILE = "model.safetensors"
VERSION = "0.5B"
DTYPES = ("float32", "float16", "bfloat16")
STORED_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "F16"}  # bf16 is stored as fp16
QUANT_BITS = (4, 8)  # what its converter offers
QUANTIZED_COMPONENTS = ["tokenizer/model.layers"]
TOP_KEYS = frozenset(
    {
        "model_type",
        "version",
        "sample_rate",
        "mel_channels",
        "speech_token_size",
        "dtype",
        "quantization",
        "llm",
        "flow",
        "hifigan",
        "hift",
    }
)
PREFIXES = ("llm.", "qwen2.", "flow.", "hift.", "campplus.")
UNUSED = frozenset({"qwen2.lm_head.weight"})  # Qwen2's output head, tied to the embedding

# Its `CosyVoice2Config` sections -> `ModelConfig` paths (only the fields its schema has).
_LLM = {
    "llm_input_size": "llm_input_size",
    "llm_output_size": "llm_output_size",
    "speech_token_size": "speech_token_size",
    "mix_ratio": "mix_ratio",
    "hidden_size": "qwen.hidden_size",
    "num_hidden_layers": "qwen.num_hidden_layers",
    "intermediate_size": "qwen.intermediate_size",
    "num_attention_heads": "qwen.num_attention_heads",
    "num_key_value_heads": "qwen.num_key_value_heads",
    "rms_norm_eps": "qwen.rms_norm_eps",
    "vocab_size": "qwen.vocab_size",
}
_FLOW = {
    "input_size": "input_size",
    "output_size": "output_size",
    "spk_embed_dim": "spk_embed_dim",
    "vocab_size": "vocab_size",
    "input_frame_rate": "input_frame_rate",
    "token_mel_ratio": "token_mel_ratio",
    "pre_lookahead_len": "pre_lookahead_len",
    "cfm_in_channels": "decoder.in_channels",
    "cfm_sigma_min": "decoder.sigma_min",
    "cfm_t_scheduler": "decoder.t_scheduler",
    "cfm_inference_cfg_rate": "decoder.inference_cfg_rate",
    **{
        f"encoder_{k}": f"encoder.{k}"
        for k in (
            "input_size",
            "output_size",
            "attention_heads",
            "linear_units",
            "num_blocks",
            "num_up_blocks",
            "normalize_before",
            "static_chunk_size",
            "upsample_stride",
            "pos_enc_layer_type",
        )
    },
    **{
        f"decoder_{k}": f"decoder.estimator.{k}"
        for k in (
            "in_channels",
            "channels",
            "attention_head_dim",
            "n_blocks",
            "num_mid_blocks",
            "num_heads",
            "act_fn",
            "static_chunk_size",
            "num_decoding_left_chunks",
        )
    },
    "decoder_out_channel": "decoder.estimator.out_channels",
}
# Its fields that change nothing at inference here (dropouts, fixed choices, defaults of a call).
_FLOW_IGNORED = frozenset(
    {
        "output_type",
        "only_mask_loss",
        "n_timesteps",
        "encoder_dropout_rate",
        "encoder_positional_dropout_rate",
        "encoder_attention_dropout_rate",
        "encoder_macaron_style",
        "encoder_use_cnn_module",
        "encoder_cnn_module_kernel",
        "encoder_causal",
        "decoder_dropout",
    }
)
_HIFT = {
    k: k
    for k in (
        "in_channels",
        "base_channels",
        "nb_harmonics",
        "sampling_rate",
        "nsf_alpha",
        "nsf_sigma",
        "nsf_voiced_threshold",
        "upsample_rates",
        "upsample_kernel_sizes",
        "istft_n_fft",
        "istft_hop_len",
        "resblock_kernel_sizes",
        "resblock_dilation_sizes",
        "source_resblock_kernel_sizes",
        "source_resblock_dilation_sizes",
    )
}
_HIFT_IGNORED = frozenset({"use_interpolation"})


def is_layout(path: Path, meta: dict[str, Any]) -> bool:
    """A dir of this layout: a `cosyvoice2` config without our `format_version`, and `model.safetensors`."""
    return (
        meta.get("model_type") == "cosyvoice2"
        and "format_version" not in meta
        and (path / WEIGHTS_FILE).is_file()
    )


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[last] = value


def _section(meta: dict[str, Any], key: str) -> dict[str, Any]:
    value = meta.get(key, {})
    if not isinstance(value, dict):
        raise ValueError(f"`{key}` must be an object")
    return value


def _flat_flow(flow: dict[str, Any]) -> dict[str, Any]:
    """Its `flow` section with nested `encoder`/`decoder` flattened as its loader does."""
    out: dict[str, Any] = {}
    for k, v in flow.items():
        if k in ("encoder", "decoder") and isinstance(v, dict):
            for sub, sv in v.items():
                name = (
                    "decoder_out_channel"
                    if (k, sub) == ("decoder", "out_channels")
                    else f"{k}_{sub}"
                )
                out[name] = sv
        else:
            out[k] = v
    return out


def _mapped(section: dict[str, Any], table: dict[str, str], ignored: frozenset, where: str,
            tree: dict[str, Any]) -> None:  # fmt: skip
    for k, v in section.items():
        if k in ignored:
            continue
        if k not in table:
            raise ValueError(f"unknown setting `{where}.{k}`")
        _set(tree, table[k], v)


def translate(meta: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Its `config.json` -> (our `ModelConfig` dict, our `llm_precision` record).

    A ValueError names the first key or value that this layout does not have."""
    unknown = sorted(set(meta) - TOP_KEYS)
    if unknown:
        raise ValueError(f"unknown key `{unknown[0]}`")
    if meta.get("version") != VERSION:
        raise ValueError(f"`version` is {meta.get('version')!r}, not {VERSION!r}")
    dtype = meta.get("dtype", "float16")
    if dtype not in DTYPES:
        raise ValueError(f"`dtype` must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if "hifigan" in meta and "hift" in meta:
        raise ValueError("both `hifigan` and `hift` sections")
    cfg: dict[str, Any] = {}
    _mapped(_section(meta, "llm"), _LLM, frozenset(), "llm", cfg.setdefault("llm", {}))
    flow = _flat_flow(_section(meta, "flow"))
    _mapped(flow, _FLOW, _FLOW_IGNORED, "flow", cfg.setdefault("flow", {}))
    hift = _section(meta, "hifigan" if "hifigan" in meta else "hift")
    _mapped(hift, _HIFT, _HIFT_IGNORED, "hifigan", cfg.setdefault("hift", {}))
    # what its HiFT builds from these (its F0 predictor: in_channels and base_channels wide)
    h = cfg["hift"]
    h.setdefault("sampling_rate", meta.get("sample_rate", 24000))
    if "base_channels" in h:
        h["f0_cond_channels"] = h["base_channels"]
    if "in_channels" in h:
        h["f0_in_channels"] = h["in_channels"]
    cfg["sample_rate"] = meta.get("sample_rate", 24000)
    if cfg["sample_rate"] != h["sampling_rate"]:
        raise ValueError(
            f"`sample_rate` {cfg['sample_rate']!r} is not `hifigan.sampling_rate` {h['sampling_rate']!r}"
        )
    # a model of other shapes than the tiny/0.5B the sections say is another model
    llm_tokens = cfg["llm"].get("speech_token_size", 6561)
    if meta.get("speech_token_size", 6561) != llm_tokens:
        raise ValueError(
            f"`speech_token_size` {meta.get('speech_token_size')!r} is not `llm.speech_token_size` {llm_tokens!r}"
        )
    if meta.get("mel_channels", 80) != cfg["flow"].get("output_size", 80):
        raise ValueError(
            f"`mel_channels` {meta.get('mel_channels')!r} is not the flow's output size"
        )
    record: dict[str, Any] = {"dtype": "float32" if dtype == "float32" else "float16"}
    q = meta.get("quantization")
    if q is not None:
        if not isinstance(q, dict) or set(q) - {"bits", "group_size", "quantized_components"}:
            raise ValueError(f"unknown quantisation {q!r:.60}")
        bits, group = q.get("bits"), q.get("group_size")
        if isinstance(bits, bool) or bits not in QUANT_BITS:
            raise ValueError(f"`quantization.bits` must be 4 or 8, got {bits!r:.40}")
        if isinstance(group, bool) or group not in (32, 64, 128):
            raise ValueError(f"`quantization.group_size` must be 32, 64 or 128, got {group!r:.40}")
        if q.get("quantized_components", QUANTIZED_COMPONENTS) != QUANTIZED_COMPONENTS:
            raise ValueError(
                f"unknown quantisation: quantized_components {q.get('quantized_components')!r:.60}"
            )
        record["quantization"] = {"group_size": group, "bits": bits}
    return cfg, record


# ---------------------------------------------------------------------- tensor names

_FLOW_RENAMES = [
    (re.compile(r"^encoder\.(up_)?embed\.linear\."), r"encoder.\1embed.out.0."),
    (re.compile(r"^encoder\.(up_)?embed\.norm\."), r"encoder.\1embed.out.1."),
    (re.compile(r"^encoder\.(up_)?encoders_(\d+)\."), r"encoder.\1encoders.\2."),
    (re.compile(r"\.(down|mid|up)_blocks_(\d+)\."), r".\1_blocks.\2."),
    (re.compile(r"(_blocks\.\d+)\.resnet\."), r"\1.0."),
    (re.compile(r"(_blocks\.\d+)\.transformer_(\d+)\."), r"\1.1.\2."),
    (re.compile(r"(down_blocks\.\d+)\.downsample\.conv\."), r"\1.2."),
    (re.compile(r"(up_blocks\.\d+)\.upsample\.conv\."), r"\1.2."),
    (re.compile(r"\.(block1|block2|final_block)\.conv\.conv\."), r".\1.block.0."),
    (re.compile(r"\.(block1|block2|final_block)\.norm\."), r".\1.block.2."),
    (re.compile(r"\.mlp_linear\."), ".mlp.1."),
    (re.compile(r"\.attn\.query_proj\."), ".attn1.to_q."),
    (re.compile(r"\.attn\.key_proj\."), ".attn1.to_k."),
    (re.compile(r"\.attn\.value_proj\."), ".attn1.to_v."),
    (re.compile(r"\.attn\.out_proj\."), ".attn1.to_out.0."),
    (re.compile(r"\.ff\.layers\.0\."), ".ff.net.0.proj."),
    (re.compile(r"\.ff\.layers\.1\."), ".ff.net.2."),
]
_HIFT_RENAMES = [(re.compile(r"\.condnet_(\d+)\."), r".condnet.\1.")]


def rename(component: str, key: str) -> str:
    """A tensor name of `model.safetensors`, without its component prefix, as ours."""
    if component == "llm":
        if key.startswith("qwen2.model."):
            return "llm." + key[len("qwen2.model.") :]
        return key[len("llm.") :]
    rules = _FLOW_RENAMES if component == "flow" else _HIFT_RENAMES
    key = key[len(component) + 1 :]
    for pattern, repl in rules:
        key = pattern.sub(repl, key)
    return key


def check_names(names: list[str]) -> None:
    """Every tensor of the file under a known prefix; a ValueError names the first that is not."""
    for name in names:
        if not name.startswith(PREFIXES):
            raise ValueError(f"tensor {name[:60]!r} belongs to no component of this layout")


def component_weights(weights: dict[str, mx.array], component: str) -> dict[str, mx.array]:
    """The tensors of `component` (`llm`, `flow`, `hift`) under our names."""
    prefixes = ("llm.", "qwen2.") if component == "llm" else (f"{component}.",)
    return {
        rename(component, k): v
        for k, v in weights.items()
        if k.startswith(prefixes) and k not in UNUSED
    }


def check_quantised(weights: dict[str, mx.array], record: dict[str, Any]) -> None:
    """The quantised modules are exactly what its converter quantises: the Linear layers of
    the backbone's decoder layers (`llm.layers.*`), and only with `quantization` set."""
    quantised = sorted(k[: -len(".scales")] for k in weights if k.endswith(".scales"))
    if quantised and not record.get("quantization"):
        raise ValueError(f"{quantised[0]} is quantised but config.json has no `quantization`")
    if record.get("quantization") and not quantised:
        raise ValueError("config.json has `quantization` but no tensor is quantised")
    for name in quantised:
        if not re.fullmatch(r"llm\.layers\.\d+\.(self_attn|mlp)\.\w+_proj", name):
            raise ValueError(f"unknown quantisation: {name} is quantised")


class Missing(nn.Module):
    """A part the dir does not have (its speech tokenizer, or a CAM++ we can read): no weights;
    using it raises a `ModelDirError` that names the part and what needs it."""

    def __init__(self, error: Exception):
        super().__init__()
        self._error = error

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise self._error

    @property
    def config(self) -> Any:
        raise self._error
