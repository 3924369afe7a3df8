"""The speech LM's decode step on the optional CPU kernels (`cosyvoice2_kernels`), MLX ops otherwise.

Why: on the CPU, MLX computes bf16 and quantized matrix-vector products on slow
paths, so a bf16 or quantized speech LM decodes slower than in fp32 with MLX's ops,
while decoding is bound by reading weights and those precisions read 2-6x fewer
bytes. And MLX's CPU path builds `mx.fast.rms_norm`, `mx.fast.rope` and
`mx.fast.scaled_dot_product_attention` from 7-20 basic ops each, a fixed cost per
call that adds up over 24 layers and every token. The kernels (built from
`kernels/`, optional) read bf16, 8- or 4-bit weights (in `mx.quantize`'s layout, so the
converted model is the one Metal uses) with fp32 accumulation, and do each of those
small operations as one graph node.

`use_kernels(model)` swaps, in place:

- each Qwen2 decoder layer (mlx-lm's `TransformerBlock`: RMSNorm, attention with
  plain rotary embeddings, SwiGLU MLP) whose projections are bfloat16, 8- or 4-bit
  affine or float32 for a `KernelBlock`: q/k/v fused into one projection and gate/up into
  another, and the layer computed as two graph nodes either side of the KV cache update
  (`layer_input`, `layer_output`: the single kernel operations in sequence, so the same
  results) instead of about 110;
- then the other `nn.RMSNorm`s (the final norm) for `KernelRMSNorm`;
- the other bfloat16 and 8- or 4-bit `Linear`s (e.g. `llm_decoder`) for `KernelLinear`,
  and, in a model with kernel layers, its other float32 `Linear`s too.

Float32 projections keep their weight packed once in panels of 16 columns
(`pack_panels`) instead of row-major, the layout of a register-blocked GEMM kernel
that serves every row count: decode at the memory's speed, and prefill without
the re-packing of the whole weight matrix that MLX's matmul (OpenBLAS's GEMM) does
on every call (kernels/README.md). Float16 models are
left alone. Nothing is swapped when the backend has no extension (not built,
disabled with `COSYVOICE2_KERNELS=0`, or not the CPU).

Numerics: everything after the embeddings runs in float32 (x converted, float32
accumulation), as MLX's own path does for a float32 or quantized model: the swapped
model computes the same function as the unswapped one up to summation order. For
a bf16 model it computes the float32 model with bf16-rounded weights, where MLX's
bf16 path also rounds every activation to bf16: the kernel path is the more
precise one. 8- and 4-bit weights are dequantised exactly; x is never quantised.

A swapped model is a runtime form: its parameters are renamed and fused (e.g.
`llm.layers.0.qkv.weight`), so save weights from an unswapped model (the converter
never swaps). Swapped modules fall back to MLX's ops when the default device is
not the CPU (any backend without the extension, `cosyvoice2.backend`), so a
swapped model runs anywhere.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from cosyvoice2 import backend
from cosyvoice2.lm_models import qwen2, scaled_dot_product_attention

GROUP_SIZES = (32, 64, 128)


def _active() -> ModuleType | None:
    """The kernels module if this call should use it: the active backend's extension."""
    return backend.current().extension


# ------------------------------------------------------------------- layers


class KernelLinear(nn.Module):
    """y = x W^T (+ bias), W bfloat16, float32 or 8- or 4-bit affine (`scales`, `biases`).

    `weight` may be a list of arrays: W is their rows stacked (a fused projection).

    x is taken in float32 and y is float32, on the kernels and on MLX's ops alike.
    `bias` is kept in float32. A float32 W is stored only as `panels`
    (`pack_panels(W)`, `(ceil(N / 16), K, 16)`), which MLX's fallback multiplies as a
    batch of `K x 16` matrices.
    """

    def __init__(
        self,
        weight: mx.array | list[mx.array],
        bias: mx.array | None = None,
        scales: mx.array | None = None,
        biases: mx.array | None = None,
        group_size: int | None = None,
        bits: int | None = None,
    ):
        super().__init__()
        parts = weight if isinstance(weight, list) else [weight]  # a list: its rows stacked
        self.float32 = all(w.dtype == mx.float32 for w in parts) and scales is None
        self.out_features = sum(w.shape[0] for w in parts)
        if self.float32:  # packed straight from the parts: no concatenated copy
            self.panels = backend.load_extension().pack_panels(parts, stream=mx.cpu)
        else:
            self.weight = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)
        if scales is not None:
            self.scales = scales
            self.biases = biases
        if bias is not None:
            self.bias = bias.astype(mx.float32)
        self.group_size = group_size
        self.bits = bits
        self.quantized = scales is not None
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        bias = self.get("bias")
        k = _active()
        if k is not None:
            if self.quantized:
                return k.linear_quantized(
                    x,
                    self.weight,
                    self.scales,
                    self.biases,
                    bias,
                    group_size=self.group_size,
                    bits=self.bits,
                )
            if self.float32:
                return k.linear_panels(x, self.panels, self.out_features, bias)
            return k.linear_dense(x, self.weight, bias)
        x = x.astype(mx.float32)
        if self.quantized:
            y = mx.quantized_matmul(
                x,
                self.weight,
                scales=self.scales,
                biases=self.biases,
                transpose=True,
                group_size=self.group_size,
                bits=self.bits,
            )
        elif self.float32:
            y = _panels_matmul(x, self.panels, self.out_features)
        else:
            y = x @ self.weight.T
        return y + bias if bias is not None else y

    def operands(self) -> tuple[list[mx.array], list[int]]:
        """Its weights as the fused layer operations take a projection (`layer_input`,
        `layer_output`): the arrays, and the spec `[n, bits, group_size, has_bias]` (bits 32:
        float32 panels, 16: bf16 W, 8 or 4: `w, scales, biases`)."""
        bias = self.get("bias")
        if self.quantized:
            arrays = [self.weight, self.scales, self.biases]
            bits, group_size = self.bits, self.group_size
        elif self.float32:
            arrays, bits, group_size = [self.panels], 32, 0
        else:
            arrays, bits, group_size = [self.weight], 16, 0
        spec = [self.out_features, bits, group_size, bias is not None]
        return arrays + ([bias] if bias is not None else []), spec


def _panels_matmul(x: mx.array, panels: mx.array, n: int) -> mx.array:
    """`x @ W.T` with MLX's ops, W given as `pack_panels(W)` (`n` rows)."""
    lead, k = x.shape[:-1], x.shape[-1]
    y = mx.matmul(x.reshape(1, -1, k), panels)  # (panels, rows, 16)
    y = y.transpose(1, 0, 2).reshape(-1, panels.shape[0] * panels.shape[2])[:, :n]
    return y.reshape(*lead, n)


class KernelRMSNorm(nn.Module):
    """`nn.RMSNorm` in float32 (float32 copy of the weight), one graph node on the kernels."""

    def __init__(self, weight: mx.array, eps: float):
        super().__init__()
        self.weight = weight.astype(mx.float32)
        self.eps = eps
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        k = _active()
        if k is not None:
            return k.rms_norm(x, self.weight, self.eps)[0]
        return mx.fast.rms_norm(x.astype(mx.float32), self.weight, self.eps)


def _rope_inv_freq(dims: int, base: float) -> mx.array:
    """`base ** (-2i / dims)` computed as `mx.fast.rope`'s CPU path does (float32, MLX's exp)."""
    half = dims // 2
    step = np.float32(np.log(np.float32(base))) / np.float32(half)
    return mx.exp(mx.arange(0, -half, -1, dtype=mx.float32) * mx.array(step))


class KernelBlock(nn.Module):
    """A Qwen2 decoder layer (mlx-lm's `TransformerBlock`) with fused projections.

    Same function as the layer it replaces: x + attn(norm1(x)) = h, h + mlp(norm2(h)),
    grouped-query attention with rotary embeddings on q and k, the KV cache updated
    through `cache.update_and_fetch` as mlx-lm does.
    """

    def __init__(self, block: nn.Module, specs: dict[str, dict[str, Any]]):
        super().__init__()
        attn = block.self_attn
        self.n_heads, self.n_kv_heads = attn.n_heads, attn.n_kv_heads
        self.scale = attn.scale
        self.rope_dims, self.rope_base, self.rope_scale = (
            attn.rope.dims,
            attn.rope.base,
            attn.rope.scale,
        )
        self.inv_freq = _rope_inv_freq(self.rope_dims, self.rope_base)
        self.input_norm = KernelRMSNorm(block.input_layernorm.weight, block.input_layernorm.eps)
        self.post_norm = KernelRMSNorm(
            block.post_attention_layernorm.weight, block.post_attention_layernorm.eps
        )
        self.qkv = _fuse([specs["q_proj"], specs["k_proj"], specs["v_proj"]])
        self.o_proj = _layer(specs["o_proj"])
        self.gate_up = _fuse([specs["gate_proj"], specs["up_proj"]])
        self.down_proj = _layer(specs["down_proj"])
        self.freeze()

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        k = _active()
        plain_mask = mask is None or (isinstance(mask, str) and mask == "causal")
        plain_cache = cache is None or not hasattr(cache, "bits")
        if k is None or not (plain_mask and plain_cache):
            return self._mlx(x, mask, cache)
        qkv_w, qkv_s = self.qkv.operands()
        rest = [p.operands() for p in (self.o_proj, self.gate_up, self.down_proj)]
        q, kk, v = k.layer_input(
            x,
            self.input_norm.weight,
            self.input_norm.eps,
            qkv_w,
            qkv_s,
            self.inv_freq,
            self.n_heads,
            self.n_kv_heads,
            self.rope_dims,
            self.rope_scale,
            cache.offset if cache is not None else 0,
        )
        if cache is not None:
            kk, v = cache.update_and_fetch(kk, v)
        return k.layer_output(
            x,
            q,
            kk,
            v,
            self.scale,
            mask is not None,
            self.post_norm.weight,
            self.post_norm.eps,
            [a for w, _ in rest for a in w],
            [i for _, spec in rest for i in spec],
        )

    def _mlx(self, x: mx.array, mask: Any, cache: Any) -> mx.array:
        """The same layer with MLX's ops (a backend without the extension, or unusual masks/caches)."""
        x = x.astype(mx.float32)
        B, L, _ = x.shape
        qkv = self.qkv(self.input_norm(x))
        hq, hkv = self.n_heads, self.n_kv_heads
        d = qkv.shape[-1] // (hq + 2 * hkv)
        q, kk, v = mx.split(qkv, [hq * d, (hq + hkv) * d], axis=-1)
        q = q.reshape(B, L, hq, -1).transpose(0, 2, 1, 3)
        kk = kk.reshape(B, L, hkv, -1).transpose(0, 2, 1, 3)
        v = v.reshape(B, L, hkv, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        rope = {"traditional": False, "base": self.rope_base, "scale": self.rope_scale}
        q = mx.fast.rope(q, self.rope_dims, offset=offset, **rope)
        kk = mx.fast.rope(kk, self.rope_dims, offset=offset, **rope)
        if cache is not None:
            kk, v = cache.update_and_fetch(kk, v)
        o = scaled_dot_product_attention(q, kk, v, cache=cache, scale=self.scale, mask=mask)
        h = x + self.o_proj(o.transpose(0, 2, 1, 3).reshape(B, L, -1))
        gate, up = mx.split(self.gate_up(self.post_norm(h)), 2, axis=-1)
        return h + self.down_proj(nn.silu(gate) * up)


# ------------------------------------------------------------------ swapping


def _spec(module: nn.Module, float32: bool = False) -> dict[str, Any] | None:
    """The kernel form of a linear layer (weights and settings), or None if none serves it."""
    if isinstance(module, nn.QuantizedLinear):
        if (
            getattr(module, "mode", "affine") != "affine"
            or module.bits not in (4, 8)
            or module.group_size not in GROUP_SIZES
            or module.get("biases") is None
        ):
            return None
        return {
            "weight": module.weight,
            "scales": module.scales,
            "biases": module.biases,
            "bias": module.get("bias"),
            "group_size": module.group_size,
            "bits": module.bits,
        }
    if isinstance(module, nn.Linear):
        dtype = module.weight.dtype
        if dtype == mx.bfloat16 or (float32 and dtype == mx.float32):
            return {"weight": module.weight, "bias": module.get("bias")}
    return None


def _layer(spec: dict[str, Any]) -> KernelLinear:
    spec = dict(spec)
    return KernelLinear(bias=spec.pop("bias"), **spec)


def _fuse(specs: list[dict[str, Any]]) -> KernelLinear:
    """One layer computing all `specs` (of one kind and input size), outputs concatenated."""
    bias = None
    if any(s["bias"] is not None for s in specs):
        bias = mx.concatenate(
            [
                s["bias"].astype(mx.float32)
                if s["bias"] is not None
                else mx.zeros((s["weight"].shape[0],), mx.float32)
                for s in specs
            ]
        )

    def cat(name: str) -> mx.array:
        return mx.concatenate([s[name] for s in specs], axis=0)

    first = specs[0]
    weights = [s["weight"] for s in specs]
    if "scales" in first:
        layer = KernelLinear(
            weights, bias, cat("scales"), cat("biases"), first["group_size"], first["bits"]
        )
    else:
        layer = KernelLinear(weights, bias)
    mx.eval(layer.parameters())
    return layer


_PROJECTIONS = {
    "self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}


def _block_specs(block: nn.Module) -> dict[str, dict[str, Any]] | None:
    """The projections of a Qwen2 decoder layer a `KernelBlock` can take, or None."""
    if not isinstance(block, qwen2.TransformerBlock):
        return None
    attn = block.self_attn
    if not isinstance(attn, qwen2.Attention) or not isinstance(block.mlp, qwen2.MLP):
        return None
    if type(attn.rope) is not nn.RoPE or attn.rope.traditional:
        return None
    if not all(
        type(n) is nn.RMSNorm for n in (block.input_layernorm, block.post_attention_layernorm)
    ):
        return None
    specs = {}
    for part, names in _PROJECTIONS.items():
        for name in names:
            spec = _spec(getattr(block, part)[name], float32=True)
            if spec is None:
                return None
            specs[name] = spec
    kinds = {
        ("q", s["bits"], s["group_size"], s["scales"].dtype) if "scales" in s else s["weight"].dtype
        for s in specs.values()
    }
    in_dims = {specs[n]["weight"].shape[1] for n in ("q_proj", "k_proj", "v_proj")}
    in_dims_mlp = {specs[n]["weight"].shape[1] for n in ("gate_proj", "up_proj")}
    if len(kinds) != 1 or len(in_dims) != 1 or len(in_dims_mlp) != 1:
        return None
    return specs


def use_kernels(model: nn.Module, on: backend.Backend | None = None) -> int:
    """Swap `model`'s decoder layers, norms and bf16/quantized linears for kernel modules, in place.

    Returns the number of modules swapped: 0 (and nothing changes) when the backend
    `on` (default: the active one) has no extension, or the model has nothing for
    them. Call it after setting the model's precision (`cast`, `quantize`).
    """
    if (on or backend.current()).extension is None:
        return 0
    swapped = 0
    # decoder layers first; then, in the updated tree, the remaining norms and linears.
    # Each layer is packed and its old weights dropped before the next one is packed (the
    # walk keeps where the layers are, not the layers), so loading never holds two copies.
    places = [
        (parent, key, i)
        for _, parent in model.named_modules()
        for key, value in parent.items()
        for i, item in (enumerate(value) if isinstance(value, list) else [(None, value)])
        if _block_specs(item) is not None
    ]
    for parent, key, i in places:
        item = parent[key] if i is None else parent[key][i]
        block = KernelBlock(item, _block_specs(item))
        if i is None:
            setattr(parent, key, block)
        else:
            parent[key][i] = block
        del item
        mx.eval(block.parameters())
        swapped += 1
    for _, parent in model.named_modules():
        for key, value in list(parent.items()):
            if type(value) is nn.RMSNorm and swapped:  # the norm after kernel layers
                setattr(parent, key, KernelRMSNorm(value.weight, value.eps))
                swapped += 1
            elif isinstance(value, nn.Module) and (spec := _spec(value, bool(swapped))):
                setattr(parent, key, _layer(spec))
                swapped += 1
    mx.eval(model.parameters())
    return swapped
