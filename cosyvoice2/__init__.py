"""CosyVoice2-0.5B text-to-speech in MLX.

A port of the official PyTorch model, proven by parity tests against it; see the
README for the commands and the layout.
"""

__version__ = "0.1.0"

from cosyvoice2 import blas as _blas  # noqa: E402 - before anything loads MLX
from cosyvoice2 import malloc as _malloc  # noqa: E402

_blas.setup()
_malloc.tune()


def load(path, **kwargs):
    """Load an MLX model dir written by `cosyvoice2 convert` (see `cosyvoice2.model.CosyVoice2.load`)."""
    from cosyvoice2.model import CosyVoice2

    return CosyVoice2.load(path, **kwargs)
