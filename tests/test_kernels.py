"""The optional CPU kernels (`cosyvoice2_kernels`, built from `kernels/`) and `cosyvoice2.kernel_layers`.

Kernel tests skip when the extension is not built or `COSYVOICE2_KERNELS=0`; CI
builds it (`kernels/build.sh`) and runs the suite both ways. The tests of the
package without the extension always run.

Tolerances (max |y - ref| over max |ref|, "relative to the output scale"):
- primitives: <= 1e-5 against float32 `mx.matmul` on the same bf16-rounded x and W
  (bf16), or on `mx.dequantize`'s weights (8 and 4 bits). There is no fast mode: x is never
  quantised, every variant converts the weights exactly and accumulates in float32,
  so only the summation order differs from the reference;
- decode-step ops (rms_norm, rope_split, attention, swiglu): <= 1e-5 against
  `mx.fast.rms_norm`, `mx.fast.rope`, `mx.fast.scaled_dot_product_attention` and
  `nn.silu`;
- speech LM at one precision with and without the kernels, against MLX's own
  unswapped model computing the same function (fp32; 8 and 4 bits with MLX's
  `QuantizedLinear`; bf16 as the fp32 model holding the bf16-rounded weights, since
  the kernel path keeps activations in fp32): logits of a prefill and 100 cached
  steps <= 1e-5, greedy tokens identical over 120 steps. That bound is tight enough
  to fail on bf16 rounding of activations, as MLX's own bf16 path does (checked in
  `test_bf16_kernels_closer_to_fp32_than_mlx_bf16`).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map_with_path

from cosyvoice2 import backend, kernel_layers
from cosyvoice2.llm import Qwen2LM, cast, quantize, weights_of
from tests.test_llm import BACKBONE_SCALE, TINY, NoStopGreedy, inputs, random_tiny

K = backend.load_extension()
needs_kernels = pytest.mark.skipif(
    K is None, reason="cosyvoice2_kernels not built (kernels/build.sh) or COSYVOICE2_KERNELS=0"
)
ISAS = K.available_isas() if K is not None else ["none"]
TOL = 1e-5
S = 6561


def rel_err(y: mx.array, ref: mx.array) -> float:
    y, ref = np.array(y, dtype=np.float64), np.array(ref, dtype=np.float64)
    return float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-30))


def bf16_round(a: np.ndarray) -> mx.array:
    """float32 values exactly representable in bfloat16."""
    return mx.array(a.astype(np.float32)).astype(mx.bfloat16).astype(mx.float32)


@pytest.fixture(params=ISAS)
def isa(request):
    """Run the test with each instruction-set variant this CPU supports."""
    if K is None:
        pytest.skip("cosyvoice2_kernels not built")
    K.set_isa(request.param)
    yield request.param
    K.set_isa("auto")


# ------------------------------------------------------------------ primitives

DENSE_SHAPES = [  # (rows, K, N): K not a multiple of 16/32/64, N = 1, rows 1..8 and beyond
    (1, 1, 1),
    (1, 7, 5),
    (2, 33, 1),
    (3, 100, 37),
    (4, 129, 70),
    (5, 64, 16),
    (6, 896, 3),
    (7, 47, 129),
    (8, 896, 200),
    (8, 4864, 96),
    (13, 95, 50),
    (16, 96, 50),  # from 16 rows on: the weights expanded to fp32 (the prefill path)
    (40, 70, 97),
    (121, 896, 130),
]


@needs_kernels
@pytest.mark.parametrize(("m", "k", "n"), DENSE_SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_dense_matches_matmul(
    isa: str, m: int, k: int, n: int, with_bias: bool, dtype: str
) -> None:
    rng = np.random.default_rng(m * 1000 + k + n)
    x = bf16_round(rng.standard_normal((m, k)))
    w32 = bf16_round(rng.standard_normal((n, k)))
    b = mx.array(rng.standard_normal(n).astype(np.float32)) if with_bias else None
    if dtype == "float32":  # any float32 values
        x = mx.array(rng.standard_normal((m, k)).astype(np.float32))
        w32 = mx.array(rng.standard_normal((n, k)).astype(np.float32))
    y = K.linear_dense(x, w32.astype(getattr(mx, dtype)), b)
    ref = x @ w32.T + (b if b is not None else 0)
    assert y.dtype == mx.float32 and y.shape == (m, n)
    err = rel_err(y, ref)
    assert err <= TOL, f"{isa} {dtype} {m}x{k} @ {n}: relative error {err:.2e}"


PANEL_SHAPES = [  # (rows, K, N): rows across tile edges (6 / 12), K across depth blocks (256)
    (1, 1, 1),
    (1, 896, 1152),
    (2, 7, 17),
    (5, 300, 16),
    (6, 256, 33),
    (7, 513, 100),
    (12, 64, 48),
    (13, 257, 15),
    (70, 256, 1536),
    (121, 96, 31),
]


@needs_kernels
@pytest.mark.parametrize(("m", "k", "n"), PANEL_SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("parallel", [False, True])
def test_panels_match_matmul(
    isa: str, m: int, k: int, n: int, with_bias: bool, parallel: bool
) -> None:
    rng = np.random.default_rng(m * 1000 + k + n)
    x = mx.array(rng.standard_normal((m, k)).astype(np.float32))
    w = mx.array(rng.standard_normal((n, k)).astype(np.float32))
    b = mx.array(rng.standard_normal(n).astype(np.float32)) if with_bias else None
    wp = K.pack_panels(w)
    assert wp.shape == (-(-n // 16), k, 16)
    # the layout the kernels read: column c of w.T in panel c // 16, lane c % 16, zero padding
    c = n - 1
    assert np.array_equal(np.array(wp[c // 16, :, c % 16]), np.array(w[c]))
    if n % 16:
        assert not np.array(wp[-1, :, n % 16 :]).any()
    y = K.linear_panels(x, wp, n, b, parallel=parallel)
    ref = x @ w.T + (b if b is not None else 0)
    assert y.dtype == mx.float32 and y.shape == (m, n)
    err = rel_err(y, ref)
    assert err <= TOL, f"{isa} {m}x{k} @ {n}: relative error {err:.2e}"


def bf16_np(a) -> np.ndarray:
    """`a` rounded to bfloat16 (to nearest even), as float64."""
    return np.array(mx.array(a).astype(mx.bfloat16).astype(mx.float32), dtype=np.float64)


@needs_kernels
@pytest.mark.parametrize(("m", "k", "n"), [*PANEL_SHAPES, (16, 32, 16), (32, 64, 40), (33, 96, 50)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("parallel", [False, True])
def test_bf16_panels_match_rounded_matmul(
    isa: str, m: int, k: int, n: int, with_bias: bool, parallel: bool
) -> None:
    """bf16 pair panels (every ISA's kernel: widened FMA, AVX-512 BF16, AMX): x and W
    rounded to bf16, the exact products summed in float32."""
    rng = np.random.default_rng(m * 1000 + k + n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32) if with_bias else None
    wp = K.pack_panels(mx.array(w), bf16=True)
    pairs = -(-k // 32) * 16
    assert wp.dtype == mx.bfloat16 and wp.shape == (-(-n // 16), pairs, 32)
    # the layout: element (c, j) at [c // 16, j // 2, 2 * (c % 16) + j % 2], zero padding
    lanes = np.array(wp.astype(mx.float32))
    c = n - 1
    assert np.array_equal(lanes[c // 16, : (k + 1) // 2, 2 * (c % 16)], bf16_np(w[c, ::2]))
    assert np.array_equal(lanes[c // 16, : k // 2, 2 * (c % 16) + 1], bf16_np(w[c, 1::2]))
    if k % 32:
        assert not lanes[:, k // 2 + 1 :].any()
    if n % 16:
        assert not lanes[-1, :, 2 * (n % 16) :].any()
    y = K.linear_panels(mx.array(x), wp, n, None if b is None else mx.array(b), parallel=parallel)
    ref = bf16_np(x) @ bf16_np(w).T + (b if b is not None else 0)
    assert y.dtype == mx.float32 and y.shape == (m, n)
    err = rel_err(y, mx.array(ref.astype(np.float32)))
    assert err <= TOL, f"{isa} bf16 {m}x{k} @ {n}: relative error {err:.2e}"


def panels_np(w: np.ndarray) -> np.ndarray:
    """`pack_panels`' float32 layout in numpy: W's rows zero-padded to a multiple of 16,
    each group of 16 rows transposed to a (K, 16) panel."""
    n, k = w.shape
    padded = np.zeros((-(-n // 16) * 16, k), np.float32)
    padded[:n] = w
    return padded.reshape(-1, 16, k).transpose(0, 2, 1)


@needs_kernels
@pytest.mark.parametrize(
    "rows", [(40,), (896, 128, 128), (3, 20, 1), (0, 17), (16, 16), (5, 0, 11, 33)]
)
def test_pack_panels_of_stacked_parts(rows: tuple[int, ...]) -> None:
    """A list packs as its rows stacked (the fused q/k/v and gate/up projections), panels
    straddling the parts where their row counts are not multiples of 16; a transposed or
    bf16 part is read as it is."""
    rng = np.random.default_rng(sum(rows))
    k = 24
    parts = [rng.standard_normal((r, k)).astype(np.float32) for r in rows]
    arrays = [mx.array(p) for p in parts]
    arrays[-1] = mx.array(parts[-1].T.copy()).T  # a transposed view: not row-contiguous
    wp = K.pack_panels(arrays)
    assert wp.dtype == mx.float32
    assert np.array_equal(np.array(wp), panels_np(np.concatenate(parts)))
    half = [mx.array(p).astype(mx.bfloat16) for p in parts]  # converted, exactly, as read
    stacked = np.concatenate([np.array(h.astype(mx.float32)) for h in half])
    assert np.array_equal(np.array(K.pack_panels(half)), panels_np(stacked))
    pairs = K.pack_panels(arrays, bf16=True)  # pair panels of the concatenation
    whole = K.pack_panels(mx.concatenate(arrays), bf16=True)
    assert np.array_equal(np.array(pairs.astype(mx.float32)), np.array(whole.astype(mx.float32)))


@needs_kernels
def test_pack_panels_refuses_bad_parts() -> None:
    with pytest.raises(ValueError, match="no arrays"):
        K.pack_panels([])
    with pytest.raises(ValueError, match="same K"):
        K.pack_panels([mx.zeros((16, 8)), mx.zeros((16, 9))])
    with pytest.raises(ValueError, match="2-D"):
        K.pack_panels([mx.zeros((16, 8)), mx.zeros((2, 8, 1))])


@needs_kernels
def test_panels_take_any_leading_shape_and_strided_x() -> None:
    rng = np.random.default_rng(3)
    w = mx.array(rng.standard_normal((40, 24)).astype(np.float32))
    x = mx.array(rng.standard_normal((2, 3, 24, 5)).astype(np.float32)).transpose(0, 1, 3, 2)
    y = K.linear_panels(x, K.pack_panels(w), 40)
    assert y.shape == (2, 3, 5, 40)
    assert rel_err(y, x @ w.T) <= TOL


@needs_kernels
def test_panels_refuse_bad_arguments() -> None:
    w = mx.zeros((40, 24))
    wp = K.pack_panels(w)
    with pytest.raises(ValueError, match="n must be"):
        K.linear_panels(mx.zeros((2, 24)), wp, 20)  # 20 rows need 2 panels, not 3
    with pytest.raises(ValueError, match="column count"):
        K.linear_panels(mx.zeros((2, 23)), wp, 40)
    with pytest.raises(ValueError, match="column count"):  # bf16 panels of K 24: 16 pairs
        K.linear_panels(mx.zeros((2, 40)), K.pack_panels(w, bf16=True), 40)
    with pytest.raises(ValueError, match="pack_panels"):  # fp32 panels cast: not pair panels
        K.linear_panels(mx.zeros((2, 24)), wp.astype(mx.bfloat16), 40)
    with pytest.raises(ValueError, match="pack_panels"):
        K.linear_panels(mx.zeros((2, 24)), w, 40)
    with pytest.raises(ValueError, match="bias"):
        K.linear_panels(mx.zeros((2, 24)), wp, 40, mx.zeros((39,)))


CONV_CASES = [  # (B, L, C, N, K, stride, dilation, pad_left, pad_right)
    (1, 50, 5, 7, 3, 1, 1, 1, 1),  # "same" padding, N below one panel
    (2, 37, 18, 20, 7, 1, 3, 9, 9),  # dilation: 3 phases, L not a multiple of 3; batch 2
    (1, 64, 33, 17, 11, 1, 5, 25, 25),  # HiFT's largest dilation, N just past one panel
    (1, 500, 24, 48, 3, 1, 1, 2, 0),  # causal (the flow); rows across tasks (192)
    (1, 419, 16, 40, 5, 1, 2, 4, 4),  # dilation 2 across tasks, odd panel count
    (1, 41, 8, 16, 3, 1, 2, 0, 0),  # dilation without pads: each phase's last row is data
    (2, 50, 6, 9, 4, 1, 3, 9, 0),  # dilated and causal
    (1, 100, 18, 128, 30, 15, 1, 7, 7),  # HiFT's strided source convolution
    (2, 33, 18, 64, 6, 3, 1, 1, 1),
    (1, 9, 4, 4, 1, 1, 1, 0, 0),  # pointwise
    (1, 3, 8, 16, 5, 1, 1, 2, 0),  # fewer input rows than taps: the pads make the rest
]


def _conv_reference(x, w, b, stride, dilation, lo, hi, snake=None):
    """torch's Conv1d (channels-last) in float64 by direct sums, after Snake if given."""
    x = x.astype(np.float64)
    if snake is not None:
        alpha, inv = (a.astype(np.float64) for a in snake)
        x = x + np.sin(alpha * x) ** 2 * inv
    xp = np.pad(x, [(0, 0), (lo, hi), (0, 0)])
    n, k, _ = w.shape
    l_out = (xp.shape[1] - dilation * (k - 1) - 1) // stride + 1
    y = np.zeros((x.shape[0], l_out, n))
    for j in range(k):
        rows = xp[:, j * dilation : j * dilation + (l_out - 1) * stride + 1 : stride]
        y += rows @ w[:, j, :].astype(np.float64).T
    return y + (0 if b is None else b)


@needs_kernels
@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("snake", [False, True])
@pytest.mark.parametrize("parallel", [False, True])
def test_conv1d_panels_matches_direct_sums(isa: str, case, snake: bool, parallel: bool) -> None:
    bsz, length, c, n, k, stride, dilation, lo, hi = case
    rng = np.random.default_rng(length * 7 + k)
    x = (rng.standard_normal((bsz, length, c)) * 2).astype(np.float32)
    w = rng.standard_normal((n, k, c)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    pre = None
    if snake:
        alpha = rng.uniform(0.2, 3.0, c).astype(np.float32)
        pre = (alpha, (1.0 / (alpha.astype(np.float64) + 1e-9)).astype(np.float32))
    wp = K.pack_panels(mx.array(w).reshape(n, k * c))
    y = K.conv1d_panels(
        mx.array(x),
        wp,
        n,
        k,
        mx.array(b),
        pad_left=lo,
        pad_right=hi,
        stride=stride,
        dilation=dilation,
        snake=[] if pre is None else [mx.array(a) for a in pre],
        parallel=parallel,
    )
    ref = _conv_reference(x, w, b, stride, dilation, lo, hi, pre)
    assert y.dtype == mx.float32 and y.shape == ref.shape
    err = rel_err(y, mx.array(ref.astype(np.float32)))
    assert err <= TOL, f"{isa} {case} snake={snake}: relative error {err:.2e}"


@needs_kernels
def test_conv1d_panels_results_do_not_depend_on_threads() -> None:
    """Each output row is one task's, summed in one order: the pool changes nothing."""
    rng = np.random.default_rng(12)
    x = mx.array(rng.standard_normal((1, 1000, 64)).astype(np.float32))
    w = mx.array(rng.standard_normal((64, 7, 64)).astype(np.float32))
    wp = K.pack_panels(w.reshape(64, 7 * 64))
    one = K.conv1d_panels(x, wp, 64, 7, pad_left=9, pad_right=9, dilation=3, parallel=False)
    all_ = K.conv1d_panels(x, wp, 64, 7, pad_left=9, pad_right=9, dilation=3, parallel=True)
    assert np.array_equal(np.array(one), np.array(all_))


@needs_kernels
def test_conv1d_snake_is_hift_snake(isa: str) -> None:
    """The Snake taken into the padding pass computes HiFT's `Snake` (its `_sin_squared`
    steps), up to the rounding of the last operations, over a range of alpha * x."""
    from cosyvoice2.hift import Snake

    rng = np.random.default_rng(13)
    c = 37
    x = mx.array((rng.standard_normal((2, 300, c)) * 20).astype(np.float32))
    act = Snake(c)
    act.alpha = mx.array(rng.uniform(0.05, 5.0, c).astype(np.float32))
    identity = K.pack_panels(mx.eye(c))
    y = K.conv1d_panels(x, identity, c, 1, snake=[act.alpha, act.inv_alpha()])
    ref = act(x)
    err = float(mx.abs(y - ref).max() / mx.abs(ref).max())
    assert err <= 2e-7, f"{isa}: relative difference {err:.2e}"


@needs_kernels
def test_conv1d_panels_refuse_bad_arguments() -> None:
    x = mx.zeros((1, 10, 8))
    wp = K.pack_panels(mx.zeros((20, 3 * 8)))
    with pytest.raises(ValueError, match="pack_panels"):
        K.conv1d_panels(x, wp, 20, 2)  # kernel size 2 x 8 channels is not the packed 24
    with pytest.raises(ValueError, match="pack_panels"):
        K.conv1d_panels(x, K.pack_panels(mx.zeros((20, 24)), bf16=True), 20, 3)
    with pytest.raises(ValueError, match="output channel"):
        K.conv1d_panels(x, wp, 40, 3)
    with pytest.raises(ValueError, match="shorter than the kernel"):
        K.conv1d_panels(mx.zeros((1, 5, 8)), wp, 20, 3, dilation=3)
    with pytest.raises(ValueError, match="dilation 1"):
        K.conv1d_panels(x, wp, 20, 3, stride=2, dilation=2)
    with pytest.raises(ValueError, match=">= 1"):
        K.conv1d_panels(x, wp, 20, 3, stride=0)
    with pytest.raises(ValueError, match="shape \\(B, L, C\\)"):
        K.conv1d_panels(mx.zeros((10, 8)), wp, 20, 3)
    with pytest.raises(ValueError, match="bias"):
        K.conv1d_panels(x, wp, 20, 3, mx.zeros((19,)))
    with pytest.raises(ValueError, match="snake"):
        K.conv1d_panels(x, wp, 20, 3, snake=[mx.ones((8,))])
    with pytest.raises(ValueError, match="snake"):
        K.conv1d_panels(x, wp, 20, 3, snake=[mx.ones((8,)), mx.ones((7,))])


def _attention_reference(qkv, blocks, heads, chunk, rnd=None):
    """float64 chunk-masked attention of the new positions over blocks + themselves;
    `rnd`: a rounding of the products' operands (queries, keys, values, weights)."""
    rnd = rnd or (lambda a: np.asarray(a, dtype=np.float64))
    m, hd = qkv.shape[1], qkv.shape[2] // 3
    d = hd // heads
    old = np.concatenate([b[0] for b in blocks], 0) if blocks else np.zeros((0, 2 * hd))
    q0 = old.shape[0]
    keys = rnd(np.concatenate([old[:, :hd], qkv[0, :, hd : 2 * hd]], 0))
    values = rnd(np.concatenate([old[:, hd:], qkv[0, :, 2 * hd :]], 0))
    out = np.zeros((m, hd))
    for h in range(heads):
        cols = slice(h * d, (h + 1) * d)
        s = rnd(qkv[0, :, cols]) @ keys[:, cols].T
        for r in range(m):
            if chunk:
                s[r, ((q0 + r) // chunk + 1) * chunk :] = -np.inf
        p = np.exp(s - s.max(1, keepdims=True))
        out[:, cols] = rnd(p / p.sum(1, keepdims=True)) @ values[:, cols]
    return out


@needs_kernels
@pytest.mark.parametrize(
    ("m", "lengths", "heads", "d", "chunk"),
    [
        (70, (50, 50), 8, 64, 50),  # the estimator's streaming cache: 70 new frames
        (10, (50, 50, 50), 8, 64, 50),
        (60, (100,), 8, 64, 50),
        (13, (7, 30), 2, 20, 16),  # head size not a multiple of 16, chunks cut blocks
        (33, (), 3, 8, 0),  # no cache, full attention
        (35, (), 2, 64, 0),  # an odd number of keys in a partial panel (bf16: vectorised)
        (1, (5,), 1, 4, 0),
    ],
)
@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("bf16", [False, True])
def test_block_attention_matches_reference(
    isa, m, lengths, heads, d, chunk, parallel, bf16
) -> None:
    """`bf16`: against the products of bf16-rounded operands, in relative L2 (see
    test_transformer_block_matches_reference), and far from the unrounded attention."""
    rng = np.random.default_rng(m + len(lengths))
    hd = heads * d
    qkv = (rng.standard_normal((1, m, 3 * hd)) * 2).astype(np.float32)
    blocks = [(rng.standard_normal((1, n, 2 * hd)) * 2).astype(np.float32) for n in lengths]
    y = K.block_attention(
        mx.array(qkv), [mx.array(b) for b in blocks], heads, chunk, parallel=parallel, bf16=bf16
    )
    assert y.shape == (1, m, hd) and y.dtype == mx.float32
    y = np.array(y[0], dtype=np.float64)
    exact = _attention_reference(qkv, blocks, heads, chunk)
    if bf16:
        ref = _attention_reference(
            qkv, blocks, heads, chunk, lambda a: bf16_np(np.asarray(a, dtype=np.float32))
        )
        err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
        far = float(np.linalg.norm(y - exact) / np.linalg.norm(ref))
        assert err <= 1e-4 and far >= 3e-4, f"{isa}: relative L2 {err:.2e} (unrounded: {far:.2e})"
    else:
        err = float(np.abs(y - exact).max() / np.abs(exact).max())
        assert err <= TOL, f"{isa}: relative error {err:.2e}"


@needs_kernels
@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("d", [16, 64])  # 64: the flow's heads (bf16_kv's vector path)
def test_bf16_blocks_are_read_as_they_are(isa, parallel, d) -> None:
    """With bf16 products, cached blocks stored in bf16 give exactly the result of the same
    (bf16-representable) blocks in float32: the block attention and the transformer block
    take them at their values (widened, rounded again: exact)."""
    rng = np.random.default_rng(21)
    heads, m = 4, 20
    hd = heads * d
    qkv = mx.array(rng.standard_normal((1, m, 3 * hd)).astype(np.float32))
    b16 = [
        mx.array(rng.standard_normal((1, n, 2 * hd)).astype(np.float32)).astype(mx.bfloat16)
        for n in (9, 16)
    ]
    b32 = [b.astype(mx.float32) for b in b16]
    for bf16 in (True, False):
        one = K.block_attention(qkv, b16, heads, 8, parallel=parallel, bf16=bf16)
        two = K.block_attention(qkv, b32, heads, 8, parallel=parallel, bf16=bf16)
        assert mx.array_equal(one, two), bf16
    c, ff = 32, 48
    w = lambda *shape: mx.array((rng.standard_normal(shape) * 0.3).astype(np.float32))  # noqa: E731
    P = lambda a: K.pack_panels(a, bf16=True)  # noqa: E731
    params = [1 + w(c), w(c), P(w(3 * hd, c)), P(w(c, hd)), w(c), 1 + w(c), w(c), P(w(ff, c))]
    params += [w(ff), P(w(c, ff)), w(c)]
    x = w(1, m, c)
    one = K.transformer_block(x, params, b16, heads, hd, ff, 8, 1e-5, 1e-5, 5, parallel=parallel)
    two = K.transformer_block(x, params, b32, heads, hd, ff, 8, 1e-5, 1e-5, 5, parallel=parallel)
    assert all(mx.array_equal(a, b) for a, b in zip(one, two))


@needs_kernels
def test_block_attention_refuses_bad_shapes() -> None:
    qkv = mx.zeros((1, 5, 48))
    with pytest.raises(ValueError, match="qkv"):
        K.block_attention(mx.zeros((1, 5, 47)), [], 2, 0)
    with pytest.raises(ValueError, match="block"):
        K.block_attention(qkv, [mx.zeros((1, 3, 31))], 2, 0)
    with pytest.raises(ValueError, match="heads"):
        K.block_attention(qkv, [], 0, 0)


@needs_kernels
@pytest.mark.parametrize("mish", [False, True])
def test_layer_norm_matches_reference(isa, mish: bool) -> None:
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((37, 259)) * 6 + 2).astype(np.float32)
    x[0, :6] = [30, -30, 0, 19.9, 20.1, -90]
    w = rng.standard_normal(259).astype(np.float32)
    b = rng.standard_normal(259).astype(np.float32)
    xd = x.astype(np.float64)
    mean = xd.mean(-1, keepdims=True)
    ref = (xd - mean) / np.sqrt(((xd - mean) ** 2).mean(-1, keepdims=True) + 1e-5) * w + b
    if mish:
        ref = ref * np.tanh(np.logaddexp(ref, 0.0))
    for parallel in (False, True):
        y = K.layer_norm(mx.array(x), mx.array(w), mx.array(b), 1e-5, mish=mish, parallel=parallel)
        err = rel_err(y, mx.array(ref.astype(np.float32)))
        assert err <= TOL, f"{isa}: relative error {err:.2e}"


@needs_kernels
@pytest.mark.parametrize("with_bias", [False, True])
def test_gelu_matches_reference(isa, with_bias: bool) -> None:
    from math import erf

    rng = np.random.default_rng(8)
    x = (rng.standard_normal((5, 1029)) * 4).astype(np.float32)
    x[0, :4] = [95, -95, 0, 1e-3]
    b = rng.standard_normal(1029).astype(np.float32) if with_bias else None
    v = x.astype(np.float64) + (b if with_bias else 0)
    ref = 0.5 * v * (1 + np.vectorize(erf)(v / np.sqrt(2)))
    y = K.gelu(mx.array(x), mx.array(b) if with_bias else None)
    err = float(np.abs(np.array(y, dtype=np.float64) - ref).max())
    assert err <= TOL * np.abs(ref).max(), f"{isa}: max error {err:.2e}"


@needs_kernels
@pytest.mark.parametrize(
    ("m", "lengths", "chunk", "keep"), [(30, (16, 16), 16, 30), (9, (), 0, 0), (20, (7,), 8, 5)]
)
@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("bf16", [False, True])
def test_transformer_block_matches_reference(isa, m, lengths, chunk, keep, parallel, bf16) -> None:
    """`bf16`: the four projections as bf16 pair panels, each input rounded to bf16; then
    compared in relative L2 (a rounding boundary the float32 and float64 intermediates
    fall on either side of moves one element by a bf16 step) and checked to be far from
    the function without the inputs' rounding."""
    from math import erf

    rng = np.random.default_rng(m + keep)
    c, heads, d, ff = 40, 4, 8, 72
    inner = heads * d

    def arr(*shape, scale=0.3):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    x, ln1_w, ln1_b, w_qkv = arr(1, m, c, scale=1.0), 1 + arr(c), arr(c), arr(3 * inner, c)
    w_o, b_o, ln3_w, ln3_b = arr(c, inner), arr(c), 1 + arr(c), arr(c)
    w1, b1, w2, b2 = arr(ff, c), arr(ff), arr(c, ff), arr(c)
    blocks = [arr(1, n, 2 * inner, scale=1.0) for n in lengths]

    def ln(v, w, b):
        v = v.astype(np.float64)
        mu = v.mean(-1, keepdims=True)
        return (v - mu) / np.sqrt(((v - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * w + b

    def reference(rx, rw):  # rx, rw: the roundings of the projections' inputs and weights
        qkv = rx(ln(x[0], ln1_w, ln1_b)) @ rw(w_qkv).T
        att = _attention_reference(qkv[None], blocks, heads, chunk, rx if rx is not same else None)
        x1 = x[0] + rx(att) @ rw(w_o).T + b_o
        f = rx(ln(x1, ln3_w, ln3_b)) @ rw(w1).T + b1
        return qkv, x1 + rx(0.5 * f * (1 + np.vectorize(erf)(f / np.sqrt(2)))) @ rw(w2).T + b2

    same = lambda a: np.asarray(a, dtype=np.float64)  # noqa: E731
    r16 = (lambda a: bf16_np(np.asarray(a, dtype=np.float32))) if bf16 else same
    qkv, ref = reference(r16, r16)

    def P(w):
        return K.pack_panels(w, bf16=bf16)

    params = [ln1_w, ln1_b, P(mx.array(w_qkv)), P(mx.array(w_o)), b_o, ln3_w, ln3_b]
    params += [P(mx.array(w1)), b1, P(mx.array(w2)), b2]
    params = [mx.array(p) for p in params]
    outs = K.transformer_block(
        mx.array(x),
        params,
        [mx.array(b) for b in blocks],
        heads,
        inner,
        ff,
        chunk,
        1e-5,
        1e-5,
        keep,
        parallel=parallel,
    )
    assert len(outs) == (2 if keep else 1)
    y = np.array(outs[0][0], dtype=np.float64)
    if bf16:
        err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
        unrounded = reference(same, r16)[1]
        far = float(np.linalg.norm(y - unrounded) / np.linalg.norm(ref))
        assert err <= 1e-4 and far >= 1e-3, f"{isa}: relative L2 {err:.2e} (unrounded x: {far:.2e})"
    else:
        err = float(np.abs(y - ref).max() / np.abs(ref).max())
        assert err <= TOL, f"{isa}: relative error {err:.2e}"
    if keep:  # the committed keys and values: the first `keep` rows of the projection's k | v
        kv = np.array(outs[1][0], dtype=np.float64)
        assert np.abs(kv - qkv[:keep, inner:]).max() <= TOL * np.abs(qkv).max()


@needs_kernels
def test_transformer_block_refuses_bad_arguments() -> None:
    c, inner, ff = 16, 16, 32
    P = K.pack_panels
    params = [mx.ones((c,)), mx.zeros((c,)), P(mx.zeros((3 * inner, c))), P(mx.zeros((c, inner)))]
    params += [mx.zeros((c,)), mx.ones((c,)), mx.zeros((c,)), P(mx.zeros((ff, c))), mx.zeros((ff,))]
    params += [P(mx.zeros((c, ff))), mx.zeros((c,))]
    x = mx.zeros((1, 5, c))
    K.transformer_block(x, params, [], 2, inner, ff, 0, 1e-5, 1e-5)  # well formed
    with pytest.raises(ValueError, match="keep"):
        K.transformer_block(x, params, [], 2, inner, ff, 0, 1e-5, 1e-5, 6)
    with pytest.raises(ValueError, match="ff1"):
        K.transformer_block(x, params, [], 2, inner, ff + 16, 0, 1e-5, 1e-5)
    with pytest.raises(ValueError, match="11 arrays"):
        K.transformer_block(x, params[:-1], [], 2, inner, ff, 0, 1e-5, 1e-5)
    with pytest.raises(ValueError, match="block"):
        K.transformer_block(x, params, [mx.zeros((1, 3, inner))], 2, inner, ff, 0, 1e-5, 1e-5)


Q_SHAPES = [  # (rows, K, N, group size): K must be a multiple of the group size
    (1, 64, 1, 64),
    (2, 96, 5, 32),
    (3, 128, 37, 128),
    (4, 192, 70, 64),
    (5, 320, 16, 32),
    (6, 896, 3, 64),
    (7, 256, 129, 128),
    (8, 896, 200, 64),
    (8, 4864, 96, 64),
    (11, 160, 33, 32),
    (16, 64, 49, 64),  # from 16 rows on: the weights expanded to fp32 (the prefill path)
    (50, 896, 100, 32),
    (120, 4864, 20, 128),
]


@needs_kernels
@pytest.mark.parametrize(("m", "k", "n", "gs"), Q_SHAPES)
@pytest.mark.parametrize("scale_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_matches_dequantized_matmul(
    isa: str, m: int, k: int, n: int, gs: int, scale_dtype: str, bits: int
) -> None:
    rng = np.random.default_rng(m * 1000 + k + n + gs)
    x = mx.array(rng.standard_normal((m, k)).astype(np.float32))
    w = mx.array(rng.standard_normal((n, k)).astype(np.float32)).astype(getattr(mx, scale_dtype))
    wq, scales, biases = mx.quantize(w, group_size=gs, bits=bits)
    bias = mx.array(rng.standard_normal(n).astype(np.float32))
    y = K.linear_quantized(x, wq, scales, biases, bias, group_size=gs, bits=bits)
    # the exact weights: dequantised in float32 from the stored scales and biases
    wd = mx.dequantize(
        wq, scales.astype(mx.float32), biases.astype(mx.float32), group_size=gs, bits=bits
    )
    ref = x @ wd.T + bias
    assert y.dtype == mx.float32 and y.shape == (m, n)
    err = rel_err(y, ref)
    assert err <= TOL, f"{isa} {bits}-bit {m}x{k} @ {n} (gs {gs}, {scale_dtype}): error {err:.2e}"


@needs_kernels
def test_quantized_float16_scales_are_converted(isa: str) -> None:
    rng = np.random.default_rng(5)
    x = mx.array(rng.standard_normal((2, 128)).astype(np.float32))
    w = mx.array(rng.standard_normal((9, 128)).astype(np.float16))
    wq, scales, biases = mx.quantize(w, group_size=64, bits=8)
    y = K.linear_quantized(x, wq, scales, biases, group_size=64)
    wd = mx.dequantize(
        wq, scales.astype(mx.float32), biases.astype(mx.float32), group_size=64, bits=8
    )
    assert rel_err(y, x @ wd.T) <= TOL


@needs_kernels
def test_leading_dims_strided_inputs_and_empty_rows(isa: str) -> None:
    rng = np.random.default_rng(7)
    wide = bf16_round(rng.standard_normal((2, 3, 2 * 45)))
    x = wide[..., ::2]  # (2, 3, 45), not contiguous
    src = bf16_round(rng.standard_normal((45, 11)))
    w = src.T.astype(mx.bfloat16)  # (11, 45) cast from a transposed view
    y = K.linear_dense(x, w)
    assert y.shape == (2, 3, 11)
    assert rel_err(y, x @ src) <= TOL
    wide_w = mx.repeat(src.T.astype(mx.bfloat16), 2, axis=1)  # (11, 90)
    assert rel_err(K.linear_dense(x, wide_w[:, ::2]), x @ src) <= TOL  # strided weights
    empty = K.linear_dense(mx.zeros((0, 45)), w)
    assert empty.shape == (0, 11)
    mx.eval(empty)


@needs_kernels
@pytest.mark.parametrize("kind", ["bf16", "f32", "q8", "q4"])
@pytest.mark.parametrize("rows", [3, 40])
def test_results_do_not_depend_on_threads(kind: str, rows: int) -> None:
    rng = np.random.default_rng(11)
    x = mx.array(rng.standard_normal((rows, 896)).astype(np.float32))
    w = mx.array(rng.standard_normal((1000, 896)).astype(np.float32))
    if kind in ("bf16", "f32"):
        wb = w.astype(mx.bfloat16) if kind == "bf16" else w

        def f() -> mx.array:
            return K.linear_dense(x, wb)

    else:
        bits = 8 if kind == "q8" else 4
        q = mx.quantize(w, group_size=64, bits=bits)

        def f() -> mx.array:
            return K.linear_quantized(x, *q, group_size=64, bits=bits)

    threads = K.num_threads()
    try:
        K.set_num_threads(1)
        one = f()
        mx.eval(one)
        K.set_num_threads(3)
        three = f()
        mx.eval(three)
    finally:
        K.set_num_threads(threads)
    assert K.num_threads() == threads
    assert mx.array_equal(
        one, three
    )  # columns (or rows of W) are split among threads, sums are not


@needs_kernels
@pytest.mark.parametrize("shapeless", [False, True])
def test_inside_compile(shapeless: bool) -> None:
    rng = np.random.default_rng(3)
    w = mx.array(rng.standard_normal((37, 100)).astype(np.float32)).astype(mx.bfloat16)
    w8 = mx.array(rng.standard_normal((37, 128)).astype(np.float32))
    q = mx.quantize(w8, 64, 8) + mx.quantize(w8, 64, 4)
    b = mx.array(rng.standard_normal(37).astype(np.float32))

    def step(x, x8, w, b, wq, s, z, wq4, s4, z4):
        y = K.linear_dense(x, w, b)
        y8 = K.linear_quantized(x8, wq, s, z, group_size=64, bits=8)
        y4 = K.linear_quantized(x8, wq4, s4, z4, group_size=64, bits=4)
        return mx.tanh(y) * 2.0 + y8 - y4

    compiled = mx.compile(step, shapeless=shapeless)
    for m in (1, 4, 8):
        x = mx.array(rng.standard_normal((m, 100)).astype(np.float32))
        x8 = mx.array(rng.standard_normal((m, 128)).astype(np.float32))
        got = compiled(x, x8, w, b, *q)
        want = step(x, x8, w, b, *q)
        assert got.shape == (m, 37)
        assert rel_err(got, want) <= 1e-6


@needs_kernels
def test_composes_lazily() -> None:
    w = mx.ones((4, 8), dtype=mx.bfloat16)
    x = mx.ones((1, 8))
    y = K.linear_dense(x, w)
    z = y + 1.0  # composes lazily with other ops
    mx.async_eval(z)
    assert z.tolist() == [[9.0] * 4]


@needs_kernels
def test_bad_arguments_raise() -> None:
    x = mx.ones((2, 64))
    w = mx.ones((3, 64), dtype=mx.bfloat16)
    with pytest.raises(ValueError, match="bfloat16"):
        K.linear_dense(x, w.astype(mx.float16))
    with pytest.raises(ValueError, match="K"):
        K.linear_dense(mx.ones((2, 65)), w)
    with pytest.raises(ValueError, match="bias"):
        K.linear_dense(x, w, mx.ones((4,)))
    wq, s, z = mx.quantize(mx.ones((3, 64)), group_size=64, bits=8)
    with pytest.raises(ValueError, match="bits"):
        K.linear_quantized(x, wq, s, z, group_size=64, bits=2)
    with pytest.raises(ValueError, match="group_size"):
        K.linear_quantized(x, wq, s, z, group_size=16, bits=8)
    with pytest.raises(ValueError, match="scales"):
        K.linear_quantized(x, wq, s[:, :0], z, group_size=64, bits=8)
    if mx.is_available(mx.gpu):
        with pytest.raises(ValueError, match="CPU only"):
            K.linear_dense(x, w, stream=mx.gpu)


@needs_kernels
def test_variant_selection() -> None:
    if not os.environ.get("COSYVOICE2_KERNELS_ISA"):
        assert K.isa() == K.available_isas()[0]  # the best one by default
    assert "portable" in K.available_isas()
    with pytest.raises(ValueError):
        K.set_isa("no-such-isa")
    assert K.BUILD_INFO["mlx_version"] == ".".join(mx.__version__.split("+")[0].split(".")[:3])


# ------------------------------------------------------------ decode-step ops


def _rand(rng: np.random.Generator, *shape: int) -> mx.array:
    return mx.array(rng.standard_normal(shape).astype(np.float32))


@needs_kernels
@pytest.mark.parametrize("shape", [(1, 1, 896), (2, 7, 33), (5, 1)])
def test_rms_norm_matches_mlx(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(len(shape))
    x, r, w = _rand(rng, *shape), _rand(rng, *shape), _rand(rng, shape[-1])
    (y,) = K.rms_norm(x, w, 1e-6)
    assert rel_err(y, mx.fast.rms_norm(x, w, 1e-6)) <= TOL
    h, y2 = K.rms_norm(x.astype(mx.bfloat16), w.astype(mx.bfloat16), 1e-5, r)
    xb = x.astype(mx.bfloat16).astype(mx.float32)
    wb = w.astype(mx.bfloat16).astype(mx.float32)
    assert mx.array_equal(h, xb + r)
    assert rel_err(y2, mx.fast.rms_norm(xb + r, wb, 1e-5)) <= TOL


def _heads(qkv: mx.array, hq: int, hkv: int) -> list[mx.array]:
    b, L, width = qkv.shape
    d = width // (hq + 2 * hkv)
    parts = mx.split(qkv, [hq * d, (hq + hkv) * d], axis=-1)
    return [p.reshape(b, L, -1, d).transpose(0, 2, 1, 3) for p in parts]


@needs_kernels
@pytest.mark.parametrize(
    ("b", "L", "hq", "hkv", "d", "dims", "offset"),
    [(1, 1, 14, 2, 64, 64, 300), (2, 5, 4, 2, 16, 16, 0), (1, 3, 2, 1, 24, 16, 7)],
)
def test_rope_split_matches_mlx(b, L, hq, hkv, d, dims, offset) -> None:
    rng = np.random.default_rng(d + L)
    qkv = _rand(rng, b, L, (hq + 2 * hkv) * d)
    base, scale = 1e6, 1.0 if offset else 0.5
    inv = kernel_layers._rope_inv_freq(dims, base)
    q, k, v = K.rope_split(qkv, inv, hq, hkv, dims, scale, offset)
    rq, rk, rv = _heads(qkv, hq, hkv)
    rope = {"traditional": False, "base": base, "scale": scale, "offset": offset}
    assert rel_err(q, mx.fast.rope(rq, dims, **rope)) <= TOL
    assert rel_err(k, mx.fast.rope(rk, dims, **rope)) <= TOL
    assert mx.array_equal(v, rv)


@needs_kernels
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    ("b", "L", "hq", "hkv", "T"), [(1, 1, 14, 2, 140), (2, 6, 4, 2, 9), (1, 4, 3, 3, 4)]
)
def test_attention_matches_mlx(b, L, hq, hkv, T, causal) -> None:
    rng = np.random.default_rng(T + L)
    d = 64
    q = _rand(rng, b, hq, L, d)
    # keys and values as the KV cache hands them over: slices of larger buffers
    kbuf, vbuf = _rand(rng, b, hkv, T + 20, d), _rand(rng, b, hkv, T + 20, d)
    k, v = kbuf[..., :T, :], vbuf[..., 3 : T + 3, :]
    y = K.attention(q, k, v, d**-0.5, causal)
    ref = mx.fast.scaled_dot_product_attention(
        q, k, v, scale=d**-0.5, mask="causal" if causal else None
    )
    assert y.shape == (b, L, hq * d)
    assert rel_err(y, ref.transpose(0, 2, 1, 3).reshape(b, L, -1)) <= TOL


@needs_kernels
def test_swiglu_matches_mlx() -> None:
    rng = np.random.default_rng(4)
    h = _rand(rng, 2, 3, 2 * 77) * 4
    assert rel_err(K.swiglu(h), nn.silu(h[..., :77]) * h[..., 77:]) <= TOL


@needs_kernels
def test_decode_ops_inside_compile() -> None:
    rng = np.random.default_rng(8)
    w, inv = _rand(rng, 48), kernel_layers._rope_inv_freq(16, 1e4)

    def layer(x, kc, vc):
        (n,) = K.rms_norm(x, w, 1e-6)
        q, k, v = K.rope_split(n, inv, 1, 1, 16, 1.0, 5)
        k = mx.concatenate([kc, k], axis=2)
        v = mx.concatenate([vc, v], axis=2)
        return K.swiglu(K.attention(q, k, v, 0.25, True) * 2.0)

    x, kc, vc = _rand(rng, 1, 2, 48), _rand(rng, 1, 1, 5, 16), _rand(rng, 1, 1, 5, 16)
    assert rel_err(mx.compile(layer)(x, kc, vc), layer(x, kc, vc)) <= 1e-6


def _kernel_block(precision: str, seed: int) -> kernel_layers.KernelBlock:
    """A Qwen2 decoder layer (biased q/k/v, grouped heads) swapped for a `KernelBlock`."""
    from cosyvoice2.lm_models import qwen2

    args = qwen2.ModelArgs(
        model_type="qwen2",
        hidden_size=64,
        num_hidden_layers=1,
        intermediate_size=96,
        num_attention_heads=4,
        rms_norm_eps=1e-6,
        vocab_size=10,
        num_key_value_heads=2,
        rope_theta=1e4,
        tie_word_embeddings=False,
    )
    mx.random.seed(seed)
    holder = nn.Module()
    holder.layers = [qwen2.TransformerBlock(args)]
    if precision == "bf16":
        holder.set_dtype(mx.bfloat16)
    elif precision in ("8bit", "4bit"):
        nn.quantize(holder, group_size=32, bits=int(precision[0]))
    assert kernel_layers.use_kernels(holder) == 1
    return holder.layers[0]


def _layer_by_ops(b: kernel_layers.KernelBlock, x: mx.array, causal: bool, cache) -> mx.array:
    """The layer as the single operations, one node each (what the fused pair replaces)."""
    (n,) = K.rms_norm(x, b.input_norm.weight, b.input_norm.eps)
    q, k, v = K.rope_split(
        b.qkv(n), b.inv_freq, b.n_heads, b.n_kv_heads, b.rope_dims, b.rope_scale, cache.offset
    )
    k, v = cache.update_and_fetch(k, v)
    o = K.attention(q, k, v, b.scale, causal)
    h, n = K.rms_norm(b.o_proj(o), b.post_norm.weight, b.post_norm.eps, x)
    return h + b.down_proj(K.swiglu(b.gate_up(n)))


@needs_kernels
@pytest.mark.parametrize("precision", ["fp32", "bf16", "8bit", "4bit"])
def test_fused_layer_is_its_operations(isa: str, precision: str) -> None:
    """`layer_input` and `layer_output` (a `KernelBlock`'s two nodes) give exactly what the
    single operations give, over a prompt (20 rows: the prefill path of the projections)
    and cached steps of 1 and 3 positions."""
    from cosyvoice2.lm_models import KVCache

    b = _kernel_block(precision, seed=3)
    rng = np.random.default_rng(5)
    fused, ops = KVCache(), KVCache()
    for length, causal in ((20, True), (1, False), (3, True)):
        x = _rand(rng, 1, length, 64)
        got = b(x, "causal" if causal else None, fused)
        want = _layer_by_ops(b, x, causal, ops)
        assert got.shape == want.shape == (1, length, 64)
        assert mx.array_equal(got, want), f"{precision}, {length} positions"


@needs_kernels
def test_fused_layer_refuses_bad_arguments() -> None:
    b = _kernel_block("8bit", seed=1)
    x = mx.zeros((1, 2, 64))
    w, spec = b.qkv.operands()
    args = (b.inv_freq, b.n_heads, b.n_kv_heads, b.rope_dims, b.rope_scale, 0)
    K.layer_input(x, b.input_norm.weight, 1e-6, w, spec, *args)  # as given: accepted
    bad = [
        (w, spec[:3]),  # specs: 4 ints a projection
        (w[:2], spec),  # the biases missing
        (w, [spec[0], 6, *spec[2:]]),  # no such bits
        (w, [spec[0], spec[1], 48, spec[3]]),  # no such group size
        ([w[0], w[1], w[2]], spec),  # has_bias, but no bias
    ]
    for weights, specs in bad:
        with pytest.raises(ValueError, match="layer_input"):
            K.layer_input(x, b.input_norm.weight, 1e-6, weights, specs, *args)
    with pytest.raises(ValueError, match="input width"):
        K.layer_input(mx.zeros((1, 2, 32)), mx.ones((32,)), 1e-6, w, spec, *args)
    q, k, v = K.layer_input(x, b.input_norm.weight, 1e-6, w, spec, *args)
    rest = [p.operands() for p in (b.o_proj, b.gate_up, b.down_proj)]
    weights = [a for arrays, _ in rest for a in arrays]
    specs = [i for _, spec in rest for i in spec]
    out = (b.post_norm.weight, 1e-6, weights, specs)
    K.layer_output(x, q, k, v, b.scale, True, *out)  # as given: accepted
    with pytest.raises(ValueError, match="layer_output"):
        K.layer_output(x, q, k, v, b.scale, True, b.post_norm.weight, 1e-6, weights[:-1], specs)
    with pytest.raises(ValueError, match="layer_output"):  # fewer keys than causal queries
        K.layer_output(x, q, k[:, :, :1], v[:, :, :1], b.scale, True, *out)
    with pytest.raises(ValueError, match="layer_output"):  # gate/up and down swapped
        swapped = [*rest[0][0], *rest[2][0], *rest[1][0]]
        K.layer_output(
            x,
            q,
            k,
            v,
            b.scale,
            True,
            b.post_norm.weight,
            1e-6,
            swapped,
            [*rest[0][1], *rest[2][1], *rest[1][1]],
        )


# ------------------------------------------------------------ kernel_layers swapping


def tiny_precision(base: Qwen2LM, precision: str) -> Qwen2LM:
    """A copy of `base` at a precision; `bf16-in-fp32`: float32 holding bf16-rounded weights."""
    model = Qwen2LM.from_weights(base.config, weights_of(base))
    if precision in ("bf16", "bf16-in-fp32"):
        cast(model, "bfloat16")
    elif precision in ("8bit", "4bit"):
        quantize(model, bits=int(precision[0]), group_size=64)
    if precision == "bf16-in-fp32":
        cast(model, "float32")
    return model


@needs_kernels
@pytest.mark.parametrize("precision", ["fp32", "bf16", "8bit", "4bit"])
def test_use_kernels_swaps_layers(precision: str) -> None:
    model = tiny_precision(random_tiny(0), precision)
    n = kernel_layers.use_kernels(model)
    layers = TINY.qwen.num_hidden_layers
    # the decoder layers, the final norm and llm_decoder (float32 outside bf16)
    assert n == layers + 2
    assert all(isinstance(layer, kernel_layers.KernelBlock) for layer in model.llm.layers)
    assert isinstance(model.llm.norm, kernel_layers.KernelRMSNorm)
    assert isinstance(model.llm_decoder, kernel_layers.KernelLinear)
    keys = dict(tree_flatten(model.parameters()))
    q = TINY.qwen
    qkv_rows = q.hidden_size + 2 * q.num_key_value_heads * (q.hidden_size // q.num_attention_heads)
    # float32 weights are kept only as panels of 16 columns, (ceil(N / 16), K, 16)
    if precision == "bf16":
        assert keys["llm_decoder.weight"].dtype == mx.bfloat16
    else:  # llm_decoder stays float32 in the quantized models
        assert "llm_decoder.weight" not in keys
        assert keys["llm_decoder.panels"].dtype == mx.float32
    assert model.llm_decoder.out_features == TINY.speech_token_size + 3
    if precision == "fp32":
        assert keys["llm.layers.0.qkv.panels"].shape == (-(-qkv_rows // 16), q.hidden_size, 16)
        assert keys["llm.layers.0.gate_up.panels"].shape[0] * 16 == 2 * q.intermediate_size
    else:
        assert keys["llm.layers.0.qkv.weight"].shape[0] == qkv_rows
        assert keys["llm.layers.0.gate_up.weight"].shape[0] == 2 * q.intermediate_size
    assert "llm.layers.0.self_attn.q_proj.weight" not in keys


def test_float16_models_are_left_alone() -> None:
    model = tiny_precision(random_tiny(0), "fp32")
    cast(model, "float16")
    assert kernel_layers.use_kernels(model) == 0
    assert isinstance(model.llm.layers[0].self_attn.q_proj, nn.Linear)


# ------------------------------------------------------------------ speech LM


def scaled_tiny(seed: int = 2) -> Qwen2LM:
    """`tests.test_llm.backbone_model`'s weights: a backbone that shapes the logits."""
    model = random_tiny(seed)

    def scale(path: str, p: mx.array) -> mx.array:
        if path.startswith("llm.layers.") and path.endswith(".weight") and "norm" not in path:
            return p / 0.02 * BACKBONE_SCALE / math.sqrt(p.shape[-1])
        return p

    model.update(tree_map_with_path(scale, model.parameters()))
    mx.eval(model.parameters())
    return model


def teacher_forced_logits(model: Qwen2LM, n_steps: int = 100) -> np.ndarray:
    """Logits of a prefill and `n_steps` cached steps on fixed speech tokens, (n_steps + 1, V)."""
    text, prompt_text, prompt_speech = inputs(12)
    steps = np.random.default_rng(12).integers(0, S, n_steps)
    cache = model.make_cache()
    x = model.prompt_input(text, prompt_text, prompt_speech)
    out = []
    for i in range(n_steps + 1):
        out.append(np.array(model.forward_one_step(x, cache)[0].astype(mx.float32)))
        if i < n_steps:
            x = model.speech_embedding(mx.array([[int(steps[i])]]))
    return np.stack(out)


def greedy_tokens(model: Qwen2LM) -> list[int]:
    """120 greedy tokens (6 text tokens x max ratio 20; no stop token)."""
    text, prompt_text, prompt_speech = inputs(13, n_text=6)
    return list(model.inference(text, prompt_text, prompt_speech, sampling=NoStopGreedy()))


def logits_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.fixture(scope="module")
def synthetic_tiny(request) -> Qwen2LM:
    """The speech LM of the tiny synthetic official dir (fixture `tiny_pt_dir`)."""
    from cosyvoice2.checkpoint import load_torch_checkpoint
    from cosyvoice2.config import config_from_official_dir

    tiny_pt_dir: Path = request.getfixturevalue("tiny_pt_dir")
    config = config_from_official_dir(tiny_pt_dir).llm
    weights = Qwen2LM.sanitize(load_torch_checkpoint(tiny_pt_dir / "llm.pt"))
    return Qwen2LM.from_weights(config, weights)


@pytest.fixture(scope="module", params=["synthetic", "scaled"])
def tiny_base(request) -> Qwen2LM:
    if request.param == "synthetic":
        return request.getfixturevalue("synthetic_tiny")
    return scaled_tiny()


# The unswapped model computing the same function: bf16 with kernels is the float32
# model with bf16-rounded weights (activations stay float32 on the kernel path).
REFERENCE = {"fp32": "fp32", "bf16": "bf16-in-fp32", "8bit": "8bit", "4bit": "4bit"}


@needs_kernels
@pytest.mark.parametrize("precision", list(REFERENCE))
def test_llm_with_and_without_kernels(tiny_base: Qwen2LM, precision: str, capsys) -> None:
    """Kernels against MLX's own model at the same precision: logits, 120 greedy tokens."""
    model = tiny_precision(tiny_base, precision)
    assert kernel_layers.use_kernels(model) > 0
    reference = tiny_precision(tiny_base, REFERENCE[precision])
    with_k, without = teacher_forced_logits(model), teacher_forced_logits(reference)
    tokens_k, tokens = greedy_tokens(model), greedy_tokens(reference)
    err = logits_rel(with_k, without)
    same = first_difference(tokens_k, tokens)
    with capsys.disabled():
        print(
            f"\n[kernels] {precision}: logits rel err {err:.2e}, tokens equal {same}/{len(tokens)}"
        )
    assert err <= TOL, f"{precision}: logits relative error {err:.2e}"
    assert len(tokens) == 120 and tokens_k == tokens, f"tokens differ from step {same}"


@needs_kernels
@pytest.mark.parametrize("precision", ["bf16", "8bit"])
def test_swapped_model_on_mlx_ops(precision: str) -> None:
    """A swapped model on a backend without the kernels (as on a GPU) computes the same logits."""
    base = scaled_tiny()
    model = tiny_precision(base, precision)
    kernel_layers.use_kernels(model)
    reference = teacher_forced_logits(tiny_precision(base, REFERENCE[precision]), 20)
    with backend.active(backend.choose("composed")):
        err = logits_rel(teacher_forced_logits(model, 20), reference)
    assert err <= TOL, f"{precision}: logits relative error {err:.2e} on MLX's ops"


@needs_kernels
def test_bf16_kernels_closer_to_fp32_than_mlx_bf16(capsys) -> None:
    """MLX's bf16 path rounds activations to bf16; the kernels keep them in fp32.

    Also the power check of the tolerance above: the bf16 rounding of activations
    moves the logits far more than TOL, so a kernel that rounded them would fail.
    """
    base = scaled_tiny()
    fp32 = teacher_forced_logits(base, 20)
    mlx_bf16 = teacher_forced_logits(tiny_precision(base, "bf16"), 20)
    kernel = tiny_precision(base, "bf16")
    kernel_layers.use_kernels(kernel)
    k_bf16 = teacher_forced_logits(kernel, 20)
    d_mlx, d_k = logits_rel(mlx_bf16, fp32), logits_rel(k_bf16, fp32)
    with capsys.disabled():
        print(f"\n[kernels] bf16 vs fp32 logits: kernels {d_k:.2e}, MLX bf16 {d_mlx:.2e}")
    assert logits_rel(k_bf16, mlx_bf16) > 10 * TOL
    assert d_k < d_mlx


# ------------------------------------------------------------ without kernels


def test_absent_extension_changes_nothing(monkeypatch) -> None:
    """With the extension missing, nothing is swapped and the model runs on MLX's ops."""
    monkeypatch.setitem(sys.modules, "cosyvoice2_kernels", None)  # import raises
    monkeypatch.setattr(backend, "_extension", None)
    monkeypatch.setattr(backend, "_tried_extension", False)
    assert backend.load_extension() is None
    chosen = backend.choose()
    assert chosen.extension is None and chosen.describe() == "off" and chosen.route == "plain"
    model = tiny_precision(random_tiny(0), "bf16")
    assert kernel_layers.use_kernels(model, chosen) == 0
    assert isinstance(model.llm.layers[0].self_attn.q_proj, nn.Linear)
    assert len(greedy_tokens(model)) == 120


def test_environment_switch_disables(monkeypatch) -> None:
    monkeypatch.setenv("COSYVOICE2_KERNELS", "0")
    assert backend.load_extension() is None
    chosen = backend.choose()
    assert chosen.extension is None
    model = tiny_precision(random_tiny(0), "8bit")
    assert kernel_layers.use_kernels(model, chosen) == 0
    assert isinstance(model.llm.layers[0].mlp.gate_proj, nn.QuantizedLinear)


@needs_kernels
def test_swapped_layers_fall_back_without_the_module(monkeypatch) -> None:
    """Where the kernels cannot run (a backend without them), swapped layers use MLX's ops."""
    model = tiny_precision(random_tiny(0), "8bit")
    kernel_layers.use_kernels(model)
    want = teacher_forced_logits(model, 3)
    with backend.active(backend.choose("plain")):
        assert logits_rel(teacher_forced_logits(model, 3), want) <= TOL


# ------------------------------------------------------------ model loading


def test_load_selects_kernels_by_precision(mlx_tiny_dir: Path) -> None:
    """`CosyVoice2.load(llm_kernels=...)`: kernel layers when installed, MLX's own with "off"."""
    from cosyvoice2.model import CosyVoice2

    off = CosyVoice2.load(mlx_tiny_dir, llm_bits=8, llm_kernels="off")
    assert off.meta["llm_kernels"] == "off"
    assert isinstance(off.llm.llm.layers[0].mlp.down_proj, nn.QuantizedLinear)
    for kwargs in ({}, {"llm_dtype": "bfloat16"}, {"llm_bits": 8}):
        auto = CosyVoice2.load(mlx_tiny_dir, **kwargs)
        layer = auto.llm.llm.layers[0]
        if K is None:
            assert auto.meta["llm_kernels"] == "off" and not isinstance(
                layer, kernel_layers.KernelBlock
            )
        else:
            assert auto.meta["llm_kernels"] == auto.backend.describe() != "off"
            assert isinstance(layer, kernel_layers.KernelBlock)
    with pytest.raises(ValueError, match="llm_kernels"):
        CosyVoice2.load(mlx_tiny_dir, llm_kernels="on")


# ------------------------------------------------------------------ full size


@pytest.mark.full
@needs_kernels
@pytest.mark.parametrize("precision", ["bf16", "8bit"])
def test_full_size_llm_with_and_without_kernels(precision: str, capsys) -> None:
    """The 0.5B-shape speech LM (synthetic weights): kernels against MLX's model, 20 steps."""
    from cosyvoice2.checkpoint import load_torch_checkpoint
    from cosyvoice2.config import config_from_official_dir
    from cosyvoice2_testing.synthetic import cached_official_dir

    official = cached_official_dir("full", onnx=False)
    config = config_from_official_dir(official).llm
    base = Qwen2LM.from_weights(
        config, Qwen2LM.sanitize(load_torch_checkpoint(official / "llm.pt"))
    )
    reference = teacher_forced_logits(tiny_precision(base, REFERENCE[precision]), 20)
    model = tiny_precision(base, precision)
    del base
    assert kernel_layers.use_kernels(model) > 0
    err = logits_rel(teacher_forced_logits(model, 20), reference)
    with capsys.disabled():
        print(f"\n[kernels] full size {precision}: logits rel err {err:.2e}")
    assert err <= TOL, f"{precision}: logits relative error {err:.2e}"
