"""Run the two classifier-free-guidance branches of an estimator call side by side on CPU.

Why: one Euler step evaluates the estimator on a batch of two (conditional and
unconditional input). Batched, only the GEMMs use both cores (OpenBLAS threads);
MLX's element-wise ops, layout copies and the hand-offs to the numba kernels run
on one core while OpenBLAS's idle thread spins on the other. Measured on the
2-core x86-64 machine (full size, 400 frames, quiet, 2026-11-27): batched
2.3-2.9 s per call for 5.1-5.5 s of CPU time; the two branches on two threads,
each with single-threaded BLAS and serial kernels, 1.87-1.92 s for 3.75 s of
CPU time. Results equal the batched call within float rounding (8e-6 at full
size: the GEMMs block M = 400 instead of 800).

Used when the default device is the CPU, the machine has at least two cores and
`COSYVOICE2_FLOW_BRANCH_THREADS` is not `0`. On Metal the batched call is kept.

How: two long-lived worker threads, each with its own MLX CPU stream (MLX streams
are per thread), each evaluating one branch to completion. While they run,
OpenBLAS (when it is the BLAS in use, e.g. preloaded on Linux) is set to one
thread and restored afterwards, and the numba kernels of `cpu_kernels` run
serially in those threads (`cpu_kernels.serial_in_this_thread`).
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import mlx.core as mx

_LOCAL = threading.local()
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
_BLAS: tuple[Callable[[], int], Callable[[int], None]] | None | bool = None


def _openblas() -> tuple[Callable[[], int], Callable[[int], None]] | None:
    """OpenBLAS's get/set thread-count functions when OpenBLAS is loaded in this process."""
    global _BLAS
    if _BLAS is None:
        try:
            lib = ctypes.CDLL(None)
            get, set_ = lib.openblas_get_num_threads, lib.openblas_set_num_threads
            get.restype = ctypes.c_int
            set_.argtypes = [ctypes.c_int]
            _BLAS = (get, set_)
        except (AttributeError, OSError):
            _BLAS = False
    return _BLAS or None


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def enabled() -> bool:
    """Whether estimator branches run on two threads (CPU device, >= 2 cores, not disabled)."""
    if os.environ.get("COSYVOICE2_FLOW_BRANCH_THREADS", "1") == "0":
        return False
    return mx.default_device() == mx.cpu and _cpus() >= 2


def _init_worker() -> None:
    from cosyvoice2.flow import cpu_kernels

    _LOCAL.stream = mx.new_stream(mx.cpu)
    cpu_kernels.serial_in_this_thread()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(
                max_workers=2, thread_name_prefix="cosyvoice2-cfg", initializer=_init_worker
            )
        return _POOL


def _run(fn: Callable[..., mx.array], args: Sequence[Any]) -> mx.array:
    with mx.stream(_LOCAL.stream):
        out = fn(*args)
        mx.eval(out)
    return out


def map_branches(fn: Callable[..., mx.array], branches: Sequence[Sequence[Any]]) -> list[mx.array]:
    """`[fn(*b) for b in branches]`, evaluated, each branch on its own worker thread.

    Inputs must be evaluated arrays (or plain values); the results are evaluated.
    """
    args = [list(b) for b in branches]
    mx.eval([a for b in args for a in b if isinstance(a, mx.array)])
    blas = _openblas()
    before = blas[0]() if blas else 0
    if blas:
        blas[1](1)
    try:
        return list(_pool().map(_run, [fn] * len(args), args))
    finally:
        if blas:
            blas[1](before)
