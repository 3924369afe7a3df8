"""HiFT vocoder of CosyVoice2 (24 kHz): mel -> F0 -> harmonic source -> waveform, in MLX.

A port of the official `cosyvoice/hifigan/generator.py` (`HiFTGenerator`,
`ResBlock` with Snake activations). Module and parameter names are the official
ones, so checkpoint keys map one to one (`sanitize` folds weight norm and moves
conv weights to MLX's layout). The parts are split as the official files are
read, to be put side by side with them:
- `cosyvoice2.hift_source`: the F0 predictor (official `f0_predictor.py`) and the
  harmonic source `SourceModuleHnNSF2` / `SineGen2` (official `generator.py`),
  with the bit-faithful sine phase and the explicit noise;
- `cosyvoice2.stft`: the `torch.stft` / `torch.istft` equivalents;
- here: `HiFTGenerator` (upsampling, source fusion, resblocks), `ResBlock`, `Snake`.
Their names stay importable from this module.

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
- Randomness is explicit: pass `noise` (the sine generator's Gaussian draw) or a
  `key` to draw it (`cosyvoice2.hift_source` says why no other draw is needed).
- STFT and iSTFT are small matrix products (`cosyvoice2.stft`), equal to
  `torch.stft` / `torch.istft` (center=True, reflect pad).
- Convolutions go through `cosyvoice2.ops`: with the CPU extension one
  `conv1d_panels` node each (a resblock's Snake activations computed inside it),
  elsewhere on the CPU matmul formulations (MLX's dilated and transposed convs are
  slow paths there), on Metal MLX's own.

Performance (full size, fp32, CPU; measured times belong in the bench's results
files, `bench/README.md`):
- Work (from the shapes): about 30 GFLOP per second of audio, nearly all of it in
  the resblock convs (per stage three resblocks plus one source resblock, six
  convs each, kernels 3/7/11, at 256/128/64 channels over 400/2000/6000 samples
  per second); the F0 predictor and the upsamplers are small beside them.
- With the extension, the resblock convolutions read the padded input in place (no
  per-tap pass, no im2col buffer) and each Snake is computed in its convolution's
  padding pass, so the activations are not read and written again per Snake.
- Without it, the conv tap matmuls take most of the time: one matmul per tap
  (BLAS efficiency at an inner dimension of C_in = 64-256; see `cosyvoice2.ops` for
  why an im2col does not pay on MLX-CPU), and Snake a few passes of its own. A
  forward is about 2000 MLX graph nodes; their dispatch is a fixed cost per call,
  which dominates on the tiny model and matters for short streaming chunks.
- `mx.sin` is a scalar libm call per element on MLX-CPU. Snake (17.8 M elements
  per second of audio) therefore uses `_sin_squared`, a fused polynomial with its
  two broadcast products (the extension's Snake computes the same steps); the sine
  source (0.2 M elements per second) keeps `mx.sin`.
- On CPU the three resblocks of a stage run on two threads (kernel 11 on one,
  3 and 7 on the other; `cosyvoice2.branches`), which balances the two cores.
- Not done, would help: the transposed convolutions on the same kernel (a stride-1
  convolution with stride * C_out outputs, `cosyvoice2.ops.conv_transpose1d_taps`);
  the residual additions taken into the second convolution of each pair.
"""

from __future__ import annotations

import re
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from cosyvoice2 import branches
from cosyvoice2.config import HiFTConfig
from cosyvoice2.hift_source import (
    ELU,
    ConvRNNF0Predictor,
    SineGen,
    SineGen2,
    SourceModuleHnNSF,
    SourceModuleHnNSF2,
)
from cosyvoice2.ops import Conv1d, ConvTranspose1d, Derived, set_dtype_evaluated
from cosyvoice2.packed import forget_packed
from cosyvoice2.stft import istft, stft

__all__ = [
    "ELU",
    "FINAL_LRELU_SLOPE",
    "ISTFT_MAX_MAGNITUDE",
    "SNAKE_EPS",
    "ConvRNNF0Predictor",
    "HiFTGenerator",
    "ResBlock",
    "SineGen",
    "SineGen2",
    "Snake",
    "SourceModuleHnNSF",
    "SourceModuleHnNSF2",
    "get_padding",
]

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
        return x + _sin_squared(x * self.alpha) * self.inv_alpha()

    def inv_alpha(self) -> mx.array:
        """1 / (alpha + 1e-9), kept until `alpha` is replaced."""
        return self._inv_alpha.get(self.alpha, lambda a: 1.0 / (a + SNAKE_EPS))


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
            # c2(a2(c1(a1(x)))), each Snake taken into its convolution (`Conv1d`)
            x = x + c2(c1(x, snake=a1), snake=a2)
        return x


class HiFTGenerator(nn.Module):
    """HiFTNet generator (neural source filter + iSTFTNet): at 24 kHz as CosyVoice2 configures
    it, or at 22.05 kHz as the first generation does (upsampling x8 x8, its own source)."""

    def set_dtype(self, dtype: mx.Dtype, predicate: Any = None) -> None:
        forget_packed(self)  # the panels hold weights of the old dtype
        for _, m in self.named_modules():  # the tap forms of the old weights go (`pack_weights`)
            if isinstance(m, Conv1d):
                m._taps = Derived()
            elif isinstance(m, ConvTranspose1d):
                m._blocks = Derived()
        set_dtype_evaluated(self, dtype, predicate)

    def pack_weights(self) -> int:
        """Make now the forms of the convolution weights that the active backend's calls
        read (`Conv1d.pack_weights`: panels with the extension, else tap matrices), each
        holding its weight: one copy of each, not two (the transposed convolutions, a few
        MB, keep both). Returns the number of convolutions done. Load calls it."""
        return sum(m.pack_weights() for _, m in self.named_modules() if isinstance(m, Conv1d))

    def __init__(self, config: HiFTConfig):
        super().__init__()
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

        # the official choice: the first generation's source at 22.05 kHz, SineGen2's otherwise
        source = SourceModuleHnNSF if config.sampling_rate == 22050 else SourceModuleHnNSF2
        self.m_source = source(
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

    @property
    def draws_phase(self) -> bool:
        """Whether the source takes random initial phases (the 22.05 kHz `SineGen`)."""
        return isinstance(self.m_source, SourceModuleHnNSF)

    def source(self, f0: mx.array, noise: mx.array, phase: mx.array | None = None) -> mx.array:
        """Excitation (B, 1, T * scale) from F0 per frame (B, T), the sine generator's normal
        noise and, at 22.05 kHz, the harmonics' initial phases (B, harmonics + 1)."""
        if self.draws_phase and phase is None:
            raise ValueError("the 22.05 kHz source needs the harmonics' initial phases")
        return self.m_source(f0, noise, phase).swapaxes(1, 2)

    def draw_phase(self, batch: int, key: mx.array | None = None) -> mx.array:
        """The official `SineGen`'s initial phases: uniform in [-pi, pi), harmonic 0 at 0."""
        phase = mx.random.uniform(-np.pi, np.pi, (batch, self.config.nb_harmonics + 1), key=key)
        return mx.concatenate([mx.zeros((batch, 1)), phase[:, 1:]], axis=1)

    def noise_shape(self, speech_feat: mx.array) -> tuple[int, int, int]:
        """Shape of the Gaussian noise that `inference` draws for this mel (B, 80, T)."""
        b, _, t = speech_feat.shape
        return (b, t * self.upsample_scale, self.config.nb_harmonics + 1)

    def _stft(self, s: mx.array) -> mx.array:
        """Official `_stft` (torch.stft, center=True, reflect, Hann) as (B, frames, [Re | Im])."""
        return stft(s, self.n_fft, self.hop)

    def _istft(self, magnitude: mx.array, phase: mx.array) -> mx.array:
        """Official `_istft` of magnitude * e^(i phase), (B, frames, bins) each -> (B, hop * (frames - 1))."""
        magnitude = mx.minimum(magnitude, ISTFT_MAX_MAGNITUDE)
        spec = mx.concatenate([magnitude * mx.cos(phase), magnitude * mx.sin(phase)], axis=-1)
        return istft(spec, self.n_fft, self.hop)

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
        phase: mx.array | None = None,
    ) -> tuple[mx.array, mx.array]:
        """Mel (B, in_channels, T) -> (waveform (B, T * 480), source (B, 1, T * 480)), official `inference`.

        `cache_source` (B, 1, n): the previous chunk's source tail; it replaces the first
        n samples of this chunk's source (streaming: no phase jump at joins).
        `noise`: the sine generator's standard normal draw, shape `noise_shape(speech_feat)`;
        drawn with `key` (or MLX's global generator) when not given. `phase` (22.05 kHz
        only): the harmonics' initial phases `(B, nb_harmonics + 1)`, drawn likewise.
        """
        if noise is None:
            noise = mx.random.normal(self.noise_shape(speech_feat), key=key)
        elif tuple(noise.shape) != self.noise_shape(speech_feat):
            raise ValueError(f"noise shape {noise.shape} != {self.noise_shape(speech_feat)}")
        if self.draws_phase and phase is None:
            sub = None if key is None else mx.random.split(key)[1]
            phase = self.draw_phase(speech_feat.shape[0], sub)
        f0 = self.f0(speech_feat)
        s = self.source(f0, noise, phase)
        if cache_source is not None and cache_source.shape[2] != 0:
            n = cache_source.shape[2]
            if n > s.shape[2]:
                raise ValueError(
                    f"cache_source ({n} samples) longer than the source ({s.shape[2]})"
                )
            s = mx.concatenate([cache_source.astype(s.dtype), s[:, :, n:]], axis=2)
        return self.decode(speech_feat, s), s

    def __call__(
        self,
        speech_feat: mx.array,
        noise: mx.array | None = None,
        key: mx.array | None = None,
        phase: mx.array | None = None,
    ) -> mx.array:
        """Waveform only (B, T * upsample_scale); see `inference`."""
        return self.inference(speech_feat, noise=noise, key=key, phase=phase)[0]
