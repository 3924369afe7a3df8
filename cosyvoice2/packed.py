"""Weights packed for the CPU extension's panel GEMM, the packed form holding the weight.

`packed(kernels, layer)` gives `kernels.pack_panels` of a layer's weight, made on first
use and kept on the layer (again when the weight changes). At load (`release=True`) the
panels become the only copy: `layer.weight` turns into a lazy exact re-layout of them
(`unpack_panels`), which costs no memory unless something evaluates it (saving the
weights, a cast). `let_form_hold` / `held_weight` do that for any derived form, and
`forget_packed` undoes it before the weights change form.

The flow's projections (`cosyvoice2.flow`) and the convolutions of HiFT and the flow
(`cosyvoice2.ops.Conv1d`, `conv1d_panels`: a convolution weight (C_out, K, C_in) packs
as the (C_out, K * C_in) matrix) share these helpers.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn


def let_form_hold(layer: nn.Module, name: str, rebuild: Callable[[], mx.array]) -> mx.array:
    """Let a derived form hold the parameter `layer.<name>`: the parameter becomes the lazy
    array `rebuild()` (an exact re-layout of evaluated arrays, costing no memory unless it
    is evaluated), and `held_weight` rebuilds it where a thread other than this one needs
    its values (a lazy array belongs to the MLX stream of the thread that built it)."""
    lazy = rebuild()
    setattr(layer, name, lazy)
    released = getattr(layer, "_released", None) or {}
    released[name] = (lazy, rebuild, threading.get_ident())
    layer._released = released
    return lazy


def held_weight(layer: nn.Module, name: str = "weight") -> mx.array:
    """`layer.<name>` as an array this thread can evaluate: a released parameter (`let_form_hold`)
    read on another thread is rebuilt and evaluated here, and kept (a copy, from then on)."""
    w = getattr(layer, name)
    released = getattr(layer, "_released", None)
    entry = released.get(name) if released else None
    if entry is not None and entry[0] is w and entry[2] != threading.get_ident():
        w = entry[1]()
        mx.eval(w)
        setattr(layer, name, w)
        released.pop(name, None)  # (the other branch thread may have done it too)
    return w


class _Packed:
    """A layer's weight packed for the panel GEMM, with the array it was packed from."""

    __slots__ = ("panels", "source")

    def __init__(self, source: mx.array, panels: mx.array):
        self.source, self.panels = source, panels


def is_bf16_linear(layer: nn.Module) -> bool:
    """Whether `layer` is a bfloat16 linear of a float32 flow (`flow_bits=16`,
    `cosyvoice2.flow.quantize.bf16_linears`): its bf16 weight meets its input rounded to
    bf16, the exact products summed in float32, on every route."""
    return getattr(layer, "_bf16_linear", False) and layer.weight.dtype == mx.bfloat16


def packed(kernels, layer: nn.Module, release: bool = False) -> mx.array:
    """`kernels.pack_panels` of a pointwise layer's weight, packed on first use and kept on
    the layer (again when the weight changes).

    `release` (`CausalMaskedDiffWithXvec.pack_weights`, at load): the panels then hold the
    weight, and `layer.weight` becomes `unpack_panels` of them, a lazy array that costs no
    memory unless something evaluates it (saving the weights, a cast: it gives them back
    exactly), so the model keeps one copy of the weight, not two. Only on the thread that
    will evaluate it: a lazy array belongs to the MLX stream of the thread that built it.
    """
    w = layer.weight
    cache = getattr(layer, "_panel_cache", None)
    if cache is None or cache.source is not w:
        w = held_weight(layer)
        panels = kernels.pack_panels(w.reshape(w.shape[0], -1), bf16=is_bf16_linear(layer))
        mx.eval(panels)  # shared by threads (`cosyvoice2.branches`): never lazy
        if release:
            shape = w.shape
            w = let_form_hold(layer, "weight", lambda: unpack_panels(panels, shape))
        cache = _Packed(w, panels)
        layer._panel_cache = cache
    return cache.panels


def unpack_panels(panels: mx.array, shape: tuple[int, ...]) -> mx.array:
    """The weight of `shape` (rows first) that `pack_panels` packed into `panels`, as a lazy
    array (row n is lane `n % 16` of panel `n // 16`; bf16 pair panels: column k of it in
    pair `k // 2`, zero-padded): an exact re-layout."""
    p, k, width = panels.shape
    if panels.dtype == mx.bfloat16:  # (panels, pairs, 16 x 2)
        w = panels.reshape(p, k, 16, 2).transpose(0, 2, 1, 3).reshape(p * 16, 2 * k)
        return w[: shape[0], : math.prod(shape[1:])].reshape(shape)
    return panels.transpose(0, 2, 1).reshape(p * width, k)[: shape[0]].reshape(shape)


def forget_packed(module: nn.Module) -> None:
    """Drop the packed forms of `module`'s weights (`packed`, `let_form_hold`), before its
    weights change form (a cast, a quantisation): the held weights are rebuilt on this
    thread first, a later call packs again what it needs, and nothing keeps the old forms
    alive."""
    for _, m in module.named_modules():
        for name in list(getattr(m, "_released", None) or {}):
            held_weight(m, name)  # a weight its form held: rebuilt here (this thread's arrays)
        if getattr(m, "_panel_cache", None) is not None:
            m._panel_cache = None
