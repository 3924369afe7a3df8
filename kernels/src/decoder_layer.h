// A Qwen2 decoder layer (the speech LM's) as two MLX operations, either side of the KV
// cache update: one node each where the unfused layer has about a dozen (norms, the four
// projections, rotary embeddings, attention, SwiGLU, residuals), for the fixed cost per
// node and per Python call that weighs at decode shapes. The same functions as those
// operations (decode_ops.h, linear.h), in the same order: the results are theirs.
#pragma once

#include <vector>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace cv2k {

namespace mx = mlx::core;

// Each projection is given as its arrays in `weights`, one after the other, described by
// four ints in `specs` (n, bits, group_size, has_bias):
//   bits 32: [pack_panels(W)] (float32 panels of W's n rows), as linear_panels reads them;
//   bits 16: [W (n, K) bfloat16], as linear_dense;
//   bits 8 or 4: [w, scales, biases] in mx.quantize's affine layout, as linear_quantized;
// then the bias (n,) where has_bias.

// x (B, L, C) -> [q (B, Hq, L, D), k, v (B, Hkv, L, D)]: rms_norm(x) * norm_w, the fused
// q/k/v projection (one spec), rope_split at positions offset + [0, L).
std::vector<mx::array> layer_input(
    const mx::array& x,
    const mx::array& norm_w,
    float eps,
    const std::vector<mx::array>& weights,
    const std::vector<int>& specs,
    const mx::array& inv_freq,
    int n_heads,
    int n_kv_heads,
    int dims,
    float rope_scale,
    int offset,
    mx::StreamOrDevice s = {});

// x (B, L, C), q (B, Hq, L, D), k and v (B, Hkv, T, D) (the cache's keys and values, new
// positions included) -> y (B, L, C): h = x + attention(q, k, v) Wo^T, then
// y = h + swiglu(rms_norm(h) * norm_w Wgu^T) Wd^T. Specs: o_proj, the fused gate/up
// projection, down_proj.
mx::array layer_output(
    const mx::array& x,
    const mx::array& q,
    const mx::array& k,
    const mx::array& v,
    float attn_scale,
    bool causal,
    const mx::array& norm_w,
    float eps,
    const std::vector<mx::array>& weights,
    const std::vector<int>& specs,
    mx::StreamOrDevice s = {});

}  // namespace cv2k
