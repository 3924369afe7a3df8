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
  static constexpr int panel_rows = 12;
  static constexpr int cols(int m) { return m <= 4 ? 4 : m <= 6 ? 3 : 2; }
};

#include "kernels_simd.inc"

const KernelTable kTable = {"avx512", 2 * V::L, bf16_cols, f32_cols, q8_cols, q4_cols, panel_cols};

}  // namespace

const KernelTable* avx512_table() { return &kTable; }

}  // namespace cv2k
