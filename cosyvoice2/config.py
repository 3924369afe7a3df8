"""Hyperparameters of every part, as frozen dataclasses: the one source of truth.

Built either from the official `cosyvoice2.yaml` (via `cosyvoice2.official_yaml`,
read as data) plus `CosyVoice-BlankEN/config.json`, or from the MLX model dir's
`config.json` (written by the converter with `ModelConfig.to_dict`). Field names
follow the official constructor arguments so the two read side by side.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The files of an official CosyVoice2 model dir that the converter reads (the release and
# fine-tunes saved like it); `cosyvoice2.convert` checks them, `cosyvoice2.hub` downloads them.
OFFICIAL_FILES = (
    "cosyvoice2.yaml",
    "llm.pt",
    "flow.pt",
    "hift.pt",
    "campplus.onnx",
    "speech_tokenizer_v2.onnx",
    "CosyVoice-BlankEN/vocab.json",
    "CosyVoice-BlankEN/merges.txt",
    "CosyVoice-BlankEN/config.json",
)


def _build(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Construct dataclass `cls` from a dict, recursing into nested dataclasses, ignoring
    unknown keys; a nested section that is not an object is a ValueError naming it."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint) and not isinstance(value, hint):
            if not isinstance(value, dict):
                raise ValueError(f"`{where}{f.name}` is {type(value).__name__}, not an object")
            value = _build(hint, value, f"{where}{f.name}.")
        elif typing.get_origin(hint) is tuple and isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        kwargs[f.name] = value
    return cls(**kwargs)


class _Config:
    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        return _build(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


@dataclass(frozen=True)
class SamplingConfig(_Config):
    """Repetition-aware sampling (`ras_sampling`) settings."""

    top_p: float = 0.8
    top_k: int = 25
    win_size: int = 10
    tau_r: float = 0.1


@dataclass(frozen=True)
class QwenConfig(_Config):
    """The Qwen2 backbone (`CosyVoice-BlankEN/config.json`), in mlx_lm `qwen2.ModelArgs` names."""

    hidden_size: int = 896
    num_hidden_layers: int = 24
    intermediate_size: int = 4864
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-6
    vocab_size: int = 151936
    rope_theta: float = 1000000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True
    model_type: str = "qwen2"


@dataclass(frozen=True)
class LLMConfig(_Config):
    """`cosyvoice.llm.llm.Qwen2LM`."""

    llm_input_size: int = 896
    llm_output_size: int = 896
    speech_token_size: int = 6561
    mix_ratio: tuple[int, int] = (5, 15)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    qwen: QwenConfig = field(default_factory=QwenConfig)


@dataclass(frozen=True)
class TransformerEncoderConfig(_Config):
    """A `cosyvoice.transformer.encoder` encoder of the first generation: the speech LM's text
    encoder and the flow's encoder (`ConformerEncoder`, `input_layer: linear`, SiLU
    feed-forward) or the speech LM (`TransformerEncoder`, `input_layer: linear_legacy`, ReLU
    feed-forward); rel-pos self-attention, pre-norm. `static_chunk_size` 1 makes the
    attention causal (the speech LM's encoders), 0 full (the flow's)."""

    input_size: int = 512
    output_size: int = 1024
    attention_heads: int = 16
    linear_units: int = 4096
    num_blocks: int = 6
    static_chunk_size: int = 0


@dataclass(frozen=True)
class TransformerLMConfig(_Config):
    """`cosyvoice.llm.llm.TransformerLM` (CosyVoice-300M, -SFT, -Instruct, -25Hz)."""

    text_encoder_input_size: int = 512
    llm_input_size: int = 1024
    llm_output_size: int = 1024
    text_token_size: int = 60515
    speech_token_size: int = 4096
    spk_embed_dim: int = 192
    text_encoder: TransformerEncoderConfig = field(
        default_factory=lambda: TransformerEncoderConfig(static_chunk_size=1)
    )
    llm: TransformerEncoderConfig = field(
        default_factory=lambda: TransformerEncoderConfig(
            input_size=1024, output_size=1024, num_blocks=14, static_chunk_size=1
        )
    )
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


@dataclass(frozen=True)
class EncoderConfig(_Config):
    """`UpsampleConformerEncoder` (rel-pos self-attention, no conv module, pre-norm)."""

    input_size: int = 512
    output_size: int = 512
    attention_heads: int = 8
    linear_units: int = 2048
    num_blocks: int = 6
    num_up_blocks: int = 4
    normalize_before: bool = True
    static_chunk_size: int = 25
    upsample_stride: int = 2
    pos_enc_layer_type: str = "rel_pos_espnet"
    selfattention_layer_type: str = "rel_selfattn"


@dataclass(frozen=True)
class EstimatorConfig(_Config):
    """`CausalConditionalDecoder`, the U-Net that predicts the CFM velocity."""

    in_channels: int = 320
    out_channels: int = 80
    channels: tuple[int, ...] = (256,)
    attention_head_dim: int = 64
    n_blocks: int = 4
    num_mid_blocks: int = 12
    num_heads: int = 8
    act_fn: str = "gelu"
    static_chunk_size: int = 50
    num_decoding_left_chunks: int = -1


@dataclass(frozen=True)
class CFMConfig(_Config):
    """`CausalConditionalCFM`: Euler solver with a cosine time schedule and classifier-free guidance."""

    in_channels: int = 240
    n_spks: int = 1
    spk_emb_dim: int = 80
    sigma_min: float = 1e-6
    t_scheduler: str = "cosine"
    inference_cfg_rate: float = 0.7
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)


@dataclass(frozen=True)
class FlowConfig(_Config):
    """`CausalMaskedDiffWithXvec`."""

    input_size: int = 512
    output_size: int = 80
    spk_embed_dim: int = 192
    vocab_size: int = 6561
    input_frame_rate: int = 25
    token_mel_ratio: int = 2
    pre_lookahead_len: int = 3
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: CFMConfig = field(default_factory=CFMConfig)


@dataclass(frozen=True)
class LengthRegulatorConfig(_Config):
    """`InterpolateRegulator`: tokens' features interpolated to mel frames, then refined."""

    channels: int = 80
    sampling_ratios: tuple[int, ...] = (1, 1, 1, 1)
    out_channels: int | None = None
    groups: int = 1


@dataclass(frozen=True)
class MaskedDiffConfig(_Config):
    """`MaskedDiffWithXvec`: the first generation's flow (non-causal encoder and estimator)."""

    input_size: int = 512
    output_size: int = 80
    spk_embed_dim: int = 192
    vocab_size: int = 4096
    input_frame_rate: int = 50
    encoder: TransformerEncoderConfig = field(
        default_factory=lambda: TransformerEncoderConfig(
            input_size=512, output_size=512, attention_heads=8, linear_units=2048
        )
    )
    length_regulator: LengthRegulatorConfig = field(default_factory=LengthRegulatorConfig)
    decoder: CFMConfig = field(
        default_factory=lambda: CFMConfig(
            estimator=EstimatorConfig(channels=(256, 256), static_chunk_size=0)
        )
    )


@dataclass(frozen=True)
class HiFTConfig(_Config):
    """`HiFTGenerator` with `ConvRNNF0Predictor` (CosyVoice2: 24 kHz, `SourceModuleHnNSF2`/`SineGen2`)."""

    in_channels: int = 80
    base_channels: int = 512
    nb_harmonics: int = 8
    sampling_rate: int = 24000
    nsf_alpha: float = 0.1
    nsf_sigma: float = 0.003
    nsf_voiced_threshold: float = 10.0
    upsample_rates: tuple[int, ...] = (8, 5, 3)
    upsample_kernel_sizes: tuple[int, ...] = (16, 11, 7)
    istft_n_fft: int = 16
    istft_hop_len: int = 4
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    source_resblock_kernel_sizes: tuple[int, ...] = (7, 7, 11)
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    f0_num_class: int = 1
    f0_in_channels: int = 80
    f0_cond_channels: int = 512


@dataclass(frozen=True)
class ModelConfig(_Config):
    """The whole CosyVoice2 model as the MLX model dir's `config.json` records it."""

    sample_rate: int = 24000
    token_frame_rate: int = 25
    token_mel_ratio: int = 2
    chunk_size: int = 25
    llm: LLMConfig = field(default_factory=LLMConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    hift: HiFTConfig = field(default_factory=HiFTConfig)

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def _kw(node: Any, what: str) -> dict[str, Any]:
    from cosyvoice2.official_yaml import Tagged  # the converter's side: not imported at load

    if not isinstance(node, Tagged):
        raise ValueError(f"cosyvoice2.yaml: `{what}` is not an object definition")
    return node.kwargs()


def config_from_official(hparams: dict[str, Any], qwen_config: dict[str, Any]) -> ModelConfig:
    """Map the official yaml (as data) and the Qwen2 `config.json` onto `ModelConfig`."""
    for key in ("llm", "flow", "hift"):
        if key not in hparams:
            raise ValueError(f"cosyvoice2.yaml: missing `{key}` (not a CosyVoice2 config?)")
    llm = _kw(hparams["llm"], "llm")
    sampling = _kw(llm["sampling"], "llm.sampling") if "sampling" in llm else {}
    flow = _kw(hparams["flow"], "flow")
    enc = _kw(flow["encoder"], "flow.encoder")
    dec = _kw(flow["decoder"], "flow.decoder")
    cfm = _kw(dec["cfm_params"], "flow.decoder.cfm_params")["content"]
    est = _kw(dec["estimator"], "flow.decoder.estimator")
    return ModelConfig.from_dict(
        {
            "sample_rate": hparams.get("sample_rate", 24000),
            "token_frame_rate": hparams.get("token_frame_rate", 25),
            "token_mel_ratio": hparams.get("token_mel_ratio", 2),
            "chunk_size": hparams.get("chunk_size", 25),
            "llm": {**llm, "sampling": sampling, "qwen": qwen_config},
            "flow": {**flow, "encoder": enc, "decoder": {**dec, **cfm, "estimator": est}},
            "hift": hift_config_from_official(hparams["hift"]).to_dict(),
        }
    )


def hift_config_from_official(hift_node: Any) -> HiFTConfig:
    """`HiFTConfig` of the `hift` entry of an official yaml (either generation), read as data."""
    hift = _kw(hift_node, "hift")
    f0 = _kw(hift["f0_predictor"], "hift.f0_predictor")
    istft = hift.get("istft_params", {})
    return HiFTConfig.from_dict(
        {
            **hift,
            "istft_n_fft": istft.get("n_fft", 16),
            "istft_hop_len": istft.get("hop_len", 4),
            "f0_num_class": f0.get("num_class", 1),
            "f0_in_channels": f0.get("in_channels", 80),
            "f0_cond_channels": f0.get("cond_channels", 512),
        }
    )


def config_from_official_dir(model_dir: str | Path) -> ModelConfig:
    """`ModelConfig` of an official model dir (`cosyvoice2.yaml` + `CosyVoice-BlankEN/config.json`)."""
    from cosyvoice2.official_yaml import load_official_yaml

    model_dir = Path(model_dir)
    hp = load_official_yaml(model_dir / "cosyvoice2.yaml")
    qwen = json.loads((model_dir / "CosyVoice-BlankEN" / "config.json").read_text(encoding="utf-8"))
    return config_from_official(hp, qwen)


def transformer_lm_config_from_official(llm_node: Any) -> TransformerLMConfig:
    """`TransformerLMConfig` of the `llm` entry of an official first-generation yaml
    (`cosyvoice.yaml`: `!new:cosyvoice.llm.llm.TransformerLM`), read as data."""
    llm = _kw(llm_node, "llm")
    for key in ("text_encoder", "llm"):
        if key not in llm:
            raise ValueError(f"cosyvoice.yaml: `llm.{key}` is missing (not a TransformerLM?)")
    sampling = _kw(llm["sampling"], "llm.sampling") if "sampling" in llm else {}
    return TransformerLMConfig.from_dict(
        {
            **llm,
            "text_encoder": _kw(llm["text_encoder"], "llm.text_encoder"),
            "llm": _kw(llm["llm"], "llm.llm"),
            "sampling": sampling,
        }
    )


def masked_diff_config_from_official(flow_node: Any) -> MaskedDiffConfig:
    """`MaskedDiffConfig` of the `flow` entry of an official first-generation yaml
    (`!new:cosyvoice.flow.flow.MaskedDiffWithXvec`), read as data."""
    flow = _kw(flow_node, "flow")
    for key in ("encoder", "length_regulator", "decoder"):
        if key not in flow:
            raise ValueError(f"cosyvoice.yaml: `flow.{key}` is missing (not a MaskedDiffWithXvec?)")
    dec = _kw(flow["decoder"], "flow.decoder")
    cfm = _kw(dec["cfm_params"], "flow.decoder.cfm_params")["content"]
    est = _kw(dec["estimator"], "flow.decoder.estimator")
    return MaskedDiffConfig.from_dict(
        {
            **flow,
            "encoder": _kw(flow["encoder"], "flow.encoder"),
            "length_regulator": _kw(flow["length_regulator"], "flow.length_regulator"),
            "decoder": {**dec, **cfm, "estimator": {**est, "static_chunk_size": 0}},
        }
    )
