// AVX-512F kernels (16 fp32 lanes). This file alone is compiled with -mavx512f; the
// dispatcher calls it only when the CPU and the OS support AVX-512F (see kernels.h for
// why it includes nothing but intrinsics). The arithmetic is the AVX2 one at twice the
// width: fp32 FMA on converted weights, so results do not depend on the variant beyond
// summation order.
#include <immintrin.h>

#include <cstdint>

#include "kernels.h"

namespace cv2k {
namespace {

struct V {
  using F = __m512;
  static constexpr int L = 16;
  static F zero() { return _mm512_setzero_ps(); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static F set1(float f) { return _mm512_set1_ps(f); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  static float hmax(F v) { return _mm512_reduce_max_ps(v); }
  static F floor(F x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
  // 2^n for float lanes holding integers n (in the exponent range)
  static F pow2(F n) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
  }
  static F min(F a, F b) { return _mm512_min_ps(a, b); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static F abs(F a) { return _mm512_abs_ps(a); }
  // |a| with the sign of s
  static F copysign(F a, F s) {
    const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_and_si512(sign, _mm512_castps_si512(s)),
                                               _mm512_castps_si512(abs(a))));
  }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static float hsum(F v) { return _mm512_reduce_add_ps(v); }
  static void bf16x2(const uint16_t* p, F& even, F& odd) {
    __m512i w = _mm512_loadu_si512(p);
    even = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
    odd = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  static F u8(const uint8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static void u4x2(const uint8_t* p, F& e, F& o) {
    __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    __m128i mask = _mm_set1_epi8(0x0F);
    e = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, mask)));
    o = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), mask)));
  }
  // 32 vector registers.
  // Panel tiles: 12 rows x 16 columns = 12 accumulators, plus the weights and a broadcast.
  static constexpr int panel_group = 2;
  static constexpr int panel_rows = 12;
  static constexpr int cols(int m) { return m <= 4 ? 4 : m <= 6 ? 3 : 2; }
};

#include "kernels_simd.inc"

const KernelTable kTable = {"avx512", 2 * V::L, bf16_cols, f32_cols, q8_cols, q4_cols,
                            bf16_rows, q_rows, panel_cols, panel_bf16_cols, bf16_pairs_scalar,
                            softmax_rows, layer_norm_rows, gelu_rows, snake_row,
                            bf16_kv_scalar};

}  // namespace

const KernelTable* avx512_table() { return &kTable; }

}  // namespace cv2k
