"""Fast 1-D convolution primitives for MLX, with the native ops kept where they are fast.

On the CPU backend of MLX (0.32), two convolution kernels are slow paths, orders
of magnitude slower than the same work as matrix multiplies: a dilated `mx.conv1d`
(the undilated one is fast) and `mx.conv_transpose1d`. HiFT is made of exactly these
(resblocks with dilations 1, 3, 5; three transposed-conv upsamplers), so this
module routes them through formulations made of matrix multiplies, which MLX
hands to BLAS (OpenBLAS preloaded):

- `conv1d_taps` (stride 1, the routed one): one accumulating matmul (`addmm`)
  per tap, each reading a shifted row range of the padded input, a view.
- `conv1d_unfold` (routed for stride > 1): im2col, the K shifted (strided)
  views concatenated into (N, L_out, K * C_in), then one matmul.
- `conv_transpose1d_taps` (routed): the transposed conv as a stride-1 conv over
  the input with ceil(K / stride) tap blocks of stride * C_out outputs, whose
  result is already the interleaved output (a free reshape).
- `conv_transpose1d_matmul`: one matmul giving every tap's contribution, then
  overlap-add of ceil(K / stride) shifted blocks (kept as a tested alternative).

The routed ones avoid copies on purpose: MLX-CPU copies strided arrays (slices
across the channel axis, `concatenate`, `as_strided` views) element by element,
so an im2col buffer, whose larger inner dimension makes the matmul faster for
64-128 channels, costs more to build than it saves.

The `Conv1d` module goes one step further where the CPU extension runs
(`cosyvoice2.backend`): a float32 convolution is then the extension's
`conv1d_panels` (the weight packed once, the padded input read in place by its panel
GEMM, a preceding Snake computed in its padding pass).

`conv1d` and `conv_transpose1d` pick the route: the fast formulation where
`fast_paths_enabled()` (the backend's choice, `cosyvoice2.backend`: on the CPU),
the native op otherwise (Metal's kernels are fast), and the native op for what the
fast formulations do not cover (groups > 1, transposed dilation > 1).

Layouts are MLX's: input (N, L, C_in), conv weight (C_out, K, C_in) for both
the conv and the transposed conv, as `mx.conv1d` / `mx.conv_transpose1d` take them.

`tests/benchmarks/test_bench_hift.py` times the native ops against these
formulations at HiFT's shapes (`python -m bench micro`, or `python -m bench run
--micro`, which keeps pytest-benchmark's JSON beside the run's results file).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from cosyvoice2 import backend, branches
from cosyvoice2.packed import held_weight, packed


def fast_paths_enabled() -> bool:
    """Whether `conv1d` / `conv_transpose1d` use the matmul formulations: the active
    backend's choice (`cosyvoice2.backend`; on the CPU by default)."""
    return backend.current().conv_matmuls


def _pads(padding: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(padding, int):
        return padding, padding
    lo, hi = padding
    return int(lo), int(hi)


def _matmul_bias(cols: mx.array, weight_t: mx.array, bias: mx.array | None) -> mx.array:
    if bias is None:
        return cols @ weight_t
    return mx.addmm(bias, cols, weight_t)


def conv1d_unfold(
    x: mx.array,
    weight: mx.array,
    bias: mx.array | None = None,
    stride: int = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int = 1,
) -> mx.array:
    """`mx.conv1d` (groups 1) as im2col plus one matmul; `padding` may be (left, right).

    x: (N, L, C_in); weight: (C_out, K, C_in); returns (N, L_out, C_out) with
    L_out = (L + left + right - dilation * (K - 1) - 1) // stride + 1.
    """
    c_out, k, c_in = weight.shape
    lo, hi = _pads(padding)
    if lo or hi:
        x = mx.pad(x, [(0, 0), (lo, hi), (0, 0)])
    length = x.shape[1]
    l_out = (length - dilation * (k - 1) - 1) // stride + 1
    if l_out <= 0:
        raise ValueError(f"conv1d: input of length {length} (padded) is shorter than the kernel")
    span = (l_out - 1) * stride + 1
    taps = [x[:, j * dilation : j * dilation + span : stride] for j in range(k)]
    cols = taps[0] if k == 1 else mx.concatenate(taps, axis=-1)
    return _matmul_bias(cols, weight.reshape(c_out, k * c_in).T, bias)


def tap_matrices(weight: mx.array) -> list[mx.array]:
    """Conv weight (C_out, K, C_in) -> K contiguous (C_in, C_out) matrices, one per tap."""
    return [mx.contiguous(weight[:, j, :].T) for j in range(weight.shape[1])]


def conv1d_taps(
    x: mx.array,
    weight: mx.array,
    bias: mx.array | None = None,
    padding: int | tuple[int, int] = 0,
    dilation: int = 1,
    taps: Sequence[mx.array] | None = None,
) -> mx.array:
    """`mx.conv1d` (stride 1, groups 1) as a chain of K accumulating matmuls, one per tap.

    Tap j reads the padded input shifted by j * dilation, a contiguous row range
    (no copy), and adds `x_j @ W_j` to the output with `addmm` (BLAS beta = 1).
    No im2col buffer: on MLX-CPU the strided copies that build one cost more than
    the matmul itself when C_in is small (64-128 channels).

    `taps`: `tap_matrices(weight)`, if the caller keeps them. MLX's matmul copies
    an operand that is neither contiguous nor a plain transpose, which
    `weight[:, j]` is not; kept tap matrices save that copy of every weight, and
    two graph nodes per tap, on every call.
    """
    c_out, k, c_in = weight.shape
    if taps is None:
        taps = [weight[:, j, :].T for j in range(k)]
    lo, hi = _pads(padding)
    if lo or hi:
        x = mx.pad(x, [(0, 0), (lo, hi), (0, 0)])
    l_out = x.shape[1] - dilation * (k - 1)
    if l_out <= 0:
        raise ValueError(
            f"conv1d: input of length {x.shape[1]} (padded) is shorter than the kernel"
        )
    y = None
    for j in range(k):
        tap = x if k == 1 else x[:, j * dilation : j * dilation + l_out]
        if y is None:
            y = tap @ taps[j] if bias is None else mx.addmm(bias, tap, taps[j])
        else:
            y = mx.addmm(y, tap, taps[j])
    return y


def conv_transpose1d_matmul(
    x: mx.array,
    weight: mx.array,
    bias: mx.array | None = None,
    stride: int = 1,
    padding: int = 0,
    output_padding: int = 0,
) -> mx.array:
    """`mx.conv_transpose1d` (groups 1, dilation 1) as one matmul plus overlap-add.

    x: (N, L, C_in); weight: (C_out, K, C_in); returns (N, L_out, C_out) with
    L_out = (L - 1) * stride - 2 * padding + K + output_padding, as torch's
    `ConvTranspose1d` defines it.
    """
    c_out, k, c_in = weight.shape
    n, length, _ = x.shape
    s = stride
    m = math.ceil(k / s)
    # Every tap's contribution: y[n, i, o, t] = sum_c x[n, i, c] * w[o, t, c] lands at i * s + t.
    y = (x @ weight.reshape(c_out * k, c_in).T).reshape(n, length, c_out, k)
    if m * s > k:
        y = mx.pad(y, [(0, 0), (0, 0), (0, 0), (0, m * s - k)])
    y = y.reshape(n, length, c_out, m, s)
    # Tap block j of input i lands in output block i + j: sum the m blocks at their shifts.
    out = None
    for j in range(m):
        part = (
            mx.pad(y[:, :, :, j], [(0, 0), (j, m - 1 - j), (0, 0), (0, 0)])
            if m > 1
            else y[:, :, :, j]
        )
        out = part if out is None else out + part
    out = out.swapaxes(2, 3).reshape(n, (length + m - 1) * s, c_out)
    l_out = (length - 1) * s - 2 * padding + k + output_padding
    end = padding + l_out
    if end > out.shape[1]:  # output_padding reaches past the last tap
        out = mx.pad(out, [(0, 0), (0, end - out.shape[1]), (0, 0)])
    out = out[:, padding:end]
    return out if bias is None else out + bias


def transposed_tap_blocks(weight: mx.array, stride: int) -> list[mx.array]:
    """Transposed-conv weight (C_out, K, C_in) -> ceil(K / stride) contiguous (C_in, stride * C_out) blocks.

    Block j holds taps j * stride .. j * stride + stride - 1 (zero past K), output
    phase-major: column r * C_out + o is tap j * stride + r, output channel o.
    """
    c_out, k, c_in = weight.shape
    m = math.ceil(k / stride)
    if m * stride > k:
        weight = mx.pad(weight, [(0, 0), (0, m * stride - k), (0, 0)])
    return [
        mx.contiguous(
            weight[:, j * stride : (j + 1) * stride, :].transpose(2, 1, 0).reshape(c_in, -1)
        )
        for j in range(m)
    ]


def conv_transpose1d_taps(
    x: mx.array,
    weight: mx.array,
    bias: mx.array | None = None,
    stride: int = 1,
    padding: int = 0,
    output_padding: int = 0,
    blocks: Sequence[mx.array] | None = None,
) -> mx.array:
    """`mx.conv_transpose1d` (groups 1, dilation 1) as a stride-1 conv with stride * C_out outputs.

    Output block b (samples b * stride .. b * stride + stride - 1) is
    sum_j x[b - j] @ B_j over the m = ceil(K / stride) tap blocks B_j
    (`transposed_tap_blocks`): m accumulating matmuls over shifted row ranges of
    the zero-padded input, whose (N, L + m - 1, stride * C_out) result is already
    the interleaved output, (N, (L + m - 1) * stride, C_out), by a free reshape;
    then cropped by `padding`. No overlap-add pass, no strided copy.
    `blocks`: the tap blocks, if the caller keeps them (as `ConvTranspose1d` does).
    """
    c_out, k, c_in = weight.shape
    n, length, _ = x.shape
    if blocks is None:
        blocks = transposed_tap_blocks(weight, stride)
    m = len(blocks)
    if m > 1:
        x = mx.pad(x, [(0, 0), (m - 1, m - 1), (0, 0)])
    n_blocks = length + m - 1
    y = None
    for j in range(m):
        tap = x[:, m - 1 - j : m - 1 - j + n_blocks] if m > 1 else x
        y = tap @ blocks[j] if y is None else mx.addmm(y, tap, blocks[j])
    y = y.reshape(n, n_blocks * stride, c_out)
    l_out = (length - 1) * stride - 2 * padding + k + output_padding
    end = padding + l_out
    if end > y.shape[1]:  # output_padding reaches past the last tap
        y = mx.pad(y, [(0, 0), (0, end - y.shape[1]), (0, 0)])
    y = y[:, padding:end]
    return y if bias is None else y + bias


def conv1d(
    x: mx.array,
    weight: mx.array,
    bias: mx.array | None = None,
    stride: int = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int = 1,
    groups: int = 1,
    taps: Sequence[mx.array] | None = None,
) -> mx.array:
    """1-D convolution (cross-correlation, as torch's `Conv1d`), routed to the fast formulation on CPU.

    x: (N, L, C_in); weight: (C_out, K, C_in // groups); `padding` an int or (left, right);
    `taps`: optionally `tap_matrices(weight)`, kept by the caller (see `conv1d_taps`).
    """
    if groups == 1 and fast_paths_enabled():
        if stride == 1:
            return conv1d_taps(x, weight, bias, padding, dilation, taps)
        return conv1d_unfold(x, weight, bias, stride, padding, dilation)
    lo, hi = _pads(padding)
    if lo == hi:
        y = mx.conv1d(x, weight, stride=stride, padding=lo, dilation=dilation, groups=groups)
    else:
        y = mx.conv_general(
            x, weight, stride=stride, padding=([lo], [hi]), kernel_dilation=dilation, groups=groups
        )
    return y if bias is None else y + bias


def conv_transpose1d(
    x: mx.array,
    weight: mx.array,
    bias: mx.array | None = None,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    output_padding: int = 0,
    groups: int = 1,
    blocks: Sequence[mx.array] | None = None,
) -> mx.array:
    """1-D transposed convolution (torch's `ConvTranspose1d`), routed to the fast formulation on CPU.

    x: (N, L, C_in); weight: (C_out, K, C_in // groups), MLX's layout (torch's is (C_in, C_out, K));
    `blocks`: optionally `transposed_tap_blocks(weight, stride)`, kept by the caller.
    """
    if groups == 1 and dilation == 1 and fast_paths_enabled():
        return conv_transpose1d_taps(x, weight, bias, stride, padding, output_padding, blocks)
    y = mx.conv_transpose1d(
        x,
        weight,
        stride=stride,
        padding=padding,
        dilation=dilation,
        output_padding=output_padding,
        groups=groups,
    )
    return y if bias is None else y + bias


def panel_extension(weight: mx.array, stride: int = 1, dilation: int = 1) -> Any:
    """The CPU extension where its `conv1d_panels` serves a convolution of `weight` (the
    extension active, a float32 weight, not both stride and dilation above 1), else None."""
    k = backend.current().extension
    if k is None or weight.dtype != mx.float32 or (stride > 1 and dilation > 1):
        return None
    return k


def panel_conv1d(
    layer: nn.Module,
    x: mx.array,
    pad_left: int = 0,
    pad_right: int = 0,
    stride: int = 1,
    dilation: int = 1,
    snake: Any = None,
) -> mx.array | None:
    """`layer`'s convolution (weight (C_out, K, C_in), optional bias) of `x` (N, L, C_in) as
    one `conv1d_panels` node where the extension serves it (`panel_extension`; the weight
    packed once, `cosyvoice2.packed.packed`), else None. `snake`: a Snake module (`alpha`,
    `inv_alpha()`) applied to `x` first, in the kernel's padding pass. The kernel's threads
    are the pool's unless this is a branch worker (`cosyvoice2.branches`)."""
    w = layer.weight
    k = panel_extension(w, stride, dilation)
    if k is None:
        return None
    return k.conv1d_panels(
        x,
        packed(k, layer),
        w.shape[0],
        w.shape[1],
        layer.get("bias"),
        pad_left=pad_left,
        pad_right=pad_right,
        stride=stride,
        dilation=dilation,
        snake=[] if snake is None else [snake.alpha, snake.inv_alpha()],
        parallel=not branches.in_worker(),
    )


def set_dtype_evaluated(module: nn.Module, dtype: mx.Dtype, predicate: Any = None) -> None:
    """`nn.Module.set_dtype`, then the cast parameters evaluated on this thread: a module whose
    work runs in worker threads (`cosyvoice2.branches`) cannot evaluate arrays left pending
    on the stream of the thread that cast them."""
    if predicate is None:
        nn.Module.set_dtype(module, dtype)
    else:
        nn.Module.set_dtype(module, dtype, predicate)
    mx.eval(module.parameters())


class Derived:
    """A value derived from a parameter array, kept until the parameter is replaced.

    Modules hold one per derived form (not a parameter: it is a plain attribute).
    `get` compares by identity, so `load_weights` or `update`, which put new arrays
    in place, rebuild it on the next call.
    """

    def __init__(self) -> None:
        self.source: mx.array | None = None
        self.value: Any = None

    def get(self, source: mx.array, make: Callable[[mx.array], Any]) -> Any:
        if self.source is not source:
            value = make(source)
            # Evaluated before it is shared: a lazy value would tie every later graph to
            # the stream (thread) that built it (`cosyvoice2.branches` runs modules on two).
            mx.eval(value)
            self.source, self.value = source, value
        return self.value


class Conv1d(nn.Module):
    """`torch.nn.Conv1d` on channels-last input, parameters `weight` (C_out, K, C_in) and `bias`.

    Where the CPU extension runs (`cosyvoice2.backend`) and the weight is float32, a call
    is one `conv1d_panels` node: the weight packed once as panels of the (C_out, K * C_in)
    matrix (`cosyvoice2.packed`), the panel GEMM reading overlapping rows of the padded
    input (no im2col buffer, no pass per tap). Elsewhere on the CPU it keeps the per-tap
    matrices of `weight` (the fast route of `conv1d`), and off the CPU MLX's own op.
    `pack_weights` (load calls it) makes that form now and lets it hold the weight: one
    copy of each weight, not two. Either form is made again if `weight` is replaced
    (`load_weights`).

    A call may take `snake`, the Snake activation that precedes the convolution (HiFT's
    resblocks): with the extension it is computed in the pass that pads the input, which
    saves its own passes over the activations; elsewhere `snake(x)` first.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int = 1,
        bias: bool = True,
    ):
        super().__init__()
        scale = math.sqrt(1.0 / (in_channels * kernel_size))
        self.weight = mx.random.uniform(-scale, scale, (out_channels, kernel_size, in_channels))
        if bias:
            self.bias = mx.zeros((out_channels,))
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self._taps = Derived()

    def pack_weights(self) -> bool:
        """Make now the form of the weight that calls read on the active backend, holding the
        weight (every array here is evaluated: any thread may read them). With the
        extension: the panels (`cosyvoice2.packed.packed`, `release`), `weight` their lazy
        re-layout (main thread only: a lazy array belongs to its thread's stream). On the
        other CPU route: the tap matrices as one buffer whose slices they are, `weight` a
        transposed view of it. Returns whether a form was made."""
        k = panel_extension(self.weight, self.stride, self.dilation)
        if k is not None:
            if threading.current_thread() is not threading.main_thread():
                return False
            packed(k, self, release=True)
            return True
        if self.stride != 1 or not fast_paths_enabled():
            return False
        taps = mx.contiguous(self.weight.transpose(1, 2, 0))  # (K, C_in, C_out)
        weight = taps.transpose(2, 0, 1)  # (C_out, K, C_in): the same values, a view
        mx.eval(taps, weight)
        self.weight = weight
        views = [taps[j : j + 1].squeeze(0) for j in range(taps.shape[0])]  # (`taps[j]` copies)
        self._taps.source, self._taps.value = weight, views
        mx.eval(self._taps.value)
        return True

    def __call__(self, x: mx.array, snake: Any = None) -> mx.array:
        """`snake`: None, or a Snake module (`alpha`, `inv_alpha()`) applied to `x` first."""
        lo, hi = _pads(self.padding)
        y = panel_conv1d(self, x, lo, hi, self.stride, self.dilation, snake)
        if y is not None:
            return y
        if snake is not None:
            x = snake(x)
        w = held_weight(self)
        taps = (
            self._taps.get(w, tap_matrices) if self.stride == 1 and fast_paths_enabled() else None
        )
        return conv1d(x, w, self.get("bias"), self.stride, self.padding, self.dilation, taps=taps)


class ConvTranspose1d(nn.Module):
    """`torch.nn.ConvTranspose1d` on channels-last input, `weight` (C_out, K, C_in) and `bias`.

    On the fast (CPU) route it keeps the tap blocks of `weight` (see `Conv1d`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        bias: bool = True,
    ):
        super().__init__()
        scale = math.sqrt(1.0 / (in_channels * kernel_size))
        self.weight = mx.random.uniform(-scale, scale, (out_channels, kernel_size, in_channels))
        if bias:
            self.bias = mx.zeros((out_channels,))
        self.stride = stride
        self.padding = padding
        self._blocks = Derived()

    def __call__(self, x: mx.array) -> mx.array:
        blocks = None
        if fast_paths_enabled():
            blocks = self._blocks.get(self.weight, lambda w: transposed_tap_blocks(w, self.stride))
        return conv_transpose1d(
            x, self.weight, self.get("bias"), self.stride, self.padding, blocks=blocks
        )
