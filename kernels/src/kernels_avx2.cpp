// AVX2 + FMA kernels (8 fp32 lanes). This file alone is compiled with -mavx2 -mfma;
// the dispatcher calls it only when the CPU reports both (see kernels.h for why it
// includes nothing but intrinsics).
#include <immintrin.h>

#include <cstdint>

#include "kernels.h"

namespace cv2k {
namespace {

struct V {
  using F = __m256;
  static constexpr int L = 8;
  static F zero() { return _mm256_setzero_ps(); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static F set1(float f) { return _mm256_set1_ps(f); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static float hmax(F v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static F floor(F x) { return _mm256_floor_ps(x); }
  // 2^n for float lanes holding integers n (in the exponent range)
  static F pow2(F n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
  }
  static F min(F a, F b) { return _mm256_min_ps(a, b); }
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  static F abs(F a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
  // |a| with the sign of s
  static F copysign(F a, F s) {
    return _mm256_or_ps(_mm256_and_ps(_mm256_set1_ps(-0.0f), s), abs(a));
  }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static float hsum(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // 16 bf16 values: as 32-bit lanes, the low half holds the even element, the high half the odd one.
  static void bf16x2(const uint16_t* p, F& even, F& odd) {
    __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    even = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
    odd = _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  static F u8(const uint8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  // 8 bytes: low nibbles (even elements) to e, high nibbles (odd elements) to o.
  static void u4x2(const uint8_t* p, F& e, F& o) {
    __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    __m128i mask = _mm_set1_epi8(0x0F);
    e = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(b, mask)));
    o = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), mask)));
  }
  // 16 vector registers: accumulators plus a few temporaries.
  // Panel tiles: 6 rows x 16 columns = 12 accumulators, plus the weights and a broadcast.
  static constexpr int panel_group = 1;
  static constexpr int panel_rows = 6;
  static constexpr int cols(int m) { return m <= 2 ? 4 : m == 3 ? 3 : m <= 6 ? 2 : 1; }
};

#include "kernels_simd.inc"

const KernelTable kTable = {"avx2", 2 * V::L, bf16_cols, f32_cols, q8_cols, q4_cols,
                            bf16_rows, q_rows, panel_cols, panel_bf16_cols, bf16_pairs_scalar,
                            softmax_rows, layer_norm_rows, gelu_rows, snake_row,
                            bf16_kv_scalar};

}  // namespace

const KernelTable* avx2_table() { return &kTable; }

}  // namespace cv2k
