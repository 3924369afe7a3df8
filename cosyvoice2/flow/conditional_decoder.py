"""The non-causal Matcha-TTS `ConditionalDecoder`: the first generation's CFM estimator.

CosyVoice2's estimator is the causal `cosyvoice2.flow.decoder.CausalConditionalDecoder`.
The first generation (CosyVoice-300M's `MaskedDiffWithXvec`) uses the official
`cosyvoice/flow/decoder.py`'s multi-level non-causal form (Matcha's: GroupNorm
`Block1D`s, zero-padded convolutions, channels `(256, 256)`: two levels joined by a
stride-2 `Downsample1D` and a transposed-conv `Upsample1D`). Only the blocks differ from
the causal U-Net, so this class swaps them in and reuses the rest (structure, forward
pass, masks halved per level).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from cosyvoice2.config import EstimatorConfig
from cosyvoice2.flow.decoder import CausalConditionalDecoder, CausalResnetBlock1D, Mish, _masked


class Block1D(nn.Module):
    """`Conv1d(k=3, pad 1) -> GroupNorm(groups) -> Mish` on the masked input."""

    def __init__(self, dim: int, dim_out: int, groups: int = 8):
        super().__init__()
        self.block = [
            nn.Conv1d(dim, dim_out, 3, padding=1),
            nn.GroupNorm(groups, dim_out, pytorch_compatible=True),
            Mish(),
        ]

    def __call__(self, x: mx.array, mask: mx.array | None, cache: Any = None) -> mx.array:
        _no_cache(cache)
        x = _masked(x, mask)
        for layer in self.block:
            x = layer(x)
        return _masked(x, mask)


class SameConv1d(nn.Conv1d):
    """`Conv1d(k=3, pad 1)` in place of down/up-sampling at the last level."""

    def __init__(self, dim: int):
        super().__init__(dim, dim, 3, padding=1)

    def __call__(self, x: mx.array, cache: Any = None) -> mx.array:
        _no_cache(cache)
        return super().__call__(x)


def _no_cache(cache: Any) -> None:
    if cache is not None:
        raise NotImplementedError("the non-causal decoder has no streaming cache")


class ResnetBlock1D(CausalResnetBlock1D):
    """Matcha's `ResnetBlock1D`: the causal block's structure with GroupNorm `Block1D`s."""

    def __init__(self, dim: int, dim_out: int, time_emb_dim: int, groups: int = 8):
        super().__init__(dim, dim_out, time_emb_dim)
        self.block1 = Block1D(dim, dim_out, groups=groups)
        self.block2 = Block1D(dim_out, dim_out, groups=groups)


class ConditionalDecoder(CausalConditionalDecoder):
    """The non-causal U-Net velocity estimator.

    It has no streaming mode (the official one ignores the flag): a chunk size of 0
    keeps attention full either way.
    """

    def __init__(self, config: EstimatorConfig):
        super().__init__(dataclasses.replace(config, static_chunk_size=0))

    @staticmethod
    def _resnet(dim: int, dim_out: int, time_emb_dim: int) -> nn.Module:
        return ResnetBlock1D(dim, dim_out, time_emb_dim)

    @staticmethod
    def _same_conv(dim: int) -> nn.Module:
        return SameConv1d(dim)

    @staticmethod
    def _final_block(dim: int) -> nn.Module:
        return Block1D(dim, dim)
