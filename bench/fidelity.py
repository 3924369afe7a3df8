"""Fidelity metrics: how far a setting's output is from the reference setting's output.

Each function compares what one setting (a dtype, a kernel, a step count, a
streaming mode) produced with what the reference setting produced on the same
inputs and seed, so a speed-up can be judged by what it costs in output. All are
plain numpy on 1-D float waveforms (or token lists); none needs MLX or a model.

- `token_agreement`: the LLM's speech tokens, position by position.
- `log_mel_distance`: mean absolute log-mel difference with the flow's own mel
  settings (what the flow sees and predicts).
- `mrstft_distance`: multi-resolution STFT distance (spectral convergence plus
  log-magnitude L1), the usual vocoder-comparison figure.
- `f0_error`: pitch error in cents and voicing disagreement (a YIN estimator).
- `click_score`: steps at chunk joins and at the signal's ends that stand out
  from the local variation (clicks and pops a streaming join can cause).

Unequal lengths: the spectral and pitch distances compare the common prefix
only; `length_difference` gives the difference, to be reported beside them.
Bad input (not 1-D, empty, non-finite, too short, joins outside the signal)
raises `cosyvoice2.errors.InputError` with a one-line message.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from cosyvoice2.errors import InputError

# The flow's mel settings (`cosyvoice2.frontend.features.MelConfig`).
MEL_N_FFT = 1920
MEL_HOP = 480
MEL_BINS = 80
MEL_FMAX = 8000.0

MRSTFT_FFT_SIZES = (512, 1024, 2048)
_MAG_FLOOR = 1e-7  # magnitude floor before the log in the log-magnitude term

F0_MIN_HZ = 50.0
F0_MAX_HZ = 500.0
F0_FRAME_S = 0.040
F0_HOP_S = 0.010
YIN_THRESHOLD = 0.15
SILENCE_DB = 40.0  # frames this far below the loudest frame are unvoiced

CLICK_STEP_S = 0.002
CLICK_CONTEXT_S = 0.020
CLICK_FLOOR = 1e-4  # floor of the local variation (about -80 dB full scale)


# ---------------------------------------------------------------------------
# Input checks


def _signal(x: Any, name: str, min_samples: int = 1) -> np.ndarray:
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InputError(f"{name}: not a numeric waveform ({e})") from None
    if a.ndim != 1:
        raise InputError(f"{name}: expected a 1-D waveform, got shape {a.shape}")
    if a.size < min_samples:
        raise InputError(f"{name}: {a.size} samples, need at least {min_samples}")
    if not np.all(np.isfinite(a)):
        raise InputError(f"{name}: waveform has NaN or infinite samples")
    return a


def _rate(sr: Any) -> int:
    if isinstance(sr, bool) or not isinstance(sr, numbers.Integral) or sr <= 0:
        raise InputError(f"sample rate must be a positive integer, got {sr!r}")
    return int(sr)


def _tokens(x: Any, name: str) -> list[int]:
    if isinstance(x, (str, bytes)) or not isinstance(x, Sequence | np.ndarray):
        raise InputError(f"{name}: expected a sequence of token ids, got {type(x).__name__}")
    out = []
    for i, t in enumerate(x):
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise InputError(f"{name}[{i}]: token ids must be integers, got {t!r}")
        out.append(int(t))
    return out


# ---------------------------------------------------------------------------
# Tokens


def token_agreement(ref: Sequence[int], got: Sequence[int]) -> dict[str, Any]:
    """Position-wise agreement of two speech-token sequences.

    `agreement` is the number of positions holding the same token divided by
    the longer length: positions `got` is missing, or has in excess of `ref`,
    count as disagreements (two empty sequences agree fully). `first_divergence`
    is the first index where they differ, including where one ends before the
    other, or None when they are identical. Autoregressive decoding makes every
    token after the first divergence depend on it, so the index says more than
    the fraction does.
    """
    r = _tokens(ref, "ref")
    g = _tokens(got, "got")
    common = min(len(r), len(g))
    same = [a == b for a, b in zip(r[:common], g[:common])]
    longest = max(len(r), len(g))
    first = next((i for i, s in enumerate(same) if not s), None)
    if first is None and len(r) != len(g):
        first = common
    return {
        "agreement": 1.0 if longest == 0 else sum(same) / longest,
        "first_divergence": first,
        "ref_len": len(r),
        "got_len": len(g),
    }


# ---------------------------------------------------------------------------
# Spectra


def _frames(x: np.ndarray, size: int, hop: int) -> np.ndarray:
    count = 1 + (x.size - size) // hop
    return np.lib.stride_tricks.as_strided(
        x, (count, size), (x.strides[0] * hop, x.strides[0]), writeable=False
    )


def _hann(n: int) -> np.ndarray:
    return 0.5 - 0.5 * np.cos(2.0 * math.pi * np.arange(n) / n)  # periodic


def length_difference(ref_wav: Any, got_wav: Any, sr: int = 24000) -> dict[str, float]:
    """`got` length minus `ref` length, in samples and seconds (the distances ignore it)."""
    r = _signal(ref_wav, "ref")
    g = _signal(got_wav, "got")
    diff = g.size - r.size
    return {"samples": diff, "seconds": diff / _rate(sr)}


def log_mel(wav: Any, sr: int = 24000) -> np.ndarray:
    """Natural-log mel spectrogram (80, frames) with the flow's prompt-mel settings.

    n_fft = window = 1920, hop 480, reflect padding of (n_fft - hop) / 2 on both
    sides without centring, periodic Hann window, magnitude
    `sqrt(re^2 + im^2 + 1e-9)`, Slaney mel filters 0-8000 Hz (the filterbank of
    `cosyvoice2.frontend.features`), `log(max(x, 1e-5))`.
    """
    from cosyvoice2.frontend.features import slaney_mel_filters

    pad = (MEL_N_FFT - MEL_HOP) // 2
    x = _signal(wav, "wav", min_samples=pad + 1)
    rate = _rate(sr)
    x = np.pad(x, (pad, pad), mode="reflect")
    spec = np.fft.rfft(_frames(x, MEL_N_FFT, MEL_HOP) * _hann(MEL_N_FFT), axis=-1)
    mag = np.sqrt(spec.real**2 + spec.imag**2 + 1e-9)
    filters = slaney_mel_filters(rate, MEL_N_FFT, MEL_BINS, 0.0, MEL_FMAX).astype(np.float64)
    return np.log(np.maximum(filters @ mag.T, 1e-5))


def log_mel_distance(ref_wav: Any, got_wav: Any, sr: int = 24000) -> float:
    """Mean absolute difference of the two log-mel spectrograms (`log_mel`), in nats.

    Over the frames both have: the common prefix is compared and extra frames of
    the longer signal are ignored; report `length_difference` separately. 0 for
    identical signals.
    """
    a = log_mel(ref_wav, sr)
    b = log_mel(got_wav, sr)
    n = min(a.shape[1], b.shape[1])
    return float(np.mean(np.abs(a[:, :n] - b[:, :n])))


def _stft_mag(x: np.ndarray, n_fft: int) -> np.ndarray:
    hop = n_fft // 4
    x = np.pad(x, (n_fft // 2, n_fft // 2), mode="reflect")
    return np.abs(np.fft.rfft(_frames(x, n_fft, hop) * _hann(n_fft), axis=-1))


def mrstft_distance(ref_wav: Any, got_wav: Any) -> float:
    """Multi-resolution STFT distance; 0 for identical signals.

    For each FFT size N in 512, 1024, 2048 (Hann window of N, hop N / 4,
    centred frames with reflect padding), with magnitudes R (reference) and G:
    spectral convergence `||G - R||_F / ||R||_F` plus log-magnitude L1
    `mean |log G - log R|` (magnitudes floored at 1e-7); the result is the mean
    of the per-size sums. The signals are cut to their common prefix; report
    `length_difference` separately. Both need more than 1024 samples.
    """
    r = _signal(ref_wav, "ref", min_samples=max(MRSTFT_FFT_SIZES) // 2 + 1)
    g = _signal(got_wav, "got", min_samples=max(MRSTFT_FFT_SIZES) // 2 + 1)
    n = min(r.size, g.size)
    total = 0.0
    for n_fft in MRSTFT_FFT_SIZES:
        mr = _stft_mag(r[:n], n_fft)
        mg = _stft_mag(g[:n], n_fft)
        sc = np.linalg.norm(mg - mr) / max(float(np.linalg.norm(mr)), 1e-12)
        lm = np.mean(
            np.abs(np.log(np.maximum(mg, _MAG_FLOOR)) - np.log(np.maximum(mr, _MAG_FLOOR)))
        )
        total += float(sc) + float(lm)
    return total / len(MRSTFT_FFT_SIZES)


# ---------------------------------------------------------------------------
# Pitch


def f0_track(wav: Any, sr: int = 24000) -> tuple[np.ndarray, np.ndarray]:
    """F0 in Hz per 10 ms frame and the voicing flags, by YIN.

    Each 40 ms frame's difference function over lags for 50-500 Hz is
    normalised by its cumulative mean; the pitch is at the first lag whose value
    dips under 0.15 (walked down to the local minimum, refined by a parabola).
    A frame is voiced when such a dip exists and its energy is within 40 dB of
    the loudest frame. Unvoiced frames get F0 0.
    """
    rate = _rate(sr)
    win = round(F0_FRAME_S * rate)
    hop = round(F0_HOP_S * rate)
    tau_min = max(2, math.floor(rate / F0_MAX_HZ))
    tau_max = math.ceil(rate / F0_MIN_HZ)
    x = _signal(wav, "wav", min_samples=win + tau_max + 1)
    frames = _frames(x, win + tau_max + 1, hop)  # (T, win + tau_max + 1)
    head = frames[:, :win]
    # d(tau) = sum_j (x_j - x_{j+tau})^2 = E(0) + E(tau) - 2 r(tau), j in [0, win)
    size = 1 << (frames.shape[1] + win).bit_length()
    corr = np.fft.irfft(
        np.fft.rfft(frames, size, axis=-1) * np.conj(np.fft.rfft(head, size, axis=-1)),
        size,
        axis=-1,
    )[:, : tau_max + 1]
    sq = np.concatenate([np.zeros((frames.shape[0], 1)), np.cumsum(frames**2, axis=-1)], axis=-1)
    taus = np.arange(tau_max + 1)
    energy_tau = sq[:, taus + win] - sq[:, taus]
    d = np.maximum(energy_tau[:, :1] + energy_tau - 2.0 * corr, 0.0)
    cum = np.cumsum(d[:, 1:], axis=-1)
    cmnd = np.ones_like(d)
    cmnd[:, 1:] = d[:, 1:] * taus[1:] / np.maximum(cum, 1e-20)

    rms = np.sqrt(energy_tau[:, 0] / win)
    loud = rms >= max(float(rms.max()) * 10 ** (-SILENCE_DB / 20), 1e-8)
    f0 = np.zeros(frames.shape[0])
    voiced = np.zeros(frames.shape[0], dtype=bool)
    for t in range(frames.shape[0]):
        if not loud[t]:
            continue
        c = cmnd[t]
        below = np.nonzero(c[tau_min : tau_max + 1] < YIN_THRESHOLD)[0]
        if below.size == 0:
            continue
        k = tau_min + int(below[0])
        while k + 1 <= tau_max and c[k + 1] < c[k]:
            k += 1
        shift = 0.0
        if tau_min < k < tau_max:
            a, b, e = c[k - 1], c[k], c[k + 1]
            den = a - 2.0 * b + e
            if den > 0:
                shift = 0.5 * (a - e) / den
        f0[t] = rate / (k + shift)
        voiced[t] = True
    return f0, voiced


def f0_error(ref_wav: Any, got_wav: Any, sr: int = 24000) -> dict[str, Any]:
    """Pitch error of `got` against `ref` (`f0_track` on both, common frames only).

    `rmse_cents`: root mean square of `1200 log2(f0_got / f0_ref)` over frames
    voiced in both (None when there are none); `voicing_disagreement`: the
    fraction of common frames voiced in one signal and not the other;
    `frames` and `frames_both_voiced`: the counts behind them.
    """
    fr, vr = f0_track(ref_wav, sr)
    fg, vg = f0_track(got_wav, sr)
    n = min(fr.size, fg.size)
    fr, vr, fg, vg = fr[:n], vr[:n], fg[:n], vg[:n]
    both = vr & vg
    cents = 1200.0 * np.log2(fg[both] / fr[both])
    return {
        "rmse_cents": float(np.sqrt(np.mean(cents**2))) if cents.size else None,
        "voicing_disagreement": float(np.mean(vr != vg)) if n else 0.0,
        "frames": int(n),
        "frames_both_voiced": int(both.sum()),
    }


# ---------------------------------------------------------------------------
# Clicks


def click_score(wav: Any, sr: int = 24000, joins: Sequence[int] = ()) -> dict[str, Any]:
    """Click/pop score at the signal's start, at each join and at its end.

    The signal is taken as silent before its first and after its last sample,
    so `step[i] = x[i] - x[i-1]` exists for i in 0..n (a start or end far from
    zero is a step too). A join at index j is the first sample of the new chunk.
    At each point p the score is the largest |step| within +-2 ms of p divided
    by the local variation: the median |step| over the 20 ms around p (shifted
    to lie inside the signal), floored at 1e-4. A smooth signal scores about 1-2;
    a click is a step many times the local variation. Returns `points` (0,
    the joins, n), their `scores` and the `max`.
    """
    x = _signal(wav, "wav")
    rate = _rate(sr)
    n = x.size
    pts = [0]
    for i, j in enumerate(joins):
        if isinstance(j, bool) or not isinstance(j, numbers.Integral) or not 0 <= j <= n:
            raise InputError(f"joins[{i}]: expected a sample index in 0..{n}, got {j!r}")
        pts.append(int(j))
    pts.append(n)
    step = np.abs(np.diff(np.concatenate([[0.0], x, [0.0]])))  # step[i] = x[i] - x[i-1]
    near = max(1, round(CLICK_STEP_S * rate))
    ctx = min(step.size, max(1, round(CLICK_CONTEXT_S * rate)))
    scores = []
    for p in pts:
        peak = float(step[max(0, p - near) : min(step.size, p + near + 1)].max())
        lo = min(max(0, p - ctx // 2), step.size - ctx)
        local = max(float(np.median(step[lo : lo + ctx])), CLICK_FLOOR)
        scores.append(peak / local)
    return {"points": pts, "scores": scores, "max": max(scores)}
