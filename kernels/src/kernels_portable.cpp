// Portable C++ kernels: any CPU, baseline compiler flags. Written so that compilers
// can vectorise the inner loops for the baseline instruction set (8 partial sums per
// dot product, weights converted to fp32 in short chunks reused across rows).
#include <cmath>
#include <cstdint>

#include "internal.h"  // baseline flags here, as in every file that includes it
#include "kernels.h"

namespace cv2k {
namespace {

constexpr int kRowBlock = 8;   // rows of x sharing one converted weight chunk
constexpr int kChunk = 256;    // weights converted to fp32 at a time
constexpr int kLanes = 8;      // partial sums per dot product

// acc[m][j] += x[m][k0 + k] * wf[k] over k < kn, lanes j = k % kLanes (kn multiple of kLanes,
// the remainder added to lane 0).
inline void accumulate(float (*acc)[kLanes], const float* x, int64_t ldx, int64_t mb,
                       int64_t k0, const float* wf, int64_t kn) {
  int64_t kv = kn - kn % kLanes;
  for (int64_t m = 0; m < mb; ++m) {
    const float* xr = x + m * ldx + k0;
    float* a = acc[m];
    for (int64_t k = 0; k < kv; k += kLanes) {
      for (int j = 0; j < kLanes; ++j) a[j] += xr[k + j] * wf[k + j];
    }
    for (int64_t k = kv; k < kn; ++k) a[0] += xr[k] * wf[k];
  }
}

inline float lane_sum(const float* a) {
  float s = 0.0f;
  for (int j = 0; j < kLanes; ++j) s += a[j];
  return s;
}

void bf16_cols(const Bf16Args& p, int64_t n0, int64_t n1) {
  float wf[kChunk];
  for (int64_t mb0 = 0; mb0 < p.M; mb0 += kRowBlock) {
    int64_t mb = p.M - mb0 < kRowBlock ? p.M - mb0 : kRowBlock;
    const float* x = p.x + mb0 * p.K;
    for (int64_t n = n0; n < n1; ++n) {
      float acc[kRowBlock][kLanes] = {};
      const uint16_t* wr = p.w + n * p.K;
      for (int64_t k0 = 0; k0 < p.K; k0 += kChunk) {
        int64_t kn = p.K - k0 < kChunk ? p.K - k0 : kChunk;
        for (int64_t k = 0; k < kn; ++k) wf[k] = bf16_to_float(wr[k0 + k]);
        accumulate(acc, x, p.K, mb, k0, wf, kn);
      }
      float b = p.bias ? p.bias[n] : 0.0f;
      for (int64_t m = 0; m < mb; ++m) p.y[(mb0 + m) * p.N + n] = lane_sum(acc[m]) + b;
    }
  }
}

void f32_cols(const F32Args& p, int64_t n0, int64_t n1) {
  for (int64_t mb0 = 0; mb0 < p.M; mb0 += kRowBlock) {
    int64_t mb = p.M - mb0 < kRowBlock ? p.M - mb0 : kRowBlock;
    const float* x = p.x + mb0 * p.K;
    for (int64_t n = n0; n < n1; ++n) {
      float acc[kRowBlock][kLanes] = {};
      accumulate(acc, x, p.K, mb, 0, p.w + n * p.K, p.K);
      float b = p.bias ? p.bias[n] : 0.0f;
      for (int64_t m = 0; m < mb; ++m) p.y[(mb0 + m) * p.N + n] = lane_sum(acc[m]) + b;
    }
  }
}

inline float scale_at(const void* s, bool is_bf16, int64_t i) {
  return is_bf16 ? bf16_to_float(static_cast<const uint16_t*>(s)[i])
                 : static_cast<const float*>(s)[i];
}

void q_cols(const QArgs& p, int64_t n0, int64_t n1) {
  const int64_t gs = p.group_size;  // <= 128 = kChunk / 2
  const int64_t ng = p.K / gs;
  float wf[kChunk];
  for (int64_t mb0 = 0; mb0 < p.M; mb0 += kRowBlock) {
    int64_t mb = p.M - mb0 < kRowBlock ? p.M - mb0 : kRowBlock;
    const float* x = p.x + mb0 * p.K;
    for (int64_t n = n0; n < n1; ++n) {
      float out[kRowBlock] = {};
      const uint8_t* wr = p.w + n * p.K * p.bits / 8;
      for (int64_t g = 0; g < ng; ++g) {
        // y += scale * (x . q) + zero * sum(x) over the group
        if (p.bits == 8) {
          for (int64_t k = 0; k < gs; ++k) wf[k] = static_cast<float>(wr[g * gs + k]);
        } else {
          const uint8_t* b = wr + g * gs / 2;
          for (int64_t k = 0; k < gs; k += 2) {
            wf[k] = static_cast<float>(b[k / 2] & 0x0F);
            wf[k + 1] = static_cast<float>(b[k / 2] >> 4);
          }
        }
        float dot[kRowBlock][kLanes] = {};
        accumulate(dot, x, p.K, mb, g * gs, wf, gs);
        const float s = scale_at(p.scales, p.scale_bf16, n * ng + g);
        const float z = scale_at(p.zeros, p.scale_bf16, n * ng + g);
        for (int64_t m = 0; m < mb; ++m) {
          out[m] += s * lane_sum(dot[m]) + z * p.xsum[(mb0 + m) * ng + g];
        }
      }
      const float b = p.bias ? p.bias[n] : 0.0f;
      for (int64_t m = 0; m < mb; ++m) p.y[(mb0 + m) * p.N + n] = out[m] + b;
    }
  }
}

// Rows of W as fp32 (kernels.h), in order (this variant permutes nothing).
void bf16_rows(const uint16_t* w, int64_t K, int64_t n0, int64_t n1, float* out) {
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t k = 0; k < K; ++k) out[(n - n0) * K + k] = bf16_to_float(w[n * K + k]);
  }
}

void q_rows(const QArgs& p, int64_t n0, int64_t n1, float* out) {
  const int64_t K = p.K, gs = p.group_size, ng = K / gs;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = p.w + n * K * p.bits / 8;
    float* o = out + (n - n0) * K;
    for (int64_t k = 0; k < K; ++k) {
      const int q = p.bits == 8 ? wr[k] : (k % 2 ? wr[k / 2] >> 4 : wr[k / 2] & 0x0F);
      const int64_t g = n * ng + k / gs;
      o[k] = std::fma(scale_at(p.scales, p.scale_bf16, g), static_cast<float>(q),
                      scale_at(p.zeros, p.scale_bf16, g));
    }
  }
}

// Panel layout (kernels.h): per row of x and panel, 16 sums updated in order of k,
// which the compiler vectorises over the panel's columns.
void panel_cols(const PanelArgs& p, int64_t p0, int64_t p1) {
  constexpr int W = kPanelWidth;
  for (int64_t panel = p0; panel < p1; ++panel) {
    const float* w = p.wp + panel * p.K * W;
    const int64_t n0 = panel * W;
    const int64_t cols = p.N - n0 < W ? p.N - n0 : W;
    for (int64_t m = 0; m < p.M; ++m) {
      const float* x = p.x + m * p.ldx;
      float acc[W] = {};
      for (int64_t k = 0; k < p.K; ++k) {
        const float a = x[k];
        for (int c = 0; c < W; ++c) acc[c] += a * w[k * W + c];
      }
      for (int64_t c = 0; c < cols; ++c) {
        float base = p.accumulate ? p.y[m * p.ldy + n0 + c] : 0.0f;
        p.y[m * p.ldy + n0 + c] = base + acc[c] + (p.bias ? p.bias[n0 + c] : 0.0f);
      }
    }
  }
}

// bf16 pair panels (kernels.h): per row and panel, 16 sums updated pair by pair.
void panel_bf16_cols(const PanelBf16Args& p, int64_t p0, int64_t p1) {
  constexpr int W = kPanelWidth;
  for (int64_t panel = p0; panel < p1; ++panel) {
    const uint16_t* w = p.wp + panel * p.kpairs * 2 * W;
    const int64_t n0 = panel * W;
    const int64_t cols = p.N - n0 < W ? p.N - n0 : W;
    for (int64_t m = 0; m < p.M; ++m) {
      const uint32_t* x = p.x + m * p.kpairs;
      float acc[W] = {};
      for (int64_t j = 0; j < p.kpairs; ++j) {
        const float xe = bf16_to_float(static_cast<uint16_t>(x[j]));
        const float xo = bf16_to_float(static_cast<uint16_t>(x[j] >> 16));
        for (int c = 0; c < W; ++c) {
          acc[c] += xe * bf16_to_float(w[j * 2 * W + 2 * c]) + xo * bf16_to_float(w[j * 2 * W + 2 * c + 1]);
        }
      }
      for (int64_t c = 0; c < cols; ++c) {
        float base = p.accumulate ? p.y[m * p.ldy + n0 + c] : 0.0f;
        p.y[m * p.ldy + n0 + c] = base + acc[c] + (p.bias ? p.bias[n0 + c] : 0.0f);
      }
    }
  }
}

void softmax_rows(float* s, int64_t rows, int64_t ld, const int64_t* visible, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = s + r * ld;
    const int64_t n = visible[r];
    float m = row[0];
    for (int64_t k = 1; k < n; ++k) m = row[k] > m ? row[k] : m;
    float total = 0.0f;
    for (int64_t k = 0; k < n; ++k) {
      row[k] = std::exp(row[k] - m);
      total += row[k];
    }
    for (int64_t k = 0; k < n; ++k) row[k] /= total;
    for (int64_t k = n; k < cols; ++k) row[k] = 0.0f;
  }
}

void layer_norm_rows(const float* x, const float* w, const float* b, float eps, bool mish,
                     float* y, int64_t C, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * C;
    float* yr = y + r * C;
    float mean = 0.0f, var = 0.0f;
    for (int64_t c = 0; c < C; ++c) mean += xr[c];
    mean /= static_cast<float>(C);
    for (int64_t c = 0; c < C; ++c) var += (xr[c] - mean) * (xr[c] - mean);
    const float inv = 1.0f / std::sqrt(var / static_cast<float>(C) + eps);
    for (int64_t c = 0; c < C; ++c) {
      float v = (xr[c] - mean) * inv * w[c] + b[c];
      yr[c] = mish ? (v >= 20.0f ? v : v * std::tanh(std::log1p(std::exp(v)))) : v;
    }
  }
}

void gelu_rows(const float* x, const float* bias, float* y, int64_t C, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t c = 0; c < C; ++c) {
      float v = x[r * C + c] + (bias ? bias[c] : 0.0f);
      y[r * C + c] = 0.5f * v * (1.0f + std::erf(v * 0.7071067811865476f));
    }
  }
}

void snake_row(const float* x, const float* alpha, const float* inv_alpha, float* y, int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    const float v = x[c] * alpha[c];
    const float k = (v * kSnakeInvPi + kSnakeRound) - kSnakeRound;
    const float r = (v - k * kSnakePiHi) - k * kSnakePiLo;
    const float u = r * r;
    float p = kSnakeSin[3] * u;
    p = (kSnakeSin[2] + p) * u;
    p = (kSnakeSin[1] + p) * u;
    p = (kSnakeSin[0] + p) * u;
    const float s = r * (1.0f + p);
    y[c] = x[c] + (s * s) * inv_alpha[c];
  }
}

const KernelTable kTable = {"portable", 0,          bf16_cols,    f32_cols,        q_cols,    q_cols,
                            bf16_rows,  q_rows,     panel_cols,   panel_bf16_cols, bf16_pairs_scalar,
                            softmax_rows,    layer_norm_rows, gelu_rows,
                            snake_row,  bf16_kv_scalar};

}  // namespace

const KernelTable* portable_table() { return &kTable; }

// x rounded to bf16 pairs (kernels.h), element by element.
void bf16_pairs_scalar(const float* x, int64_t ldx, int64_t K, int64_t kpairs, int64_t m0,
                       int64_t m1, uint32_t* out) {
  for (int64_t m = m0; m < m1; ++m) {
    uint16_t* d = reinterpret_cast<uint16_t*>(out + m * kpairs);
    for (int64_t k = 0; k < K; ++k) d[k] = round_bf16(x[m * ldx + k]);
  }
}

void bf16_kv_scalar(const float* const* k, const float* const* v, int64_t n, int64_t D,
                    int64_t dpairs, int64_t npairs, uint16_t* kp, uint16_t* vp) {
  constexpr int64_t W = kPanelWidth;
  for (int64_t j = 0; j < n; ++j) {  // key j: column j of the scores; value j: row pair j / 2
    uint16_t* kcol = kp + (j / W) * dpairs * 2 * W + (j % W) * 2;
    uint16_t* vrow = vp + (j / 2) * 2 * W + j % 2;
    for (int64_t d = 0; d < D; ++d) kcol[(d / 2) * 2 * W + d % 2] = round_bf16(k[j][d]);
    for (int64_t d = 0; d < D; ++d) vrow[(d / W) * npairs * 2 * W + (d % W) * 2] = round_bf16(v[j][d]);
  }
  for (int64_t j = n; j < (n + W - 1) / W * W; ++j) {  // the last key panel's unused columns
    uint16_t* kcol = kp + (j / W) * dpairs * 2 * W + (j % W) * 2;
    for (int64_t d = 0; d < D; ++d) kcol[(d / 2) * 2 * W + d % 2] = 0;
  }
  if (n % 2) {  // the last pair's second value
    for (int64_t d = 0; d < D; ++d) vp[(d / W) * npairs * 2 * W + (n / 2) * 2 * W + (d % W) * 2 + 1] = 0;
  }
}

}  // namespace cv2k
