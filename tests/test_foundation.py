"""The foundation: official-yaml reading, config, synthetic official dirs, the reference builder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cosyvoice2.config import ModelConfig, config_from_official
from cosyvoice2.official_yaml import Tagged, load_official_yaml
from cosyvoice2_testing.synthetic import official_yaml_text, qwen_config

OFFICIAL_FILES = [
    "cosyvoice2.yaml",
    "llm.pt",
    "flow.pt",
    "hift.pt",
    "campplus.onnx",
    "speech_tokenizer_v2.onnx",
    "CosyVoice-BlankEN/config.json",
    "CosyVoice-BlankEN/vocab.json",
    "CosyVoice-BlankEN/merges.txt",
    "CosyVoice-BlankEN/tokenizer_config.json",
]


def test_yaml_tags_are_data_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    (tmp_path / "cosyvoice2.yaml").write_text(
        f"""
a: 25
b: 2
evil: !apply:os.system ["touch {marker}"]
obj: !new:os.system
    command: touch {marker}
prod: !ref <a> * <b>
same: !ref <a>
small: 1e-06
nested: !new:pkg.Cls
    x: !ref <prod>
    f: !name:pkg.fn
        k: 1
"""
    )
    hp = load_official_yaml(tmp_path / "cosyvoice2.yaml")
    assert not marker.exists()
    assert hp["evil"] == Tagged("apply", "os.system", [f"touch {marker}"])
    assert hp["prod"] == 50 and hp["same"] == 25
    assert isinstance(hp["small"], float) and hp["small"] == 1e-6
    assert hp["nested"].kwargs()["x"] == 50
    assert hp["nested"].kwargs()["f"] == Tagged("name", "pkg.fn", {"k": 1})


def test_yaml_rejects_code_in_ref_expressions(tmp_path: Path) -> None:
    (tmp_path / "y.yaml").write_text("a: 1\nb: !ref <a> + __import__('os')\n")
    with pytest.raises(ValueError, match="unsupported expression"):
        load_official_yaml(tmp_path / "y.yaml")


def test_yaml_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "cosyvoice2.yaml"
    bad.write_text("a: [unclosed\n")
    with pytest.raises(ValueError, match="cosyvoice2.yaml"):
        load_official_yaml(bad)
    (tmp_path / "r.yaml").write_text("a: !ref <missing>\n")
    with pytest.raises(KeyError, match="missing"):
        load_official_yaml(tmp_path / "r.yaml")


@pytest.mark.parametrize("size", ["tiny", "full"])
def test_config_from_synthetic_yaml(tmp_path: Path, size: str) -> None:
    (tmp_path / "cosyvoice2.yaml").write_text(official_yaml_text(size))
    cfg = config_from_official(load_official_yaml(tmp_path / "cosyvoice2.yaml"), qwen_config(size))
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    if size == "full":  # the released CosyVoice2-0.5B hyperparameters
        assert cfg.llm.qwen.hidden_size == 896 and cfg.llm.qwen.num_hidden_layers == 24
        assert cfg.llm.speech_token_size == 6561 and cfg.llm.mix_ratio == (5, 15)
        assert cfg.flow.encoder.output_size == 512 and cfg.flow.encoder.num_blocks == 6
        assert cfg.flow.decoder.estimator.static_chunk_size == 50
        assert cfg.flow.decoder.estimator.num_mid_blocks == 12
        assert cfg.flow.decoder.inference_cfg_rate == 0.7 and cfg.flow.decoder.sigma_min == 1e-6
        assert cfg.hift.upsample_rates == (8, 5, 3) and cfg.hift.istft_n_fft == 16
        assert cfg.hift.resblock_dilation_sizes == ((1, 3, 5),) * 3


def test_config_rejects_a_yaml_of_another_model(tmp_path: Path) -> None:
    (tmp_path / "cosyvoice2.yaml").write_text("sample_rate: 22050\nllm: !new:x.Y\n    a: 1\n")
    with pytest.raises(ValueError, match="missing `flow`"):
        config_from_official(load_official_yaml(tmp_path / "cosyvoice2.yaml"), {})


def test_official_dir_has_the_official_layout(tiny_official_dir: Path) -> None:
    missing = [f for f in OFFICIAL_FILES if not (tiny_official_dir / f).is_file()]
    assert not missing, f"missing from the synthetic official dir: {missing}"
    label = json.loads((tiny_official_dir / "synthetic.json").read_text())
    assert label["weights"] == "synthetic"


@pytest.mark.parametrize("part", ["llm", "flow", "hift"])
def test_pt_files_load_strictly_into_official_modules(tiny_pt_dir: Path, part: str) -> None:
    import torch

    from cosyvoice2_testing.official import build_official, official_hparams

    module = build_official(part, official_hparams(tiny_pt_dir), seed=123)
    state = torch.load(tiny_pt_dir / f"{part}.pt", map_location="cpu", weights_only=True)
    result = module.load_state_dict(state, strict=False)
    assert not result.missing_keys and not result.unexpected_keys, result


def test_official_modules_run_a_forward_pass(tiny_pt_dir: Path, torch_threads: None) -> None:
    import torch

    from cosyvoice2_testing.official import load_official

    torch.manual_seed(0)
    llm = load_official("llm", tiny_pt_dir)
    hidden = llm.llm_input_size
    emb = torch.randn(1, 7, hidden)
    out, _ = llm.llm(emb, torch.tensor([7]))
    logits = llm.llm_decoder(out)
    assert logits.shape == (1, 7, 6561 + 3) and torch.isfinite(logits).all()

    flow = load_official("flow", tiny_pt_dir)
    tok = torch.randint(0, 6561, (1, 13))
    ptok = torch.randint(0, 6561, (1, 9))
    pfeat = torch.randn(1, 18, 80)
    mel, _ = flow.inference(
        token=tok,
        token_len=torch.tensor([13]),
        prompt_token=ptok,
        prompt_token_len=torch.tensor([9]),
        prompt_feat=pfeat,
        prompt_feat_len=torch.tensor([18]),
        embedding=torch.randn(1, 192),
        streaming=False,
        finalize=True,
    )
    assert mel.shape == (1, 80, 26) and torch.isfinite(mel).all()

    hift = load_official("hift", tiny_pt_dir)
    wav, _ = hift.inference(speech_feat=mel)
    assert wav.shape == (1, 26 * 480) and torch.isfinite(wav).all()


def test_generation_is_deterministic_per_seed(tiny_pt_dir: Path, tmp_path: Path) -> None:
    import torch

    from cosyvoice2_testing.synthetic import make_official_dir

    again = make_official_dir(tmp_path / "again", size="tiny", seed=0, onnx=False)
    other = make_official_dir(tmp_path / "other", size="tiny", seed=1, onnx=False)
    for part in ("llm", "flow", "hift"):
        a = torch.load(tiny_pt_dir / f"{part}.pt", weights_only=True)
        b = torch.load(again / f"{part}.pt", weights_only=True)
        c = torch.load(other / f"{part}.pt", weights_only=True)
        assert a.keys() == b.keys() == c.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), part
        assert not all(torch.equal(a[k], c[k]) for k in a if a[k].numel() > 1), part
    assert (tiny_pt_dir / "cosyvoice2.yaml").read_text() == (again / "cosyvoice2.yaml").read_text()


def test_weight_norm_key_styles(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from cosyvoice2_testing.synthetic import legacy_weight_norm_keys

    state = {
        "conv_pre.parametrizations.weight.original0": np.zeros((4, 1, 1)),
        "conv_pre.parametrizations.weight.original1": np.ones((4, 2, 3)),
        "conv_pre.bias": np.zeros(4),
    }
    assert sorted(legacy_weight_norm_keys(state)) == [
        "conv_pre.bias",
        "conv_pre.weight_g",
        "conv_pre.weight_v",
    ]
