"""Small array helpers shared by the flow's modules: convolutions, masks, activations.

Everything here works channels-last, as MLX does: sequences are `(B, T, C)` and
convolution weights `(C_out, K, C_in)` (the converter moves torch's `(C_out, C_in, K)`).

CPU notes (MLX 0.32.4 on Linux x86_64, OpenBLAS preloaded; the whole profile is in
the `cosyvoice2.flow` package docstring):

- An undilated `mx.conv1d` with kernel 3 runs at GEMM speed (measured equal to an
  unfold + matmul formulation), so the causal convolutions use it after a left pad;
  with the extension they are its `conv1d_panels` (the panel GEMM over overlapping rows
  of the padded input, the weight packed once).
- `mx.conv_transpose1d` is a slow path on CPU. CosyVoice2's
  estimator has one resolution level and never uses it; the multi-level
  estimator does (`Upsample1D`), through the shared fast route
  `cosyvoice2.ops.conv_transpose1d` (the one HiFT uses).
- Float32 projections (`linear`: `nn.Linear`, 1x1 `nn.Conv1d`) run the panel GEMM of
  the optional `cosyvoice2_kernels` when it is built: weights packed once per layer
  (`pack_panels`), which at the streaming cache's 60-70 rows saves what MLX's
  matmul spends re-packing the weights (OpenBLAS) on every call. Without the
  extension they are MLX's matmul.
- With the extension, `layer_norm` (and Mish) and `gelu` are its operations too, so a
  transformer block is lazy end to end (a numba kernel needs an evaluation and a
  buffer hand-off per call, 3 per block).
- Transcendental element-wise functions (`exp`, `erf`, `tanh`, `sigmoid`,
  `log1p`) are slow paths on MLX-CPU, costing more per element than a 256-wide
  matmul does. `softmax`, `gelu`, `silu`, `mish` and `layer_norm` here therefore
  run the numba kernels of `cosyvoice2.row_kernels` where the backend uses them
  (`use_cpu_kernels`), and the MLX ops otherwise. Both are tested against each other.

Which of these run is the active backend's choice (`cosyvoice2.backend`), made once
at load; nothing here reads the environment or the device.

The convolution routes shared with HiFT (dilated and transposed convolutions)
live in `cosyvoice2/ops.py`; this module keeps what only the flow needs.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from cosyvoice2 import backend, branches
from cosyvoice2.ops import panel_conv1d
from cosyvoice2.packed import held_weight, is_bf16_linear, packed


def causal_conv1d(layer: nn.Module, x: mx.array) -> mx.array:
    """`layer`'s convolution (weight `(C_out, K, C_in)`, optional bias) of `x` `(B, T, C_in)`
    made causal: `K - 1` zeros on the left, then a valid convolution; `(B, T, C_out)`."""
    return conv1d_valid(layer, x, layer.weight.shape[1] - 1)


def conv1d_valid(layer: nn.Module, x: mx.array, pad_left: int = 0) -> mx.array:
    """`layer`'s stride-1 convolution of `x` zero-padded by `pad_left` rows on the left only.

    A float32 weight where the extension runs is one `conv1d_panels` node
    (`cosyvoice2.ops.panel_conv1d`); otherwise `mx.conv1d`.
    """
    y = panel_conv1d(layer, x, pad_left)
    if y is not None:
        return y
    bias = layer.get("bias")
    if pad_left:
        x = mx.pad(x, [(0, 0), (pad_left, 0), (0, 0)])
    y = mx.conv1d(x, held_weight(layer))
    return y if bias is None else y + bias


def cpu_extension():
    """`cosyvoice2_kernels` where the active backend uses it (its panel GEMM, row ops,
    attention and transformer block), else None (`cosyvoice2.backend`)."""
    return backend.current().extension


def all_cores() -> bool:
    """Whether an extension operation built in this thread may split its work over all
    cores: not in a CFG branch worker (`cosyvoice2.branches`), whose other branch has
    the other core."""
    return not branches.in_worker()


def panel_linear(kernels, x: mx.array, panels: mx.array, n: int, bias: mx.array | None = None):
    """`x @ W.T (+ bias)` with `panels = kernels.pack_panels(W)` (threads: `all_cores`)."""
    return kernels.linear_panels(x, panels, n, bias, parallel=all_cores())


def _is_pointwise(layer: nn.Module) -> bool:
    """`nn.Linear`, or an `nn.Conv1d` that is one (kernel 1, stride 1, no padding, one group)."""
    if type(layer) is nn.Linear:
        return True
    return (
        type(layer) is nn.Conv1d
        and layer.weight.shape[1] == 1
        and (layer.stride, layer.padding, layer.dilation, layer.groups) == (1, 0, 1, 1)
    )


def bf16_rounded(x: mx.array) -> mx.array:
    """`x` rounded to bfloat16 (to nearest even), as float32."""
    return x.astype(mx.bfloat16).astype(mx.float32)


def uses_panels(layer: nn.Module) -> bool:
    """Whether `linear` runs `layer` on the panel GEMM where the extension is active: a
    pointwise layer with float32 weights, or a bf16 linear (`is_bf16_linear`: bf16 pair
    panels)."""
    return (layer.weight.dtype == mx.float32 or is_bf16_linear(layer)) and _is_pointwise(layer)


def linear(layer: nn.Module, x: mx.array, bias: bool = True) -> mx.array:
    """`layer(x)` for an `nn.Linear` or a pointwise `nn.Conv1d` (channels-last); `bias=False`:
    without the layer's bias.

    float32 weights on the CPU run the panel GEMM (`cpu_extension`), the weight packed
    on first use and kept on the layer (again when the weight changes); otherwise MLX.
    An `nn.QuantizedLinear` (`cosyvoice2.flow.quantize`) runs MLX's quantised matmul.
    A bf16 linear (`is_bf16_linear`) runs bf16 pair panels, or its function in float32
    MLX ops.
    """
    w = layer.weight
    k = cpu_extension() if uses_panels(layer) else None
    if k is None:
        w = held_weight(layer)
        if is_bf16_linear(layer):
            y = bf16_rounded(x) @ w.reshape(w.shape[0], -1).astype(mx.float32).T
            b = layer.get("bias") if bias else None
            return y if b is None else y + b
        if bias:
            return layer(x)
        if isinstance(layer, nn.QuantizedLinear):
            return mx.quantized_matmul(
                x,
                w,
                layer.scales,
                layer.get("biases"),
                transpose=True,
                group_size=layer.group_size,
                bits=layer.bits,
                mode=layer.mode,
            )
        return x @ w.reshape(w.shape[0], -1).T
    return panel_linear(k, x, packed(k, layer), w.shape[0], layer.get("bias") if bias else None)


def chunk_mask(size: int, chunk_size: int) -> mx.array:
    """Boolean `(size, size)` mask: position i sees every position before the end of its chunk.

    The official `subsequent_chunk_mask` (its ONNX-friendly form, which ignores
    `num_left_chunks`): `j < (i // chunk_size + 1) * chunk_size`.
    """
    pos = mx.arange(size)
    ends = (pos // chunk_size + 1) * chunk_size
    return pos[None, :] < ends[:, None]


def block_scores(q: mx.array, keys: list[mx.array]) -> mx.array:
    """`q @ K^T` over key blocks: `(..., n_q, sum of block lengths)`."""
    parts = [q @ k.transpose(0, 1, 3, 2) for k in keys]
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)


def block_values(p: mx.array, values: list[mx.array]) -> mx.array:
    """`p @ V` over value blocks (`p`'s last axis spans the blocks in order)."""
    out, start = None, 0
    for v in values:
        n = v.shape[2]
        term = p[..., start : start + n] @ v
        out = term if out is None else out + term
        start += n
    return out


# Below this many elements an element-wise op is cheaper in MLX than a kernel hand-off.
SMALL = 4096


def _kernels():
    """The numba row kernels where the active backend uses them, else None."""
    return backend.current().row_kernels


def use_cpu_kernels() -> bool:
    """Whether element-wise transcendentals go through the numba row kernels (`cosyvoice2.row_kernels`)."""
    return backend.current().row_kernels is not None


def _as_numpy(x: mx.array, shape: tuple[int, ...]) -> np.ndarray:
    """A C-contiguous float32 numpy view (or copy) of `x` reshaped, after evaluating it."""
    x = x.astype(mx.float32).reshape(shape)
    mx.eval(x)
    return np.ascontiguousarray(np.asarray(x))


def _new_output(shape: tuple[int, ...]) -> tuple[mx.array, np.ndarray]:
    """An MLX-owned float32 buffer and a writable numpy view of it (MLX reuses freed buffers: no page faults)."""
    out = mx.zeros(shape, dtype=mx.float32)
    mx.eval(out)
    return out, np.asarray(out)


def softmax(scores: mx.array, chunk: int = 0, q0: int = 0) -> mx.array:
    """Softmax over the last axis of `(..., T_q, T_k)` scores; with `chunk > 0`, chunk-masked.

    Query `i` is at absolute position `q0 + i` and keys at `0 .. T_k - 1`; query `q`
    sees the keys `j < (q // chunk + 1) * chunk` (`chunk_mask`); the masked
    probabilities are 0. (`q0 > 0`: the new queries of the streaming cache.)
    """
    t_q, t_k = scores.shape[-2:]
    k = _kernels()
    if k is None:
        if chunk > 0:
            q = mx.arange(q0, q0 + t_q)
            visible = mx.arange(t_k)[None, :] < ((q // chunk + 1) * chunk)[:, None]
            scores = mx.where(visible, scores, -mx.inf)
        return mx.softmax(scores, axis=-1)
    s = _as_numpy(scores, (-1, t_k))
    out, o = _new_output(scores.shape)
    k.run_rows(k.softmax_rows, s.shape[0], t_k, s, o.reshape(-1, t_k), t_q, chunk, q0)
    return out


def gelu(x: mx.array, bias: mx.array | None = None) -> mx.array:
    """Exact (erf) GELU of `x + bias`, as diffusers' `GELU` with `approximate="none"`."""
    ck = cpu_extension() if x.dtype == mx.float32 else None
    if ck is not None:
        return ck.gelu(x, bias, parallel=all_cores())
    k = _kernels()
    if k is None:
        if bias is not None:
            x = x + bias
        return 0.5 * x * (1.0 + mx.erf(x * 0.7071067811865476))
    c = x.shape[-1]
    b = np.zeros(c, np.float32) if bias is None else _as_numpy(bias, (c,))
    out, o = _new_output(x.shape)
    xs = _as_numpy(x, (-1, c))
    k.run_rows(k.gelu_bias, xs.shape[0], c, xs, b, o.reshape(-1, c))
    return out


def silu(x: mx.array, bias: mx.array | None = None) -> mx.array:
    """`v * sigmoid(v)` with `v = x + bias` (the encoder's swish)."""
    k = _kernels()
    if k is None:
        if bias is not None:
            x = x + bias
        return x * mx.sigmoid(x)
    c = x.shape[-1]
    b = np.zeros(c, np.float32) if bias is None else _as_numpy(bias, (c,))
    out, o = _new_output(x.shape)
    xs = _as_numpy(x, (-1, c))
    k.run_rows(k.silu_bias, xs.shape[0], c, xs, b, o.reshape(-1, c))
    return out


def layer_norm(
    x: mx.array, weight: mx.array, bias: mx.array, eps: float, then_mish: bool = False
) -> mx.array:
    """LayerNorm over the last axis (torch semantics), optionally followed by Mish, in one pass on CPU."""
    ck = cpu_extension() if x.dtype == mx.float32 else None
    if ck is not None:
        return ck.layer_norm(x, weight, bias, eps, mish=then_mish, parallel=all_cores())
    k = _kernels()
    if k is None:
        y = mx.fast.layer_norm(x, weight, bias, eps)
        return mish(y) if then_mish else y
    c = x.shape[-1]
    out, o = _new_output(x.shape)
    xs = _as_numpy(x, (-1, c))
    k.run_rows(
        k.layer_norm_rows,
        xs.shape[0],
        c,
        xs,
        _as_numpy(weight, (c,)),
        _as_numpy(bias, (c,)),
        eps,
        o.reshape(-1, c),
        then_mish,
    )
    return out


def mish(x: mx.array) -> mx.array:
    """`x * tanh(softplus(x))` (torch `nn.Mish`).

    Small inputs (the time embedding, 1 x 1024 per resnet block) take MLX's ops: a
    kernel would force an evaluation there, stalling the rest of the lazily built step.
    """
    k = _kernels() if x.size >= SMALL else None
    if k is None:
        return x * mx.tanh(mx.where(x > 20.0, x, mx.logaddexp(x, 0.0)))
    c = x.shape[-1]
    xs = _as_numpy(x, (-1, c))
    out, o = _new_output(x.shape)
    k.run_rows(k.mish_rows, xs.shape[0], c, xs, o.reshape(-1, c))
    return out
