"""Micro-benchmarks: HiFT on 1 s of mel (tiny shape) and the CPU conv fast paths against MLX's ops.

No timing is asserted; with `--benchmark-disable` each case runs once and checks
its result (the fast formulations against the direct op). Full-size HiFT timing
per second of audio belongs to the bench harness (`nox -s bench`).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from cosyvoice2 import ops
from cosyvoice2.config import HiFTConfig
from cosyvoice2.hift import HiFTGenerator

pytest.importorskip("pytest_benchmark")

TINY = HiFTConfig(base_channels=32, f0_cond_channels=32)


def _rand(seed: int, *shape: int) -> mx.array:
    return mx.array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def test_bench_hift_tiny_1s(benchmark) -> None:
    mx.random.seed(0)
    model = HiFTGenerator(TINY)
    mx.eval(model.parameters())
    mel = _rand(1, 1, 80, 50)  # 50 mel frames = 1 s at 24 kHz
    noise = mx.random.normal(model.noise_shape(mel), key=mx.random.key(0))

    def run() -> mx.array:
        wav, _ = model.inference(mel, noise=noise)
        mx.eval(wav)
        return wav

    wav = benchmark(run)
    assert wav.shape == (1, 24000)
    assert bool(mx.all(mx.isfinite(wav)))


# A stage-3 HiFT resblock conv (64 channels, k=11, dilation 5) on 0.5 s of audio.
CONV = dict(length=3000, channels=64, kernel=11, dilation=5)


@pytest.mark.parametrize("route", ["taps", "unfold", "native"])
def test_bench_dilated_conv1d(benchmark, route: str) -> None:
    c, k, d = CONV["channels"], CONV["kernel"], CONV["dilation"]
    x = _rand(2, 1, CONV["length"], c)
    w = _rand(3, c, k, c)
    b = _rand(4, c)
    pad = d * (k - 1) // 2
    taps = ops.tap_matrices(w)
    mx.eval(taps)
    run = {
        "taps": lambda: ops.conv1d_taps(x, w, b, pad, d, taps),
        "unfold": lambda: ops.conv1d_unfold(x, w, b, 1, pad, d),
        "native": lambda: mx.conv1d(x, w, padding=pad, dilation=d) + b,
    }[route]

    def once() -> mx.array:
        y = run()
        mx.eval(y)
        return y

    y = benchmark(once)
    want = mx.conv1d(x, w, padding=pad, dilation=d) + b
    assert float(mx.max(mx.abs(y - want))) <= 1e-3


# HiFT ups[1] at full size: 256 -> 128 channels, k=11, x5, on 1 s of audio (400 frames in).
CONVT = dict(length=400, c_in=256, c_out=128, kernel=11, stride=5, padding=3)


@pytest.mark.parametrize("route", ["taps", "matmul", "native"])
def test_bench_conv_transpose1d(benchmark, route: str) -> None:
    x = _rand(5, 1, CONVT["length"], CONVT["c_in"])
    w = _rand(6, CONVT["c_out"], CONVT["kernel"], CONVT["c_in"])
    s, p = CONVT["stride"], CONVT["padding"]
    blocks = ops.transposed_tap_blocks(w, s)
    mx.eval(blocks)
    run = {
        "taps": lambda: ops.conv_transpose1d_taps(x, w, None, s, p, 0, blocks),
        "matmul": lambda: ops.conv_transpose1d_matmul(x, w, None, s, p),
        "native": lambda: mx.conv_transpose1d(x, w, stride=s, padding=p),
    }[route]

    def once() -> mx.array:
        y = run()
        mx.eval(y)
        return y

    y = benchmark(once)
    want = mx.conv_transpose1d(x, w, stride=s, padding=p)
    assert float(mx.max(mx.abs(y - want))) <= 1e-3
