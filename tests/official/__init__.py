"""The official CosyVoice2 PyTorch code as a parity reference.

Importing this package installs three small import shims (see `shims.py`) and
then exposes `build_official`, which constructs any official module from the
hyperparameters of a `cosyvoice2.yaml` with a given seed.
"""

from tests.official.shims import install_shims

install_shims()

from tests.official.build import (  # noqa: E402
    build_official,
    official_hparams,
)

__all__ = ["build_official", "official_hparams", "install_shims"]
