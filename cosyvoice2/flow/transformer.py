"""The estimator's transformer block: diffusers' `Attention`, a GELU feed-forward, `BasicTransformerBlock`.

Port of the blocks the official estimator takes from Matcha-TTS
(`matcha/models/components/transformer.py`: `BasicTransformerBlock` with diffusers'
`Attention` and `FeedForward`/`GELU`), as the official `cosyvoice/flow/decoder.py`
uses them: self-attention only, no q/k/v bias, layer norms, exact GELU. Names are
the official ones, so the `flow.pt` keys under `decoder.estimator.*.transformer_blocks`
map one to one.

A block runs over the whole utterance (`cache=None`), or over new positions with
the earlier positions' keys and values from a streaming cache (`over_blocks`,
`cosyvoice2.flow.cache.ChunkCache`). Where the backend has the C++ extension
(`cosyvoice2.backend`), a float32 block is one `transformer_block` node (panel
GEMMs over weights packed once, block attention over the cached keys and values,
LayerNorm and GELU in C++); otherwise the same function in MLX's ops, with the
numba row kernels for the softmax and the GELU where the backend has them.
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from cosyvoice2.flow.ops import (
    all_cores,
    bf16_rounded,
    block_scores,
    block_values,
    chunk_mask,
    cpu_extension,
    gelu,
    layer_norm,
    linear,
    panel_linear,
    softmax,
    use_cpu_kernels,
)
from cosyvoice2.packed import held_weight, is_bf16_linear, let_form_hold, packed, unpack_panels


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
        return linear(self.to_out[0], self.attend(self.qkv(x), [], chunk, mask))

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
        bf16 = all(is_bf16_linear(m) for m in layers)
        k = cpu_extension() if self.to_q.weight.dtype == mx.float32 or bf16 else None
        fused = self.fused_weight(k)
        if k is not None:
            return panel_linear(k, x, fused, 3 * h * d)
        return bf16_rounded(x) @ fused.astype(mx.float32) if bf16 else x @ fused

    def fused_weight(self, kernels, release: bool = False) -> mx.array:
        """The q/k/v weights stacked (q scaled): `kernels.pack_panels` of it, or (kernels None)
        its transpose for MLX's matmul. Cached until the weights change.

        `release` (as `packed`'s): the fused weight then holds the three, each a lazy slice
        of it (q scaled back where the scale is a power of two, so exactly), so the model
        keeps one copy of these weights, not two.
        """
        layers = (self.to_q, self.to_k, self.to_v)
        ws = tuple(m.weight for m in layers)
        cached = self._fused
        if (
            cached is None
            or cached[0] != (kernels is not None)
            or any(a is not c for a, c in zip(ws, cached[1]))
        ):
            ws = tuple(held_weight(m) for m in layers)
            scale = self.dim_head**-0.5
            stacked = mx.concatenate([ws[0] * scale, ws[1], ws[2]], axis=0)
            bf16 = all(is_bf16_linear(m) for m in layers)
            fused = kernels.pack_panels(stacked, bf16=bf16) if kernels is not None else stacked.T
            mx.eval(fused)  # shared by threads (`cosyvoice2.branches`): never lazy
            if release:
                shape, inner = stacked.shape, ws[0].shape[0]

                def part(i: int, factor: float = 1.0):
                    def rebuild() -> mx.array:
                        full = unpack_panels(fused, shape) if kernels is not None else fused.T
                        w = full[i * inner : (i + 1) * inner]
                        return w * factor if factor != 1.0 else w

                    return rebuild

                # a power of two and an exponent range without underflow: q * scale / scale is q
                if math.frexp(scale)[0] == 0.5 and ws[0].dtype in (mx.float32, mx.bfloat16):
                    let_form_hold(self.to_q, "weight", part(0, 1 / scale))
                let_form_hold(self.to_k, "weight", part(1))
                let_form_hold(self.to_v, "weight", part(2))
                ws = tuple(m.weight for m in layers)
            cached = self._fused = (kernels is not None, ws, fused)
        return cached[2]

    def bf16_products(self) -> bool:
        """Whether the attention's products are bf16 (queries, keys, values and weights
        rounded to bf16, float32 sums): with bf16-linear q/k/v projections (`flow_bits=16`)."""
        return all(is_bf16_linear(m) for m in (self.to_q, self.to_k, self.to_v))

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
        values (blocks are never joined); otherwise MLX's fused attention. With bf16
        products (`bf16_products`) the same function on every route: the kernel's bf16
        path, or the explicit scores of rounded operands.
        """
        b, t, _ = qkv.shape
        h, d = self.heads, self.dim_head
        if mask is not None and blocks:
            raise ValueError("a key-padding mask applies to a whole-utterance call only")
        bf16 = self.bf16_products()
        k = cpu_extension() if mask is None and b == 1 and qkv.dtype == mx.float32 else None
        if k is not None:
            return k.block_attention(qkv, blocks, h, chunk, parallel=all_cores(), bf16=bf16)
        q, key, value = self._heads(qkv, 3)
        if bf16:  # the products of bf16-rounded operands, as the kernel computes them
            old = [self._heads(blk, 2) for blk in blocks]
            keys = [bf16_rounded(kv[0]) for kv in old] + [bf16_rounded(key)]
            values = [bf16_rounded(kv[1]) for kv in old] + [bf16_rounded(value)]
            scores = block_scores(bf16_rounded(q), keys)
            if mask is None:
                p = softmax(scores, chunk, sum(blk.shape[1] for blk in blocks))
            else:
                if chunk > 0:
                    mask = mask & chunk_mask(t, chunk)[None, None]
                p = mx.softmax(mx.where(mask, scores, -mx.inf), axis=-1)
            out = block_values(bf16_rounded(p), values)
        elif mask is None and (blocks or use_cpu_kernels()):
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
            return gelu(linear(self.proj, x, bias=False), self.proj.bias)
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
        return linear(self.net[2], self.net[0](x))


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
        if kv is not None and self.attn1.bf16_products():
            kv = kv.astype(mx.bfloat16)  # what the bf16 products read of them: half the cache
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
        x = x + linear(attn.to_out[0], attn.attend(qkv, blocks, chunk, attention_mask))
        y = x + self.ff(layer_norm(x, n3.weight, n3.bias, n3.eps))
        # copied: a view would pin the whole projection's buffer in the cache
        return y, mx.contiguous(qkv[:, :keep, inner:]) if keep > 0 else None

    def _kernel(
        self, x: mx.array, blocks: list[mx.array], chunk: int, keep: int
    ) -> list[mx.array] | None:
        """The whole block as one `transformer_block` node, where the extension serves it
        (CPU, batch 1, float32 or bf16-linear `nn.Linear` weights); else None."""
        k = cpu_extension() if x.dtype == mx.float32 and x.shape[0] == 1 else None
        attn, gelu_proj, down = self.attn1, self.ff.net[0].proj, self.ff.net[2]
        layers = (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0], gelu_proj, down)
        if k is None or not all(
            type(m) is nn.Linear and (m.weight.dtype == mx.float32 or is_bf16_linear(m))
            for m in layers
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
