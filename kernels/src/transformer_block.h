// The flow estimator's transformer block (Matcha's BasicTransformerBlock as CosyVoice2
// uses it) for new positions over cached key/value blocks, as one MLX operation.
#pragma once

#include <vector>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace cv2k {

namespace mx = mlx::core;

// x (1, M, C) -> y (1, M, C):
//   h = LayerNorm1(x); qkv = h Wqkv^T (scaled queries | keys | values, `inner` each);
//   a = block_attention(qkv, blocks, heads, chunk); x1 = x + a Wo^T + bo;
//   y = x1 + GELU(LayerNorm3(x1) W1^T + b1) W2^T + b2.
// params: [ln1_w, ln1_b, pack_panels(Wqkv), pack_panels(Wo), bo, ln3_w, ln3_b,
//          pack_panels(W1), b1, pack_panels(W2), b2]; W1 has `ff` rows. Each panel
// array may be bf16 pair panels (pack_panels(W, bf16=True)): that product then rounds
// its input to bf16; bf16 q/k/v panels also make the attention's products bf16
// (block_attention's bf16).
// Returns [y], or [y, kv] with kv (1, keep, 2 * inner) the keys and values of the first
// `keep` new positions (what a streaming cache commits).
std::vector<mx::array> transformer_block(
    const mx::array& x,
    const std::vector<mx::array>& params,
    const std::vector<mx::array>& blocks,
    int heads,
    int inner,
    int ff,
    int chunk,
    float eps1,
    float eps3,
    int keep,
    bool parallel,
    mx::StreamOrDevice s = {});

class TransformerBlockPrimitive : public mx::Primitive {
 public:
  struct Attrs {
    int heads, inner, ff, chunk, keep, n_blocks;
    float eps1, eps3;
    bool parallel;
    bool operator==(const Attrs&) const = default;
  };

  TransformerBlockPrimitive(mx::Stream stream, Attrs a) : mx::Primitive(stream), a_(a) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;

  const char* name() const override { return "CosyVoice2TransformerBlock"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  Attrs a_;
};

}  // namespace cv2k
