"""Real-speech clips for the frontend tests: Debian's Asterisk prompts and espeak-ng output.

A test that asks for clips gets all of them or skips, with a reason naming the
package to install; it never runs on fewer clips than it names. (`nox -s tests`
sets `COSYVOICE2_NO_SKIP`, which turns such a skip into a failure that prints
the reason.)

- Asterisk: Allison Smith's English prompts from `asterisk-core-sounds-en-wav`
  (8 kHz recordings; loaded through `audio.load_prompt_wav`, which resamples
  them as a prompt is).
- espeak-ng: a sentence synthesised by the `espeak-ng` program (22.05 kHz).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from cosyvoice2.frontend import audio

ASTERISK = Path("/usr/share/asterisk/sounds/en")
ASTERISK_PACKAGE = "asterisk-core-sounds-en-wav"
ESPEAK_PACKAGE = "espeak-ng"


def asterisk_path(name: str) -> Path:
    """The path of one Asterisk prompt; skips naming the package where it is missing."""
    path = ASTERISK / name
    if not path.is_file():
        pytest.skip(f"real speech missing: install {ASTERISK_PACKAGE} (no {path})")
    return path


def asterisk_clips(names: list[str], sr: int) -> dict[str, np.ndarray]:
    """Each named Asterisk prompt at `sr` (all of them, or skip)."""
    return {name: audio.load_prompt_wav(asterisk_path(name), sr) for name in names}


def espeak_wav(text: str, folder: Path) -> Path:
    """`text` spoken by espeak-ng (en-us) into `folder/espeak.wav`; skips naming the package."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        pytest.skip(f"real speech missing: install {ESPEAK_PACKAGE} (no espeak-ng program)")
    path = Path(folder) / "espeak.wav"
    subprocess.run([exe, "-v", "en-us", "-w", str(path), text], check=True, capture_output=True)
    return path


def speech_clips(names: list[str], text: str, sr: int, folder: Path) -> dict[str, np.ndarray]:
    """The named Asterisk prompts plus `text` from espeak-ng (key "espeak"), at `sr`."""
    out = asterisk_clips(names, sr)
    out["espeak"] = audio.load_prompt_wav(espeak_wav(text, folder), sr)
    return out


def knf_fbank(x: np.ndarray) -> np.ndarray:
    """Kaldi fbank of 16 kHz samples by kaldi-native-fbank (80 bins, no dither): a second,
    independent Kaldi implementation for the features' and CAM++'s references."""
    knf = pytest.importorskip("kaldi_native_fbank")
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.samp_freq = 16000
    opts.mel_opts.num_bins = 80
    fb = knf.OnlineFbank(opts)
    fb.accept_waveform(16000, x.tolist())
    fb.input_finished()
    return np.stack([fb.get_frame(i) for i in range(fb.num_frames_ready)])
