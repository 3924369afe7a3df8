"""The first generation's (CosyVoice-300M family) official config, in the released layout.

So far the speech LM's part (`llm: !new:cosyvoice.llm.llm.TransformerLM`), the flow's
(`flow: !new:cosyvoice.flow.flow.MaskedDiffWithXvec`) and HiFT's (22.05 kHz) of
`cosyvoice.yaml`, at the released sizes (`full`) or small ones (`tiny`), for the parity
tests of `cosyvoice2.transformer_lm`, `cosyvoice2.flow.flow.MaskedDiffWithXvec` and
`cosyvoice2.hift.HiFTGenerator`; the official modules are built from them by
`cosyvoice2_testing.official.instantiate` with random weights.
"""

from __future__ import annotations

import json
from pathlib import Path

# TransformerLM sizes: the released CosyVoice-300M (`full`) and a small stand-in (`tiny`).
_LLM_DIMS = {
    "full": dict(
        text_in=512,
        llm=1024,
        text_tokens=60515,
        speech_tokens=4096,
        text_out=1024,
        text_heads=16,
        text_units=4096,
        text_blocks=6,
        llm_heads=16,
        llm_units=4096,
        llm_blocks=14,
    ),
    "tiny": dict(
        text_in=32,
        llm=64,
        text_tokens=300,
        speech_tokens=200,
        text_out=48,
        text_heads=4,
        text_units=96,
        text_blocks=2,
        llm_heads=4,
        llm_units=128,
        llm_blocks=3,
    ),
}


def llm_yaml_text(size: str = "tiny") -> str:
    """The `llm` entry of a `cosyvoice.yaml` (the released structure) at `size`."""
    d = _LLM_DIMS[size]
    return f"""# synthetic CosyVoice-300M speech LM ({size}); structure of the released cosyvoice.yaml
llm: !new:cosyvoice.llm.llm.TransformerLM
    text_encoder_input_size: {d["text_in"]}
    llm_input_size: {d["llm"]}
    llm_output_size: {d["llm"]}
    text_token_size: {d["text_tokens"]}
    speech_token_size: {d["speech_tokens"]}
    length_normalized_loss: True
    lsm_weight: 0
    spk_embed_dim: 192
    text_encoder: !new:cosyvoice.transformer.encoder.ConformerEncoder
        input_size: {d["text_in"]}
        output_size: {d["text_out"]}
        attention_heads: {d["text_heads"]}
        linear_units: {d["text_units"]}
        num_blocks: {d["text_blocks"]}
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        use_cnn_module: False
        macaron_style: False
        use_dynamic_chunk: False
        use_dynamic_left_chunk: False
        static_chunk_size: 1
    llm: !new:cosyvoice.transformer.encoder.TransformerEncoder
        input_size: {d["llm"]}
        output_size: {d["llm"]}
        attention_heads: {d["llm_heads"]}
        linear_units: {d["llm_units"]}
        num_blocks: {d["llm_blocks"]}
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0
        input_layer: 'linear_legacy'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        static_chunk_size: 1
    sampling: !name:cosyvoice.utils.common.ras_sampling
        top_p: 0.8
        top_k: 25
        win_size: 10
        tau_r: 0.1
"""


_FLOW_DIMS = {
    "full": dict(
        inp=512, enc=512, heads=8, units=2048, blocks=6, chans="[256, 256]", head_dim=64,
        n_blocks=4, mid=12, est_heads=8,
    ),
    "tiny": dict(
        inp=32, enc=48, heads=4, units=96, blocks=2, chans="[32, 32]", head_dim=16,
        n_blocks=1, mid=2, est_heads=2,
    ),
}  # fmt: skip


def flow_yaml_text(size: str = "tiny") -> str:
    """The `flow` entry of a `cosyvoice.yaml` (the released structure) at `size`."""
    d = _FLOW_DIMS[size]
    return f"""# synthetic CosyVoice-300M flow ({size}); structure of the released cosyvoice.yaml
flow: !new:cosyvoice.flow.flow.MaskedDiffWithXvec
    input_size: {d["inp"]}
    output_size: 80
    spk_embed_dim: 192
    output_type: 'mel'
    vocab_size: 4096
    input_frame_rate: 50
    only_mask_loss: True
    encoder: !new:cosyvoice.transformer.encoder.ConformerEncoder
        output_size: {d["enc"]}
        attention_heads: {d["heads"]}
        linear_units: {d["units"]}
        num_blocks: {d["blocks"]}
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        input_size: {d["inp"]}
        use_cnn_module: False
        macaron_style: False
    length_regulator: !new:cosyvoice.flow.length_regulator.InterpolateRegulator
        channels: 80
        sampling_ratios: [1, 1, 1, 1]
    decoder: !new:cosyvoice.flow.flow_matching.ConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: 0.7
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.decoder.ConditionalDecoder
            in_channels: 320
            out_channels: 80
            channels: {d["chans"]}
            dropout: 0
            attention_head_dim: {d["head_dim"]}
            n_blocks: {d["n_blocks"]}
            num_mid_blocks: {d["mid"]}
            num_heads: {d["est_heads"]}
            act_fn: 'gelu'
"""


def hift_yaml_text(size: str = "tiny") -> str:
    """The `hift` entry of a `cosyvoice.yaml` (the released 22.05 kHz HiFT) at `size`."""
    channels = 512 if size == "full" else 32
    return f"""# synthetic CosyVoice-300M HiFT ({size}); structure of the released cosyvoice.yaml
hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    in_channels: 80
    base_channels: {channels}
    nb_harmonics: 8
    sampling_rate: 22050
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 8]
    upsample_kernel_sizes: [16, 16]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: [3, 7, 11]
    resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    source_resblock_kernel_sizes: [7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: {channels}
"""


V1_GENERATOR_VERSION = 1
SPEAKERS = ("中文女", "英文男")
"""The SFT speakers of a synthetic `spk2info.pt` (two of the released model's names)."""


def official_v1_yaml_text(size: str = "tiny") -> str:
    """A `cosyvoice.yaml` with the released CosyVoice-300M structure: the three parts above,
    the 22.05 kHz features and the multilingual tokenizer."""
    return "\n".join(
        [
            f"# synthetic CosyVoice-300M config ({size}); structure of the released cosyvoice.yaml",
            "sample_rate: 22050",
            llm_yaml_text(size).split("\n", 1)[1],
            flow_yaml_text(size).split("\n", 1)[1],
            hift_yaml_text(size).split("\n", 1)[1],
            """get_tokenizer: !name:cosyvoice.tokenizer.tokenizer.get_tokenizer
    multilingual: True
    num_languages: 100
    language: 'en'
    task: 'transcribe'
allowed_special: 'all'
feat_extractor: !name:matcha.utils.audio.mel_spectrogram
    n_fft: 1024
    num_mels: 80
    sampling_rate: 22050
    hop_size: 256
    win_size: 1024
    fmin: 0
    fmax: 8000
    center: False
""",
        ]
    )


def make_official_v1_dir(out_dir: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a synthetic CosyVoice-300M(-SFT) official dir (atomically): `cosyvoice.yaml`,
    `llm.pt`, `flow.pt`, `hift.pt` (torch.save state dicts of the official modules with
    their own initialisation; `hift.pt` with the legacy weight-norm keys of the release),
    `spk2info.pt` (`SPEAKERS`, an x-vector each) and `synthetic.json`. Needs torch and
    the official code. (The ONNX files come later.)"""
    import torch

    from cosyvoice2.files import staged_dir
    from cosyvoice2.official_yaml import load_official_yaml
    from cosyvoice2_testing.official import instantiate
    from cosyvoice2_testing.shims import install_shims
    from cosyvoice2_testing.synthetic import legacy_weight_norm_keys

    install_shims()
    out_dir = Path(out_dir)
    with staged_dir(out_dir) as tmp:
        (tmp / "cosyvoice.yaml").write_text(official_v1_yaml_text(size), encoding="utf-8")
        hp = load_official_yaml(tmp / "cosyvoice.yaml")
        for i, part in enumerate(("llm", "flow", "hift")):
            torch.manual_seed(seed + i)
            module = instantiate(hp[part]).eval()
            state = {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}
            if part == "hift":
                state = legacy_weight_norm_keys(state)
            torch.save(state, tmp / f"{part}.pt")
        g = torch.Generator().manual_seed(seed + 3)
        spk2info = {name: {"embedding": torch.randn(1, 192, generator=g)} for name in SPEAKERS}
        torch.save(spk2info, tmp / "spk2info.pt")
        label = {"weights": "synthetic", "size": size, "seed": seed, "model": "CosyVoice-300M"}
        label["generator_version"] = V1_GENERATOR_VERSION
        (tmp / "synthetic.json").write_text(json.dumps(label, indent=2), encoding="utf-8")
    return out_dir
