"""The fast convolution formulations of `cosyvoice2.ops` equal MLX's direct ops (and torch's).

Every case compares against `mx.conv1d` / `mx.conv_general` / `mx.conv_transpose1d`
on the same inputs; the tolerance is float32 rounding of sums of K * C_in products.
"""

from __future__ import annotations

import contextlib

import mlx.core as mx
import numpy as np
import pytest

from cosyvoice2 import backend, ops
from tests.routes import with_backend


def _rand(rng: np.random.Generator, *shape: int) -> mx.array:
    return mx.array(rng.standard_normal(shape).astype(np.float32))


def _assert_close(got: mx.array, want: mx.array, what: str, atol: float = 2e-5) -> None:
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    err = float(mx.max(mx.abs(got - want))) if got.size else 0.0
    scale = float(mx.max(mx.abs(want))) if want.size else 1.0
    assert err <= atol * max(1.0, scale), f"{what}: max abs diff {err:.3g} (scale {scale:.3g})"


_STACKS: list[contextlib.ExitStack] = []


@pytest.fixture(autouse=True)
def _restore_routing():
    with contextlib.ExitStack() as stack:
        _STACKS.append(stack)
        yield
        _STACKS.pop()


def set_fast_paths(fast: bool) -> None:
    """The fast convolution routes on or off for the rest of the test (a backend variant)."""
    _STACKS[-1].enter_context(with_backend(conv_matmuls=fast))


# (batch, length, c_in, c_out, kernel, stride, padding, dilation)
CONV_CASES = [
    (1, 20, 5, 7, 3, 1, 1, 1),
    (2, 33, 5, 7, 11, 1, 15, 3),  # HiFT resblock: k=11, dilation 3, "same" padding
    (1, 40, 8, 8, 7, 1, 15, 5),
    (1, 40, 8, 8, 11, 1, 25, 5),
    (2, 9, 3, 3, 1, 1, 0, 1),  # 1x1 conv
    (1, 121, 18, 6, 30, 15, 7, 1),  # HiFT source_downs[0]: k=30, stride 15
    (2, 61, 18, 4, 6, 3, 1, 1),  # source_downs[1]: k=6, stride 3
    (1, 50, 4, 6, 7, 2, 0, 5),  # stride and dilation together
    (1, 17, 6, 5, 4, 1, (3, 0), 1),  # causal (left-only) padding
    (1, 17, 6, 5, 5, 1, (0, 2), 2),  # right-only padding
    (1, 12, 2, 3, 16, 1, 2, 1),  # even kernel
]


def _native_conv(x, w, stride, padding, dilation):
    lo, hi = (padding, padding) if isinstance(padding, int) else padding
    return mx.conv_general(x, w, stride=stride, padding=([lo], [hi]), kernel_dilation=dilation)


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "n{}l{}ci{}co{}k{}s{}p{}d{}".format(*c))
def test_conv1d_formulations_equal_native(case):
    n, length, c_in, c_out, k, stride, padding, dilation = case
    rng = np.random.default_rng(k * 100 + length)
    x, w, b = _rand(rng, n, length, c_in), _rand(rng, c_out, k, c_in), _rand(rng, c_out)
    want = _native_conv(x, w, stride, padding, dilation) + b
    _assert_close(ops.conv1d_unfold(x, w, b, stride, padding, dilation), want, "unfold")
    if stride == 1:
        _assert_close(ops.conv1d_taps(x, w, b, padding, dilation), want, "taps")
        taps = ops.tap_matrices(w)
        _assert_close(ops.conv1d_taps(x, w, b, padding, dilation, taps), want, "kept taps")
        _assert_close(ops.conv1d_taps(x, w, None, padding, dilation), want - b, "taps, no bias")
    for fast in (True, False):
        set_fast_paths(fast)
        got = ops.conv1d(x, w, b, stride=stride, padding=padding, dilation=dilation)
        _assert_close(got, want, f"conv1d (fast paths {fast})")


def test_conv1d_groups_fall_back_to_native():
    rng = np.random.default_rng(0)
    x, w = _rand(rng, 1, 10, 4), _rand(rng, 6, 3, 2)
    set_fast_paths(True)
    got = ops.conv1d(x, w, padding=1, groups=2)
    _assert_close(got, mx.conv1d(x, w, padding=1, groups=2), "groups=2")


def test_conv1d_rejects_too_short_input():
    rng = np.random.default_rng(0)
    x, w = _rand(rng, 1, 4, 2), _rand(rng, 3, 7, 2)
    with pytest.raises(ValueError, match="shorter than the kernel"):
        ops.conv1d_taps(x, w)
    with pytest.raises(ValueError, match="shorter than the kernel"):
        ops.conv1d_unfold(x, w)


# (batch, length, c_in, c_out, kernel, stride, padding, output_padding)
CONVT_CASES = [
    (1, 10, 16, 8, 16, 8, 4, 0),  # HiFT ups[0]: k=16, x8
    (2, 13, 8, 4, 11, 5, 3, 0),  # ups[1]: k=11, x5
    (1, 9, 4, 2, 7, 3, 2, 0),  # ups[2]: k=7, x3
    (1, 5, 3, 2, 4, 1, 0, 0),  # stride 1
    (2, 6, 3, 2, 5, 3, 1, 2),  # output padding
    (1, 6, 3, 2, 2, 4, 0, 1),  # kernel shorter than stride (gaps), output padding past the taps
    (1, 7, 5, 3, 4, 2, 1, 0),  # kernel a multiple of stride
    (1, 1, 3, 2, 9, 4, 0, 0),  # one input frame
]


@pytest.mark.parametrize(
    "case", CONVT_CASES, ids=lambda c: "n{}l{}ci{}co{}k{}s{}p{}op{}".format(*c)
)
def test_conv_transpose1d_formulations_equal_native(case):
    n, length, c_in, c_out, k, stride, padding, output_padding = case
    rng = np.random.default_rng(k * 10 + length)
    x, w, b = _rand(rng, n, length, c_in), _rand(rng, c_out, k, c_in), _rand(rng, c_out)
    want = (
        mx.conv_transpose1d(x, w, stride=stride, padding=padding, output_padding=output_padding) + b
    )
    got = ops.conv_transpose1d_matmul(x, w, b, stride, padding, output_padding)
    _assert_close(got, want, "matmul + overlap-add")
    got = ops.conv_transpose1d_taps(x, w, b, stride, padding, output_padding)
    _assert_close(got, want, "tap blocks")
    blocks = ops.transposed_tap_blocks(w, stride)
    got = ops.conv_transpose1d_taps(x, w, None, stride, padding, output_padding, blocks)
    _assert_close(got, want - b, "kept tap blocks, no bias")
    for fast in (True, False):
        set_fast_paths(fast)
        got = ops.conv_transpose1d(
            x, w, b, stride=stride, padding=padding, output_padding=output_padding
        )
        _assert_close(got, want, f"conv_transpose1d (fast paths {fast})")


def test_routing_follows_the_backend():
    assert ops.fast_paths_enabled() == (mx.default_device().type == mx.DeviceType.cpu)
    assert not backend.choose("composed").conv_matmuls
    set_fast_paths(False)
    assert not ops.fast_paths_enabled()
    set_fast_paths(True)
    assert ops.fast_paths_enabled()


def test_modules_rebuild_kept_weights_when_replaced():
    """`Conv1d` / `ConvTranspose1d` keep derived weight forms; new weights must replace them."""
    rng = np.random.default_rng(4)
    x = _rand(rng, 1, 12, 3)
    set_fast_paths(True)
    for module, ref in (
        (ops.Conv1d(3, 5, 3, padding=2, dilation=2), lambda m: _native_conv(x, m.weight, 1, 2, 2)),
        (
            ops.ConvTranspose1d(3, 5, 7, 3, padding=2),
            lambda m: mx.conv_transpose1d(x, m.weight, stride=3, padding=2),
        ),
    ):
        _assert_close(module(x), ref(module) + module.bias, "first weights")
        module.load_weights([("weight", _rand(rng, *module.weight.shape))], strict=False)
        _assert_close(module(x), ref(module) + module.bias, "replaced weights")


def test_modules_match_torch_layers():
    """`Conv1d` / `ConvTranspose1d` with torch weights moved to MLX layout equal torch's layers."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 8, 23)).astype(np.float32)  # torch layout (N, C, L)

    tconv = torch.nn.Conv1d(8, 6, 11, padding=15, dilation=3)
    conv = ops.Conv1d(8, 6, 11, padding=15, dilation=3)
    conv.weight = mx.array(tconv.weight.detach().numpy().transpose(0, 2, 1))
    conv.bias = mx.array(tconv.bias.detach().numpy())
    want = tconv(torch.from_numpy(x)).detach().numpy().transpose(0, 2, 1)
    got = conv(mx.array(x.transpose(0, 2, 1)))
    _assert_close(got, mx.array(want), "Conv1d vs torch")

    tup = torch.nn.ConvTranspose1d(8, 4, 11, 5, padding=3)
    up = ops.ConvTranspose1d(8, 4, 11, 5, padding=3)
    up.weight = mx.array(tup.weight.detach().numpy().transpose(1, 2, 0))
    up.bias = mx.array(tup.bias.detach().numpy())
    want = tup(torch.from_numpy(x)).detach().numpy().transpose(0, 2, 1)
    got = up(mx.array(x.transpose(0, 2, 1)))
    _assert_close(got, mx.array(want), "ConvTranspose1d vs torch")
