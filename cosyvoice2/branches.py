"""Run the two classifier-free-guidance branches of an estimator call side by side on CPU.

Why: one Euler step evaluates the estimator on a batch of two (conditional and
unconditional input). Batched, only the GEMMs use both cores (OpenBLAS threads);
MLX's element-wise ops, layout copies and the hand-offs to the numba kernels run
on one core while OpenBLAS's idle thread spins on the other. The two branches on
two threads, each with single-threaded BLAS and serial kernels, keep both cores
busy with useful work and spend less CPU time in all. Results equal the batched
call within float rounding (8e-6 at full size: the GEMMs block M = 400 instead of
800).

Used where the active backend says so (`cosyvoice2.backend`: the CPU, at least two
cores and `COSYVOICE2_FLOW_BRANCH_THREADS` not `0`). Without the threads, the CPU
extension still takes the branches one after the other (`split`); on Metal the batched
call is kept. The workers run each call in a copy of the caller's context, so the caller's
backend is theirs too.

How: two long-lived worker threads, each with its own MLX CPU stream (an MLX
thread-local stream: plain streams belong to the thread that made them), each evaluating one branch to completion. While they run,
OpenBLAS (when it is the BLAS in use, e.g. preloaded on Linux) is set to one
thread and restored afterwards, and the numba kernels of `row_kernels` run
serially in those threads (`row_kernels.serial_in_this_thread`).
"""

from __future__ import annotations

import contextvars
import ctypes
import queue
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import mlx.core as mx

from cosyvoice2 import backend

# One MLX CPU stream per thread that uses it (a plain MLX stream belongs to the
# thread that made it; a thread-local stream is valid in any thread).
_STREAM = mx.new_thread_local_stream(mx.cpu)
_POOL_LOCK = threading.Lock()
_LOCAL = threading.local()  # `worker`: set in the branch worker threads
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


def in_worker() -> bool:
    """Whether this thread is a branch worker (which computes with one core: the other
    branch has the other)."""
    return getattr(_LOCAL, "worker", False)


def enabled() -> bool:
    """Whether estimator branches run on two threads (the active backend's choice)."""
    return backend.current().branch_threads


def split() -> bool:
    """Whether the CFG branches are one estimator call each (batch 1) rather than one batched
    call: on two threads where `enabled()`, and one after the other wherever the CPU
    extension runs, threads or not (its fused transformer block and attention take batch 1;
    a batched call would fall back to MLX's ops there: a single-core machine or
    `COSYVOICE2_FLOW_BRANCH_THREADS=0`). Elsewhere (Metal, the composed route) batched."""
    on = backend.current()
    return on.branch_threads or on.extension is not None


class _Worker:
    """A daemon thread that runs submitted calls with serial kernels on its own MLX stream.

    Daemon and never joined: MLX keeps per-thread state (its compile cache) whose
    destructor needs the GIL, so a worker thread must not exit while the interpreter
    finalizes (as `ThreadPoolExecutor`'s workers do at exit, which aborts the process);
    a daemon thread blocked on its queue simply ends with the process.
    """

    def __init__(self, name: str):
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._loop, name=name, daemon=True).start()

    def _loop(self) -> None:
        _LOCAL.worker = True
        serial = False
        while True:
            fn, args, fut = self.jobs.get()
            # The numba kernels, serial in this thread once a backend has loaded them (the
            # plain route); never imported here: the other routes do not use numba.
            rows = sys.modules.get("cosyvoice2.row_kernels")
            if rows is not None and not serial and hasattr(rows, "serial_in_this_thread"):
                rows.serial_in_this_thread()
                serial = True
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # handed to the caller
                fut.set_exception(e)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        fut: Future = Future()
        self.jobs.put((fn, args, fut))
        return fut


_WORKERS: list[_Worker] = []


def _workers() -> list[_Worker]:
    with _POOL_LOCK:
        if not _WORKERS:
            _WORKERS.extend(_Worker(f"cosyvoice2-branch-{i}") for i in range(2))
        return _WORKERS


def _run(fn: Callable[..., mx.array], args: Sequence[Any]) -> mx.array:
    with mx.stream(_STREAM):
        out = fn(*args)
        mx.eval(out)
    return out


def map_branches(fn: Callable[..., mx.array], branches: Sequence[Sequence[Any]]) -> list[mx.array]:
    """`[fn(*b) for b in branches]`, evaluated; each branch on its own worker thread when
    `enabled()`, else one after the other in the calling thread.

    Inputs must be evaluated arrays (or plain values); the results are evaluated.
    """
    args = [list(b) for b in branches]
    if not enabled():
        outs = [fn(*a) for a in args]
        mx.eval(outs)
        return outs
    mx.eval([a for b in args for a in b if isinstance(a, mx.array)])
    blas = _openblas()
    before = blas[0]() if blas else 0
    if blas:
        blas[1](1)
    try:
        workers = _workers()
        futures = [
            workers[i % 2].submit(contextvars.copy_context().run, _run, fn, a)
            for i, a in enumerate(args)
        ]
        return [f.result() for f in futures]
    finally:
        if blas:
            blas[1](before)
