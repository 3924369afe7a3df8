"""Write `torchaudio_reference.npz`: outputs of the real torchaudio functions the official frontend calls.

torchaudio has no build for torch 2.13, but the two functions the official
CosyVoice2 frontend uses, `torchaudio.compliance.kaldi.fbank` and
`torchaudio.transforms.Resample`, are pure PyTorch code. This script was run
once with torchaudio 2.11.0's Python sources on the path (the wheel unpacked
and its native `lib/*.so` files deleted, so `import torchaudio` skips the
extension), and torch 2.13.0 CPU:

    pip download --no-deps torchaudio==2.11.0 -d /tmp/ta
    python -m zipfile -e /tmp/ta/torchaudio-2.11.0-*.whl /tmp/ta/site
    rm /tmp/ta/site/torchaudio/lib/*.so
    PYTHONPATH=/tmp/ta/site python tests/data/frontend/make_torchaudio_reference.py

The inputs are stored with the outputs, so the tests do not depend on numpy's
random streams. `tests/test_features.py` compares our numpy/MLX versions with them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torchaudio
from torchaudio.compliance import kaldi

OUT = Path(__file__).with_name("torchaudio_reference.npz")
# Real speech from Debian's asterisk-core-sounds-en-wav (8 kHz): only the fbank of it is stored, with the
# file's sha256 so the test can check it reads the same recording.
ASTERISK_CLIP = Path("/usr/share/asterisk/sounds/en/vm-login.wav")
RESAMPLE_PAIRS = [
    (8000, 16000),
    (11025, 16000),
    (22050, 16000),
    (24000, 16000),
    (44100, 16000),
    (48000, 16000),
    (16000, 24000),
    (44100, 24000),
]


def speechlike(sr: int, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Voiced segments (harmonics of a gliding f0, formant-like spectral tilt) separated by near-silence."""
    t = np.arange(int(sr * seconds)) / sr
    f0 = 110 + 40 * np.sin(2 * np.pi * 1.3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    x = sum(np.sin(k * phase) / k**1.2 for k in range(1, 30))
    envelope = np.clip(np.sin(2 * np.pi * 1.7 * t), 0, None) ** 2
    x = 0.3 * x * envelope + 1e-4 * rng.standard_normal(t.shape)
    return (x / np.abs(x).max() * 0.8).astype(np.float32)


def main() -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(20261127)
    data: dict[str, np.ndarray] = {
        "torchaudio_version": np.array(torchaudio.__version__),
        "torch_version": np.array(torch.__version__),
    }
    data["fbank_speechlike_in"] = speechlike(16000, 1.5, rng)
    data["fbank_noise_in"] = (0.1 * rng.standard_normal(8000)).astype(np.float32)
    for name in ("speechlike", "noise"):
        x = torch.from_numpy(data[f"fbank_{name}_in"])[None]
        data[f"fbank_{name}_out"] = kaldi.fbank(
            x, num_mel_bins=80, dither=0, sample_frequency=16000
        ).numpy()
    import soundfile as sf

    wav, sr = sf.read(str(ASTERISK_CLIP), dtype="float32", always_2d=True)
    speech = torchaudio.transforms.Resample(sr, 16000)(torch.from_numpy(wav.mean(axis=1))[None])
    data["fbank_asterisk_sha256"] = np.array(hashlib.sha256(ASTERISK_CLIP.read_bytes()).hexdigest())
    data["fbank_asterisk_out"] = kaldi.fbank(
        speech, num_mel_bins=80, dither=0, sample_frequency=16000
    ).numpy()
    for orig, new in RESAMPLE_PAIRS:
        x = (0.3 * rng.standard_normal((2 if orig == 8000 else 1, orig // 16))).astype(np.float32)
        data[f"resample_{orig}_{new}_in"] = x
        data[f"resample_{orig}_{new}_out"] = torchaudio.transforms.Resample(orig, new)(
            torch.from_numpy(x)
        ).numpy()
    x = speechlike(16000, 0.5, rng)
    data["resample_speechlike_16000_24000_in"] = x
    data["resample_speechlike_16000_24000_out"] = torchaudio.transforms.Resample(16000, 24000)(
        torch.from_numpy(x)[None]
    )[0].numpy()
    np.savez_compressed(OUT, **data)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
