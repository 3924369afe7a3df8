"""Optional CPU kernels for cosyvoice2-mlx: MLX primitives for y = x W^T.

- `linear_dense(x, w, bias=None)`: `w` (N, K) bfloat16 or float32.
- `linear_quantized(x, w, scales, biases, bias=None, group_size=64, bits=8)`: 8- or
  4-bit affine weights in `mx.quantize`'s layout (packed uint32, per-group scales and
  biases), so one converted model serves Metal (MLX's own kernels) and the CPU (these).

- `pack_panels(w)` and `linear_panels(x, wp, n, bias=None, parallel=True)`: float32
  `w` (N, K) packed once into panels of 16 columns, then products of any row count
  at near the CPU's FMA peak (a register-blocked GEMM that streams the panels, where
  a BLAS GEMM re-packs the weights on every call).

All take `x` (..., K) (converted to float32), accumulate in float32 and return
(..., N) float32. The rest of a transformer decode step, each one graph node where
MLX's CPU path builds `mx.fast.rms_norm`, `mx.fast.rope` and
`mx.fast.scaled_dot_product_attention` from 7-20 basic ops:

- `rms_norm(x, w, eps, residual=None)`: `[y]`, or `[x + residual, y(x + residual)]`;
- `rope_split(qkv, inv_freq, n_heads, n_kv_heads, dims, scale, offset)`: a fused q/k/v
  projection to `[q, k, v]` in (B, H, L, D), rotary embeddings on q and k;
- `attention(q, k, v, scale, causal)`: grouped-head attention to (B, L, Hq * D);
- `swiglu(h)`: `silu(gate) * up` from the fused gate/up projection;
- `layer_input(...)` and `layer_output(...)`: a Qwen2 decoder layer as two nodes either
  side of its KV cache update (the operations above and the projections, in the same
  order, so the same results): norm, q/k/v projection and rotary embeddings; then
  attention, output projection, residual, norm, gate/up, SwiGLU, down and residual;
- `block_attention(qkv, blocks, heads, chunk, parallel=True)`: the flow estimator's
  chunk-masked attention of new positions over its cached key/value blocks (scores
  and weighted values on the panel GEMM, the softmax in place), one node where MLX
  needs a matmul per block, a concatenation, the masked softmax and a sum;
- `conv1d_panels(x, wp, n, kernel_size, bias=None, pad_left=0, pad_right=0, stride=1,
  dilation=1)`: torch's `Conv1d` on channels-last input, `wp` = `pack_panels` of the
  weight (n, K, C) reshaped to (n, K * C); the panel GEMM reads overlapping rows of the
  padded input, so there is no im2col buffer and no per-tap pass (HiFT, the flow's
  convolutions);
- `layer_norm(x, w, b, eps, mish=False)` and `gelu(x, bias=None)`: the estimator's
  row-wise operations (exponentials and erf vectorised in C++), one node each;
- `transformer_block(x, params, blocks, heads, inner, ff, chunk, eps1, eps3, keep)`: the
  estimator's whole transformer block (the ops above in sequence, residuals in place),
  one node instead of about fifteen.

All are lazy MLX operations on the CPU stream in float32, usable inside
`mx.compile`; they have no gradient and no GPU implementation (callers use MLX's
own ops there, see `cosyvoice2.kernel_layers`).

Why: on the CPU, MLX computes bf16 and quantized matrix-vector products on slow
paths and fp32 reads twice the bytes of bf16; decoding is bound by reading the
weights. These kernels read bf16, 8-bit or 4-bit weights directly, convert them in
registers and use fp32 FMA, with the instruction set chosen at run time (AVX-512F,
AVX2+FMA, or portable C++), in a thread pool created once.

Environment: `COSYVOICE2_KERNELS_ISA` (avx512, avx2, portable; default: the best
available), `COSYVOICE2_KERNELS_THREADS` (default: the CPUs this process may use,
at most 8), `COSYVOICE2_KERNELS_SPIN_US` (how long idle workers poll before sleeping,
default 50).

Importing raises ImportError when the extension was built against another MLX
version than the one installed (rebuild with `kernels/build.sh`).
"""

from __future__ import annotations

import mlx.core as mx  # loads libmlx and registers mx.array before the extension

from . import _ext

__all__ = [
    "BUILD_INFO",
    "attention",
    "available_isas",
    "gelu",
    "layer_input",
    "layer_norm",
    "layer_output",
    "block_attention",
    "conv1d_panels",
    "isa",
    "linear_dense",
    "linear_quantized",
    "linear_panels",
    "num_threads",
    "pack_panels",
    "rms_norm",
    "rope_split",
    "set_isa",
    "set_num_threads",
    "swiglu",
    "transformer_block",
]

BUILD_INFO: dict = dict(_ext.build_info())


def _release(version: str) -> str:
    """`0.32.4` from `0.32.4`, `0.32.4.dev20260101+abc` and the like."""
    return ".".join(version.split("+")[0].split(".")[:3])


if _release(mx.__version__) != BUILD_INFO["mlx_version"]:
    raise ImportError(
        f"cosyvoice2_kernels was built against MLX {BUILD_INFO['mlx_version']} but MLX "
        f"{mx.__version__} is installed; rebuild it (kernels/build.sh)"
    )

linear_dense = _ext.linear_dense
linear_quantized = _ext.linear_quantized
pack_panels = _ext.pack_panels
linear_panels = _ext.linear_panels
rms_norm = _ext.rms_norm
rope_split = _ext.rope_split
attention = _ext.attention
block_attention = _ext.block_attention
conv1d_panels = _ext.conv1d_panels
layer_norm = _ext.layer_norm
gelu = _ext.gelu
transformer_block = _ext.transformer_block
swiglu = _ext.swiglu
layer_input = _ext.layer_input
layer_output = _ext.layer_output
isa = _ext.isa
available_isas = _ext.available_isas
set_isa = _ext.set_isa
num_threads = _ext.num_threads
set_num_threads = _ext.set_num_threads
