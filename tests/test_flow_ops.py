"""The flow's array helpers against direct formulations (no torch needed)."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map

from cosyvoice2 import backend
from cosyvoice2.flow.cache import ChunkCache
from cosyvoice2.flow.decoder import CausalConv1d, ConvTranspose1d
from cosyvoice2.flow.encoder import RelPositionMultiHeadedAttention, rel_position_table
from cosyvoice2.flow.flow_matching import euler_times, time_schedule
from cosyvoice2.flow.ops import (
    causal_conv1d,
    chunk_mask,
    gelu,
    mish,
)


def _rand(rng: np.random.Generator, *shape: int) -> mx.array:
    return mx.array(rng.standard_normal(shape).astype(np.float32))


@pytest.mark.parametrize("k", [1, 3, 4, 5])
def test_causal_conv1d_matches_direct_sum(k: int, route: str) -> None:
    """On each route (the extension's `conv1d_panels`, `mx.conv1d`), and with the left
    context from a streaming cache."""
    rng = np.random.default_rng(k)
    x, w, b = _rand(rng, 2, 19, 24), _rand(rng, 16, k, 24), _rand(rng, 16)
    layer = CausalConv1d(24, 16, k)
    layer.weight, layer.bias = w, b
    xn, wn = np.array(x, np.float64), np.array(w, np.float64)
    xp = np.pad(xn, [(0, 0), (k - 1, 0), (0, 0)])
    ref = np.einsum("btkc,okc->bto", np.stack([xp[:, i : i + 19] for i in range(k)], 2), wn)
    ref += np.array(b)
    got = causal_conv1d(layer, x)
    assert got.shape == (2, 19, 16)
    assert np.abs(np.array(got) - ref).max() < 1e-4
    # causality: changing the last frame changes only the last output frame
    x2 = mx.concatenate([x[:, :-1], x[:, -1:] + 1.0], axis=1)
    diff = mx.abs(causal_conv1d(layer, x2) - got).max(axis=(0, 2))
    assert diff[:-1].max().item() == 0.0 and diff[-1].item() > 0.0
    # frames 11.. with frames ..10 as the cache's left context: the same outputs
    cache = ChunkCache(None, 0, 11)
    head = cache.conv(x[:, :11], layer)
    tail = ChunkCache(cache.new, 11, 19)
    rest = tail.conv(x[:, 11:], layer)
    assert np.abs(np.array(mx.concatenate([head, rest], axis=1)) - ref).max() < 1e-4


@pytest.mark.parametrize(
    ("k", "stride", "padding"), [(4, 2, 1), (3, 2, 0), (5, 3, 1), (16, 8, 4), (2, 2, 0)]
)
def test_upsample_conv_transpose1d_matches_mlx(k: int, stride: int, padding: int) -> None:
    rng = np.random.default_rng(100 + k)
    x, w, b = _rand(rng, 2, 11, 12), _rand(rng, 8, k, 12), _rand(rng, 8)
    ref = mx.conv_transpose1d(x, w, stride=stride, padding=padding) + b
    conv = ConvTranspose1d(12, 8, k, stride, padding)
    conv.weight, conv.bias = w, b
    got = conv(x)
    assert got.shape == ref.shape
    assert mx.abs(got - ref).max().item() < 1e-5


@pytest.mark.parametrize(("size", "chunk"), [(7, 3), (50, 25), (10, 50)])
def test_chunk_mask_matches_official_definition(size: int, chunk: int) -> None:
    # subsequent_chunk_mask_deprecated with num_left_chunks < 0, written as a loop
    ref = np.zeros((size, size), dtype=bool)
    for i in range(size):
        ref[i, : min((i // chunk + 1) * chunk, size)] = True
    assert np.array_equal(np.array(chunk_mask(size, chunk)), ref)


def test_activations_match_reference_formulas() -> None:
    xs = np.linspace(-30.0, 30.0, 2001).astype(np.float64)
    x = mx.array(xs.astype(np.float32))
    gelu_ref = 0.5 * xs * (1.0 + np.vectorize(math.erf)(xs / math.sqrt(2.0)))
    mish_ref = xs * np.tanh(np.log1p(np.exp(xs)))
    assert np.abs(np.array(gelu(x)) - gelu_ref).max() < 1e-5 * np.abs(gelu_ref).max()
    assert np.abs(np.array(mish(x)) - mish_ref).max() < 1e-5 * np.abs(mish_ref).max()


def test_rel_shift_reads_relative_positions() -> None:
    rng = np.random.default_rng(3)
    t = 6
    x = rng.standard_normal((1, 2, t, 2 * t - 1)).astype(np.float32)
    got = np.array(RelPositionMultiHeadedAttention.rel_shift(mx.array(x)))
    ref = np.empty((1, 2, t, t), np.float32)
    for i in range(t):
        for j in range(t):
            ref[:, :, i, j] = x[:, :, i, t - 1 - i + j]
    assert np.array_equal(got, ref)


def test_rel_position_table_layout() -> None:
    t, d = 5, 8
    pe = np.array(rel_position_table(t, d))[0]
    assert pe.shape == (2 * t - 1, d)
    for k in range(2 * t - 1):
        rel = t - 1 - k
        div = np.exp(np.arange(0, d, 2) * -(math.log(10000.0) / d))
        assert np.allclose(pe[k, 0::2], np.sin(rel * div), atol=1e-6)
        assert np.allclose(pe[k, 1::2], np.cos(rel * div), atol=1e-6)


@pytest.mark.parametrize("n", [1, 3, 10])
def test_euler_times_cover_the_cosine_schedule(n: int) -> None:
    span = time_schedule(n)
    assert span[0] == 0.0 and abs(span[-1] - 1.0) < 1e-6
    assert np.all(np.diff(span) > 0)
    steps = euler_times(n)
    assert len(steps) == n
    assert abs(sum(dt for _, dt in steps) - 1.0) < 1e-6
    for (t, _), s in zip(steps, span[:-1]):
        assert abs(t - s) < 1e-6


# --- the numba CPU kernels against the MLX ops they replace ---------------------------------


@pytest.fixture
def kernels_or_skip():
    """The flow ops module on the plain route (the numba row kernels, no extension)."""
    from cosyvoice2.flow import ops

    if backend.load_row_kernels() is None:
        pytest.skip("numba kernels unavailable (no numba, or COSYVOICE2_FLOW_KERNELS=0)")
    with backend.active(backend.choose("plain")):
        assert ops.use_cpu_kernels()
        yield ops


def _mlx_route(monkeypatch, fn, *args, **kwargs):
    """`fn` on MLX's ops: neither the numba kernels nor the `cosyvoice2_kernels` extension."""
    from cosyvoice2.flow import ops

    with backend.active(backend.choose("composed")):
        assert not ops.use_cpu_kernels() and ops.cpu_extension() is None
        out = fn(*args, **kwargs)
        mx.eval(out)
    return out


@pytest.fixture(params=["numba", "extension"])
def fast_route(request, monkeypatch):
    """The flow ops module on one of its fast CPU routes: the numba kernels alone, or the
    `cosyvoice2_kernels` extension (which `layer_norm`, `gelu`, `linear` and attention
    prefer when it is built)."""
    from cosyvoice2.flow import ops

    if request.param == "numba":
        if backend.load_row_kernels() is None:
            pytest.skip("numba kernels unavailable (no numba, or COSYVOICE2_FLOW_KERNELS=0)")
        with backend.active(backend.choose("plain")):
            yield ops
        return
    if ops.cpu_extension() is None:
        pytest.skip("cosyvoice2_kernels not built (kernels/build.sh) or COSYVOICE2_KERNELS=0")
    yield ops


@pytest.mark.parametrize(("t_q", "chunk"), [(37, 0), (37, 10), (120, 50)])
def test_softmax_kernel_matches_mlx(kernels_or_skip, monkeypatch, t_q: int, chunk: int) -> None:
    ops = kernels_or_skip
    rng = np.random.default_rng(t_q + chunk)
    s = mx.array((rng.standard_normal((2, 3, t_q, t_q)) * 8).astype(np.float32))
    got = ops.softmax(s, chunk)
    ref = _mlx_route(monkeypatch, ops.softmax, s, chunk)
    assert got.shape == s.shape
    assert mx.abs(got - ref).max().item() < 1e-6
    if chunk:  # masked keys get exactly zero probability
        masked = ~np.array(chunk_mask(t_q, chunk))
        assert np.all(np.array(got)[:, :, masked] == 0.0)


@pytest.mark.parametrize(("q0", "t_q", "t_k", "chunk"), [(100, 70, 170, 50), (50, 40, 90, 25)])
def test_softmax_with_query_offset(kernels_or_skip, monkeypatch, q0, t_q, t_k, chunk) -> None:
    """New queries at positions `q0...` (the streaming cache) against all keys so far:
    both routes equal the rows `q0...` of the full chunk-masked softmax."""
    ops = kernels_or_skip
    rng = np.random.default_rng(q0 + t_q)
    s = (rng.standard_normal((2, t_q, t_k)) * 8).astype(np.float32)
    full = np.full((2, t_k, t_k), -1e4, np.float32)  # rows before q0: anything
    full[:, q0 : q0 + t_q] = s
    ref = np.array(ops.softmax(mx.array(full), chunk))[:, q0 : q0 + t_q]
    got = ops.softmax(mx.array(s), chunk, q0)
    mlx = _mlx_route(monkeypatch, ops.softmax, mx.array(s), chunk, q0)
    assert np.abs(np.array(got) - ref).max() < 1e-6
    assert np.abs(np.array(mlx) - ref).max() < 1e-6
    visible = np.arange(t_k)[None, :] < ((np.arange(q0, q0 + t_q) // chunk + 1) * chunk)[:, None]
    assert not visible.all()  # the case masks something
    assert np.all(np.array(got)[:, ~visible] == 0.0)


@pytest.mark.parametrize("name", ["gelu", "silu"])
def test_bias_activation_kernels_match_mlx(fast_route, monkeypatch, name: str) -> None:
    ops = fast_route
    rng = np.random.default_rng(1)
    x = mx.array((rng.standard_normal((3, 17, 64)) * 6).astype(np.float32))
    x = mx.concatenate([x, mx.full((3, 1, 64), 95.0), mx.full((3, 1, 64), -95.0)], axis=1)
    b = mx.array(rng.standard_normal(64).astype(np.float32))
    fn = getattr(ops, name)
    got, ref = fn(x, b), _mlx_route(monkeypatch, fn, x, b)
    assert mx.abs(got - ref).max().item() < 5e-6 * max(1.0, mx.abs(ref).max().item())
    got, ref = fn(x), _mlx_route(monkeypatch, fn, x)
    assert mx.abs(got - ref).max().item() < 5e-6 * max(1.0, mx.abs(ref).max().item())


def test_mish_kernel_matches_mlx(kernels_or_skip, monkeypatch) -> None:
    ops = kernels_or_skip
    x = mx.array(np.linspace(-100.0, 100.0, 10001).astype(np.float32)).reshape(1, -1, 1)
    got, ref = ops.mish(x), _mlx_route(monkeypatch, ops.mish, x)
    err = mx.abs(got - ref) / mx.maximum(mx.abs(ref), 1e-3)
    assert err.max().item() < 1e-5


@pytest.mark.parametrize("then_mish", [False, True])
def test_layer_norm_kernel_matches_mlx(fast_route, monkeypatch, then_mish: bool) -> None:
    ops = fast_route
    rng = np.random.default_rng(2)
    x = mx.array((rng.standard_normal((2, 33, 96)) * 4 + 3).astype(np.float32))
    ramp = np.broadcast_to(np.linspace(-60, 60, 96, dtype=np.float32), (2, 1, 96))
    x = mx.concatenate([x, mx.array(ramp)], axis=1)  # rows far from 0 (Mish's tails)
    w = mx.array((1 + 0.1 * rng.standard_normal(96)).astype(np.float32))
    b = mx.array((0.1 * rng.standard_normal(96)).astype(np.float32))
    got = ops.layer_norm(x, w, b, 1e-5, then_mish)
    ref = _mlx_route(monkeypatch, ops.layer_norm, x, w, b, 1e-5, then_mish)
    assert mx.abs(got - ref).max().item() < 1e-5


@pytest.mark.parametrize("layer", ["linear", "pointwise_conv"])
@pytest.mark.parametrize("bias", [True, False])
def test_dense_matches_the_layer(fast_route, monkeypatch, layer: str, bias: bool) -> None:
    import mlx.nn as nn

    ops = fast_route
    mx.random.seed(4)
    m = nn.Linear(40, 33) if layer == "linear" else nn.Conv1d(40, 33, 1)
    x = mx.random.normal((2, 23, 40))
    ref = _mlx_route(monkeypatch, lambda: m(x) if bias else x @ m.weight.reshape(33, 40).T)
    got = ops.linear(m, x, bias=bias)
    assert got.shape == ref.shape
    assert mx.abs(got - ref).max().item() < 1e-5 * mx.abs(ref).max().item()
    m.weight = m.weight * 2  # a new weight is packed again, not read from the old panels
    assert mx.abs(ops.linear(m, x) - m(x)).max().item() < 1e-5 * mx.abs(m(x)).max().item()


@pytest.mark.parametrize(
    ("blocks", "n", "chunk"), [((), 37, 0), ((), 60, 25), ((50, 50), 70, 50), ((25,), 13, 25)]
)
def test_attention_over_blocks_matches_mlx(fast_route, monkeypatch, blocks, n, chunk) -> None:
    """`Attention.attend` of new positions over cached key/value blocks, on the fast route
    against MLX's, and against plain full-sequence attention's rows for those positions."""
    from cosyvoice2.flow.decoder import Attention

    mx.random.seed(5)
    attn = Attention(64, 4, 16)
    total = sum(blocks) + n
    x = mx.random.normal((1, total, 64))
    qkv = attn.qkv(x)
    inner = 4 * 16
    cuts = np.cumsum((0, *blocks)).tolist()
    kv = [qkv[:, a:b, inner:] for a, b in zip(cuts[:-1], cuts[1:])]
    new = qkv[:, cuts[-1] :]
    got = attn.attend(new, kv, chunk)
    ref = _mlx_route(monkeypatch, attn.attend, new, kv, chunk)
    full = _mlx_route(monkeypatch, attn.attend, qkv, [], chunk)[:, cuts[-1] :]
    assert got.shape == (1, n, inner)
    assert mx.abs(got - ref).max().item() < 1e-5
    assert mx.abs(ref - full).max().item() < 1e-5


@pytest.mark.parametrize(
    ("blocks", "n", "chunk", "keep"), [((), 37, 0, 0), ((50, 50), 70, 50, 50), ((25,), 13, 25, 13)]
)
def test_transformer_block_over_blocks_matches_mlx(
    fast_route, monkeypatch, blocks, n, chunk, keep
) -> None:
    """`BasicTransformerBlock.over_blocks` (one `transformer_block` node with the extension,
    composed ops with numba) against MLX's ops, output and committed keys/values; and
    the plain call (no cache) equal to it."""
    from cosyvoice2.flow.decoder import BasicTransformerBlock

    mx.random.seed(6)
    blk = BasicTransformerBlock(64, 4, 16)
    blk.update(tree_map(lambda p: p + 0.1 * mx.random.normal(p.shape), blk.parameters()))
    x = mx.random.normal((1, n, 64))
    kv = [mx.random.normal((1, b, 128)) for b in blocks]
    y, kept = blk.over_blocks(x, kv, chunk, keep)
    ref_y, ref_kept = _mlx_route(monkeypatch, blk.over_blocks, x, kv, chunk, keep)
    assert y.shape == x.shape
    assert mx.abs(y - ref_y).max().item() < 1e-5 * mx.abs(ref_y).max().item()
    if keep:
        assert kept.shape == (1, keep, 128)
        assert mx.abs(kept - ref_kept).max().item() < 1e-5 * mx.abs(ref_kept).max().item()
    else:
        assert kept is None and ref_kept is None
    if not blocks:
        assert mx.abs(blk(x, None, chunk) - y).max().item() < 1e-6 * mx.abs(y).max().item()


def test_flow_rejects_out_of_range_tokens() -> None:
    from cosyvoice2.flow import CausalMaskedDiffWithXvec
    from tests.test_flow_parity import tiny_flow_config

    model = CausalMaskedDiffWithXvec(tiny_flow_config())
    ok = mx.array([[1, 2, 3, 4, 5]])
    with pytest.raises(ValueError, match="out of range"):
        model.encode(mx.array([[1, 6561]]), ok)
    with pytest.raises(ValueError, match="more than 3 tokens"):
        model.encode(mx.array([[1]]), mx.zeros((1, 0), dtype=mx.int32), finalize=False)
    assert model.encode(ok, ok).shape == (1, 20, 80)
