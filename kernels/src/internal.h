// Building blocks shared by the operations (baseline flags; each runs on the calling
// thread, or splits its work over the kernels' pool when `parallel`).
#pragma once

#include <cstdint>
#include <vector>

#include "kernels.h"
#include "mlx/array.h"

namespace cv2k {

// y (+)= x W^T (+ bias), W as panels (kernels.h), split by panels.
void run_panels(const PanelArgs& a, bool parallel);

// Pairs of k of a bf16 pair panel for K columns: K padded to a multiple of 32.
inline int64_t bf16_kpairs(int64_t K) { return (K + 31) / 32 * 16; }

// The same with W as fp32 panels or (bf16) bf16 pair panels (kernels.h), x (M x K, row
// stride ldx) then rounded to bf16.
void run_any_panels(const float* x, int64_t ldx, const void* wp, bool bf16, const float* bias,
                    float* y, int64_t ldy, int64_t M, int64_t K, int64_t N, bool accumulate,
                    bool parallel);

// The inputs of block attention (attention_blocks.h), raw.
struct AttentionProblem {
  const float* qkv;                  // M x 3HD: scaled queries | keys | values
  std::vector<const float*> blocks;  // n_i x 2HD each: keys | values
  std::vector<const uint16_t*> blocks16;  // the same as bf16 (bf16 only; blocks then empty)
  std::vector<int64_t> lengths;      // n_i
  float* out;                        // M x HD
  int64_t M, H, D, q0, chunk;
  bool bf16 = false;                 // the products in bf16 (block_attention)
};

// f rounded to bf16 (to nearest even; NaN stays NaN), its bit pattern.
inline uint16_t round_bf16(float f) {
  uint32_t b;
  __builtin_memcpy(&b, &f, sizeof b);
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  return static_cast<uint16_t>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

// The bf16 bit pattern `h` as the float it stands for (exact). (The kernel files built
// with wider instruction sets keep their own copy: kernels.h says why.)
inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  __builtin_memcpy(&f, &bits, sizeof f);
  return f;
}

// Split by heads.
void run_attention(const AttentionProblem& p, bool parallel);

// The buffer bf16_pairs (kernels.h) fills with M rows of K values: kpairs pairs a row and
// rows up to a multiple of 16 (AMX tiles read whole tiles), zero where bf16_pairs writes
// nothing (the pairs from K / 2 on, the rows from M on).
inline uint32_t* pairs_buffer(std::vector<uint32_t>& buf, int64_t M, int64_t K, int64_t kpairs) {
  const int64_t rows = (M + 15) / 16 * 16;
  buf.resize(static_cast<size_t>(rows * kpairs));
  uint32_t* b = buf.data();
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t j = K / 2; j < kpairs; ++j) b[m * kpairs + j] = 0u;
  }
  for (int64_t i = M * kpairs; i < rows * kpairs; ++i) b[i] = 0u;
  return b;
}

// Block inputs of an attention operation: as they are where all are bf16 and the products
// are bf16 (`bf16`), else converted to fp32.
void push_blocks(std::vector<mlx::core::array>& inputs, const std::vector<mlx::core::array>& blocks,
                 bool bf16, mlx::core::Stream stream);
// Appends a block of `length` positions (bf16: uint16 data) to p, q0 included.
void add_block(AttentionProblem& p, const void* data, int64_t length, bool bf16);

// LayerNorm (+ Mish) and GELU over `rows` rows of C, split by rows.
void run_layer_norm(const float* x, const float* w, const float* b, float eps, bool mish, float* y,
                    int64_t C, int64_t rows, bool parallel);
void run_gelu(const float* x, const float* bias, float* y, int64_t C, int64_t rows, bool parallel);

// y = x W^T (+ bias) for M rows of x (M x K, row-major) into y (M x N), the pool
// splitting the columns: W bf16 (N x K), or MLX's affine 8-/4-bit layout (w bytes,
// scales and zeros fp32 or bf16 per group), as linear_dense and linear_quantized compute it.
void compute_bf16(const float* x, const uint16_t* w, const float* bias, float* y, int64_t M,
                  int64_t K, int64_t N);
void compute_quantized(const float* x, const uint8_t* w, const void* scales, const void* zeros,
                       bool scale_bf16, const float* bias, float* y, int64_t M, int64_t K,
                       int64_t N, int group_size, int bits);

// The loops of the decode-step operations (decode_ops.h), on the calling thread:
// rms_norm (h = x + residual first where residual is given; h is then written),
// rope_split of (B, L, (hq + 2 hkv) * D) rows, swiglu of rows of 2f.
void rms_norm_rows(const float* x, const float* residual, const float* w, float eps, float* h,
                   float* y, int64_t d, int64_t rows);
void rope_split_rows(const float* x, const float* inv_freq, float* q, float* k, float* v,
                     int64_t B, int64_t L, int64_t D, int hq, int hkv, int dims, float scale,
                     int64_t offset);
void swiglu_rows(const float* h, float* y, int64_t f, int64_t rows);

// softmax(scale * q k^T) v with grouped heads (decode_ops.h's attention), split by
// (batch, head, query) over the pool when large enough.
struct DecodeAttention {
  const float* q;  // (B, Hq, L, D) contiguous
  const float* k;  // strided (B, Hkv, T, D), unit stride in D
  const float* v;
  int64_t ks[3], vs[3];  // element strides of k and v over B, H, T
  float* y;              // (B, L, Hq * D)
  int64_t B, Hq, Hkv, L, T, D;
  float scale;
  bool causal;
};
void run_decode_attention(const DecodeAttention& a);
// In a task: the attention of the views q (B, Hq, L, D), k and v (B, Hkv, T, D) (common.h)
// without its output: q densified into qd; k and v read in place where unit-stride over D
// (the KV cache's slices), else densified into kd and vd.
struct Strided;
struct Dense;
DecodeAttention decode_attention_job(const Strided& q, const Strided& k, const Strided& v,
                                     float scale, bool causal, Dense& qd, Dense& kd, Dense& vd);

}  // namespace cv2k
