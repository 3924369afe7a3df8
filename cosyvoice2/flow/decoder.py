"""The CFM's velocity estimator: `CausalConditionalDecoder` (a 1-D U-Net).

Port of the official `cosyvoice/flow/decoder.py` and the Matcha-TTS blocks it
builds on (`matcha/models/components/decoder.py`: `SinusoidalPosEmb`,
`TimestepEmbedding`, `ResnetBlock1D` in its causal form, `Downsample1D`, `Upsample1D`;
`matcha/models/components/transformer.py`: `BasicTransformerBlock` with diffusers'
`Attention` and a GELU feed-forward, ported in `cosyvoice2.flow.transformer`).
Module and parameter names are the official ones, so the keys of `flow.pt` under
`decoder.estimator.` map one to one.

Layout: channels-last. Inputs `x`, `mu`, `cond` are `(B, T, 80)`, `spks`
`(B, 80)`, `t` `(B,)`; the output velocity is `(B, T, 80)`. `mask` is `(B, T, 1)`
(1 for valid frames) or None, meaning every frame is valid (inference with batch
1, where the official mask is all ones); with None the mask products are skipped.

CosyVoice2's estimator (`CausalConditionalDecoder`, channels `(256,)`): one
resolution level, so no down/up-sampling: a causal resnet block and 4
transformer blocks, 12 mid blocks of the same, an up block on the concatenated
skip, a final causal block and a 1x1 projection. Attention is full, or in chunks
of `static_chunk_size` frames (each frame sees everything before the end of its
chunk) when `streaming`. A streaming cache (`cache=`, `cosyvoice2.flow.cache`)
makes a call cover only new frames: causal convolutions take their left context
from it and attention the earlier frames' keys and values.

With more than one entry in `channels` the U-Net has one level per entry,
joined by stride-2 `Downsample1D` and transposed-conv `Upsample1D`, as in the
official class. CosyVoice2 does not use the non-causal Matcha `ConditionalDecoder`
(GroupNorm blocks); the first generation's flow does, built from these blocks in
`cosyvoice2.flow.conditional_decoder`.
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from cosyvoice2.config import EstimatorConfig
from cosyvoice2.flow.ops import causal_conv1d, layer_norm, linear, mish
from cosyvoice2.flow.transformer import GELU, Attention, BasicTransformerBlock, FeedForward

__all__ = [
    "GELU",
    "Attention",
    "BasicTransformerBlock",
    "CausalBlock1D",
    "CausalConditionalDecoder",
    "CausalConv1d",
    "CausalResnetBlock1D",
    "ConvTranspose1d",
    "Downsample1D",
    "FeedForward",
    "Mish",
    "SinusoidalPosEmb",
    "TimestepEmbedding",
    "Upsample1D",
]
from cosyvoice2.ops import conv_transpose1d


class SinusoidalPosEmb(nn.Module):
    """Sinusoidal embedding of the flow time `t` (scaled by 1000): `[sin, cos]` of `dim // 2` frequencies."""

    def __init__(self, dim: int):
        super().__init__()
        if dim % 2:
            raise ValueError("SinusoidalPosEmb requires an even dim")
        self.dim = dim

    def __call__(self, x: mx.array, scale: float = 1000.0) -> mx.array:
        half = self.dim // 2
        freqs = mx.exp(mx.arange(half, dtype=mx.float32) * -(math.log(10000) / (half - 1)))
        emb = scale * x[:, None] * freqs[None]
        return mx.concatenate([mx.sin(emb), mx.cos(emb)], axis=-1)


class TimestepEmbedding(nn.Module):
    """`linear_2(silu(linear_1(t_emb)))`."""

    def __init__(self, in_channels: int, time_embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def __call__(self, sample: mx.array) -> mx.array:
        return self.linear_2(nn.silu(self.linear_1(sample)))


class CausalConv1d(nn.Module):
    """Stride-1 convolution padded on the left only, so frame t sees frames <= t."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        scale = 1.0 / math.sqrt(in_channels * kernel_size)
        self.weight = mx.random.uniform(-scale, scale, (out_channels, kernel_size, in_channels))
        self.bias = mx.zeros((out_channels,))

    def __call__(self, x: mx.array, cache: Any = None) -> mx.array:
        """Left context from the streaming `cache` when given, else zeros."""
        if cache is None:
            return causal_conv1d(self, x)
        return cache.conv(x, self)


class ConvTranspose1d(nn.Module):
    """Transposed convolution with weight `(C_out, K, C_in)`, on the fast CPU route of `cosyvoice2.ops`."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int
    ):
        super().__init__()
        scale = 1.0 / math.sqrt(in_channels * kernel_size)
        self.weight = mx.random.uniform(-scale, scale, (out_channels, kernel_size, in_channels))
        self.bias = mx.zeros((out_channels,))
        self.stride = stride
        self.padding = padding

    def __call__(self, x: mx.array) -> mx.array:
        return conv_transpose1d(x, self.weight, self.bias, stride=self.stride, padding=self.padding)


class Mish(nn.Module):
    def __call__(self, x: mx.array) -> mx.array:
        return mish(x)


def _masked(x: mx.array, mask: mx.array | None) -> mx.array:
    return x if mask is None else x * mask


class CausalBlock1D(nn.Module):
    """`CausalConv1d(k=3) -> LayerNorm over channels -> Mish` on the masked input.

    The official `Sequential` holds two `Transpose` modules around the norm
    (indices 1 and 3); channels-last needs none, so those slots stay empty and
    the parameter keys (`block.0`, `block.2`) still match.
    """

    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        self.block = [
            CausalConv1d(dim, dim_out, 3),
            nn.Identity(),
            nn.LayerNorm(dim_out),
            nn.Identity(),
            Mish(),
        ]

    def __call__(self, x: mx.array, mask: mx.array | None, cache: Any = None) -> mx.array:
        x = self.block[0](_masked(x, mask), cache)
        norm = self.block[2]
        x = layer_norm(x, norm.weight, norm.bias, norm.eps, then_mish=True)
        return _masked(x, mask)


class CausalResnetBlock1D(nn.Module):
    """Two causal blocks with the time embedding added between them, plus a 1x1 residual convolution."""

    def __init__(self, dim: int, dim_out: int, time_emb_dim: int):
        super().__init__()
        self.mlp = [Mish(), nn.Linear(time_emb_dim, dim_out)]
        self.block1 = CausalBlock1D(dim, dim_out)
        self.block2 = CausalBlock1D(dim_out, dim_out)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def __call__(
        self, x: mx.array, mask: mx.array | None, time_emb: mx.array, cache: Any = None
    ) -> mx.array:
        h = self.block1(x, mask, cache)
        h = h + self.mlp[1](self.mlp[0](time_emb))[:, None, :]
        h = self.block2(h, mask, cache)
        return h + linear(self.res_conv, _masked(x, mask))


class Downsample1D(nn.Module):
    """Stride-2 convolution (kernel 3, padding 1)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, 3, stride=2, padding=1)

    def __call__(self, x: mx.array, cache: Any = None) -> mx.array:
        if cache is not None:
            raise NotImplementedError("the streaming cache supports the single-level estimator")
        return self.conv(x)


class Upsample1D(nn.Module):
    """x2 upsampling by a transposed convolution (kernel 4, stride 2, padding 1)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = ConvTranspose1d(channels, channels, 4, 2, 1)

    def __call__(self, x: mx.array, cache: Any = None) -> mx.array:
        if cache is not None:
            raise NotImplementedError("the streaming cache supports the single-level estimator")
        return self.conv(x)


def _padding_mask(mask: mx.array | None) -> mx.array | None:
    """Boolean key-padding mask `(B, 1, 1, T)` for attention from a `(B, T, 1)` frame mask."""
    return None if mask is None else (mask[:, :, 0] > 0)[:, None, None, :]


class CausalConditionalDecoder(nn.Module):
    """CosyVoice2's estimator: causal convolutions, LayerNorm blocks, optional chunk-masked attention.

    The blocks come from `_resnet`, `_same_conv` and `_final_block`, so that a
    variant with other blocks (the non-causal Matcha decoder the tests compare)
    shares this structure and forward pass.
    """

    def __init__(self, config: EstimatorConfig):
        super().__init__()
        channels = tuple(config.channels)
        self.config = config
        self.in_channels = config.in_channels
        self.time_embeddings = SinusoidalPosEmb(config.in_channels)
        time_embed_dim = channels[0] * 4
        self.time_mlp = TimestepEmbedding(config.in_channels, time_embed_dim)
        resnet_cls = self._resnet
        same_conv = self._same_conv

        def transformers(dim: int) -> list[BasicTransformerBlock]:
            return [
                BasicTransformerBlock(
                    dim, config.num_heads, config.attention_head_dim, config.act_fn
                )
                for _ in range(config.n_blocks)
            ]

        self.down_blocks = []
        output_channel = config.in_channels
        for i, ch in enumerate(channels):
            input_channel, output_channel = output_channel, ch
            is_last = i == len(channels) - 1
            resnet = resnet_cls(input_channel, output_channel, time_embed_dim)
            down = same_conv(output_channel) if is_last else Downsample1D(output_channel)
            self.down_blocks.append([resnet, transformers(output_channel), down])

        self.mid_blocks = []
        for _ in range(config.num_mid_blocks):
            resnet = resnet_cls(channels[-1], output_channel, time_embed_dim)
            self.mid_blocks.append([resnet, transformers(output_channel)])

        up_channels = channels[::-1] + (channels[0],)
        self.up_blocks = []
        for i in range(len(up_channels) - 1):
            input_channel = up_channels[i] * 2
            output_channel = up_channels[i + 1]
            is_last = i == len(up_channels) - 2
            resnet = resnet_cls(input_channel, output_channel, time_embed_dim)
            up = same_conv(output_channel) if is_last else Upsample1D(output_channel)
            self.up_blocks.append([resnet, transformers(output_channel), up])

        self.final_block = self._final_block(up_channels[-1])
        self.final_proj = nn.Conv1d(up_channels[-1], config.out_channels, 1)

    def __call__(
        self,
        x: mx.array,
        mask: mx.array | None,
        mu: mx.array,
        t: mx.array,
        spks: mx.array | None = None,
        cond: mx.array | None = None,
        streaming: bool = False,
        cache: Any = None,
    ) -> mx.array:
        """The velocity at noisy mel `x` and time `t`, conditioned on `mu`, `spks`, `cond` (see module doc).

        `cache`: the streaming state of the frames before `x` (`ChunkCache`, in frames;
        streaming only), read and recorded; None: `x` is the whole utterance.
        """
        if cache is not None and not streaming:
            raise ValueError("a streaming cache needs streaming=True (chunk-masked attention)")
        chunk = self.config.static_chunk_size if streaming else 0
        temb = self.time_mlp(self.time_embeddings(t))

        parts = [x, mu]
        if spks is not None:
            parts.append(mx.broadcast_to(spks[:, None, :], (*x.shape[:2], spks.shape[-1])))
        if cond is not None:
            parts.append(cond)
        x = mx.concatenate(parts, axis=-1)

        hiddens = []
        masks = [mask]
        for resnet, blocks, down in self.down_blocks:
            mask_down = masks[-1]
            x = resnet(x, mask_down, temb, cache)
            attn_mask = _padding_mask(mask_down)
            for block in blocks:
                x = block(x, attn_mask, chunk, cache)
            hiddens.append(x)
            x = down(_masked(x, mask_down), cache)
            masks.append(None if mask_down is None else mask_down[:, ::2])
        masks = masks[:-1]
        mask_mid = masks[-1]

        for resnet, blocks in self.mid_blocks:
            x = resnet(x, mask_mid, temb, cache)
            attn_mask = _padding_mask(mask_mid)
            for block in blocks:
                x = block(x, attn_mask, chunk, cache)
            if cache is not None:
                # A streaming chunk is small: start computing what is built while the rest
                # of the graph is built, so that no step waits for its whole graph first.
                mx.async_eval(x)

        for resnet, blocks, up in self.up_blocks:
            mask_up = masks.pop()
            skip = hiddens.pop()
            x = mx.concatenate([x[:, : skip.shape[1]], skip], axis=-1)
            x = resnet(x, mask_up, temb, cache)
            attn_mask = _padding_mask(mask_up)
            for block in blocks:
                x = block(x, attn_mask, chunk, cache)
            x = up(_masked(x, mask_up), cache)
        x = self.final_block(x, mask_up, cache)
        out = linear(self.final_proj, _masked(x, mask_up))
        return _masked(out, mask)

    @staticmethod
    def _resnet(dim: int, dim_out: int, time_emb_dim: int) -> nn.Module:
        return CausalResnetBlock1D(dim, dim_out, time_emb_dim)

    @staticmethod
    def _same_conv(dim: int) -> nn.Module:
        """The convolution in place of down/up-sampling at the last level."""
        return CausalConv1d(dim, dim, 3)

    @staticmethod
    def _final_block(dim: int) -> nn.Module:
        return CausalBlock1D(dim, dim)
