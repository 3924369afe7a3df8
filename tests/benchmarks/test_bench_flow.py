"""Micro-benchmarks of the flow: one CFM estimator step (tiny shape) and its CPU element-wise kernels.

No timing is asserted; with `--benchmark-disable` each case runs once and checks
its result. Full-size flow timing per second of audio belongs to the bench
harness; the findings are in the `cosyvoice2.flow` module docstrings.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from cosyvoice2 import backend
from cosyvoice2.config import EstimatorConfig
from cosyvoice2.flow import ops
from cosyvoice2.flow.decoder import CausalConditionalDecoder

pytest.importorskip("pytest_benchmark")

TINY = EstimatorConfig(
    channels=(64,), attention_head_dim=32, n_blocks=1, num_mid_blocks=2, num_heads=2
)


def _rand(seed: int, *shape: int) -> mx.array:
    return mx.array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


@pytest.mark.parametrize("streaming", [False, True])
def test_bench_estimator_step_tiny(benchmark, streaming: bool) -> None:
    """One CFG estimator call (batch 2) on 4 s of mel frames (200) with the tiny estimator."""
    mx.random.seed(0)
    est = CausalConditionalDecoder(TINY)
    mx.eval(est.parameters())
    t_len = 200
    x, mu, cond = _rand(1, 2, t_len, 80), _rand(2, 2, t_len, 80), _rand(3, 2, t_len, 80)
    spks, t = _rand(4, 2, 80), mx.array([0.3, 0.3])

    def run() -> mx.array:
        v = est(x, None, mu, t, spks, cond, streaming)
        mx.eval(v)
        return v

    v = benchmark(run)
    assert v.shape == (2, t_len, 80)
    assert bool(mx.all(mx.isfinite(v)))


# One full-size attention's scores: batch 2 x 8 heads x 400 x 400.
@pytest.mark.parametrize("route", ["kernel", "mlx"])
def test_bench_softmax(benchmark, monkeypatch, route: str) -> None:
    s = _rand(5, 2, 8, 400, 400)
    ref = mx.softmax(s, axis=-1)
    if route == "kernel" and backend.load_row_kernels() is None:
        pytest.skip("numba kernels unavailable (no numba, or COSYVOICE2_FLOW_KERNELS=0)")
    monkeypatch.setattr(
        backend, "_DEFAULT", backend.choose("plain" if route == "kernel" else "composed")
    )

    def run() -> mx.array:
        p = ops.softmax(s)
        mx.eval(p)
        return p

    p = benchmark(run)
    assert mx.abs(p - ref).max().item() < 1e-6


@pytest.mark.parametrize("route", ["kernel", "mlx"])
def test_bench_gelu(benchmark, monkeypatch, route: str) -> None:
    x = _rand(6, 2, 400, 1024) * 3.0
    ref = x * 0.5 * (1.0 + mx.erf(x / np.sqrt(2.0)))
    if route == "kernel" and backend.load_row_kernels() is None:
        pytest.skip("numba kernels unavailable (no numba, or COSYVOICE2_FLOW_KERNELS=0)")
    monkeypatch.setattr(
        backend, "_DEFAULT", backend.choose("plain" if route == "kernel" else "composed")
    )

    def run() -> mx.array:
        y = ops.gelu(x)
        mx.eval(y)
        return y

    y = benchmark(run)
    assert mx.abs(y - ref).max().item() < 5e-6
