"""Vectorised CPU row kernels (numba) for the flow's transcendental element-wise work.

Why: MLX 0.32.4 on Linux x86_64 evaluates `exp`, `erf`, `tanh`, `sigmoid` and
`log1p` one scalar call per element (its CPU backend has no vectorised
transcendental path there, and `mx.compile`'s CPU kernels are built without
`-march`, so they stay scalar), while a 256-wide matmul costs less per element.
In the CFM estimator at full size (batch 2 x 400 frames) one Euler step computes
about 143 M softmax exponentials, 46 M GELUs and 6 M Mish values, which made
element-wise functions the larger part of the step time. These kernels compute the
same functions with polynomial/rational approximations written so LLVM
vectorises them (AVX2 here) and spread over the cores by a small thread pool.

Accuracy (float32): `exp` is `2^n * p(r)` with `|r| <= ln2/2` and a degree-6
Taylor polynomial (relative error about 2e-7); `erf` is the rational
approximation Eigen uses for float (absolute error 4.3e-7 over the real line);
GELU's absolute error is within 1.5e-6 of the exact one, softmax rows within
1.5e-6 relative. The tests compare each kernel with the direct MLX op.

The kernels take numpy views of evaluated MLX arrays and write into a separate
output buffer; `cosyvoice2.flow.ops` uses them where the backend has them
(`cosyvoice2.backend`: the CPU without the compiled extension, which does this work
itself, and without `COSYVOICE2_FLOW_KERNELS=0`) and MLX's ops otherwise (Metal, or
no numba).
They are serial `nogil` functions over a range of rows: `run_rows` splits the
rows over a small thread pool. (numba's `parallel=True` compiled more slowly,
and its single-thread code was slower.) numba comes with librosa, a dependency of
the package; compiled kernels are cached on disk (`cache=True`), so only the first
process on a machine pays the compile time.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit

from cosyvoice2 import settings

_MIN_PARALLEL = 1 << 15  # below this many elements one thread is faster than handing work out

_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693145751953125)
_LN2_LO = np.float32(1.428606765330187e-06)


@njit(inline="always", fastmath=True)
def _exp_split(x: float) -> tuple:
    """`exp(x) = p * 2**e` for float32 `x` in [-87, 88]: returns `(p, e + 127 shifted into float bits)`."""
    x = min(max(x, np.float32(-87.0)), np.float32(88.0))
    nf = np.floor(x * _LOG2E + np.float32(0.5))
    r = x - nf * _LN2_HI
    r = r - nf * _LN2_LO
    p = np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    return p, (np.int32(nf) + np.int32(127)) << np.int32(23)


@njit(inline="always", fastmath=True)
def _erf(x: float) -> float:
    """float32 erf by Eigen's rational approximation (clamped to [-4, 4], where erf is +-1 in float32)."""
    x = min(max(x, np.float32(-4.0)), np.float32(4.0))
    x2 = x * x
    p = np.float32(-2.72614225801306e-10)
    p = p * x2 + np.float32(2.77068142495902e-08)
    p = p * x2 + np.float32(-2.10102402082508e-06)
    p = p * x2 + np.float32(-5.69250639462346e-05)
    p = p * x2 + np.float32(-7.34990630326855e-04)
    p = p * x2 + np.float32(-2.95459980854025e-03)
    p = p * x2 + np.float32(-1.60960333262415e-02)
    q = np.float32(-1.45660718464996e-05)
    q = q * x2 + np.float32(-2.13374055278905e-04)
    q = q * x2 + np.float32(-1.68282697438203e-03)
    q = q * x2 + np.float32(-7.37332916720468e-03)
    q = q * x2 + np.float32(-1.42647390514189e-02)
    return x * p / q


_JIT = dict(fastmath=True, cache=True, nogil=True, error_model="numpy")


@njit(**_JIT)
def softmax_rows(
    s: np.ndarray, out: np.ndarray, t_q: int, chunk: int, q0: int, lo: int, hi: int
) -> None:
    """Row softmax of rows `lo:hi` of `s` `(R, T)` into `out`, with an optional chunk mask.

    Row `i` is query `q = q0 + i % t_q` (`q0`: the absolute position of the first
    query, as in the streaming cache); with `chunk > 0` it sees only the keys before
    the end of its chunk (`j < (q // chunk + 1) * chunk`); masked entries become 0.
    """
    t = s.shape[1]
    bits = np.empty(t, np.int32)
    scale = bits.view(np.float32)
    for i in range(lo, hi):
        row = s[i]
        o = out[i]
        limit = t
        if chunk > 0:
            limit = min(t, ((q0 + i % t_q) // chunk + 1) * chunk)
        m = row[0]
        for j in range(1, limit):
            m = max(m, row[j])
        for j in range(limit):
            p, b = _exp_split(row[j] - m)
            o[j] = p
            bits[j] = b
        total = np.float32(0.0)
        for j in range(limit):
            e = o[j] * scale[j]
            o[j] = e
            total += e
        inv = np.float32(1.0) / total
        for j in range(limit):
            o[j] *= inv
        for j in range(limit, t):
            o[j] = np.float32(0.0)


@njit(**_JIT)
def gelu_bias(x: np.ndarray, bias: np.ndarray, out: np.ndarray, lo: int, hi: int) -> None:
    """`out = gelu(x + bias)` (exact-erf GELU) on rows `lo:hi` of `x` `(R, C)`, `bias` `(C,)`."""
    c = x.shape[1]
    for i in range(lo, hi):
        row = x[i]
        o = out[i]
        for j in range(c):
            v = row[j] + bias[j]
            o[j] = (
                np.float32(0.5) * v * (np.float32(1.0) + _erf(v * np.float32(0.7071067811865476)))
            )


@njit(**_JIT)
def silu_bias(x: np.ndarray, bias: np.ndarray, out: np.ndarray, lo: int, hi: int) -> None:
    """`out = silu(x + bias) = v / (1 + exp(-v))` on rows `lo:hi` of `x` `(R, C)`, `bias` `(C,)`."""
    c = x.shape[1]
    bits = np.empty(c, np.int32)
    scale = bits.view(np.float32)
    for i in range(lo, hi):
        row = x[i]
        o = out[i]
        for j in range(c):
            p, b = _exp_split(-(row[j] + bias[j]))
            o[j] = p
            bits[j] = b
        for j in range(c):
            v = row[j] + bias[j]
            o[j] = v / (np.float32(1.0) + o[j] * scale[j])


@njit(**_JIT)
def mish_rows(x: np.ndarray, out: np.ndarray, lo: int, hi: int) -> None:
    """`out = x * tanh(softplus(x))` on rows `lo:hi`, as `x * n / (n + 2)` with `n = e^x (e^x + 2)`."""
    c = x.shape[1]
    bits = np.empty(c, np.int32)
    scale = bits.view(np.float32)
    for i in range(lo, hi):
        row = x[i]
        o = out[i]
        for j in range(c):
            p, b = _exp_split(min(row[j], np.float32(20.0)))
            o[j] = p
            bits[j] = b
        for j in range(c):
            e = o[j] * scale[j]
            n = e * (e + np.float32(2.0))
            o[j] = row[j] * n / (n + np.float32(2.0))


@njit(**_JIT)
def layer_norm_rows(
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    eps: float,
    out: np.ndarray,
    mish: bool,
    lo: int,
    hi: int,
) -> None:
    """LayerNorm over the last axis (biased variance, as torch) of rows `lo:hi`, then Mish if `mish`."""
    c = x.shape[1]
    inv_c = np.float32(1.0 / c)
    bits = np.empty(c, np.int32)
    scale = bits.view(np.float32)
    poly = np.empty(c, np.float32)
    for i in range(lo, hi):
        row = x[i]
        o = out[i]
        mean = np.float32(0.0)
        for j in range(c):
            mean += row[j]
        mean *= inv_c
        var = np.float32(0.0)
        for j in range(c):
            d = row[j] - mean
            var += d * d
        var *= inv_c
        rstd = np.float32(1.0) / np.sqrt(var + np.float32(eps))
        for j in range(c):
            o[j] = (row[j] - mean) * rstd * weight[j] + bias[j]
        if mish:
            for j in range(c):
                p, b = _exp_split(min(o[j], np.float32(20.0)))
                poly[j] = p
                bits[j] = b
            for j in range(c):
                e = poly[j] * scale[j]
                n = e * (e + np.float32(2.0))
                o[j] = o[j] * n / (n + np.float32(2.0))


_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_LOCAL = threading.local()


def serial_in_this_thread() -> None:
    """Make `run_rows` run its kernels in the calling thread only (threads that are themselves parallel)."""
    _LOCAL.serial = True


def num_threads() -> int:
    """Threads the kernels use: `COSYVOICE2_FLOW_THREADS`, else the CPUs this process may run on."""
    env = settings.integer("COSYVOICE2_FLOW_THREADS")
    if env is not None:
        return max(1, env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


def run_rows(kernel, n_rows: int, row_size: int, *args) -> None:
    """Call `kernel(*args, lo, hi)` over `[0, n_rows)`, split into one row range per thread."""
    global _POOL, _POOL_SIZE
    n = 1 if getattr(_LOCAL, "serial", False) else min(num_threads(), n_rows)
    if n <= 1 or n_rows * row_size < _MIN_PARALLEL:
        kernel(*args, 0, n_rows)
        return
    if _POOL is None or _POOL_SIZE < n:
        _POOL = ThreadPoolExecutor(max_workers=n, thread_name_prefix="cosyvoice2-flow")
        _POOL_SIZE = n
    bounds = [n_rows * i // n for i in range(n + 1)]
    futures = [_POOL.submit(kernel, *args, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
    for f in futures:
        f.result()
