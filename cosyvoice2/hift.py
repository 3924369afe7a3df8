"""HiFT vocoder of CosyVoice2 (24 kHz): mel -> F0 -> harmonic source -> waveform, in MLX.

A port of the official `cosyvoice/hifigan/generator.py` (`HiFTGenerator`,
`ResBlock` with Snake activations, `SineGen2`, `SourceModuleHnNSF2`) and
`cosyvoice/hifigan/f0_predictor.py` (`ConvRNNF0Predictor`) as of mid-2025
(latest upstream renames `SourceModuleHnNSF2` to `SourceModuleHnNSF` with
`sinegen_type='2'`, same computation and keys, for any rate but 22.05 kHz). Module and
parameter names are the official ones, so checkpoint keys map one to one
(`sanitize` folds weight norm and moves conv weights to MLX's layout).

Pipeline (`HiFTGenerator.inference`, as the official one):
1. `ConvRNNF0Predictor`: five k=3 convs with ELU, a linear head, `abs` -> F0 per mel frame.
2. F0 repeated to the sample rate (x480 = prod(upsample_rates) * hop), then
   `SourceModuleHnNSF2`: `SineGen2` makes 9 harmonics with a phase integrated at
   frame rate and linearly interpolated to samples, voiced where F0 > 10 Hz, plus
   Gaussian noise; a linear layer and tanh merge them into one excitation signal.
3. `decode`: STFT of the source (n_fft 16, hop 4) is fused at each of the three
   upsampling stages (transposed convs x8, x5, x3 with a reflection pad (1, 0)
   after the last), each followed by the mean of three Snake resblocks; leaky
   ReLU (slope 0.01, torch's default, as the official code calls it), `conv_post`
   -> log-magnitude and phase of 9 bins, inverse STFT, clamp to +-0.99.

Where this port differs in form, not in result:
- Channels-last arrays inside (MLX convs take (N, L, C)); the public methods take
  and return the official layouts ((B, 80, T) mel, (B, 1, L) source).
- Randomness is explicit. The only random draw that reaches the waveform is the
  Gaussian noise of `SineGen2` (shape (B, L, nb_harmonics + 1)): pass `noise`, or a
  `key` to draw it. The official random initial phase is not drawn: it is added
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
- STFT and iSTFT are small matrix products (n_fft 16: a DFT matrix with the
  periodic Hann window folded in) plus framing / overlap-add by reshapes and
  shifted sums, equal to `torch.stft` / `torch.istft` (center=True, reflect pad).
- Convolutions go through `cosyvoice2.ops` (matmul formulations on CPU, where
  MLX's dilated and transposed convs are slow paths).

Performance (full size, fp32, CPU; measured times belong in the bench's results
files, `bench/README.md`):
- Work (from the shapes): about 30 GFLOP per second of audio, nearly all of it in
  the resblock convs (per stage three resblocks plus one source resblock, six
  convs each, kernels 3/7/11, at 256/128/64 channels over 400/2000/6000 samples
  per second); the F0 predictor and the upsamplers are small beside them.
- Where the time goes: the conv tap matmuls take most of it; padding, Snake, the
  transposed convs, the F0 predictor, the sine source and STFT/iSTFT are small
  parts. A forward is about 2000 MLX graph nodes; their dispatch is a fixed cost
  per call, which dominates on the tiny model and matters for short streaming
  chunks.
- The limit is BLAS efficiency at an inner dimension of C_in = 64-256, below what
  the same BLAS reaches on large square matmuls (see `cosyvoice2.ops` for why an
  im2col does not pay on MLX-CPU).
- `mx.sin` is a scalar libm call per element on MLX-CPU. Snake (17.8 M elements
  per second of audio) therefore uses `_sin_squared`, a fused polynomial with its
  two broadcast products; the sine source (0.2 M elements per second) keeps
  `mx.sin`.
- On CPU the three resblocks of a stage run on two threads (kernel 11 on one,
  3 and 7 on the other; `cosyvoice2.branches`), which balances the two cores.
- Not done, would help: folding each Snake's alpha and 1 / alpha into the
  neighbouring conv weights (drops two broadcast passes per activation); a
  compiled conv kernel (`kernels/`), since torch's oneDNN convolutions beat the
  per-tap GEMMs at 64-128 channels.
"""

from __future__ import annotations

import functools
import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from cosyvoice2 import branches
from cosyvoice2.config import HiFTConfig
from cosyvoice2.ops import Conv1d, ConvTranspose1d, Derived

# The official `decode` ends with `F.leaky_relu(x)`: torch's default slope, not `lrelu_slope`.
FINAL_LRELU_SLOPE = 0.01
# Snake's guard against division by zero (`Snake.no_div_by_zero` in the official code).
SNAKE_EPS = 1e-9
# `torch.clip(magnitude, max=1e2)` in the official `_istft`.
ISTFT_MAX_MAGNITUDE = 100.0


def get_padding(kernel_size: int, dilation: int = 1) -> int:
    """'Same' padding of an odd kernel, as the official `get_padding`."""
    return (kernel_size * dilation - dilation) // 2


# sin(r) = r * P(r^2) on [-pi/2, pi/2], least-squares fit, max error 3.4e-9 (below float32 rounding).
_SIN_COEFFS = (-1.6666648e-01, 8.3328988e-03, -1.9800865e-04, 2.5904301e-06)
_INV_PI = float(1.0 / np.pi)
_PI_HI = 3.140625  # 201 / 64: k * _PI_HI is exact for |k| < 2**16 (Cody-Waite reduction)
_PI_LO = float(np.float32(np.pi - 3.140625))
_ROUND_MAGIC = 12582912.0  # 1.5 * 2**23: (v + M) - M rounds to the nearest integer for |v| < 2**22


@mx.compile
def _sin_squared(y: mx.array) -> mx.array:
    """sin(y)^2 in float32: within 4e-7 of the exact value for |y| < 1e4, 2.3e-6 for |y| < 2e5.

    (`mx.sin(y) ** 2`: 1.4e-7. Past 2e5, where k * _PI_HI stops being exact, the
    error grows; Snake's output there is dominated by x itself, whose float32 step
    is larger than that error.)

    MLX-CPU evaluates `mx.sin` with a scalar libm call per element; this is a
    reduction by multiples of pi (sin^2 has period pi) and an odd polynomial,
    plain arithmetic that the fused CPU kernel vectorises. Compiled per shape,
    not `shapeless`: a shapeless compile
    passes the scalar constants as broadcast inputs, which selects MLX's
    strided (scalar) kernel.
    """
    k = (y * _INV_PI + _ROUND_MAGIC) - _ROUND_MAGIC
    r = (y - k * _PI_HI) - k * _PI_LO
    u = r * r
    c1, c2, c3, c4 = _SIN_COEFFS
    s = r * (1.0 + u * (c1 + u * (c2 + u * (c3 + u * c4))))
    return s * s


class Snake(nn.Module):
    """Snake activation x + sin^2(alpha x) / alpha, alpha per channel (linear scale, as HiFT uses it)."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = mx.ones((channels,))
        self._inv_alpha = Derived()

    def __call__(self, x: mx.array) -> mx.array:
        # Official: x + 1 / (alpha + 1e-9) * sin(x * alpha)^2. The two broadcast products
        # stay outside the compiled kernel, which then sees one contiguous input.
        inv_alpha = self._inv_alpha.get(self.alpha, lambda a: 1.0 / (a + SNAKE_EPS))
        return x + _sin_squared(x * self.alpha) * inv_alpha


class ResBlock(nn.Module):
    """HiFi-GAN / BigVGAN residual block: per dilation, Snake -> dilated conv -> Snake -> conv, plus input."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]):
        super().__init__()
        self.convs1 = [
            Conv1d(channels, channels, kernel_size, dilation=d, padding=get_padding(kernel_size, d))
            for d in dilations
        ]
        self.convs2 = [
            Conv1d(channels, channels, kernel_size, padding=get_padding(kernel_size, 1))
            for _ in dilations
        ]
        self.activations1 = [Snake(channels) for _ in dilations]
        self.activations2 = [Snake(channels) for _ in dilations]

    def __call__(self, x: mx.array) -> mx.array:
        for c1, c2, a1, a2 in zip(self.convs1, self.convs2, self.activations1, self.activations2):
            x = x + c2(a2(c1(a1(x))))
        return x


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

    def __call__(self, f0: mx.array, noise: mx.array) -> mx.array:
        """F0 per frame (B, T) and standard normal `noise` (B, T * scale, dim) -> sine waves (B, T * scale, dim)."""
        sines = mx.sin(self.phase(f0)) * self.sine_amp
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
        self.l_sin_gen = SineGen2(
            sampling_rate, upsample_scale, harmonic_num, sine_amp, add_noise_std, voiced_threshod
        )
        self.l_linear = nn.Linear(harmonic_num + 1, 1)

    def __call__(self, f0: mx.array, noise: mx.array) -> mx.array:
        """F0 per frame (B, T), noise (B, T * scale, harmonics + 1) -> excitation (B, T * scale, 1)."""
        return mx.tanh(self.l_linear(self.l_sin_gen(f0, noise)))


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


class HiFTGenerator(nn.Module):
    """HiFTNet generator (neural source filter + iSTFTNet) at 24 kHz, as CosyVoice2 configures it."""

    def __init__(self, config: HiFTConfig):
        super().__init__()
        if config.sampling_rate == 22050:
            raise NotImplementedError(
                "22.05 kHz HiFT (CosyVoice v1) uses `SineGen`/`SourceModuleHnNSF`, not ported"
            )
        if config.f0_num_class != 1:
            raise ValueError("the F0 predictor must have one output class")
        self.config = config
        self.n_fft = config.istft_n_fft
        self.hop = config.istft_hop_len
        if self.n_fft % self.hop:
            raise ValueError("istft n_fft must be a multiple of hop_len")
        self.upsample_scale = int(np.prod(config.upsample_rates)) * self.hop
        self.num_kernels = len(config.resblock_kernel_sizes)
        self.num_upsamples = len(config.upsample_rates)
        ch0 = config.base_channels
        spec_ch = self.n_fft + 2

        self.m_source = SourceModuleHnNSF2(
            sampling_rate=config.sampling_rate,
            upsample_scale=self.upsample_scale,
            harmonic_num=config.nb_harmonics,
            sine_amp=config.nsf_alpha,
            add_noise_std=config.nsf_sigma,
            voiced_threshod=config.nsf_voiced_threshold,
        )
        self.conv_pre = Conv1d(config.in_channels, ch0, 7, padding=3)
        self.ups = [
            ConvTranspose1d(ch0 // 2**i, ch0 // 2 ** (i + 1), k, u, padding=(k - u) // 2)
            for i, (u, k) in enumerate(zip(config.upsample_rates, config.upsample_kernel_sizes))
        ]
        downsample_rates = [1, *list(config.upsample_rates[::-1][:-1])]
        downsample_cum_rates = np.cumprod(downsample_rates)
        self.source_downs = []
        self.source_resblocks = []
        for i, (u, k, d) in enumerate(
            zip(
                downsample_cum_rates[::-1],
                config.source_resblock_kernel_sizes,
                config.source_resblock_dilation_sizes,
            )
        ):
            u = int(u)
            ch = ch0 // 2 ** (i + 1)
            if u == 1:
                self.source_downs.append(Conv1d(spec_ch, ch, 1))
            else:
                self.source_downs.append(Conv1d(spec_ch, ch, u * 2, u, padding=u // 2))
            self.source_resblocks.append(ResBlock(ch, k, tuple(d)))
        self.resblocks = []
        for i in range(self.num_upsamples):
            ch = ch0 // 2 ** (i + 1)
            for k, d in zip(config.resblock_kernel_sizes, config.resblock_dilation_sizes):
                self.resblocks.append(ResBlock(ch, k, tuple(d)))
        self.conv_post = Conv1d(ch, spec_ch, 7, padding=3)
        self.f0_predictor = ConvRNNF0Predictor(
            config.f0_num_class, config.f0_in_channels, config.f0_cond_channels
        )

    # -- weights ---------------------------------------------------------------------------

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Official `hift.pt` state dict (torch layouts, numpy or mx arrays) -> MLX parameters.

        Strips a `generator.` prefix (as the official loader does), folds weight norm
        (`weight_g`/`weight_v` or `parametrizations.weight.original0/1`:
        w = g * v / ||v||, the norm over all axes but the first, torch's `dim=0`),
        and moves conv weights (out, in, k) -> (out, k, in) and transposed-conv
        weights (in, out, k) -> (out, k, in).
        """
        w = {}
        for key, value in weights.items():
            key = key.removeprefix("generator.")
            w[key] = mx.array(value) if not isinstance(value, mx.array) else value
        pairs = {}
        for key in list(w):
            m = re.fullmatch(
                r"(.*)\.(weight_g|weight_v|parametrizations\.weight\.original[01])", key
            )
            if m:
                which = (
                    "g" if m.group(2) in ("weight_g", "parametrizations.weight.original0") else "v"
                )
                pairs.setdefault(m.group(1), {})[which] = w.pop(key)
        for prefix, gv in pairs.items():
            if set(gv) != {"g", "v"}:
                raise ValueError(f"weight norm of {prefix!r}: need both g and v, got {sorted(gv)}")
            g = gv["g"].astype(mx.float32)
            v = gv["v"].astype(mx.float32)
            norm = mx.sqrt(mx.sum(v * v, axis=tuple(range(1, v.ndim)), keepdims=True))
            w[f"{prefix}.weight"] = v * (g / norm)
        out = {}
        for key, value in w.items():
            if key.endswith(".weight") and value.ndim == 3:
                if key.startswith("ups."):
                    value = value.transpose(1, 2, 0)  # (in, out, k) -> (out, k, in)
                else:
                    value = value.transpose(0, 2, 1)  # (out, in, k) -> (out, k, in)
            out[key] = value
        return out

    # -- forward -----------------------------------------------------------------------------

    def f0(self, speech_feat: mx.array) -> mx.array:
        """F0 per mel frame (B, T) from the mel (B, in_channels, T), as the official `f0_predictor`."""
        return self.f0_predictor(speech_feat.swapaxes(1, 2))

    def source(self, f0: mx.array, noise: mx.array) -> mx.array:
        """Excitation (B, 1, T * scale) from F0 per frame (B, T) and the sine generator's normal noise."""
        return self.m_source(f0, noise).swapaxes(1, 2)

    def noise_shape(self, speech_feat: mx.array) -> tuple[int, int, int]:
        """Shape of the Gaussian noise that `inference` draws for this mel (B, 80, T)."""
        b, _, t = speech_feat.shape
        return (b, t * self.upsample_scale, self.config.nb_harmonics + 1)

    def _stft(self, s: mx.array) -> mx.array:
        """torch.stft(s, n_fft, hop, window=hann, center=True, reflect) as (B, frames, [Re | Im])."""
        n_fft, hop = self.n_fft, self.hop
        analysis, _, _ = _stft_mats(n_fft)
        length = s.shape[1]
        if length % hop:
            raise ValueError(f"source length {length} is not a multiple of hop {hop}")
        half = n_fft // 2
        padded = mx.concatenate(
            [s[:, 1 : half + 1][:, ::-1], s, s[:, -half - 1 : -1][:, ::-1]], axis=1
        )
        n_frames = length // hop + 1
        per = n_fft // hop
        blocks = padded.reshape(s.shape[0], n_frames + per - 1, hop)
        return _frames_from_blocks(blocks, per, n_frames) @ analysis

    def _istft(self, magnitude: mx.array, phase: mx.array) -> mx.array:
        """torch.istft of magnitude * e^(i phase), (B, frames, bins) each -> (B, hop * (frames - 1))."""
        n_fft, hop = self.n_fft, self.hop
        _, synthesis, _ = _stft_mats(n_fft)
        magnitude = mx.minimum(magnitude, ISTFT_MAX_MAGNITUDE)
        spec = mx.concatenate([magnitude * mx.cos(phase), magnitude * mx.sin(phase)], axis=-1)
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

    def decode(self, speech_feat: mx.array, source: mx.array) -> mx.array:
        """Waveform (B, L) from mel (B, in_channels, T) and excitation (B, 1, L), official `decode`."""
        cfg = self.config
        s_stft = self._stft(source[:, 0])
        x = self.conv_pre(speech_feat.swapaxes(1, 2))
        for i in range(self.num_upsamples):
            x = nn.leaky_relu(x, cfg.lrelu_slope)
            x = self.ups[i](x)
            if i == self.num_upsamples - 1:
                x = mx.concatenate([x[:, 1:2], x], axis=1)  # ReflectionPad1d((1, 0))
            si = self.source_resblocks[i](self.source_downs[i](s_stft))
            x = x + si
            ys = self._parallel_resblocks(i, x)
            xs = ys[0]
            for y in ys[1:]:
                xs = xs + y
            x = xs / self.num_kernels
        x = nn.leaky_relu(x, FINAL_LRELU_SLOPE)
        x = self.conv_post(x)
        bins = self.n_fft // 2 + 1
        magnitude = mx.exp(x[..., :bins])
        phase = mx.sin(x[..., bins:])  # the official "sin is redundancy" step, kept for parity
        wav = self._istft(magnitude, phase)
        return mx.clip(wav, -cfg.audio_limit, cfg.audio_limit)

    def _parallel_resblocks(self, stage: int, x: mx.array) -> list[mx.array]:
        """The stage's resblock outputs, in order; on CPU split over two threads by kernel size.

        The three resblocks of a stage are independent and cost in proportion to
        their kernel size (3, 7, 11): one thread takes the largest, the other the
        rest (`cosyvoice2.branches`); the caller sums them in the official order.
        """
        blocks = self.resblocks[stage * self.num_kernels : (stage + 1) * self.num_kernels]
        if len(blocks) < 2 or not branches.enabled():
            return [b(x) for b in blocks]
        order = sorted(range(len(blocks)), key=lambda j: -self.config.resblock_kernel_sizes[j])
        groups = [[order[0]], sorted(order[1:])]
        outs = branches.map_branches(
            lambda idx, x: [blocks[j](x) for j in idx], [[g, x] for g in groups]
        )
        got = {j: y for g, ys in zip(groups, outs) for j, y in zip(g, ys)}
        return [got[j] for j in range(len(blocks))]

    def inference(
        self,
        speech_feat: mx.array,
        cache_source: mx.array | None = None,
        noise: mx.array | None = None,
        key: mx.array | None = None,
    ) -> tuple[mx.array, mx.array]:
        """Mel (B, in_channels, T) -> (waveform (B, T * 480), source (B, 1, T * 480)), official `inference`.

        `cache_source` (B, 1, n): the previous chunk's source tail; it replaces the first
        n samples of this chunk's source (streaming: no phase jump at joins).
        `noise`: the sine generator's standard normal draw, shape `noise_shape(speech_feat)`;
        drawn with `key` (or MLX's global generator) when not given.
        """
        if noise is None:
            noise = mx.random.normal(self.noise_shape(speech_feat), key=key)
        elif tuple(noise.shape) != self.noise_shape(speech_feat):
            raise ValueError(f"noise shape {noise.shape} != {self.noise_shape(speech_feat)}")
        f0 = self.f0(speech_feat)
        s = self.source(f0, noise)
        if cache_source is not None and cache_source.shape[2] != 0:
            n = cache_source.shape[2]
            if n > s.shape[2]:
                raise ValueError(
                    f"cache_source ({n} samples) longer than the source ({s.shape[2]})"
                )
            s = mx.concatenate([cache_source.astype(s.dtype), s[:, :, n:]], axis=2)
        return self.decode(speech_feat, s), s

    def __call__(
        self, speech_feat: mx.array, noise: mx.array | None = None, key: mx.array | None = None
    ) -> mx.array:
        """Waveform only (B, T * 480); see `inference`."""
        return self.inference(speech_feat, noise=noise, key=key)[0]
