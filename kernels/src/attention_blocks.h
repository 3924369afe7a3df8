// Chunk-masked self-attention of new positions over cached key/value blocks (the flow
// estimator's streaming cache), one MLX operation.
#pragma once

#include <vector>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace cv2k {

namespace mx = mlx::core;

// qkv (1, M, 3 * H * D): the M new positions' queries (already scaled), keys and values,
// each H heads of D. blocks: (1, n_i, 2 * H * D), keys then values of the q0 = sum n_i
// earlier positions, in order. New position r (absolute q0 + r) attends to the keys
// j < min(T, (floor((q0 + r) / chunk) + 1) * chunk) of all T = q0 + M positions (chunk
// 0: all of them). Returns (1, M, H * D) float32, head h in columns h * D ... h * D + D - 1.
// bf16: queries, keys, values and the softmax's weights rounded to bf16 for the two
// products (exact products, fp32 sums; the softmax in fp32).
mx::array block_attention(
    const mx::array& qkv,
    const std::vector<mx::array>& blocks,
    int heads,
    int chunk,
    bool parallel,
    bool bf16 = false,
    mx::StreamOrDevice s = {});

class BlockAttentionPrimitive : public mx::UnaryPrimitive {
 public:
  BlockAttentionPrimitive(mx::Stream stream, int heads, int chunk, bool parallel, bool bf16)
      : mx::UnaryPrimitive(stream), heads_(heads), chunk_(chunk), parallel_(parallel), bf16_(bf16) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override { return "CosyVoice2BlockAttention"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  int heads_;
  int chunk_;
  bool parallel_;
  bool bf16_;
};

}  // namespace cv2k
