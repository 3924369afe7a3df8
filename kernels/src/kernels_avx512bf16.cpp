// The bf16 panel GEMM on AVX-512 BF16 dot products. This file alone is compiled with
// -mavx512bf16; the dispatcher uses it only when the CPU supports AVX-512 BF16 (see
// kernels.h for why it includes nothing but intrinsics). vdpbf16ps adds to each fp32
// lane the two products of a pair of bf16 values (exact in fp32), so a pair of k costs
// one instruction per 16 columns where the widening kernel needs two FMAs.
#include <immintrin.h>

#include <cstdint>

#include "kernels.h"

namespace cv2k {
namespace {

constexpr int kRows = 12;  // rows per tile: 12 x 2 panels = 24 accumulators of 32 registers
constexpr int64_t kDepth = 128;  // pairs per block: two panels' blocks (16 KB each) stay in L1

// y[m0 + m][16 * panel + c] for m < M, c < 16 * P.
template <int M, int P>
inline void tile(const PanelBf16Args& p, int64_t m0, int64_t panel, int64_t j0, int64_t jc) {
  __m512 acc[M][P];
  for (int m = 0; m < M; ++m)
    for (int q = 0; q < P; ++q) acc[m][q] = _mm512_setzero_ps();
  const uint16_t* w = p.wp + (panel * p.kpairs + j0) * 2 * kPanelWidth;
  const int64_t stride = p.kpairs * 2 * kPanelWidth;  // from one panel to the next
  const uint32_t* x = p.x + m0 * p.kpairs + j0;
  for (int64_t j = 0; j < jc; ++j) {
    __m512bh b[P];
    for (int q = 0; q < P; ++q) {
      b[q] = (__m512bh)_mm512_loadu_si512(w + q * stride + j * 2 * kPanelWidth);
    }
    for (int m = 0; m < M; ++m) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[m * p.kpairs + j]));
      for (int q = 0; q < P; ++q) acc[m][q] = _mm512_dpbf16_ps(acc[m][q], a, b[q]);
    }
  }
  for (int q = 0; q < P; ++q) {
    const int64_t n0 = (panel + q) * kPanelWidth;
    const int64_t cols = p.N - n0 < kPanelWidth ? p.N - n0 : kPanelWidth;
    const __mmask16 mask = static_cast<__mmask16>(cols >= 16 ? 0xFFFF : (1u << cols) - 1);
    for (int m = 0; m < M; ++m) {
      float* y = p.y + (m0 + m) * p.ldy + n0;
      __m512 r = acc[m][q];
      if (j0 > 0 || p.accumulate) r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(mask, y));
      if (j0 == 0 && p.bias) r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(mask, p.bias + n0));
      _mm512_mask_storeu_ps(y, mask, r);
    }
  }
}

template <int R, int P>
inline void rows(const PanelBf16Args& p, int64_t n, int64_t m0, int64_t panel, int64_t j0,
                 int64_t jc) {
  if constexpr (R > 1) {
    if (n < R) {
      rows<R - 1, P>(p, n, m0, panel, j0, jc);
      return;
    }
  }
  tile<R, P>(p, m0, panel, j0, jc);
}

}  // namespace

void panel_bf16_cols_dot(const PanelBf16Args& p, int64_t p0, int64_t p1) {
  for (int64_t panel = p0; panel < p1; panel += 2) {
    const bool two = panel + 1 < p1;
    for (int64_t j0 = 0; j0 < p.kpairs; j0 += kDepth) {
      const int64_t jc = p.kpairs - j0 < kDepth ? p.kpairs - j0 : kDepth;
      for (int64_t m0 = 0; m0 < p.M; m0 += kRows) {
        const int64_t n = p.M - m0 < kRows ? p.M - m0 : kRows;
        if (two) {
          rows<kRows, 2>(p, n, m0, panel, j0, jc);
        } else {
          rows<kRows, 1>(p, n, m0, panel, j0, jc);
        }
      }
    }
  }
}

void bf16_pairs_cvt(const float* x, int64_t ldx, int64_t K, int64_t kpairs, int64_t m0,
                    int64_t m1, uint32_t* out) {
  const int64_t Kv = K - K % 16;
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = x + m * ldx;
    uint16_t* d = reinterpret_cast<uint16_t*>(out + m * kpairs);
    for (int64_t k = 0; k < Kv; k += 16) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + k),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(xr + k)));
    }
    if (Kv < K) {  // the tail through one padded vector
      const __mmask16 mask = static_cast<__mmask16>((1u << (K - Kv)) - 1);
      alignas(32) uint16_t t[16];
      _mm256_store_si256(reinterpret_cast<__m256i*>(t),
                         (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, xr + Kv)));
      for (int64_t k = Kv; k < K; ++k) d[k] = t[k - Kv];
    }
  }
}

void bf16_kv_cvt(const float* const* k, const float* const* v, int64_t n, int64_t D,
                 int64_t dpairs, int64_t npairs, uint16_t* kp, uint16_t* vp) {
  constexpr int64_t W = kPanelWidth;
  constexpr int64_t kMaxD = 256;
  if (D % 32 != 0 || D > kMaxD) {
    bf16_kv_scalar(k, v, n, D, dpairs, npairs, kp, vp);
    return;
  }
  // keys, 16 at a time: each row rounded to bf16 in order (its pairs of d as 32-bit words),
  // then the 16 rows' word pd gathered into row pd of the panel
  const int64_t hp = D / 2;  // = dpairs
  alignas(64) uint32_t t[W * kMaxD / 2];
  const __m512i rows = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(static_cast<int>(hp)));
  for (int64_t j0 = 0; j0 < n; j0 += W) {
    const int64_t cols = n - j0 < W ? n - j0 : W;
    for (int64_t c = 0; c < W; ++c) {
      uint32_t* tr = t + c * hp;
      for (int64_t d = 0; d < D; d += 32) {
        __m512i b = _mm512_setzero_si512();
        if (c < cols) {
          const float* kr = k[j0 + c] + d;
          b = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(kr + 16), _mm512_loadu_ps(kr));
        }
        _mm512_store_si512(tr + d / 2, b);
      }
    }
    uint32_t* panel = reinterpret_cast<uint32_t*>(kp + (j0 / W) * dpairs * 2 * W);
    for (int64_t pd = 0; pd < hp; ++pd) {
      const __m512i idx = _mm512_add_epi32(rows, _mm512_set1_epi32(static_cast<int>(pd)));
      _mm512_storeu_si512(panel + pd * W, _mm512_i32gather_epi32(idx, t, 4));
    }
  }
  // values, a pair of rows at a time: the two rows' bf16 values interleaved
  for (int64_t j = 0; j < n; j += 2) {
    const float* a = v[j];
    const float* b = j + 1 < n ? v[j + 1] : nullptr;
    for (int64_t d = 0; d < D; d += W) {
      __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(a + d)));
      __m512i hi = _mm512_setzero_si512();
      if (b != nullptr) {
        hi = _mm512_slli_epi32(
            _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(b + d))), 16);
      }
      _mm512_storeu_si512(vp + (d / W) * npairs * 2 * W + (j / 2) * 2 * W,
                          _mm512_or_si512(lo, hi));
    }
  }
}

}  // namespace cv2k
