"""STFT and inverse STFT of HiFT (n_fft 16, hop 4), in MLX, equal to `torch.stft` / `torch.istft`.

The official HiFT (`cosyvoice/hifigan/generator.py`, `HiFTGenerator._stft` and
`_istft`) calls `torch.stft` and `torch.istft` with `center=True`, reflect
padding and a periodic Hann window of length n_fft. MLX has no such functions;
these are their equivalents for the sizes HiFT uses, kept apart from the
generator (`cosyvoice2.hift`, whose `_stft` / `_istft` methods call them) since
they are signal processing, not part of the network.

With n_fft 16 a DFT is cheaper as a small matrix product than as an FFT: the
analysis is one (n_fft, 2 * bins) matrix with the window folded in, the synthesis
its onesided inverse (2 * bins, n_fft) times the window. Framing and
overlap-add are reshapes into hop-sized blocks and shifted sums (n_fft must be a
multiple of hop), and the window-square envelope that `torch.istft` divides by is
precomputed per frame count. Spectra are real arrays (B, frames, [Re | Im]),
channels-last like the rest of the port.
"""

from __future__ import annotations

import functools

import mlx.core as mx
import numpy as np


@functools.lru_cache(maxsize=8)
def _stft_mats(n_fft: int) -> tuple[mx.array, mx.array, np.ndarray]:
    """(analysis (n_fft, 2 * bins), synthesis (2 * bins, n_fft), window) for a periodic Hann window.

    Analysis: [Re | Im] of the onesided DFT of a windowed frame. Synthesis: the
    onesided inverse DFT (1/n_fft, interior bins doubled, imaginary parts of DC
    and Nyquist ignored as a c2r transform does) times the window, as `torch.istft`.
    """
    n = np.arange(n_fft)
    bins = n_fft // 2 + 1
    k = np.arange(bins)
    window = (0.5 - 0.5 * np.cos(2.0 * np.pi * n / n_fft)).astype(np.float32).astype(np.float64)
    ang = 2.0 * np.pi * np.outer(n, k) / n_fft  # (n_fft, bins)
    analysis = np.concatenate(
        [window[:, None] * np.cos(ang), -window[:, None] * np.sin(ang)], axis=1
    )
    weight = np.full(bins, 2.0)
    weight[0] = 1.0
    if n_fft % 2 == 0:
        weight[-1] = 1.0
    synth_re = (weight[:, None] * np.cos(ang.T)) / n_fft * window[None, :]
    synth_im = (-weight[:, None] * np.sin(ang.T)) / n_fft * window[None, :]
    synthesis = np.concatenate([synth_re, synth_im], axis=0)
    return (
        mx.array(analysis.astype(np.float32)),
        mx.array(synthesis.astype(np.float32)),
        window.astype(np.float32),
    )


@functools.lru_cache(maxsize=16)
def _istft_envelope(n_frames: int, n_fft: int, hop: int) -> mx.array:
    """1 / (sum of squared windows) over the trimmed istft output (length hop * (n_frames - 1))."""
    _, _, window = _stft_mats(n_fft)
    per = n_fft // hop
    env = np.zeros((n_frames + per - 1, hop), dtype=np.float32)
    w2 = (window * window).reshape(per, hop)
    for j in range(per):
        env[j : j + n_frames] += w2[j]
    env = env.reshape(-1)[n_fft // 2 : n_fft // 2 + hop * (n_frames - 1)]
    return mx.array(np.float32(1.0) / env)


def _frames_from_blocks(blocks: mx.array, per: int, n_frames: int) -> mx.array:
    """Frames of `per` consecutive hop-blocks: (B, n_frames + per - 1, hop) -> (B, n_frames, per * hop)."""
    return mx.concatenate([blocks[:, j : j + n_frames] for j in range(per)], axis=-1)


def stft(s: mx.array, n_fft: int, hop: int) -> mx.array:
    """torch.stft(s, n_fft, hop, window=hann, center=True, reflect) as (B, frames, [Re | Im])."""
    analysis, _, _ = _stft_mats(n_fft)
    length = s.shape[1]
    if length % hop:
        raise ValueError(f"source length {length} is not a multiple of hop {hop}")
    half = n_fft // 2
    padded = mx.concatenate([s[:, 1 : half + 1][:, ::-1], s, s[:, -half - 1 : -1][:, ::-1]], axis=1)
    n_frames = length // hop + 1
    per = n_fft // hop
    blocks = padded.reshape(s.shape[0], n_frames + per - 1, hop)
    return _frames_from_blocks(blocks, per, n_frames) @ analysis


def istft(spec: mx.array, n_fft: int, hop: int) -> mx.array:
    """torch.istft (hann, center=True) of (B, frames, [Re | Im]) -> (B, hop * (frames - 1))."""
    _, synthesis, _ = _stft_mats(n_fft)
    frames = spec @ synthesis  # (B, F, n_fft), windowed
    b, n_frames, _ = frames.shape
    per = n_fft // hop
    frames = frames.reshape(b, n_frames, per, hop)
    out = None
    for j in range(per):
        part = mx.pad(frames[:, :, j], [(0, 0), (j, per - 1 - j), (0, 0)])
        out = part if out is None else out + part
    out = out.reshape(b, -1)[:, n_fft // 2 : n_fft // 2 + hop * (n_frames - 1)]
    return out * _istft_envelope(n_frames, n_fft, hop)
