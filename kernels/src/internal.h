// Building blocks shared by the operations (baseline flags; each runs on the calling
// thread, or splits its work over the kernels' pool when `parallel`).
#pragma once

#include <cstdint>
#include <vector>

#include "kernels.h"

namespace cv2k {

// y (+)= x W^T (+ bias), W as panels (kernels.h), split by panels.
void run_panels(const PanelArgs& a, bool parallel);

// The inputs of block attention (attention_blocks.h), raw.
struct AttentionProblem {
  const float* qkv;                  // M x 3HD: scaled queries | keys | values
  std::vector<const float*> blocks;  // n_i x 2HD each: keys | values
  std::vector<int64_t> lengths;      // n_i
  float* out;                        // M x HD
  int64_t M, H, D, q0, chunk;
};

// Split by heads.
void run_attention(const AttentionProblem& p, bool parallel);

// LayerNorm (+ Mish) and GELU over `rows` rows of C, split by rows.
void run_layer_norm(const float* x, const float* w, const float* b, float eps, bool mish, float* y,
                    int64_t C, int64_t rows, bool parallel);
void run_gelu(const float* x, const float* bias, float* y, int64_t C, int64_t rows, bool parallel);

}  // namespace cv2k
