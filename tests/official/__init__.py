"""The official CosyVoice2 PyTorch code as a parity reference (see `cosyvoice2.testing.official`)."""

from cosyvoice2.testing.official import build_official, install_shims, official_hparams

__all__ = ["build_official", "install_shims", "official_hparams"]
