"""Audio input/output for the eval harness: mono float32 arrays, exact-ratio resampling."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

ASR_SAMPLE_RATE = 16000  # Whisper's input rate


def load_audio(path: str | Path, sample_rate: int | None = None) -> tuple[np.ndarray, int]:
    """Read a sound file as mono float32 in [-1, 1]; resample when `sample_rate` is given."""
    import soundfile as sf

    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    wav = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if sample_rate is not None and sr != sample_rate:
        return resample(wav, sr, sample_rate), sample_rate
    return np.ascontiguousarray(wav, dtype=np.float32), sr


def resample(wav: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Polyphase resampling by the exact ratio sr_out/sr_in (scipy's Kaiser-window FIR)."""
    if sr_in == sr_out:
        return np.asarray(wav, dtype=np.float32)
    from scipy.signal import resample_poly

    g = math.gcd(int(sr_in), int(sr_out))
    out = resample_poly(np.asarray(wav, dtype=np.float64), sr_out // g, sr_in // g)
    return out.astype(np.float32)


def save_audio(path: str | Path, wav: np.ndarray, sample_rate: int) -> None:
    """Write mono float32 audio as 16-bit PCM WAV (what the Seed-TTS-eval tools read)."""
    import soundfile as sf

    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim != 1:
        raise ValueError(f"expected mono audio (1-D), got shape {wav.shape}")
    # written beside `path` and renamed: a killed run never leaves a partial wav
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        sf.write(
            str(tmp), np.clip(wav, -1.0, 1.0), int(sample_rate), subtype="PCM_16", format="WAV"
        )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
