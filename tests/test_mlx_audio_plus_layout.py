"""Dirs of mlx-audio-plus 0.1.x (mlx-community's CosyVoice2 weights) load as the same model.

The dirs are written by mlx-audio-plus 0.1.8's own converter from the tiny synthetic
official weights (`tests/mlx_audio_plus_dirs.py`: bench.peer's virtualenv, made once
with pip and cached, as are the converted dirs) and compared with our conversion of
the same weights (`tiny_mlx_dir`). What that converter loses, checked here, is what
`docs/mlx-community-weights.md` states: bfloat16 stored as float16, one dtype for all
components, HiFT's weight norm folded with an epsilon (fp32 relative error below 1e-6),
only the backbone's decoder-layer projections quantised, no speech tokenizer, no CAM++
(offline; online it takes Chatterbox's, which is not read here).

Its quantisation hard-codes Qwen2-0.5B's shapes: the quantised dirs are written by the
same converter code with `mlx_lm`'s `ModelArgs` given the tiny shapes while it runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from cosyvoice2 import model_dir
from cosyvoice2.model_dir import ModelDirError, read_weights

FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def converted(tiny_official_dir: Path):  # noqa: ARG001  (needs the parity environment)
    from tests.mlx_audio_plus_dirs import converted_dir

    return converted_dir


def _header(file: Path) -> dict:
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return {k: v for k, v in json.loads(f.read(n)).items() if k != "__metadata__"}


def _view(src: Path, dst: Path, config: dict | None = None) -> Path:
    """A dir with `src`'s files linked (not copied) and, optionally, another config.json."""
    dst.mkdir()
    for name in FILES:
        if name == "config.json" and config is not None:
            (dst / name).write_text(json.dumps(config), encoding="utf-8")
        else:
            (dst / name).symlink_to(src / name)
    return dst


def _weight_normed(ours: Path) -> set[str]:
    """HiFT's convolutions under weight norm in the official file (folded by both converters)."""
    from cosyvoice2.checkpoint import load_torch_checkpoint
    from cosyvoice2_testing.synthetic import cached_official_dir

    src = cached_official_dir("tiny", seed=0, weight_norm_style="parametrizations", onnx=False)
    keys = load_torch_checkpoint(src / "hift.pt")
    tag = ".parametrizations.weight.original0"
    return {k[: -len(tag)] + ".weight" for k in keys if k.endswith(tag)}


# --------------------------------------------------------------------------- what it writes


def test_what_the_converter_writes(converted) -> None:
    d = converted("fp32")
    assert FILES <= {p.name for p in d.iterdir()}
    assert (
        not (d / "llm.safetensors").exists() and not (d / "speech_tokenizer.safetensors").exists()
    )
    config = json.loads((d / "config.json").read_text())
    assert {k: config[k] for k in ("model_type", "version", "dtype")} == {
        "model_type": "cosyvoice2",
        "version": "0.5B",
        "dtype": "float32",
    }
    header = _header(d / "model.safetensors")
    prefixes = {k.split(".")[0] for k in header}
    assert prefixes == {"llm", "qwen2", "flow", "hift"}  # no campplus (offline), no tokenizer
    assert {v["dtype"] for v in header.values()} == {"F32"}
    assert "qwen2.lm_head.weight" in header  # the tied head, unused

    for variant in ("fp16", "bf16"):
        d = converted(variant)
        header = _header(d / "model.safetensors")
        assert {v["dtype"] for v in header.values()} == {"F16"}, variant  # bf16 stored as fp16
        assert json.loads((d / "config.json").read_text())["dtype"] == (
            "float16" if variant == "fp16" else "bfloat16"
        )
    for bits in (8, 4):
        d = converted(f"{bits}bit")
        config = json.loads((d / "config.json").read_text())
        assert config["quantization"] == {
            "bits": bits,
            "group_size": 64,
            "quantized_components": ["tokenizer/model.layers"],
        }
        header = _header(d / "model.safetensors")
        quantised = sorted(k[: -len(".scales")] for k in header if k.endswith(".scales"))
        assert quantised == sorted(
            f"qwen2.model.layers.{i}.{'mlp' if p in PROJECTIONS[4:] else 'self_attn'}.{p}"
            for i in range(2)
            for p in PROJECTIONS
        )
        assert header["qwen2.model.embed_tokens.weight"]["dtype"] == "F16"  # not quantised
        assert header["llm.llm_decoder.weight"]["dtype"] == "F16"
        assert "qwen2.lm_head.weight" not in header


# --------------------------------------------------------------------------- same weights


def _ours(tiny_mlx_dir: Path) -> dict[str, dict[str, mx.array]]:
    return {c: read_weights(tiny_mlx_dir, c) for c in ("llm", "flow", "hift")}


def _loaded(d: Path):
    meta, config = model_dir.read_config(d)
    llm, record = model_dir.load_llm(d, meta, config)
    parts = {
        "llm": llm,
        "flow": model_dir.load_flow(d, config),
        "hift": model_dir.load_hift(d, config),
    }
    return meta, config, record, {c: dict(tree_flatten(m.parameters())) for c, m in parts.items()}


def test_fp32_dir_gives_our_weights(converted, tiny_mlx_dir: Path) -> None:
    """Every tensor equal to our conversion's, but HiFT's weight-normed convolutions: the
    converter folds them as g * v / (|v| + 1e-8), ours without the epsilon."""
    meta, config, record, theirs = _loaded(converted("fp32"))
    assert config == model_dir.read_config(tiny_mlx_dir)[1]
    assert record == {"dtype": "float32"} and meta["layout"] == "mlx-audio-plus"
    ours = _ours(tiny_mlx_dir)
    normed = _weight_normed(tiny_mlx_dir)
    differ = set()
    for c in ours:
        assert set(theirs[c]) >= set(ours[c]), c
        for k, b in ours[c].items():
            a = theirs[c][k]
            assert a.dtype == mx.float32 and a.shape == b.shape, k
            if not mx.array_equal(a, b).item():
                differ.add(k)
                assert c == "hift", k
                rel = mx.abs(a - b).max().item() / mx.abs(b).max().item()
                assert rel < 1e-6, (k, rel)
    assert differ and differ <= normed


@pytest.mark.parametrize("variant", ["fp16", "bf16"])
def test_half_dirs_give_our_weights_in_fp16(converted, tiny_mlx_dir: Path, variant: str) -> None:
    """Our weights cast to float16 (bfloat16 too: the converter writes float16 for it);
    the flow and HiFT are loaded as float32, the speech LM stays float16."""
    meta, _, record, theirs = _loaded(converted(variant))
    assert record == {"dtype": "float16"} and meta["mlx_audio_plus"]["dtype"] == (
        "float16" if variant == "fp16" else "bfloat16"
    )
    ours = _ours(tiny_mlx_dir)
    normed = _weight_normed(tiny_mlx_dir)
    for c in ours:
        for k, b in ours[c].items():
            a = theirs[c][k]
            assert a.dtype == (mx.float16 if c == "llm" else mx.float32), k
            want = b.astype(mx.float16).astype(mx.float32)
            got = a.astype(mx.float32)
            if k in normed and c == "hift":  # folded in fp32 with the epsilon, then cast
                assert mx.allclose(got, want, rtol=2**-10, atol=0).item(), k
            else:
                assert mx.array_equal(got, want).item(), k


@pytest.mark.parametrize("bits", [8, 4])
def test_quantised_dirs_give_our_weights_quantised_the_same_way(
    converted, tiny_mlx_dir: Path, bits: int
) -> None:
    """Our speech LM cast to float16, then MLX's affine quantisation (group 64) of the
    Linear layers of the backbone's decoder layers only: every tensor equal."""
    from cosyvoice2.llm import Qwen2LM

    _, config, record, theirs = _loaded(converted(f"{bits}bit"))
    assert record == {"dtype": "float16", "quantization": {"group_size": 64, "bits": bits}}
    ours = Qwen2LM.from_weights(config.llm, read_weights(tiny_mlx_dir, "llm"))
    ours.set_dtype(mx.float16)
    nn.quantize(
        ours,
        group_size=64,
        bits=bits,
        class_predicate=lambda p, m: isinstance(m, nn.Linear) and p.startswith("llm.layers."),
    )
    want = dict(tree_flatten(ours.parameters()))
    assert set(want) == set(theirs["llm"])
    assert sum(k.endswith(".scales") for k in want) == 2 * len(PROJECTIONS)
    for k, b in want.items():
        assert theirs["llm"][k].dtype == b.dtype and mx.array_equal(theirs["llm"][k], b).item(), k


# --------------------------------------------------------------------------- synthesis


def test_saved_speaker_synthesis_matches_ours(
    converted, tiny_mlx_dir: Path, prompt_wav: Path, tmp_path: Path
) -> None:
    """A saved speaker made with our dir, copied into the fp32 mlx-audio-plus dir: the same
    speech tokens (same length, since the speech LM's weights are equal) and audio within
    what HiFT's folded weights change. Cross-lingual with a prompt wav needs the speech
    tokenizer, which such a dir lacks: a one-line ModelDirError says so."""
    from cosyvoice2.model import CosyVoice2

    ours_dir = tmp_path / "ours"
    shutil.copytree(tiny_mlx_dir, ours_dir)
    ours = CosyVoice2.load(ours_dir)
    ours.add_zero_shot_spk("A short prompt.", prompt_wav, "alice")
    theirs_dir = _view(converted("fp32"), tmp_path / "theirs")
    shutil.copytree(ours_dir / "speakers", theirs_dir / "speakers")
    theirs = CosyVoice2.load(theirs_dir)

    def run(model) -> np.ndarray:
        out = model.inference_zero_shot("Hello there.", "", None, "alice", seed=3, n_timesteps=2)
        return np.concatenate([np.array(c["tts_speech"]) for c in out], axis=-1)

    a, b = run(theirs), run(ours)
    assert a.shape == b.shape and a.shape[-1] > 0
    assert np.abs(a - b).max() < 1e-5 * np.abs(b).max()

    with pytest.raises(ModelDirError, match="no speech tokenizer") as e:
        list(theirs.inference_cross_lingual("Hello.", prompt_wav, seed=3, n_timesteps=2))
    assert "\n" not in str(e.value)
    with pytest.raises(ModelDirError, match="no CAM\\+\\+"):
        theirs.campplus(mx.zeros((1, 10, 80)))


# --------------------------------------------------------------------------- bad layouts


def _load(d: Path):
    from cosyvoice2.model import CosyVoice2

    return CosyVoice2.load(d)


def _bad(d: Path, *patterns: str) -> None:
    with pytest.raises(ModelDirError) as e:
        _load(d)
    text = str(e.value)
    assert "\n" not in text
    for p in patterns:
        assert p in text, text


def test_bad_config(converted, tmp_path: Path) -> None:
    src = converted("fp32")
    base = json.loads((src / "config.json").read_text())
    cases = [
        ({**base, "extra": 1}, "unknown key `extra`"),
        ({**base, "version": "1.0"}, "`version`"),
        ({**base, "dtype": "int8"}, "`dtype` must be one of"),
        ({**base, "dtype": "float16"}, "is F32, config.json's dtype says F16"),
        ({**base, "llm": {**base["llm"], "colour": 1}}, "unknown setting `llm.colour`"),
        ({**base, "quantization": {"bits": 3, "group_size": 64}}, "`quantization.bits`"),
        (
            {**base, "quantization": {"bits": 4, "group_size": 64, "quantized_components": ["x"]}},
            "unknown quantisation",
        ),
        ({**base, "quantization": {"bits": 4, "group_size": 64}}, "no tensor is quantised"),
        ({**base, "flow": {**base["flow"], "input_size": 10**9}}, "flow.input_size"),
    ]
    for i, (config, pattern) in enumerate(cases):
        _bad(_view(src, tmp_path / f"c{i}", config), pattern)


def test_bad_weights(converted, tmp_path: Path) -> None:
    src = converted("fp32")
    base = json.loads((src / "config.json").read_text())
    # a wrong shape: config.json's flow is wider than the file's
    flow = {**base["flow"], "encoder": {**base["flow"]["encoder"], "linear_units": 512}}
    _bad(_view(src, tmp_path / "shape", {**base, "flow": flow}), "does not match config.json")

    weights = mx.load(str(src / "model.safetensors"))
    for name, change, pattern in (
        ("missing", lambda w: w.pop("flow.encoder.embed.linear.weight"), "does not match"),
        ("foreign", lambda w: w.update({"vocoder.x": mx.zeros(2)}), "belongs to no component"),
        (
            "quantised",  # scales on a layer its converter never quantises
            lambda w: w.update({"llm.llm_decoder.scales": mx.zeros(2)}),
            "unknown quantisation",
        ),
    ):
        d = _view(src, tmp_path / name)
        w = dict(weights)
        change(w)
        (d / "model.safetensors").unlink()
        mx.save_safetensors(str(d / "model.safetensors"), w)
        if name == "quantised":
            q = {"bits": 8, "group_size": 64}
            (d / "config.json").unlink()
            (d / "config.json").write_text(json.dumps({**base, "quantization": q}))
        _bad(d, pattern)

    d = _view(src, tmp_path / "truncated")
    (d / "model.safetensors").unlink()
    with open(src / "model.safetensors", "rb") as f:
        (d / "model.safetensors").write_bytes(f.read(2_000_000))
    _bad(d, "model.safetensors: cannot read", "truncated")
