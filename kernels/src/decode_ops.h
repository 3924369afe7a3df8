// The small operations of a transformer decode step as single MLX primitives (CPU).
//
// On the CPU, MLX builds mx.fast.rms_norm, mx.fast.rope and
// mx.fast.scaled_dot_product_attention from its basic ops (about 7, 20 and 10 graph
// nodes), a fixed cost per call that weighs at decode shapes; one decode step of
// a 24-layer model has about 120 of them. Each operation here is one node.
// All compute in float32 and return float32.
#pragma once

#include <optional>
#include <vector>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace cv2k {

namespace mx = mlx::core;

// x * rsqrt(mean(x^2, -1) + eps) * w over the last axis; with `residual`, first
// h = x + residual and returns {h, rms_norm(h)}, else {rms_norm(x)}.
std::vector<mx::array> rms_norm(
    const mx::array& x,
    const mx::array& w,
    float eps,
    const std::optional<mx::array>& residual,
    mx::StreamOrDevice s = {});

// Splits a fused projection (B, L, (Hq + 2 Hkv) * D) into q (B, Hq, L, D), k and v
// (B, Hkv, L, D), applying rotary embeddings (non-traditional: rotating halves of the
// first `dims` features) to q and k at positions offset + [0, L):
// theta_i = (offset + t) * scale * inv_freq[i], inv_freq (dims / 2,) float32.
std::vector<mx::array> rope_split(
    const mx::array& qkv,
    const mx::array& inv_freq,
    int n_heads,
    int n_kv_heads,
    int dims,
    float scale,
    int offset,
    mx::StreamOrDevice s = {});

// softmax(scale * q k^T) v with grouped heads: q (B, Hq, L, D), k and v (B, Hkv, T, D),
// Hq a multiple of Hkv. `causal`: query l sees keys [0, T - L + l] (the queries are
// the last L positions). Returns (B, L, Hq * D), ready for the output projection.
mx::array attention(
    const mx::array& q,
    const mx::array& k,
    const mx::array& v,
    float scale,
    bool causal,
    mx::StreamOrDevice s = {});

// silu(h[..., :F]) * h[..., F:] for h (..., 2F): the fused gate/up projection's output.
mx::array swiglu(const mx::array& h, mx::StreamOrDevice s = {});

}  // namespace cv2k
