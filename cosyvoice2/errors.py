"""Errors the package raises on purpose, so callers (the CLI) can report them in one line.

`CosyVoiceError` is the base of every error caused by the user's input or files
rather than by a bug; `InputError` is the one for bad input data (prompt audio,
text, paths). Messages are one line and name the problem and the offending thing.
"""

from __future__ import annotations


class CosyVoiceError(Exception):
    """Base class of the package's deliberate errors (bad input, bad model files)."""


class InputError(CosyVoiceError):
    """Bad input data: prompt audio that is missing, unreadable, silent, too short or too long; bad text."""


class CheckpointError(CosyVoiceError):
    """A model file that cannot be read safely: corrupt, truncated, of an unknown format, or
    naming code (a pickle global) that is not on the tensor-rebuild allowlist."""


class SpeakerStoreError(CosyVoiceError):
    """A saved-speaker store (`speakers/` of a model dir) that cannot be used safely: a corrupt
    or hand-edited `index.json`, a corrupt speaker file, or one that is not where its id says."""
