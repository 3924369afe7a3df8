"""The official CosyVoice2 PyTorch code as a parity reference (see `cosyvoice2_testing.official`)."""

from types import ModuleType

import pytest

from cosyvoice2_testing.official import build_official, install_shims, official_hparams

__all__ = ["build_official", "install_shims", "need_official_frontend", "official_hparams"]


def need_official_frontend() -> ModuleType:
    """Skip (a failure under `nox -s tests`) unless the official frontend's stack imports:
    torch, the official wheel, onnxruntime, openai-whisper and wetext. Returns torch."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("cosyvoice")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("whisper", reason="the official frontend imports openai-whisper")
    pytest.importorskip(
        "wetext", reason="the official text normalisation (upstream's tn) runs on wetext"
    )
    return torch
