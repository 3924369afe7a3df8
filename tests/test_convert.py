"""The converter: every tensor reaches its parameter, hostile or broken inputs leave nothing behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from cosyvoice2.checkpoint import load_torch_checkpoint
from cosyvoice2.convert import ConversionError, convert
from cosyvoice2.errors import CheckpointError, CosyVoiceError


def _official_tensors(path: Path) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in load_torch_checkpoint(path).items()}


def test_every_llm_tensor_reaches_its_parameter(
    tiny_official_dir: Path, tiny_mlx_dir: Path
) -> None:
    official = _official_tensors(tiny_official_dir / "llm.pt")
    ours = mx.load(str(tiny_mlx_dir / "llm.safetensors"))
    unused = {"llm.model.lm_head.weight"}  # the Qwen2 output layer CosyVoice2 never uses
    assert set(official) - unused == {
        k.replace("llm.", "llm.model.model.", 1) if k.startswith("llm.") else k for k in ours
    }
    for key, value in official.items():
        if key in unused:
            continue
        mlx_key = key.replace("llm.model.model.", "llm.", 1)
        np.testing.assert_array_equal(np.array(ours[mlx_key]), value, err_msg=key)


def test_every_flow_tensor_reaches_its_parameter(
    tiny_official_dir: Path, tiny_mlx_dir: Path
) -> None:
    official = _official_tensors(tiny_official_dir / "flow.pt")
    ours = mx.load(str(tiny_mlx_dir / "flow.safetensors"))
    assert len(ours) == len(official)
    for key, value in official.items():
        got = np.array(ours[key])
        if (
            value.ndim == 3
        ):  # conv (out, in, k) -> (out, k, in); transposed conv (in, out, k) -> (out, k, in)
            ok = got.shape == value.transpose(0, 2, 1).shape and np.array_equal(
                got, value.transpose(0, 2, 1)
            )
            ok = ok or (
                got.shape == value.transpose(1, 2, 0).shape
                and np.array_equal(got, value.transpose(1, 2, 0))
            )
            assert ok, key
        else:
            np.testing.assert_array_equal(got, value, err_msg=key)


def test_every_hift_tensor_reaches_its_parameter(
    tiny_official_dir: Path, tiny_mlx_dir: Path
) -> None:
    """Weight norm is folded: each (weight_g, weight_v) pair becomes one weight g * v / ||v||."""
    official = _official_tensors(tiny_official_dir / "hift.pt")
    ours = {k: np.array(v) for k, v in mx.load(str(tiny_mlx_dir / "hift.safetensors")).items()}
    folded = {k[: -len(".weight_v")] for k in official if k.endswith(".weight_v")}
    plain = {k for k in official if not k.endswith((".weight_g", ".weight_v"))}
    expected_keys = {f"{m}.weight" for m in folded} | plain
    # our conv layers may keep extra derived copies of a weight (per-tap fast-path forms); every
    # official tensor must still be present under its own name
    assert expected_keys <= set(ours), sorted(expected_keys - set(ours))[:5]
    for m in folded:
        g, v = official[f"{m}.weight_g"], official[f"{m}.weight_v"]
        w = g * v / np.linalg.norm(v.reshape(v.shape[0], -1), axis=1).reshape(-1, 1, 1)
        got = ours[f"{m}.weight"]
        candidates = [w.transpose(0, 2, 1), w.transpose(1, 2, 0)]
        assert any(
            c.shape == got.shape and np.allclose(got, c, rtol=1e-6, atol=1e-7) for c in candidates
        ), m
    for k in plain:
        value = official[k]
        got = ours[k]
        if value.ndim == 3:
            assert np.allclose(got, value.transpose(0, 2, 1), rtol=0, atol=0), k
        else:
            np.testing.assert_array_equal(got, value, err_msg=k)


def test_config_records_weights_label_and_precision(tiny_mlx_dir: Path) -> None:
    meta = json.loads((tiny_mlx_dir / "config.json").read_text())
    assert meta["weights"] == "synthetic" and meta["model_type"] == "cosyvoice2"
    assert meta["llm_precision"] == {"dtype": "float32"}
    assert {"campplus", "speech_tokenizer", "llm", "flow", "hift"} <= set(meta)


def _copy_official(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_hostile_pickle_is_refused_and_nothing_runs(
    tiny_official_dir: Path, tmp_path: Path
) -> None:
    torch = pytest.importorskip("torch")
    import os

    src = _copy_official(tiny_official_dir, tmp_path / "official")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"llm_embedding.weight": torch.zeros(2, 2), "x": Payload()}, src / "llm.pt")
    dst = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"(os|posix)\.system"):
        convert(src, dst)
    assert not marker.exists()
    assert not dst.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["official"]


@pytest.mark.parametrize("case", ["truncated_hift", "missing_flow", "foreign_yaml", "wrong_shapes"])
def test_failed_conversion_leaves_no_partial_dir(
    case: str, tiny_official_dir: Path, tmp_path: Path
) -> None:
    src = _copy_official(tiny_official_dir, tmp_path / "official")
    if case == "truncated_hift":
        data = (src / "hift.pt").read_bytes()
        (src / "hift.pt").write_bytes(data[: len(data) // 2])
    elif case == "missing_flow":
        (src / "flow.pt").unlink()
    elif case == "foreign_yaml":
        (src / "cosyvoice2.yaml").write_text("sample_rate: 22050\nllm: !new:x.Y\n    a: 1\n")
    elif case == "wrong_shapes":
        text = (
            (src / "cosyvoice2.yaml").read_text().replace("base_channels: 32", "base_channels: 48")
        )
        (src / "cosyvoice2.yaml").write_text(text)
    dst = tmp_path / "out"
    with pytest.raises(CosyVoiceError) as info:
        convert(src, dst)
    assert str(src) in str(info.value) or "flow.pt" in str(info.value)
    assert not dst.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["official"]


def test_existing_output_is_kept_unless_overwrite(
    tiny_mlx_dir: Path, tiny_official_dir: Path
) -> None:
    with pytest.raises(ConversionError, match="already exists"):
        convert(tiny_official_dir, tiny_mlx_dir)


def test_spk2info_is_imported_as_saved_speakers(tiny_official_dir: Path, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    src = _copy_official(tiny_official_dir, tmp_path / "official")
    rng = np.random.default_rng(0)
    zero_shot = {
        "prompt_text": torch.tensor([[11, 12, 13]], dtype=torch.int32),
        "prompt_text_len": torch.tensor([3], dtype=torch.int32),
        "llm_prompt_speech_token": torch.tensor([[5, 6, 7, 8]], dtype=torch.int32),
        "flow_prompt_speech_token": torch.tensor([[5, 6, 7, 8]], dtype=torch.int32),
        "prompt_speech_feat": torch.from_numpy(rng.standard_normal((1, 8, 80)).astype(np.float32)),
        "llm_embedding": torch.from_numpy(rng.standard_normal((1, 192)).astype(np.float32)),
        "flow_embedding": torch.from_numpy(rng.standard_normal((1, 192)).astype(np.float32)),
    }
    sft = {"embedding": torch.from_numpy(rng.standard_normal((1, 192)).astype(np.float32))}
    torch.save({"zs": zero_shot, "中文女": sft}, src / "spk2info.pt")
    dst = convert(src, tmp_path / "mlx")
    from cosyvoice2.speakers import SpeakerStore

    store = SpeakerStore(dst / "speakers")
    assert store.list() == sorted(["zs", "中文女"])
    zs = store.load("zs")
    np.testing.assert_array_equal(np.array(zs.prompt_text), [[11, 12, 13]])
    np.testing.assert_array_equal(np.array(zs.speech_token), [[5, 6, 7, 8]])
    np.testing.assert_array_equal(np.array(zs.speech_feat), zero_shot["prompt_speech_feat"].numpy())
    np.testing.assert_array_equal(np.array(zs.embedding), zero_shot["flow_embedding"].numpy())
    np.testing.assert_array_equal(
        np.array(store.load("中文女").embedding), sft["embedding"].numpy()
    )
    assert store.load("中文女").speech_token.shape == (1, 0)


def test_loading_and_synthesis_need_no_torch(tiny_mlx_dir: Path, tmp_path: Path) -> None:
    """With torch made unimportable, the converted dir loads and synthesises.

    (Where torch is installed, transformers, which mlx-lm imports, imports it on
    its own; what matters is that nothing of ours needs it.)
    """
    import soundfile as sf

    wav = tmp_path / "p.wav"
    t = np.arange(24000) / 16000
    sf.write(wav, (0.3 * np.sin(2 * np.pi * 150 * t)).astype(np.float32), 16000)
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import cosyvoice2\n"
        "m = cosyvoice2.load(sys.argv[1])\n"
        "a = m.generate('Hi there.', ref_audio=sys.argv[2], n_timesteps=1, max_token_text_ratio=2)\n"
        "assert a.size > 0 and not any(k == 'torch' or k.startswith('torch.') for k, v in sys.modules.items() if v)\n"
        "print('ok')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tiny_mlx_dir), str(wav)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
