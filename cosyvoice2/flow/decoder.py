"""The CFM's velocity estimator: `CausalConditionalDecoder` (a 1-D U-Net).

Port of the official `cosyvoice/flow/decoder.py` and the Matcha-TTS blocks it
builds on (`matcha/models/components/decoder.py`: `SinusoidalPosEmb`,
`TimestepEmbedding`, `ResnetBlock1D` in its causal form, `Downsample1D`, `Upsample1D`;
`matcha/models/components/transformer.py`: `BasicTransformerBlock` with diffusers'
`Attention` and a GELU feed-forward). Module and parameter names are the
official ones, so the keys of `flow.pt` under `decoder.estimator.` map one to one.

Layout: channels-last. Inputs `x`, `mu`, `cond` are `(B, T, 80)`, `spks`
`(B, 80)`, `t` `(B,)`; the output velocity is `(B, T, 80)`. `mask` is `(B, T, 1)`
(1 for valid frames) or None, meaning every frame is valid (inference with batch
1, where the official mask is all ones); with None the mask products are skipped.

CosyVoice2's estimator (`CausalConditionalDecoder`, channels `(256,)`): one
resolution level, so no down/up-sampling: a causal resnet block and 4
transformer blocks, 12 mid blocks of the same, an up block on the concatenated
skip, a final causal block and a 1x1 projection. Attention is full, or in chunks
of `static_chunk_size` frames (each frame sees everything before the end of its
chunk) when `streaming`.

With more than one entry in `channels` the U-Net has one level per entry,
joined by stride-2 `Downsample1D` and transposed-conv `Upsample1D`, as in the
official class. CosyVoice2 does not use the non-causal Matcha `ConditionalDecoder`
(GroupNorm blocks); the parity tests build it from these blocks in
`cosyvoice2_testing.conditional_decoder`.
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from cosyvoice2.config import EstimatorConfig
from cosyvoice2.flow.ops import (
    all_cores,
    block_scores,
    block_values,
    causal_conv1d,
    chunk_mask,
    cpu_extension,
    dense,
    gelu,
    layer_norm,
    mish,
    packed,
    panel_linear,
    softmax,
    use_cpu_kernels,
)
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
            return causal_conv1d(x, self.weight, self.bias)
        return cache.conv(x, self.weight, self.bias)


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
        return h + dense(self.res_conv, _masked(x, mask))


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


class Attention(nn.Module):
    """diffusers `Attention` as the estimator uses it: self-attention, no q/k/v bias, `to_out.0` with bias."""

    def __init__(self, query_dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.dim_head = dim_head
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(query_dim, inner, bias=False)
        self.to_v = nn.Linear(query_dim, inner, bias=False)
        self.to_out = [nn.Linear(inner, query_dim)]
        # (panels?, source weights, stacked q/k/v weight); "_" keeps it out of parameters()
        self._fused = None

    def __call__(self, x: mx.array, mask: mx.array | None, chunk: int = 0) -> mx.array:
        """`x` `(B, T, D)`; `mask` boolean key-padding mask `(B, 1, 1, T)` or None; `chunk` > 0: chunk mask."""
        return dense(self.to_out[0], self.attend(self.qkv(x), [], chunk, mask))

    def qkv(self, x: mx.array) -> mx.array:
        """`(B, T, 3 * heads * dim_head)`: queries (already scaled by `dim_head ** -0.5`), keys, values.

        One matmul with the three weights stacked (cached until the weights change, as
        packed panels where `cpu_extension` serves float32 weights) instead of three:
        fewer, larger GEMMs.
        """
        h, d = self.heads, self.dim_head
        layers = (self.to_q, self.to_k, self.to_v)
        if not all(type(m) is nn.Linear for m in layers):
            return mx.concatenate([self.to_q(x) * d**-0.5, self.to_k(x), self.to_v(x)], axis=-1)
        k = cpu_extension() if self.to_q.weight.dtype == mx.float32 else None
        fused = self.fused_weight(k)
        return panel_linear(k, x, fused, 3 * h * d) if k is not None else x @ fused

    def fused_weight(self, kernels) -> mx.array:
        """The q/k/v weights stacked (q scaled): `kernels.pack_panels` of it, or (kernels None)
        its transpose for MLX's matmul. Cached until the weights change."""
        ws = (self.to_q.weight, self.to_k.weight, self.to_v.weight)
        cached = self._fused
        if (
            cached is None
            or cached[0] != (kernels is not None)
            or any(a is not c for a, c in zip(ws, cached[1]))
        ):
            stacked = mx.concatenate([ws[0] * self.dim_head**-0.5, ws[1], ws[2]], axis=0)
            fused = kernels.pack_panels(stacked) if kernels is not None else stacked.T
            mx.eval(fused)  # shared by threads (`cosyvoice2.branches`): never lazy
            cached = self._fused = (kernels is not None, ws, fused)
        return cached[2]

    def attend(
        self, qkv: mx.array, blocks: list[mx.array], chunk: int, mask: mx.array | None = None
    ) -> mx.array:
        """Attention of the positions in `qkv` (`self.qkv`'s output) over the earlier positions'
        keys and values `blocks` (each `(B, n, 2 * heads * dim_head)`, in order) and themselves.

        Position `q0 + r` (`q0` the blocks' total length) sees the keys before the end
        of its chunk (`chunk` 0: all); `mask`: a key-padding mask (no blocks then).
        Returns `(B, T, heads * dim_head)`, the output projection's input. On the CPU
        with `cosyvoice2_kernels` (batch 1) one `block_attention` node; with the numba
        kernels or over blocks, scores per block, the masked softmax and the weighted
        values (blocks are never joined); otherwise MLX's fused attention.
        """
        b, t, _ = qkv.shape
        h, d = self.heads, self.dim_head
        if mask is not None and blocks:
            raise ValueError("a key-padding mask applies to a whole-utterance call only")
        k = cpu_extension() if mask is None and b == 1 and qkv.dtype == mx.float32 else None
        if k is not None:
            return k.block_attention(qkv, blocks, h, chunk, parallel=all_cores())
        q, key, value = self._heads(qkv, 3)
        if mask is None and (blocks or use_cpu_kernels()):
            # CPU: explicit scores and a vectorised softmax (MLX's exp is the bottleneck).
            old = [self._heads(blk, 2) for blk in blocks]
            keys = [kv[0] for kv in old] + [key]
            values = [kv[1] for kv in old] + [value]
            q0 = sum(blk.shape[1] for blk in blocks)
            out = block_values(softmax(block_scores(q, keys), chunk, q0), values)
        else:
            if chunk > 0:
                cm = chunk_mask(t, chunk)[None, None]
                mask = cm if mask is None else mask & cm
            out = mx.fast.scaled_dot_product_attention(q, key, value, scale=1.0, mask=mask)
        return out.transpose(0, 2, 1, 3).reshape(b, t, h * d)

    def _heads(self, a: mx.array, parts: int) -> list[mx.array]:
        """`a` `(B, T, parts * heads * dim_head)` as `parts` views `(B, heads, T, dim_head)`.

        Slices of one heads-major view: `x[i]` on a `(parts, ...)` transpose would be an
        MLX gather (an element-wise strided copy per call).
        """
        b, t, _ = a.shape
        h = self.heads
        a = a.reshape(b, t, parts * h, self.dim_head).transpose(0, 2, 1, 3)
        return [a[:, i * h : (i + 1) * h] for i in range(parts)]


class GELU(nn.Module):
    """diffusers `GELU`: a projection followed by the exact GELU."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def __call__(self, x: mx.array) -> mx.array:
        if type(self.proj) is nn.Linear:  # bias added inside the GELU kernel
            return gelu(dense(self.proj, x, bias=False), self.proj.bias)
        return gelu(self.proj(x))


class FeedForward(nn.Module):
    """`net = [GELU(dim -> 4 dim), Dropout, Linear(4 dim -> dim)]`."""

    def __init__(self, dim: int, mult: int = 4, activation_fn: str = "gelu"):
        super().__init__()
        if activation_fn != "gelu":
            raise ValueError(f"only act_fn 'gelu' (CosyVoice2's) is ported, got {activation_fn!r}")
        inner = int(dim * mult)
        self.net = [GELU(dim, inner), nn.Identity(), nn.Linear(inner, dim)]

    def __call__(self, x: mx.array) -> mx.array:
        return dense(self.net[2], self.net[0](x))


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention and GELU feed-forward (Matcha's block with layer norms, no cross-attention)."""

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        activation_fn: str = "gelu",
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, num_attention_heads, attention_head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, activation_fn=activation_fn)

    def __call__(
        self,
        x: mx.array,
        attention_mask: mx.array | None,
        chunk: int = 0,
        cache: Any = None,
    ) -> mx.array:
        """`x` `(B, T, dim)`; `cache`: the earlier positions' keys and values (streaming),
        read and extended with the positions it commits; None: `x` is the whole utterance."""
        if cache is None:
            return self.over_blocks(x, [], chunk, 0, attention_mask)[0]
        blocks, keep = cache.kv_blocks()
        y, kv = self.over_blocks(x, blocks, chunk, keep)
        cache.commit_kv(blocks, kv)
        return y

    def over_blocks(
        self,
        x: mx.array,
        blocks: list[mx.array],
        chunk: int,
        keep: int,
        attention_mask: mx.array | None = None,
    ) -> tuple[mx.array, mx.array | None]:
        """The block for new positions `x` over earlier positions' key/value `blocks`
        (`Attention.attend`), and the keys and values `(B, keep, 2 * inner)` of the first
        `keep` new positions (None if 0), which a streaming cache keeps."""
        fused = self._kernel(x, blocks, chunk, keep) if attention_mask is None else None
        if fused is not None:
            return fused[0], fused[1] if keep > 0 else None
        n1, n3, attn = self.norm1, self.norm3, self.attn1
        inner = attn.heads * attn.dim_head
        qkv = attn.qkv(layer_norm(x, n1.weight, n1.bias, n1.eps))
        x = x + dense(attn.to_out[0], attn.attend(qkv, blocks, chunk, attention_mask))
        y = x + self.ff(layer_norm(x, n3.weight, n3.bias, n3.eps))
        # copied: a view would pin the whole projection's buffer in the cache
        return y, mx.contiguous(qkv[:, :keep, inner:]) if keep > 0 else None

    def _kernel(
        self, x: mx.array, blocks: list[mx.array], chunk: int, keep: int
    ) -> list[mx.array] | None:
        """The whole block as one `transformer_block` node, where the extension serves it
        (CPU, batch 1, float32 `nn.Linear` weights); else None."""
        k = cpu_extension() if x.dtype == mx.float32 and x.shape[0] == 1 else None
        attn, gelu_proj, down = self.attn1, self.ff.net[0].proj, self.ff.net[2]
        layers = (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0], gelu_proj, down)
        if k is None or not all(
            type(m) is nn.Linear and m.weight.dtype == mx.float32 for m in layers
        ):
            return None
        n1, n3, out = self.norm1, self.norm3, attn.to_out[0]
        params = [n1.weight, n1.bias, attn.fused_weight(k), packed(k, out), out.bias]
        params += [n3.weight, n3.bias, packed(k, gelu_proj), gelu_proj.bias, packed(k, down)]
        params.append(down.bias)
        inner, ff = attn.heads * attn.dim_head, gelu_proj.weight.shape[0]
        return k.transformer_block(
            x,
            params,
            blocks,
            attn.heads,
            inner,
            ff,
            chunk,
            n1.eps,
            n3.eps,
            keep,
            parallel=all_cores(),
        )


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
        out = dense(self.final_proj, _masked(x, mask_up))
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
