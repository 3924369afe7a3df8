"""HiFT's F0 predictor and harmonic source, in MLX: mel -> F0 -> excitation signal.

The 24 kHz source (CosyVoice2) is `SourceModuleHnNSF2` / `SineGen2`, described below; the
first generation's 22.05 kHz source is `SourceModuleHnNSF` / `SineGen` (phase integrated per
sample, random initial phases of the harmonics as an input).

A port of the official `cosyvoice/hifigan/f0_predictor.py` (`ConvRNNF0Predictor`)
and of the source half of `cosyvoice/hifigan/generator.py` (`SineGen2`,
`SourceModuleHnNSF2`; latest upstream renames `SourceModuleHnNSF2` to
`SourceModuleHnNSF` with `sinegen_type='2'`, same computation and keys, for any
rate but 22.05 kHz). `cosyvoice2.hift.HiFTGenerator` holds them as
`f0_predictor` and `m_source`, under the official module and parameter names.
They live apart from the generator because their arithmetic is the delicate
part of the parity (the phase below), and is read against the official files
side by side.

- `ConvRNNF0Predictor`: five k=3 convs with ELU, a linear head, `abs` -> F0 per
  mel frame (channels-last (B, T, C) input, as MLX convs take it).
- `SourceModuleHnNSF2`: `SineGen2` makes 9 harmonics of the F0 (repeated to the
  sample rate, x480 = prod(upsample_rates) * hop) with a phase integrated at frame
  rate and linearly interpolated to samples, voiced where F0 > 10 Hz, plus
  Gaussian noise; a linear layer and tanh merge them into one excitation signal.

Where this port differs in form, not in result:
- Randomness is explicit. The only random draw that reaches the waveform is the
  Gaussian noise of `SineGen2` (shape (B, L, nb_harmonics + 1)): the caller
  passes it (`HiFTGenerator.inference` takes `noise`, or a `key` to draw it).
  The official random initial phase is not drawn: it is added
  to sample 0 of the per-sample phase increments, which the official downsampling
  interpolation (sample 480 i + 239.5 for frame i) never reads, so it cannot
  change the output. The noise branch of `SourceModuleHnNSF2` is discarded by the
  official code and is not computed.
- The sine phase is reproduced to the bit of the official float32 arithmetic (the
  cumulative sum accumulated in float64 then rounded, as torch's CPU `cumsum`
  does, and the linear interpolation weights and sum rounded as torch's x86-64
  CPU kernel rounds them, with a fused multiply-add). The phase grows by up to
  2 pi * 480 per frame, to 1e5-1e6 rad within seconds, where one float32 step is
  0.01-0.06 rad: the same formula evaluated in plain float32 differed from the
  official source by 1.7e-3 and its waveform by 6.4e-4 at 10 s of voiced audio
  (bit-faithful: 2e-8 and 1.5e-7). The few float64 steps run on the CPU stream
  (Metal has no float64), on (B, L, 9) elements only.
- `mx.sin` is a scalar libm call per element on MLX-CPU; the sine source (0.2 M
  elements per second of audio) is small enough to keep it (Snake, 90 times
  larger, uses a polynomial: `cosyvoice2.hift._sin_squared`).
"""

from __future__ import annotations

import functools

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from cosyvoice2.ops import Conv1d


@functools.partial(mx.compile, shapeless=True)
def _elu(x: mx.array) -> mx.array:
    return mx.where(x > 0, x, mx.expm1(x))


class ELU(nn.Module):
    """ELU with alpha 1, through `expm1` as torch computes it (no cancellation near 0)."""

    def __call__(self, x: mx.array) -> mx.array:
        return _elu(x)


class ConvRNNF0Predictor(nn.Module):
    """F0 per mel frame: five k=3 convs with ELU, a linear head, absolute value."""

    def __init__(self, num_class: int = 1, in_channels: int = 80, cond_channels: int = 512):
        super().__init__()
        self.num_class = num_class
        # Official `condnet` is an nn.Sequential: convs at even indices, ELU at odd ones.
        self.condnet = []
        for i in range(5):
            self.condnet.append(
                Conv1d(in_channels if i == 0 else cond_channels, cond_channels, 3, padding=1)
            )
            self.condnet.append(ELU())
        self.classifier = nn.Linear(cond_channels, num_class)

    def __call__(self, x: mx.array) -> mx.array:
        """x: mel, channels-last (B, T, in_channels) -> F0 (B, T) (num_class 1)."""
        for layer in self.condnet:
            x = layer(x)
        return mx.abs(self.classifier(x).squeeze(-1))


class SineGen2:
    """Harmonic sine source of CosyVoice2's 24 kHz HiFT (official `SineGen2`, `flag_for_pulse=False`).

    No parameters. The phase is integrated at frame rate (F0 is constant over
    each frame's `upsample_scale` samples) and interpolated linearly to samples.
    """

    def __init__(
        self,
        samp_rate: int,
        upsample_scale: int,
        harmonic_num: int = 0,
        sine_amp: float = 0.1,
        noise_std: float = 0.003,
        voiced_threshold: float = 0.0,
    ):
        self.sine_amp = sine_amp
        self.noise_std = noise_std
        self.harmonic_num = harmonic_num
        self.dim = harmonic_num + 1
        self.sampling_rate = samp_rate
        self.voiced_threshold = voiced_threshold
        self.upsample_scale = upsample_scale

    def phase(self, f0: mx.array) -> mx.array:
        """Sample-rate phase (B, T * upsample_scale, dim) of F0 per frame (B, T), float32 as the official.

        Official steps: rad = (f0 * h / sr) % 1 per sample; linear downsampling by
        the scale (frame i reads samples 480 i + 239 and 480 i + 240, equal within
        a frame, so rad at frame rate is exactly the per-frame value); cumsum * 2 pi;
        times the scale; linear upsampling (align_corners=False) back to samples.
        """
        b, t = f0.shape
        up = self.upsample_scale
        harmonics = mx.arange(1, self.dim + 1, dtype=mx.float32)
        rad = (f0[:, :, None] * harmonics / self.sampling_rate) % 1.0  # (B, T, dim)
        i0, i1, l0, l1 = _linear_upsample_taps(t, up)
        # float64 exists on the CPU only (not on Metal): this whole small step runs there.
        with mx.stream(mx.cpu):
            # torch's CPU cumsum accumulates float32 in double and rounds each output.
            cum = mx.cumsum(rad.astype(mx.float64), axis=1).astype(mx.float32)
            frame_phase = cum * 2.0 * np.float32(np.pi) * float(up)  # (B, T, dim), float32 steps
            x0 = mx.take(frame_phase, i0, axis=1)
            x1 = mx.take(frame_phase, i1, axis=1)
            # fma(x0, l0, l1 * x1) as torch's vectorised CPU kernel evaluates it: x0 * l0 is
            # exact in float64, so one rounding of the float64 sum gives the fused result.
            far = (x1 * l1[:, None]).astype(mx.float64)
            near = x0.astype(mx.float64) * l0[:, None].astype(mx.float64)
            return (near + far).astype(mx.float32)

    def __call__(self, f0: mx.array, noise: mx.array, initial: mx.array | None = None) -> mx.array:
        """F0 per frame (B, T) and standard normal `noise` (B, T * scale, dim) -> sine waves
        (B, T * scale, dim); `initial`: the harmonics' initial phases (B, dim) (`SineGen`)."""
        phase = self.phase(f0)
        if initial is not None:
            phase = phase + initial[:, None, :]
        sines = mx.sin(phase) * self.sine_amp
        uv = mx.repeat((f0 > self.voiced_threshold).astype(mx.float32), self.upsample_scale, axis=1)
        uv = uv[:, :, None]
        noise_amp = uv * self.noise_std + (1 - uv) * (self.sine_amp / 3)
        return sines * uv + noise_amp * noise


@functools.lru_cache(maxsize=8)  # 4 arrays of T * scale values each: keep few
def _linear_upsample_taps(length: int, scale: int) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    """Indices and weights of torch's CPU `interpolate(mode='linear', scale_factor=scale)`, float32 exact.

    Source position fma(1/scale, j + 0.5, -0.5) clamped at 0 (rounded once to
    float32: the product of two float32 values is exact in float64), index
    floor, weight l1 = src - i0, l0 = 1 - l1.
    """
    j = np.arange(length * scale, dtype=np.float64)
    ratio = np.float64(np.float32(1.0 / scale))
    src = (ratio * (j + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), length - 1)
    i1 = np.where(i0 < length - 1, i0 + 1, i0)
    l1 = np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1))
    l0 = np.float32(1) - l1
    return (
        mx.array(i0.astype(np.int32)),
        mx.array(i1.astype(np.int32)),
        mx.array(l0),
        mx.array(l1),
    )


class SourceModuleHnNSF2(nn.Module):
    """Harmonic-plus-noise source: `SineGen2` harmonics merged by a linear layer and tanh."""

    sine_gen: type[SineGen2] = SineGen2

    def __init__(
        self,
        sampling_rate: int,
        upsample_scale: int,
        harmonic_num: int = 0,
        sine_amp: float = 0.1,
        add_noise_std: float = 0.003,
        voiced_threshod: float = 0.0,
    ):
        super().__init__()
        self.sine_amp = sine_amp
        self.noise_std = add_noise_std
        self.l_sin_gen = self.sine_gen(
            sampling_rate, upsample_scale, harmonic_num, sine_amp, add_noise_std, voiced_threshod
        )
        self.l_linear = nn.Linear(harmonic_num + 1, 1)

    def __call__(self, f0: mx.array, noise: mx.array, phase: mx.array | None = None) -> mx.array:
        """F0 per frame (B, T), noise (B, T * scale, harmonics + 1) and, for `SineGen`, the
        harmonics' initial phases (B, harmonics + 1) -> excitation (B, T * scale, 1)."""
        return mx.tanh(self.l_linear(self.l_sin_gen(f0, noise, phase)))


class SineGen(SineGen2):
    """Harmonic sine source of the first generation's 22.05 kHz HiFT (official `SineGen`).

    No parameters. Unlike `SineGen2`, the phase is integrated per sample (F0 repeated to
    the sample rate) and wrapped to one turn (`% 1`), and each harmonic above the first has
    a random initial phase, which reaches the waveform: it is an input here (`initial`, (B,
    dim), harmonic 0 at 0), drawn by the caller as the noise is.
    """

    def phase(self, f0: mx.array) -> mx.array:
        """`2 pi (cumsum(f0 * h / sr) % 1)` per sample (B, T * upsample_scale, dim), float32;
        the cumulative sum accumulated in float64 and rounded, as torch's CPU `cumsum`."""
        up = mx.repeat(f0, self.upsample_scale, axis=1)  # nn.Upsample(nearest)
        harmonics = mx.arange(1, self.dim + 1, dtype=mx.float32)
        rad = up[:, :, None] * harmonics / self.sampling_rate
        with mx.stream(mx.cpu):  # float64 exists on the CPU only
            cum = mx.cumsum(rad.astype(mx.float64), axis=1).astype(mx.float32)
        return np.float32(2 * np.pi) * (cum % 1.0)


class SourceModuleHnNSF(SourceModuleHnNSF2):
    """The first generation's source: `SineGen` harmonics merged by a linear layer and tanh."""

    sine_gen = SineGen
