"""The torch-free tiny MLX model dir (`tests/mlx_tiny.py`, fixture `mlx_tiny_dir`).

It must be usable without torch or the official code, and have the layout, config and
shapes of the dir converted from the tiny synthetic official dir (`tiny_mlx_dir`), so
that tests on it exercise what users load.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

ROOT = Path(__file__).resolve().parents[1]

# Build, load and synthesise with torch and the official code hidden, then list what of
# them got imported anyway (nothing may).
NO_TORCH_RUN = """
import sys
import tests.no_torch as no_torch
import numpy as np
from tests.mlx_tiny import make_mlx_tiny_dir
import cosyvoice2

model = cosyvoice2.load(make_mlx_tiny_dir(sys.argv[1]))
prompt = (0.1 * np.sin(np.arange(32000) * 0.08)).astype(np.float32)
out = list(model.inference_cross_lingual("Hello.", (prompt, 16000), n_timesteps=2, seed=1))
assert out and out[0]["tts_speech"].shape[1] > 0, out
print("loaded:", no_torch.loaded_hidden())
"""


def test_built_loaded_and_run_without_torch_or_the_official_code(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-c", NO_TORCH_RUN, str(tmp_path / "tiny")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "loaded: []", run.stdout


def test_hiding_torch_can_fail() -> None:
    """The check above sees an import of a hidden module: hiding refuses once torch is loaded."""
    run = subprocess.run(
        [sys.executable, "-c", "import torch; import tests.no_torch"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if run.returncode != 0 and "No module named 'torch'" in run.stderr:
        pytest.skip("torch is not installed here")
    assert run.returncode != 0 and "cannot be hidden" in run.stderr, run.stderr[-2000:]


def _layout(model_dir: Path) -> dict[str, object]:
    """Files, config (without provenance) and every weight's name, shape and dtype."""
    config = json.loads((model_dir / "config.json").read_text())
    config.pop("converted_from", None)
    shapes = {
        f.name: {k: (tuple(v.shape), str(v.dtype)) for k, v in mx.load(str(f)).items()}
        for f in sorted(model_dir.glob("*.safetensors"))
    }
    files = sorted(str(p.relative_to(model_dir)) for p in model_dir.rglob("*") if p.is_file())
    return {"files": files, "config": config, "weights": shapes}


def test_same_layout_config_and_shapes_as_the_converted_dir(
    mlx_tiny_dir: Path, tiny_mlx_dir: Path
) -> None:
    ours, converted = _layout(mlx_tiny_dir), _layout(tiny_mlx_dir)
    for key in ("files", "config", "weights"):
        assert ours[key] == converted[key], f"{key} differ from the converted tiny dir"


def test_tokenizer_files_equal_the_official_ones(
    mlx_tiny_dir: Path, tiny_official_dir: Path
) -> None:
    """`vocab.json` and `merges.txt` derived from the BPE ranks are the transformers-written ones."""
    for name in ("vocab.json", "merges.txt"):
        got = (mlx_tiny_dir / "tokenizer" / name).read_bytes()
        assert got == (tiny_official_dir / "CosyVoice-BlankEN" / name).read_bytes(), name


def test_weights_are_seeded_and_not_degenerate(mlx_tiny_dir: Path, tmp_path: Path) -> None:
    from tests.mlx_tiny import make_mlx_tiny_dir

    other = make_mlx_tiny_dir(tmp_path / "seed1", seed=1)
    for name in ("llm", "flow", "hift", "campplus", "speech_tokenizer"):
        a = mx.load(str(mlx_tiny_dir / f"{name}.safetensors"))
        b = mx.load(str(other / f"{name}.safetensors"))
        varied = [k for k in a if a[k].size > 1 and mx.std(a[k]).item() > 0]
        assert len(varied) > len(a) / 3, f"{name}: most weights are constant"
        assert any(not mx.array_equal(a[k], b[k]).item() for k in varied), f"{name}: seed ignored"
