"""`UpsampleConformerEncoder`: speech-token embeddings (25 Hz) to 50 Hz features for the CFM.

Port of the official `cosyvoice/transformer/upsample_encoder.py` and the parts it
builds from `cosyvoice/transformer/` (`LinearNoSubsampling`,
`EspnetRelPositionalEncoding`, `RelPositionMultiHeadedAttention`,
`ConformerEncoderLayer` without macaron or convolution module,
`PositionwiseFeedForward` with SiLU). Module and parameter names follow the
official ones so `flow.pt` keys map one to one (see `CausalMaskedDiffWithXvec.sanitize`).

Pipeline (sequences are channels-last `(B, T, C)`):

    tokens' embeddings -> embed (Linear + LayerNorm, x sqrt(d), rel-pos table)
      -> PreLookaheadLayer (sees 3 tokens ahead: zeros, or the given look-ahead context)
      -> num_blocks conformer layers (full attention, or chunks of static_chunk_size when streaming)
      -> Upsample1D (x2: repeat + causal conv k=5) -> up_embed -> num_up_blocks layers
         (chunks of 2 * static_chunk_size when streaming) -> after_norm

Streaming: the official `CausalMaskedDiffWithXvec.inference(finalize=False)`
splits the last `pre_lookahead_len` embedded tokens off as `context`; they pass
through `embed` (their own linear and norm; positions are not used) and are seen
by the `PreLookaheadLayer` in place of the zero padding, and the output covers
only the tokens before them. With `finalize=True` all tokens are encoded and the
look-ahead of the last ones is zero padding.

Differences from the official code, none numerical: the official hard-codes 512
channels for `PreLookaheadLayer` and `Upsample1D` and 4 up-blocks; here they come
from `EncoderConfig.output_size` and `num_up_blocks` (512 and 4 in CosyVoice2).
The relative-position table is computed for the needed length instead of being a
5000-row buffer (same values).

One forward pass serves the whole utterance and the O(n) streaming cache: every
module takes an optional `cache` (a `cosyvoice2.flow.cache.ChunkCache`), as
mlx-lm's layers take their KV cache. `None` is the whole-utterance pass (zero
left context, keys of this call only); with a cache, causal convolutions read
their left context from it, attention reads the earlier positions' keys and
values, and what the next call needs is recorded in it.
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from cosyvoice2.config import EncoderConfig, TransformerEncoderConfig
from cosyvoice2.flow.ops import (
    block_scores,
    block_values,
    causal_conv1d,
    chunk_mask,
    silu,
    softmax,
    use_cpu_kernels,
)


def rel_position_table(size: int, d_model: int) -> mx.array:
    """The espnet relative positional encoding for `size` frames: `(1, 2*size-1, d_model)`.

    Row `k` encodes relative position `size - 1 - k` (from `size-1` down to
    `-(size-1)`), interleaving `sin` and `cos` as `EspnetRelPositionalEncoding` does.
    """
    pos = mx.arange(size - 1, -size, -1, dtype=mx.float32)[:, None]
    div = mx.exp(mx.arange(0, d_model, 2, dtype=mx.float32) * -(math.log(10000.0) / d_model))
    angle = pos * div
    pe = mx.stack([mx.sin(angle), mx.cos(angle)], axis=-1).reshape(2 * size - 1, d_model)
    return pe[None]


class LinearNoSubsampling(nn.Module):
    """`Linear -> LayerNorm(eps 1e-5)`, then the positional-encoding scale `sqrt(d)`.

    The relative-position table the official module returns beside the features
    is built by the encoder (`rel_position_table`), for the positions of a call.
    """

    def __init__(self, idim: int, odim: int):
        super().__init__()
        self.out = [nn.Linear(idim, odim), nn.LayerNorm(odim, eps=1e-5)]
        self.xscale = math.sqrt(odim)
        self.odim = odim

    def __call__(self, x: mx.array) -> mx.array:
        return self.out[1](self.out[0](x)) * self.xscale


class RelPositionMultiHeadedAttention(nn.Module):
    """Multi-head self-attention with Transformer-XL relative positions (espnet `rel_selfattn`)."""

    def __init__(self, n_head: int, n_feat: int, key_bias: bool = True):
        super().__init__()
        self.h = n_head
        self.d_k = n_feat // n_head
        self.linear_q = nn.Linear(n_feat, n_feat)
        self.linear_k = nn.Linear(n_feat, n_feat, bias=key_bias)
        self.linear_v = nn.Linear(n_feat, n_feat)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.linear_pos = nn.Linear(n_feat, n_feat, bias=False)
        self.pos_bias_u = mx.zeros((n_head, self.d_k))
        self.pos_bias_v = mx.zeros((n_head, self.d_k))

    @staticmethod
    def rel_shift(x: mx.array) -> mx.array:
        """`(B, H, T, 2T-1)` scores against relative positions -> `(B, H, T, T)` against keys.

        Query i and key j read column `T - 1 - i + j` (relative position `i - j`).
        """
        b, h, t, p = x.shape
        x = mx.pad(x, [(0, 0), (0, 0), (0, 0), (1, 0)])
        x = x.reshape(b, h, p + 1, t)[:, :, 1:].reshape(b, h, t, p)
        return x[:, :, :, : p // 2 + 1]

    def __call__(
        self, x: mx.array, pos_emb: mx.array, chunk: int = 0, cache: Any = None
    ) -> mx.array:
        """`x` `(B, T, D)`; `chunk` > 0: chunk-masked attention.

        `pos_emb` `(1, 2L-1, D)` is the table for the `L` positions so far (`L = T`
        without a cache; with one, the cached positions come first and the queries
        are the last `T`).
        """
        b, t, _ = x.shape
        h, d = self.h, self.d_k
        c = 0 if cache is None else cache.start  # positions before this call's
        q = self.linear_q(x).reshape(b, t, h, d)
        k = self.linear_k(x).reshape(b, t, h, d).transpose(0, 2, 1, 3)
        v = self.linear_v(x).reshape(b, t, h, d).transpose(0, 2, 1, 3)
        keys, values = ([k], [v]) if cache is None else cache.keys_values(k, v)
        # Relative positions i - j for queries c .. c+t-1 and keys 0 .. c+t-1: from
        # c+t-1 down to -(t-1), the first 2t-1+c rows of the table.
        p = self.linear_pos(pos_emb[:, : 2 * t - 1 + c])
        p = p.reshape(p.shape[0], -1, h, d).transpose(0, 2, 1, 3)
        q_u = (q + self.pos_bias_u).transpose(0, 2, 1, 3)
        q_v = (q + self.pos_bias_v).transpose(0, 2, 1, 3)
        scale = 1.0 / math.sqrt(d)
        bd = q_v @ p.transpose(0, 1, 3, 2)  # (b, h, t, 2t-1+c)
        if c == 0:
            bd = self.rel_shift(bd)
        else:  # query i reads column (t - 1) - i + j for key j
            idx = (t - 1) - mx.arange(t)[:, None] + mx.arange(c + t)[None, :]
            bd = mx.take_along_axis(bd, mx.broadcast_to(idx, (b, h, t, c + t)), axis=-1)
        # Position term as an additive bias of the content attention.
        bias = bd * scale
        if cache is None and not use_cpu_kernels():
            if chunk > 0:
                bias = mx.where(chunk_mask(t, chunk), bias, -mx.inf)
            out = mx.fast.scaled_dot_product_attention(q_u, k, v, scale=scale, mask=bias)
        else:
            scores = block_scores(q_u * scale, keys) + bias
            out = block_values(softmax(scores, chunk, c), values)
        out = out.transpose(0, 2, 1, 3).reshape(b, t, h * d)
        return self.linear_out(out)


class PositionwiseFeedForward(nn.Module):
    """`w_2(silu(w_1(x)))` (the encoder's `activation_type: swish`)."""

    def __init__(self, idim: int, hidden_units: int):
        super().__init__()
        self.w_1 = nn.Linear(idim, hidden_units)
        self.w_2 = nn.Linear(hidden_units, idim)

    def __call__(self, x: mx.array) -> mx.array:
        if type(self.w_1) is nn.Linear:  # bias added inside the SiLU kernel
            return self.w_2(silu(x @ self.w_1.weight.T, self.w_1.bias))
        return self.w_2(silu(self.w_1(x)))


class ConformerEncoderLayer(nn.Module):
    """Pre-norm self-attention and feed-forward (no macaron FF, no conv module: CosyVoice2's layer)."""

    def __init__(self, size: int, heads: int, linear_units: int):
        super().__init__()
        self.self_attn = RelPositionMultiHeadedAttention(heads, size)
        self.feed_forward = PositionwiseFeedForward(size, linear_units)
        self.norm_ff = nn.LayerNorm(size, eps=1e-12)
        self.norm_mha = nn.LayerNorm(size, eps=1e-12)

    def __call__(
        self, x: mx.array, pos_emb: mx.array, chunk: int = 0, cache: Any = None
    ) -> mx.array:
        x = x + self.self_attn(self.norm_mha(x), pos_emb, chunk, cache)
        return x + self.feed_forward(self.norm_ff(x))


class ConformerEncoder(nn.Module):
    """The first generation's `ConformerEncoder` (its speech LM's text encoder and its flow's
    encoder): `embed` (Linear, LayerNorm, x sqrt(d)), conformer layers without macaron or
    convolution module, `after_norm`; attention in chunks of `static_chunk_size` positions
    (1: causal), or full (0)."""

    embed_class: type[nn.Module] = LinearNoSubsampling
    layer_class: type[nn.Module] = ConformerEncoderLayer

    def __init__(self, config: TransformerEncoderConfig):
        super().__init__()
        self.output_size = config.output_size
        self.static_chunk_size = config.static_chunk_size
        self.embed = self.embed_class(config.input_size, config.output_size)
        self.encoders = [
            self.layer_class(config.output_size, config.attention_heads, config.linear_units)
            for _ in range(config.num_blocks)
        ]
        self.after_norm = nn.LayerNorm(config.output_size, eps=1e-5)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.embed(x)
        pos = rel_position_table(x.shape[1], self.output_size)
        for layer in self.encoders:
            x = layer(x, pos, self.static_chunk_size)
        return self.after_norm(x)


class PreLookaheadLayer(nn.Module):
    """Residual causal block that sees `pre_lookahead_len` frames ahead.

    `conv1` (kernel `pre_lookahead_len + 1`) reads each frame and the frames after
    it (zeros past the end, or `context` when given), leaky ReLU (slope 0.01), then
    `conv2` (kernel 3) reads the two frames before; plus the input.
    """

    def __init__(self, channels: int, pre_lookahead_len: int = 1):
        super().__init__()
        self.pre_lookahead_len = pre_lookahead_len
        self.conv1 = nn.Conv1d(channels, channels, kernel_size=pre_lookahead_len + 1)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size=3)

    def __call__(
        self, inputs: mx.array, context: mx.array | None = None, cache: Any = None
    ) -> mx.array:
        """`inputs` `(B, T, C)`; `context` `(B, <= pre_lookahead_len, C)` of the frames after them;
        `cache`: `conv2`'s left context (else zeros)."""
        n = 0 if context is None else context.shape[1]
        if n > self.pre_lookahead_len:
            raise ValueError(f"context has {n} frames, more than {self.pre_lookahead_len}")
        x = inputs if n == 0 else mx.concatenate([inputs, context], axis=1)
        x = mx.pad(x, [(0, 0), (0, self.pre_lookahead_len - n), (0, 0)])
        x = nn.leaky_relu(self.conv1(x), negative_slope=0.01)
        x = _causal_conv(x, self.conv2, cache)
        return x + inputs


class Upsample1D(nn.Module):
    """Nearest-neighbour upsampling by `stride`, then a causal convolution of kernel `2*stride+1`."""

    def __init__(self, channels: int, out_channels: int, stride: int = 2):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(channels, out_channels, kernel_size=stride * 2 + 1)

    def __call__(self, x: mx.array, cache: Any = None) -> mx.array:
        b, t, c = x.shape
        x = mx.broadcast_to(x[:, :, None], (b, t, self.stride, c)).reshape(b, t * self.stride, c)
        return _causal_conv(x, self.conv, cache)


class UpsampleConformerEncoder(nn.Module):
    """The flow's token encoder: 25 Hz token embeddings in, 50 Hz `output_size` features out."""

    def __init__(self, config: EncoderConfig, pre_lookahead_len: int = 3):
        super().__init__()
        if config.pos_enc_layer_type != "rel_pos_espnet":
            raise ValueError(f"unsupported pos_enc_layer_type {config.pos_enc_layer_type!r}")
        if config.selfattention_layer_type != "rel_selfattn":
            raise ValueError(
                f"unsupported selfattention_layer_type {config.selfattention_layer_type!r}"
            )
        if not config.normalize_before:
            raise ValueError("only normalize_before=True (CosyVoice2's setting) is ported")
        self.config = config
        d = config.output_size
        self.embed = LinearNoSubsampling(config.input_size, d)
        self.pre_lookahead_layer = PreLookaheadLayer(d, pre_lookahead_len)
        self.encoders = [
            ConformerEncoderLayer(d, config.attention_heads, config.linear_units)
            for _ in range(config.num_blocks)
        ]
        self.up_layer = Upsample1D(d, d, stride=config.upsample_stride)
        self.up_embed = LinearNoSubsampling(config.input_size, d)
        self.up_encoders = [
            ConformerEncoderLayer(d, config.attention_heads, config.linear_units)
            for _ in range(config.num_up_blocks)
        ]
        self.after_norm = nn.LayerNorm(d, eps=1e-5)

    def __call__(
        self,
        xs: mx.array,
        context: mx.array | None = None,
        streaming: bool = False,
        cache: Any = None,
    ) -> mx.array:
        """Encode `xs` `(B, T, input_size)`; returns `(B, stride * T, output_size)`.

        `context`: the embeddings of the look-ahead tokens that follow `xs`
        (`(B, pre_lookahead_len, input_size)`), or None when `xs` ends the utterance.
        `streaming`: chunk-masked attention (`static_chunk_size` tokens, then
        `stride * static_chunk_size` frames) instead of full attention.
        `cache`: the streaming state of the tokens before `xs` (`ChunkCache`, in
        tokens; streaming only), read and recorded; None: `xs` starts the utterance.
        """
        if cache is not None and not streaming:
            raise ValueError("a streaming cache needs streaming=True (chunk-masked attention)")
        cfg = self.config
        s = cfg.upsample_stride
        start = 0 if cache is None else cache.start
        xs = self.embed(xs)
        context = self.embed(context) if context is not None and context.shape[1] > 0 else None
        chunk = cfg.static_chunk_size if streaming else 0
        xs = self.pre_lookahead_layer(xs, context, cache)
        pos_emb = _table(start + xs.shape[1], xs)
        for layer in self.encoders:
            xs = layer(xs, pos_emb, chunk, cache)
        up = None if cache is None else cache.scaled(s)  # the same state, counted in frames
        xs = self.up_layer(xs, up)
        xs = self.up_embed(xs)
        pos_emb = _table(start * s + xs.shape[1], xs)
        chunk = cfg.static_chunk_size * s if streaming else 0
        for layer in self.up_encoders:
            xs = layer(xs, pos_emb, chunk, up)
        return self.after_norm(xs)


def _table(size: int, xs: mx.array) -> mx.array:
    """`rel_position_table` for `size` positions in the features' dtype: a bfloat16 or
    float16 flow attends in that dtype (MLX's fused attention takes its mask, the
    position term, only in the output's dtype), as the official module's table buffer
    is cast with the model."""
    table = rel_position_table(size, xs.shape[2])
    return table if xs.dtype == table.dtype else table.astype(xs.dtype)


def _causal_conv(x: mx.array, conv: nn.Conv1d, cache: Any) -> mx.array:
    """`conv` applied causally: left context from `cache`, or zeros without one."""
    if cache is None:
        return causal_conv1d(conv, x)
    return cache.conv(x, conv)
