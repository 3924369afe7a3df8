"""Shared fixtures: synthetic official model dirs and the official reference modules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep torch from fighting MLX/OpenBLAS for the two cores; parity numerics do not depend on it.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _need_reference() -> None:
    pytest.importorskip("torch")
    pytest.importorskip(
        "cosyvoice", reason="the official CosyVoice code (parity environment) is not installed"
    )


@pytest.fixture(scope="session")
def tiny_pt_dir() -> Path:
    """Synthetic official dir (tiny) with the three `.pt` files, without the ONNX files."""
    _need_reference()
    from cosyvoice2.testing.synthetic import cached_official_dir

    return cached_official_dir("tiny", seed=0, onnx=False)


@pytest.fixture(scope="session")
def tiny_official_dir() -> Path:
    """Synthetic official dir (tiny), complete: `.pt` files, ONNX files and tokenizer."""
    _need_reference()
    from cosyvoice2.testing.synthetic import cached_official_dir

    return cached_official_dir("tiny", seed=0, onnx=True)


@pytest.fixture(scope="session")
def full_official_dir() -> Path:
    """Synthetic official dir at the real 0.5B shapes (generated once, about 2.5 GB)."""
    _need_reference()
    from cosyvoice2.testing.synthetic import cached_official_dir

    return cached_official_dir("full", seed=0, onnx=True)


@pytest.fixture(scope="session")
def torch_threads() -> None:
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_mlx_dir(tiny_official_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny synthetic official dir converted to an MLX model dir (once per session)."""
    from cosyvoice2.convert import convert

    return convert(tiny_official_dir, tmp_path_factory.mktemp("mlx") / "tiny")
