"""The first generation's (CosyVoice-300M family) official config, in the released layout.

So far the speech LM's part (`llm: !new:cosyvoice.llm.llm.TransformerLM`) of
`cosyvoice.yaml`, at the released sizes (`full`) or small ones (`tiny`), for the parity
tests of `cosyvoice2.transformer_lm`; the official module is built from it by
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
