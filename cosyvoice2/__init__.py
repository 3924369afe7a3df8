"""CosyVoice2-0.5B text-to-speech in MLX.

A port of the official PyTorch model, proven by parity tests against it; see the
README for the commands and ../ARCHITECTURE for the layout.
"""

__version__ = "0.1.0"
