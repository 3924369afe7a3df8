"""The official CosyVoice2 PyTorch code as a parity reference (see `cosyvoice2_testing.official`)."""

from cosyvoice2_testing.official import build_official, install_shims, official_hparams

__all__ = ["build_official", "install_shims", "official_hparams"]
