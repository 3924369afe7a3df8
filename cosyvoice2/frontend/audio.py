"""Prompt audio: read any wav, mix to mono, resample as the official frontend does, check it.

The official CosyVoice2 frontend loads a prompt with `load_wav(path, sr)`:
`torchaudio.load`, the mean over channels, then `torchaudio.transforms.Resample`
(windowed-sinc interpolation, Hann window, 6 zero crossings, roll-off 0.99, the
kernel computed in float64 and applied in float32). `resample` below is that
algorithm written in numpy, so prompt features match the official ones closely
without torch or torchaudio:

- For each output phase `j` of the reduced ratio `orig/new` (rates divided by
  their gcd), the kernel tap at input offset `i` is
  `sinc(pi * b * (i/orig - j/new)) * cos(pi/2 * b * (i/orig - j/new) / 6)^2 * b/orig`
  with `b = 0.99 * min(orig, new)`, the argument clamped to +-6 zero crossings.
- The signal is zero-padded by `width` on the left and `width + orig` on the
  right and each block of `orig` input steps yields `new` outputs; the result is
  cut to `ceil(new * length / orig)` samples.

Unlike the mid-2025 official `load_wav`, which asserts that the file's rate is
at least the target rate, any rate is accepted (8 kHz telephone prompts are
upsampled). Errors are `cosyvoice2.errors.InputError` with one-line messages.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np

from cosyvoice2.errors import InputError

#: Shortest and longest prompt accepted, in seconds. The official speech
#: tokenizer refuses audio longer than 30 s; under 0.5 s there is too little
#: speech for a speaker embedding and prompt tokens.
MIN_PROMPT_SECONDS = 0.5
MAX_PROMPT_SECONDS = 30.0
#: A prompt whose peak amplitude is at or below this (-80 dBFS) counts as silent.
SILENCE_PEAK = 1e-4

_LOWPASS_FILTER_WIDTH = 6
_ROLLOFF = 0.99


@functools.lru_cache(maxsize=32)
def _sinc_kernel(orig: int, new: int) -> tuple[np.ndarray, int]:
    """Polyphase kernel (new, 2*width + orig) for reduced rates `orig` -> `new`, and `width`.

    Computed in float64 and rounded to float32 once, as torchaudio's `Resample` caches it.
    """
    base = min(orig, new) * _ROLLOFF
    width = math.ceil(_LOWPASS_FILTER_WIDTH * orig / base)
    idx = np.arange(-width, width + orig, dtype=np.float64)[None, :] / orig
    t = -np.arange(new, dtype=np.float64)[:, None] / new + idx
    t = np.clip(t * base, -_LOWPASS_FILTER_WIDTH, _LOWPASS_FILTER_WIDTH)
    window = np.cos(t * math.pi / _LOWPASS_FILTER_WIDTH / 2) ** 2
    t = t * math.pi
    safe = np.where(t == 0, 1.0, t)
    kernel = np.where(t == 0, 1.0, np.sin(safe) / safe) * window * (base / orig)
    return kernel.astype(np.float32), width


def resample(x: np.ndarray, orig_sr: int, new_sr: int) -> np.ndarray:
    """Resample `x` (..., time) from `orig_sr` to `new_sr` as `torchaudio.transforms.Resample` does.

    Returns float32. Equal rates return the input as float32 unchanged.
    """
    if int(orig_sr) != orig_sr or int(new_sr) != new_sr or orig_sr <= 0 or new_sr <= 0:
        raise ValueError(f"sample rates must be positive integers, got {orig_sr} and {new_sr}")
    x = np.asarray(x, dtype=np.float32)
    if orig_sr == new_sr:
        return x
    g = math.gcd(int(orig_sr), int(new_sr))
    orig, new = int(orig_sr) // g, int(new_sr) // g
    kernel, width = _sinc_kernel(orig, new)
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    length = flat.shape[-1]
    padded = np.pad(flat, ((0, 0), (width, width + orig)))
    taps = kernel.shape[1]
    blocks = (padded.shape[-1] - taps) // orig + 1
    s0, s1 = padded.strides
    frames = np.lib.stride_tricks.as_strided(
        padded, (padded.shape[0], blocks, taps), (s0, orig * s1, s1), writeable=False
    )
    out = (frames @ kernel.T).reshape(flat.shape[0], -1)
    target = math.ceil(new * length / orig)
    return np.ascontiguousarray(out[:, :target]).reshape(*shape[:-1], -1)


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Read an audio file as float32 mono (the mean over channels, as the official `load_wav`) and its rate."""
    import soundfile as sf

    path = Path(path)
    if not path.exists():
        raise InputError(f"prompt audio not found: {path}")
    if not path.is_file():
        raise InputError(f"prompt audio is not a file: {path}")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError, TypeError...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"cannot read prompt audio {path}: {reason}") from None
    if data.shape[0] == 0 or data.shape[1] == 0:
        raise InputError(f"prompt audio has no samples: {path}")
    return data.mean(axis=1, dtype=np.float32), int(sr)


def check_prompt(speech: np.ndarray, sr: int, name: str = "prompt audio") -> None:
    """Raise `InputError` when `speech` is not finite, silent, shorter than 0.5 s or longer than 30 s."""
    seconds = speech.shape[-1] / sr
    if not np.all(np.isfinite(speech)):
        raise InputError(f"{name} contains NaN or infinite samples")
    if seconds < MIN_PROMPT_SECONDS:
        raise InputError(f"{name} is too short: {seconds:.2f} s (at least {MIN_PROMPT_SECONDS} s)")
    if seconds > MAX_PROMPT_SECONDS:
        raise InputError(
            f"{name} is too long: {seconds:.2f} s (at most {MAX_PROMPT_SECONDS:.0f} s)"
        )
    if float(np.max(np.abs(speech))) <= SILENCE_PEAK:
        raise InputError(f"{name} is silent (peak amplitude at or below {SILENCE_PEAK:g})")


def load_wav(path: str | Path, target_sr: int) -> np.ndarray:
    """Read `path`, mix to mono and resample to `target_sr` (float32, 1-D), without checks."""
    speech, sr = read_audio(path)
    return resample(speech, sr, target_sr)


def load_prompt_wav(path: str | Path, target_sr: int = 16000) -> np.ndarray:
    """Load a prompt wav of any rate and channel count at `target_sr`, checked as a prompt.

    Raises `InputError` for a missing or unreadable file and for prompt audio that
    is silent, shorter than 0.5 s or longer than 30 s (checked at the file's rate).
    """
    speech, sr = read_audio(path)
    check_prompt(speech, sr, name=f"prompt audio {Path(path).name}")
    return resample(speech, sr, target_sr)
