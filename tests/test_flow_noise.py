"""The CFM's fixed starting noise: the numpy recipe against torch, and no global RNG side effects.

The comparison with torch is at 1e-6 (float32 rounding of log/cos/sin gives 4.8e-7)
and has a power check: with the Box-Muller halves swapped (sines first) it must fail.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import mlx.core as mx
import numpy as np
import pytest

from cosyvoice2.flow import noise
from tests.power import assert_power, wrapped

NOISE_TOL = 1e-6


@contextlib.contextmanager
def box_muller_halves_swapped() -> Iterator[None]:
    """Bug: each 16-value Box-Muller block gives `r sin theta` first, then `r cos theta`."""

    def make(orig):
        def draw(n: int) -> np.ndarray:
            return orig(n).reshape(-1, 2, 8)[:, ::-1].reshape(n)

        return draw

    noise._noise_channels_last.cache_clear()
    try:
        with wrapped(noise, "torch_randn_seed0", make):
            yield
    finally:
        noise._noise_channels_last.cache_clear()


def test_noise_shape_layout_and_determinism() -> None:
    a = noise.cfm_noise(37)
    assert a.shape == (1, 37, 80) and a.dtype == mx.float32
    flat = noise.torch_randn_seed0(16 * 5)
    # channels-last: frame j of channel c is element c * 15000 + j of the flat official draw
    assert np.array_equal(np.array(a)[0, :5, 0], flat[:5])
    assert np.array_equal(np.array(noise.cfm_noise(37)), np.array(a))
    with pytest.raises(ValueError):
        noise.cfm_noise(noise.MAX_FRAMES + 1)


def test_noise_leaves_global_generators_alone() -> None:
    noise._noise_channels_last.cache_clear()
    np_state = np.random.get_state()[1].copy()
    py_state = random.getstate()
    mx.random.seed(123)
    expected = mx.random.normal((4,))
    mx.random.seed(123)
    noise.cfm_noise(10)
    assert np.array_equal(np.random.get_state()[1], np_state)
    assert random.getstate() == py_state
    assert mx.array_equal(mx.random.normal((4,)), expected)


def test_noise_equals_torch_seed0_randn() -> None:
    torch = pytest.importorskip("torch")
    ref = torch.randn(1, 80, 15000, generator=torch.Generator().manual_seed(0)).numpy()

    def measure() -> float:
        got = np.array(noise.cfm_noise(noise.MAX_FRAMES)).transpose(0, 2, 1)
        return float(np.abs(got - ref).max())

    assert_power(
        "CFM starting noise vs torch.randn",
        measure,
        NOISE_TOL,
        box_muller_halves_swapped(),
        "Box-Muller cos/sin halves swapped",
    )
