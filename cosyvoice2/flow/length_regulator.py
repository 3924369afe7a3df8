"""`InterpolateRegulator`: the first generation's flow turns 50 Hz token features into mel frames.

Port of the official `cosyvoice/flow/length_regulator.py` (inference). The encoder's
features are stretched to the mel frame count by linear interpolation (torch's
`F.interpolate(mode="linear", align_corners=False)`, `interpolate_linear`), then refined by
`len(sampling_ratios)` blocks of `Conv1d(k=3) -> GroupNorm -> Mish` and a 1x1 convolution.
`inference` stretches the prompt's features and the new tokens' apart, so the mel has a
clean boundary between them; new tokens beyond 40 are stretched in three pieces (the first
and last 20 tokens to a fixed 34 frames each, the official `token_overlap_len` of the
first generation's streaming), as the official code does.

Layout: channels-last `(B, T, C)`; the official modules are `(B, C, T)`.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from cosyvoice2.config import LengthRegulatorConfig
from cosyvoice2.flow.decoder import Mish

MEL_RATE = 22050 / 256
"""Mel frames per second of the first generation (22.05 kHz, hop 256), as its flow hard-codes."""
OVERLAP_TOKENS = 20
"""Tokens stretched on their own at each end of a long utterance (`token_overlap_len`)."""


def interpolate_linear(x: mx.array, size: int) -> mx.array:
    """`(B, T, C)` resampled to `(B, size, C)` as `F.interpolate(mode="linear")` does:
    output `i` reads input position `(i + 0.5) * T / size - 0.5` (clamped at 0), in float32."""
    t = x.shape[1]
    scale = np.float32(t) / np.float32(size)
    src = np.maximum((np.arange(size, dtype=np.float32) + np.float32(0.5)) * scale - 0.5, 0)
    i0 = np.minimum(src.astype(np.int64), t - 1)
    i1 = np.minimum(i0 + 1, t - 1)
    lam = mx.array(np.clip(src - i0, 0, 1).astype(np.float32))[None, :, None]
    lo, hi = x[:, mx.array(i0)], x[:, mx.array(i1)]
    return lo * (1 - lam).astype(x.dtype) + hi * lam.astype(x.dtype)


class InterpolateRegulator(nn.Module):
    """The official `InterpolateRegulator`: `model` holds the convolutions, norms and Mish."""

    def __init__(self, config: LengthRegulatorConfig):
        super().__init__()
        c = config.channels
        layers: list[nn.Module] = []
        for _ in config.sampling_ratios:
            layers += [
                nn.Conv1d(c, c, 3, padding=1),
                nn.GroupNorm(config.groups, c, pytorch_compatible=True),
                Mish(),
            ]
        layers.append(nn.Conv1d(c, config.out_channels or c, 1))
        self.model = layers

    def refine(self, x: mx.array) -> mx.array:
        for layer in self.model:
            x = layer(x)
        return x

    def inference(
        self,
        x1: mx.array,
        x2: mx.array,
        mel_len1: int,
        mel_len2: int,
        input_frame_rate: int = 50,
    ) -> mx.array:
        """The prompt's features `x1` `(1, N1, C)` to `mel_len1` frames and the new tokens'
        `x2` to `mel_len2`, joined and refined: `(1, mel_len1 + mel_len2, C)`."""
        if x2.shape[1] > 2 * OVERLAP_TOKENS:
            n = OVERLAP_TOKENS
            edge = int(n / input_frame_rate * MEL_RATE)
            x2 = mx.concatenate(
                [
                    interpolate_linear(x2[:, :n], edge),
                    interpolate_linear(x2[:, n:-n], mel_len2 - 2 * edge),
                    interpolate_linear(x2[:, -n:], edge),
                ],
                axis=1,
            )
        else:
            x2 = interpolate_linear(x2, mel_len2)
        x = x2 if x1.shape[1] == 0 else mx.concatenate([interpolate_linear(x1, mel_len1), x2], 1)
        return self.refine(x)
