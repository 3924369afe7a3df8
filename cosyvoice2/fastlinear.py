"""Speech-LM projections on the optional CPU kernels (`cosyvoice2_kernels`), MLX ops otherwise.

Why: on the CPU, MLX computes bf16 and quantized matrix-vector products on slow
paths (NOTES.md: about 5 GFLOP/s for bf16, 8-bit slower than fp32), so a bf16 or
8-bit speech LM decodes 3-5x slower than in fp32, while decoding is bound by
reading weights and those precisions read 2-4x fewer bytes. The kernels (built
from `kernels/`, optional) read bf16 or 8-bit weights (in `mx.quantize`'s layout,
so the converted model is the same one Metal uses) and accumulate in fp32.

`use_kernels(model)` swaps, in place, every `nn.Linear` with bfloat16 weights and
every 8-bit affine `nn.QuantizedLinear` for a `KernelLinear`; sibling projections
that read the same input are fused into one call (q/k/v, gate/up: `FUSE`), so each
decode step issues 4 kernel calls per layer instead of 7. Float32 and float16
layers are left alone (OpenBLAS serves fp32 well; fp16 has no kernel). Nothing is
swapped when the extension is not importable, or `COSYVOICE2_KERNELS` is `0`/`off`.

Numerics: the kernels take x in float32 and return float32 (fp32 accumulation), so
with kernels a bf16 model keeps its activations in float32 after the first
projection, where MLX's bf16 path rounds every activation to bf16: the kernel path
is the more precise one. 8-bit results equal `x @ mx.dequantize(...).T` up to fp32
summation order (both are exact dequantisation; no quantisation of x).

A swapped model is a runtime form: each fused group keeps one concatenated weight
(under the first part, e.g. `q_proj.fused.weight`), so its `parameters()` no longer
have the checkpoint's keys. Save weights from an unswapped model (the converter
never swaps). Each `KernelLinear` falls back to MLX's ops when the default device
is not the CPU, so a swapped model still runs on a GPU.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import mlx.core as mx
import mlx.nn as nn

ENV = "COSYVOICE2_KERNELS"
# Sibling projections fused into one call when all are present and of one kind.
FUSE: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
GROUP_SIZES = (32, 64, 128)

_module: ModuleType | None = None
_tried = False
_force_mlx = False


def _disabled_by_env() -> bool:
    return os.environ.get(ENV, "").strip().lower() in ("0", "off", "false", "no")


def kernels_module() -> ModuleType | None:
    """The `cosyvoice2_kernels` module, or None when absent, unusable or disabled.

    `COSYVOICE2_KERNELS=0` (or `off`) makes the package behave as if the extension
    were not installed (it is then not even imported). A present but unusable build
    (e.g. built against another MLX version) gives one warning; an absent one is
    silent, since the extension is optional.
    """
    global _module, _tried
    if _disabled_by_env():
        return None
    if not _tried:
        _tried = True
        try:
            import cosyvoice2_kernels as k

            _module = k
        except ModuleNotFoundError as e:
            if e.name != "cosyvoice2_kernels":
                warnings.warn(f"cosyvoice2_kernels cannot load: {e}", stacklevel=2)
        except ImportError as e:
            warnings.warn(f"cosyvoice2_kernels cannot load: {e}", stacklevel=2)
    return _module


def enabled() -> bool:
    """The kernels are importable and not switched off with `COSYVOICE2_KERNELS=0`."""
    return kernels_module() is not None


def describe() -> str:
    """A label for results: the variant and threads (e.g. `avx2 x2`), or `off`."""
    k = kernels_module()
    return f"{k.isa()} x{k.num_threads()}" if k is not None else "off"


@contextlib.contextmanager
def mlx_ops() -> Iterator[None]:
    """Within the block, swapped layers compute with MLX's ops (as they do off the CPU).

    For comparisons: the same swapped model with and without the kernels.
    """
    global _force_mlx
    saved, _force_mlx = _force_mlx, True
    try:
        yield
    finally:
        _force_mlx = saved


class KernelLinear(nn.Module):
    """y = x W^T (+ bias) with W bfloat16 (`weight`) or 8-bit affine (`weight`, `scales`, `biases`).

    x is taken in float32 and the output is float32, on the kernel path and on MLX's
    ops alike (the same products, up to summation order). `bias` is kept in float32.
    """

    def __init__(
        self,
        weight: mx.array,
        bias: mx.array | None = None,
        scales: mx.array | None = None,
        biases: mx.array | None = None,
        group_size: int | None = None,
        bits: int | None = None,
    ):
        super().__init__()
        self.weight = weight
        if scales is not None:
            self.scales = scales
            self.biases = biases
        if bias is not None:
            self.bias = bias.astype(mx.float32)
        self.group_size = group_size
        self.bits = bits
        self.quantized = scales is not None
        self.freeze()

    @property
    def output_dims(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: mx.array) -> mx.array:
        bias = self.get("bias")
        k = _module
        if k is not None and not _force_mlx and mx.default_device() == mx.cpu:
            if self.quantized:
                return k.linear_q8(
                    x,
                    self.weight,
                    self.scales,
                    self.biases,
                    bias,
                    group_size=self.group_size,
                    bits=self.bits,
                )
            return k.linear_bf16(x, self.weight, bias)
        x = x.astype(mx.float32)  # the kernels' semantics: float32 in and out
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
        else:
            y = x @ self.weight.T
        return y + bias if bias is not None else y


class _FusedGroup:
    """One fused call shared by sibling `FusedPart`s: computed once per input array.

    The parts are called one after another with the same `x` object (as mlx-lm's
    attention and MLP do); the first call runs the fused projection and the others
    take their slice. Calling a part again, or with another array, recomputes.
    """

    def __init__(self, proj: KernelLinear, sizes: list[int]):
        self.proj = proj
        self.splits = [sum(sizes[: i + 1]) for i in range(len(sizes) - 1)]
        self.n = len(sizes)
        self.x: mx.array | None = None
        self.outs: list[mx.array] = []
        self.taken: set[int] = set()

    def take(self, x: mx.array, index: int) -> mx.array:
        if self.x is not x or index in self.taken:
            self.x = x
            self.outs = mx.split(self.proj(x), self.splits, axis=-1)
            self.taken = set()
        self.taken.add(index)
        out = self.outs[index]
        if len(self.taken) == self.n:  # all parts served: drop the references
            self.x, self.outs = None, []
        return out


class FusedPart(nn.Module):
    """Stands in for one projection of a fused group; the first part holds the fused layer."""

    def __init__(self, group: _FusedGroup, index: int):
        super().__init__()
        self._group = group
        self.index = index
        if index == 0:
            self.fused = group.proj

    def __call__(self, x: mx.array) -> mx.array:
        return self._group.take(x, self.index)


def _spec(module: nn.Module) -> dict[str, Any] | None:
    """The kernel form of a layer (weights and settings), or None if no kernel serves it."""
    if isinstance(module, nn.QuantizedLinear):
        if (
            getattr(module, "mode", "affine") != "affine"
            or module.bits != 8
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
    if isinstance(module, nn.Linear) and module.weight.dtype == mx.bfloat16:
        return {"weight": module.weight, "bias": module.get("bias")}
    return None


def _fuse(specs: list[dict[str, Any]]) -> KernelLinear | None:
    """One layer computing all `specs` (same kind and input size), outputs concatenated."""
    first = specs[0]
    keys = ("group_size", "bits")
    if any(s.get(k) != first.get(k) for s in specs for k in keys) or any(
        s["weight"].shape[1] != first["weight"].shape[1] for s in specs
    ):
        return None
    quantized = "scales" in first
    if quantized and any(
        s["scales"].dtype != first["scales"].dtype or s["biases"].dtype != first["biases"].dtype
        for s in specs
    ):
        return None
    bias = None
    if any(s["bias"] is not None for s in specs):
        bias = mx.concatenate(
            [
                (s["bias"] if s["bias"] is not None else mx.zeros((s["weight"].shape[0],))).astype(
                    mx.float32
                )
                for s in specs
            ]
        )

    def cat(name: str) -> mx.array:
        return mx.concatenate([s[name] for s in specs], axis=0)

    if quantized:
        layer = KernelLinear(
            cat("weight"),
            bias,
            cat("scales"),
            cat("biases"),
            first["group_size"],
            first["bits"],
        )
    else:
        layer = KernelLinear(cat("weight"), bias)
    mx.eval(layer.parameters())
    return layer


def use_kernels(model: nn.Module, fuse: tuple[tuple[str, ...], ...] = FUSE) -> int:
    """Swap `model`'s bf16 and 8-bit linear layers for kernel layers, in place; returns how many.

    Returns 0 (and changes nothing) when the kernels are not available or disabled
    (`COSYVOICE2_KERNELS=0`). Call it after setting the model's precision (`cast`,
    `quantize`): it swaps the layers as they are then.
    """
    if not enabled():
        return 0
    swapped = 0
    for _, parent in model.named_modules():
        children = {k: v for k, v in parent.items() if isinstance(v, nn.Module)}
        for names in fuse:
            if not all(n in children for n in names):
                continue
            specs = [_spec(children[n]) for n in names]
            if any(s is None for s in specs):
                continue
            layer = _fuse(specs)
            if layer is None:
                continue
            group = _FusedGroup(layer, [s["weight"].shape[0] for s in specs])
            for i, n in enumerate(names):
                setattr(parent, n, FusedPart(group, i))
                children.pop(n)
            swapped += len(names)
        for name, child in children.items():
            spec = _spec(child)
            if spec is None:
                continue
            bias = spec.pop("bias")
            setattr(parent, name, KernelLinear(bias=bias, **spec))
            swapped += 1
    mx.eval(model.parameters())
    return swapped
