"""Weight-only 8- or 4-bit quantisation of the flow's linear layers, their bfloat16 form, and a record of the flow's precision.

The flow's `nn.Linear` layers (the encoder's attention and feed-forward projections,
the estimator's attention, feed-forward and time-embedding projections, the speaker
and encoder projections) are replaced by MLX's `nn.QuantizedLinear` through MLX's own
`nn.quantize` (affine quantisation: a scale and a bias per `group_size` weights of a
row). A layer whose input dimension is not a multiple of `group_size` stays float, as
MLX's quantised matmul needs whole groups. Embeddings and convolutions (including the
estimator's 1x1 convolutions) stay float: quantising them would need a quantised
convolution MLX does not have. From the released shapes the linears are most of the
flow's weights (of its 113 M parameters, the estimator's transformer projections
about 59 M and the encoder's projections about 35 M); the estimator's convolutions
are about 7 M.

Every compute route runs a quantised layer through MLX's quantised matmul: the
flow's fast paths (`cosyvoice2.flow.ops.linear`, the fused q/k/v projection and the
whole-block kernel of `cosyvoice2.flow.transformer`) serve float `nn.Linear` layers
only and fall back to the layer itself otherwise; nothing dequantises the model.
What quantisation buys is memory (the linears' weights at a quarter or an eighth
of float32): MLX's quantised matmul on the CPU is slower than its float matmul and
than the extension's panel GEMM, which a quantised layer no longer takes.

`bits=16` (`bf16_linears`) is another trade: the CFM estimator's transformer-block
projections (q/k/v, output and both feed-forward layers: most of the flow's
multiply-adds, run 2 x n_timesteps times per chunk) hold their weights in bfloat16,
and each multiplies its input rounded to bfloat16 (the products are then exact, the
sums float32); the blocks' attention multiplies bf16-rounded queries, keys, values and
softmax weights the same way (`Attention.bf16_products`), so a streaming flow cache
keeps those blocks' keys and values in bf16 (half the cache, the same function);
everything else (the softmax, norms, convolutions, the encoder) stays float32. With the
extension these run bf16 pair panels (`pack_panels(w, bf16=True)`: AMX tiles or AVX-512
BF16 dot products where the CPU has them, widened to fp32 in registers otherwise); on
the other routes the same function in float32 MLX ops (`cosyvoice2.flow.ops.linear`).
The weights they hold are half of float32's. It needs a float32 flow (`load` refuses it
with a half-precision `flow_dtype`).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from cosyvoice2.errors import InputError

__all__ = [
    "BF16_BITS",
    "FLOW_BITS",
    "FLOW_GROUP_SIZES",
    "bf16_linears",
    "check_flow_quantization",
    "flow_precision",
    "quantize_flow",
]

BF16_BITS = 16  # `bits` of the bfloat16 linears (`bf16_linears`), not a quantisation
FLOW_BITS = (8, 4, BF16_BITS)
FLOW_GROUP_SIZES = (32, 64, 128)  # MLX's affine quantisation


def _quantizable(module: nn.Module, group_size: int) -> bool:
    return type(module) is nn.Linear and module.weight.shape[-1] % group_size == 0


def check_flow_quantization(bits: Any, group_size: Any) -> None:
    """A one-line `InputError` naming the argument when `bits`/`group_size` are not MLX's."""
    if isinstance(bits, bool) or bits not in FLOW_BITS:
        raise InputError(f"flow_bits must be one of 8, 4, 16 or None, got {bits!r}")
    if isinstance(group_size, bool) or group_size not in FLOW_GROUP_SIZES:
        raise InputError(
            f"flow_group_size must be one of {', '.join(map(str, FLOW_GROUP_SIZES))}, "
            f"got {group_size!r}"
        )


def quantize_flow(flow: nn.Module, bits: int, group_size: int = 64) -> dict[str, Any]:
    """Quantise the flow's `nn.Linear` layers in place (see module doc); returns the record
    `{"bits", "group_size", "quantized_linears", "float_linears"}`.

    Run after the weights are loaded and after any dtype cast: the scales and biases
    take the weights' dtype. A layer whose input dimension is not a multiple of
    `group_size` stays float (counted in `float_linears`).
    """
    check_flow_quantization(bits, group_size)
    if bits == BF16_BITS:
        n = bf16_linears(flow)
        record = flow_precision(flow)
        return {
            "bits": bits,
            "group_size": None,
            "quantized_linears": 0,
            "float_linears": record["float_linears"] - n,
            "bf16_linears": n,
        }
    from cosyvoice2.flow.flow import forget_packed

    forget_packed(flow)
    nn.quantize(
        flow,
        group_size=group_size,
        bits=bits,
        class_predicate=lambda _path, m: _quantizable(m, group_size),
    )
    mx.eval(flow.parameters())
    record = flow_precision(flow)
    return {
        "bits": bits,
        "group_size": group_size,
        "quantized_linears": record["quantized_linears"],
        "float_linears": record["float_linears"],
    }


def _bf16_targets(flow: nn.Module) -> list[nn.Module]:
    from cosyvoice2.flow.transformer import BasicTransformerBlock

    out = []
    for _, m in flow.named_modules():
        if isinstance(m, BasicTransformerBlock):
            a = m.attn1
            out += [a.to_q, a.to_k, a.to_v, a.to_out[0], m.ff.net[0].proj, m.ff.net[2]]
    return [m for m in out if type(m) is nn.Linear]


def bf16_linears(flow: nn.Module) -> int:
    """Hold the CFM estimator's transformer-block projections in bfloat16 and mark them
    (`cosyvoice2.packed.is_bf16_linear`; see the module doc), in place; returns how many.
    Only float32 layers change: in a flow cast to bfloat16 as a whole, nothing does."""
    from cosyvoice2.flow.flow import forget_packed

    forget_packed(flow)
    n = 0
    for m in _bf16_targets(flow):
        if m.weight.dtype == mx.float32:
            m.weight = m.weight.astype(mx.bfloat16)
            m._bf16_linear = True  # not an array: an attribute, not a parameter
            n += 1
    mx.eval(flow.parameters())
    return n


def flow_precision(flow: nn.Module) -> dict[str, Any]:
    """What the flow runs at now: `dtype` (of its float weights), `bits` and `group_size`
    of its quantised linears (`bits` 16 for bfloat16 linears, None when neither), and how
    many linears are quantised, how many bfloat16 linears and how many float."""
    from cosyvoice2.packed import is_bf16_linear

    quantized = [m for _, m in flow.named_modules() if isinstance(m, nn.QuantizedLinear)]
    floats = sum(1 for _, m in flow.named_modules() if type(m) is nn.Linear)
    bf16 = sum(1 for m in _bf16_targets(flow) if is_bf16_linear(m))
    dtype = flow.input_embedding.weight.dtype
    q = quantized[0] if quantized else None
    return {
        "dtype": {mx.float32: "float32", mx.bfloat16: "bfloat16", mx.float16: "float16"}.get(
            dtype, str(dtype)
        ),
        "bits": q.bits if q is not None else BF16_BITS if bf16 else None,
        "group_size": None if q is None else q.group_size,
        "quantized_linears": len(quantized),
        "float_linears": floats - bf16,
        "bf16_linears": bf16,
    }
