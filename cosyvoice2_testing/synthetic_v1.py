"""The first generation's (CosyVoice-300M family) official config, in the released layout.

So far the speech LM's part (`llm: !new:cosyvoice.llm.llm.TransformerLM`), the flow's
(`flow: !new:cosyvoice.flow.flow.MaskedDiffWithXvec`) and HiFT's (22.05 kHz) of
`cosyvoice.yaml`, at the released sizes (`full`) or small ones (`tiny`), for the parity
tests of `cosyvoice2.transformer_lm`, `cosyvoice2.flow.flow.MaskedDiffWithXvec` and
`cosyvoice2.hift.HiFTGenerator`; the official modules are built from them by
`cosyvoice2_testing.official.instantiate` with random weights.
"""

from __future__ import annotations

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
