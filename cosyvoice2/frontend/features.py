"""Prompt features in MLX: the flow's mel, Kaldi fbank for CAM++, Whisper log-mel for the S3 tokenizer.

Each function reproduces the function the official frontend calls:

- `mel_spectrogram`: `matcha.utils.audio.mel_spectrogram` with CosyVoice2's
  `feat_extractor` settings (24 kHz, n_fft = win = 1920, hop 480, 80 bins,
  0-8000 Hz): reflect padding of (n_fft - hop) / 2 on both sides, no centering,
  periodic Hann window, magnitude `sqrt(re^2 + im^2 + 1e-9)`, Slaney mel
  filters (librosa's default), `log(max(x, 1e-5))`. Output (B, 80, frames).
- `kaldi_fbank`: `torchaudio.compliance.kaldi.fbank(x, num_mel_bins=80,
  dither=0, sample_frequency=16000)`, i.e. Kaldi's `compute-fbank-feats`
  defaults: 25 ms frames every 10 ms with snipped edges, DC removal,
  pre-emphasis 0.97, Povey window, zero padding to 512, power spectrum, 80
  triangular bins on Kaldi's mel scale `1127 ln(1 + f/700)` from 20 Hz to
  Nyquist, `log(max(x, float32 eps))`. `campplus_features` subtracts the mean
  over time, as the official `_extract_spk_embedding` does. Output (frames, 80).
- `whisper_log_mel`: `whisper.log_mel_spectrogram(x, n_mels=128)` (identical to
  `s3tokenizer.log_mel_spectrogram`): 16 kHz, n_fft 400, hop 160, centred with
  reflect padding, periodic Hann window, the last frame dropped, power
  spectrum, Slaney mel filters, `log10(max(x, 1e-10))` floored at its maximum
  minus 8, then `(x + 4) / 4`. Output (128, frames) or (B, 128, frames).

The filterbanks are built once in numpy (float64, stored as float32, the same
values librosa and Whisper's `mel_filters.npz` hold) and cached.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Any

import mlx.core as mx
import numpy as np

_FLOAT32_EPS = float(np.finfo(np.float32).eps)


@dataclass(frozen=True)
class MelConfig:
    """The flow-prompt mel: the official yaml's `feat_extractor` (`matcha` `mel_spectrogram`) arguments."""

    n_fft: int = 1920
    num_mels: int = 80
    sampling_rate: int = 24000
    hop_size: int = 480
    win_size: int = 1920
    fmin: float = 0.0
    fmax: float = 8000.0
    center: bool = False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MelConfig:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------
# Filterbanks (numpy, cached)


def _hz_to_mel_slaney(f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    f_sp = 200.0 / 3
    mels = f / f_sp
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0
    return np.where(
        f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, mels
    )


def _mel_to_hz_slaney(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


@functools.lru_cache(maxsize=8)
def slaney_mel_filters(
    sr: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None
) -> np.ndarray:
    """Slaney-style mel filterbank (n_mels, n_fft // 2 + 1), area-normalised: librosa's `filters.mel` defaults."""
    if fmax is None:
        fmax = sr / 2.0
    fft_freqs = np.linspace(0.0, sr / 2.0, 1 + n_fft // 2)
    mel_pts = np.linspace(_hz_to_mel_slaney(fmin), _hz_to_mel_slaney(fmax), n_mels + 2)
    hz_pts = _mel_to_hz_slaney(mel_pts)
    fdiff = np.diff(hz_pts)
    ramps = hz_pts[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (hz_pts[2 : n_mels + 2] - hz_pts[:n_mels]))[:, None]
    out = weights.astype(np.float32)
    out.flags.writeable = False
    return out


@functools.lru_cache(maxsize=8)
def kaldi_mel_banks(
    num_bins: int,
    padded_window: int,
    sample_freq: float,
    low_freq: float = 20.0,
    high_freq: float = 0.0,
) -> np.ndarray:
    """Kaldi's triangular mel banks (num_bins, padded_window // 2 + 1); the Nyquist column is zero.

    The bank edges and the bins' mel values are computed in float32, as Kaldi
    (`BaseFloat`) and torchaudio's `get_mel_banks` do: computing them in float64
    moves weights near the triangles' edges by up to 1.4e-5, which shows in the
    lowest-energy bins of the log fbank.
    """
    nyquist = 0.5 * sample_freq
    if high_freq <= 0.0:
        high_freq += nyquist
    if not (0.0 <= low_freq < nyquist and 0.0 < high_freq <= nyquist and low_freq < high_freq):
        raise ValueError(f"bad mel range {low_freq}-{high_freq} Hz for sample rate {sample_freq}")
    f32 = np.float32
    mel_low = 1127.0 * math.log(1.0 + low_freq / 700.0)
    mel_high = 1127.0 * math.log(1.0 + high_freq / 700.0)
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = np.arange(num_bins, dtype=f32)[:, None]
    left = f32(mel_low) + b * f32(delta)
    center = f32(mel_low) + (b + f32(1.0)) * f32(delta)
    right = f32(mel_low) + (b + f32(2.0)) * f32(delta)
    freqs = f32(sample_freq / padded_window) * np.arange(padded_window // 2, dtype=f32)
    m = (f32(1127.0) * np.log((f32(1.0) + freqs / f32(700.0)).astype(np.float64)).astype(f32))[
        None, :
    ]
    up = (m - left) / (center - left)
    down = (right - m) / (right - center)
    banks = np.maximum(f32(0.0), np.minimum(up, down))
    out = np.pad(banks, ((0, 0), (0, 1))).astype(np.float32)
    out.flags.writeable = False
    return out


@functools.lru_cache(maxsize=8)
def _hann(n: int, periodic: bool) -> np.ndarray:
    denom = n if periodic else n - 1
    return (0.5 - 0.5 * np.cos(2.0 * math.pi * np.arange(n, dtype=np.float64) / denom)).astype(
        np.float32
    )


@functools.lru_cache(maxsize=8)
def _povey(n: int) -> np.ndarray:
    return (_hann(n, periodic=False).astype(np.float64) ** 0.85).astype(np.float32)


# ---------------------------------------------------------------------------
# Framing helpers (MLX)


def _as_batch(x: mx.array | np.ndarray) -> tuple[mx.array, bool]:
    x = mx.array(x) if not isinstance(x, mx.array) else x
    x = x.astype(mx.float32)
    if x.ndim == 1:
        return x[None], True
    if x.ndim != 2:
        raise ValueError(
            f"expected audio of shape (samples,) or (batch, samples), got {tuple(x.shape)}"
        )
    return x, False


def _reflect_pad(x: mx.array, left: int, right: int) -> mx.array:
    """Reflect-pad the last axis (the edge sample is not repeated), as torch's `mode='reflect'`."""
    n = x.shape[-1]
    if left >= n or right >= n:
        raise ValueError(
            f"audio of {n} samples is too short for reflect padding of {max(left, right)}"
        )
    parts = []
    if left:
        parts.append(x[:, left:0:-1])
    parts.append(x)
    if right:
        parts.append(x[:, n - 2 : n - 2 - right : -1])
    return mx.concatenate(parts, axis=-1)


def _frames(x: mx.array, size: int, hop: int) -> mx.array:
    """(B, N) -> (B, 1 + (N - size) // hop, size) overlapping frames."""
    b, n = x.shape
    if n < size:
        raise ValueError(f"audio of {n} samples is shorter than one frame ({size})")
    count = 1 + (n - size) // hop
    x = mx.contiguous(x)
    return mx.as_strided(x, (b, count, size), (n, hop, 1))


# ---------------------------------------------------------------------------
# The three features


def mel_spectrogram(y: mx.array | np.ndarray, config: MelConfig = MelConfig()) -> mx.array:
    """Log-mel of 24 kHz audio (B, N) or (N,) for the flow prompt: (B, num_mels, frames), natural log."""
    if config.center:
        raise NotImplementedError("CosyVoice2's feat_extractor uses center=False")
    if config.win_size != config.n_fft:
        raise NotImplementedError("win_size must equal n_fft (as in CosyVoice2)")
    x, _ = _as_batch(y)
    pad = (config.n_fft - config.hop_size) // 2
    x = _reflect_pad(x, pad, pad)
    frames = _frames(x, config.n_fft, config.hop_size) * mx.array(
        _hann(config.win_size, periodic=True)
    )
    spec = mx.fft.rfft(frames, axis=-1)
    mag = mx.sqrt(mx.real(spec) ** 2 + mx.imag(spec) ** 2 + 1e-9)  # (B, T, F)
    fb = slaney_mel_filters(
        config.sampling_rate, config.n_fft, config.num_mels, float(config.fmin), float(config.fmax)
    )
    mel = mx.matmul(mx.array(fb), mag.transpose(0, 2, 1))  # (B, M, T)
    return mx.log(mx.maximum(mel, 1e-5))


def kaldi_fbank(
    waveform: mx.array | np.ndarray,
    num_mel_bins: int = 80,
    sample_frequency: float = 16000.0,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
    preemphasis: float = 0.97,
    low_freq: float = 20.0,
    high_freq: float = 0.0,
) -> mx.array:
    """Kaldi fbank (dither 0, Povey window, snip edges) of one waveform (N,): (frames, num_mel_bins).

    Matches `torchaudio.compliance.kaldi.fbank` with the same arguments and its defaults otherwise.
    """
    x, single = _as_batch(waveform)
    if not single:
        raise ValueError("kaldi_fbank takes one waveform of shape (samples,)")
    shift = int(sample_frequency * frame_shift_ms * 0.001)
    size = int(sample_frequency * frame_length_ms * 0.001)
    padded = 1 << (size - 1).bit_length()
    frames = _frames(x, size, shift)[0]  # (T, size)
    frames = frames - mx.mean(frames, axis=1, keepdims=True)
    previous = mx.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    frames = (frames - preemphasis * previous) * mx.array(_povey(size))
    frames = mx.pad(frames, [(0, 0), (0, padded - size)])
    spec = mx.fft.rfft(frames, axis=-1)
    power = mx.real(spec) ** 2 + mx.imag(spec) ** 2
    banks = kaldi_mel_banks(num_mel_bins, padded, float(sample_frequency), low_freq, high_freq)
    energies = mx.matmul(power, mx.array(banks).T)
    return mx.log(mx.maximum(energies, _FLOAT32_EPS))


def campplus_features(speech_16k: mx.array | np.ndarray) -> mx.array:
    """CAM++ input for one 16 kHz waveform: 80-bin Kaldi fbank minus its mean over time, (frames, 80)."""
    feat = kaldi_fbank(speech_16k, num_mel_bins=80, sample_frequency=16000.0)
    return feat - mx.mean(feat, axis=0, keepdims=True)


def whisper_log_mel(audio: mx.array | np.ndarray, n_mels: int = 128) -> mx.array:
    """Whisper log-mel of 16 kHz audio: (n_mels, frames) for (N,) input, (B, n_mels, frames) for (B, N).

    As in Whisper, the floor (maximum minus 8) is taken over the whole input, so a batch is
    floored at its overall maximum; pass prompts one at a time to match the official frontend.
    """
    n_fft, hop = 400, 160
    x, single = _as_batch(audio)
    x = _reflect_pad(x, n_fft // 2, n_fft // 2)
    frames = _frames(x, n_fft, hop)[:, :-1] * mx.array(_hann(n_fft, periodic=True))
    spec = mx.fft.rfft(frames, axis=-1)
    power = mx.real(spec) ** 2 + mx.imag(spec) ** 2  # (B, T, F)
    fb = slaney_mel_filters(16000, n_fft, n_mels)
    mel = mx.matmul(mx.array(fb), power.transpose(0, 2, 1))
    log_spec = mx.log10(mx.maximum(mel, 1e-10))
    log_spec = mx.maximum(log_spec, mx.max(log_spec) - 8.0)
    log_spec = (log_spec + 4.0) / 4.0
    return log_spec[0] if single else log_spec
