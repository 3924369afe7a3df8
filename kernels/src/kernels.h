// Plain-data interface between the dispatcher (linear.cpp, baseline flags) and the
// per-instruction-set kernel files (kernels_*.cpp, each built with its own flags).
//
// This header must stay free of templates and standard-library includes other than
// <cstdint>: whatever a kernel file includes is compiled with that file's target
// flags, and an inline function emitted by two files with different flags may be
// merged by the linker into the wide-instruction copy, which would then crash on a
// CPU without those instructions.
#pragma once

#include <cstdint>

namespace cv2k {

// y[m][n] = sum_k x[m][k] * w[n][k] (+ bias[n]) for m in [0, M), n in [n0, n1).
struct Bf16Args {
  const float* x;      // M x K fp32, row-major
  const float* xp;     // x permuted for the kernel's bf16 pair layout (see xperm_block), or null
  const uint16_t* w;   // N x K bf16 bit patterns, row-major
  const float* bias;   // N fp32, or null
  float* y;            // M x N fp32, row-major
  int64_t M, K, N;
};

// The same with float32 weights.
struct F32Args {
  const float* x;      // M x K fp32, row-major
  const float* w;      // N x K fp32, row-major
  const float* bias;   // N fp32, or null
  float* y;            // M x N fp32, row-major
  int64_t M, K, N;
};

// MLX affine quantisation (`mx.quantize`): w[n][k] = scale[n][g] * q[n][k] + zero[n][g],
// g = k / group_size. 8 bits: q stored as bytes in order (4 per uint32, little-endian).
// 4 bits: byte k / 2 holds element k in its low nibble if k is even, else the high one.
struct QArgs {
  const float* x;       // M x K fp32, row-major
  const float* xp;      // x permuted as for bf16_cols (4 bits, SIMD variants), or null
  const float* xsum;    // M x (K / group_size): per-group sums of x
  const uint8_t* w;     // N x (K * bits / 8) bytes
  const void* scales;   // N x (K / group_size), fp32 or bf16 (scale_bf16)
  const void* zeros;    // N x (K / group_size), same dtype as scales (MLX's "biases")
  const float* bias;    // N fp32 (the Linear layer's bias), or null
  float* y;             // M x N fp32, row-major
  int64_t M, K, N;
  int group_size;       // 32, 64 or 128
  int bits;             // 4 or 8
  bool scale_bf16;      // scales/zeros stored as bf16 (else fp32)
};

// The same with float32 weights stored as panels of kPanelWidth columns (pack_panels):
// column n, row k of W^T is wp[(n / kPanelWidth) * K * kPanelWidth + k * kPanelWidth +
// n % kPanelWidth], the last panel zero-padded. A panel's K x 16 block is read in
// order, so the kernel streams the weights instead of re-packing them per call as a
// BLAS GEMM does.
constexpr int kPanelWidth = 16;

struct PanelArgs {
  const float* x;      // M x K fp32, row m at x + m * ldx
  int64_t ldx;
  const float* wp;     // ceil(N / kPanelWidth) panels of K x kPanelWidth fp32
  const float* bias;   // N fp32, or null
  float* y;            // M x N fp32, row m at y + m * ldy
  int64_t ldy;
  int64_t M, K, N;
  bool accumulate = false;  // y += x W^T (+ bias) instead of y = ...
};

// The same with W as bf16 pair panels (pack_panels(w, bf16=True)) and x rounded to
// bf16: K is padded with zeros to K2 = 2 * kpairs, a multiple of 32; element (n, k) of W
// is wp[(n / kPanelWidth) * kpairs * 2 * kPanelWidth + (k / 2) * 2 * kPanelWidth +
// (n % kPanelWidth) * 2 + k % 2]: per pair of k, the 16 columns' two weights side by
// side (the operand layout of AVX-512 BF16 dot products and of AMX). x is given as
// its bf16 pairs: row m's pair j (k = 2j in the low half, 2j + 1 in the high half) at
// x[m * kpairs + j]. Products are exact in fp32 and summed in fp32.
struct PanelBf16Args {
  const uint32_t* x;   // M x kpairs bf16 pairs (zero rows after them up to a multiple of 16)
  const uint16_t* wp;  // ceil(N / kPanelWidth) panels of kpairs x 2 * kPanelWidth bf16
  const float* bias;   // N fp32, or null
  float* y;            // M x N fp32, row m at y + m * ldy
  int64_t ldy;
  int64_t M, kpairs, N;
  bool accumulate = false;
};

// The constants of snake_row (cosyvoice2/hift.py's `_sin_squared`): 1 / pi, pi in two
// parts (201 / 64 and the float32 rest), the rounding constant 1.5 * 2^23 and the odd
// polynomial sin(r) = r (1 + c1 u + c2 u^2 + c3 u^3 + c4 u^4), u = r^2, on [-pi/2, pi/2].
constexpr float kSnakeInvPi = 0.31830987f;
constexpr float kSnakePiHi = 3.140625f;
constexpr float kSnakePiLo = 9.676536e-04f;
constexpr float kSnakeRound = 12582912.0f;
constexpr float kSnakeSin[4] = {-1.6666648e-01f, 8.3328988e-03f, -1.9800865e-04f, 2.5904301e-06f};

// One instruction-set variant.
struct KernelTable {
  const char* name;
  // Elements per block of the permuted x used by bf16_cols and q4_cols (0: they read x
  // in order and xp may be null). Block b of 2*h elements is stored as the h even
  // elements followed by the h odd ones, h = xperm_block / 2.
  int xperm_block;
  void (*bf16_cols)(const Bf16Args& a, int64_t n0, int64_t n1);
  void (*f32_cols)(const F32Args& a, int64_t n0, int64_t n1);
  void (*q8_cols)(const QArgs& a, int64_t n0, int64_t n1);
  void (*q4_cols)(const QArgs& a, int64_t n0, int64_t n1);
  // Rows [n0, n1) of a bf16 (N, K) or quantised W as fp32 at out ((n1 - n0) x K,
  // row-major), bf16 and 4-bit in the order of xperm_block (as the permuted x), 8-bit
  // in order: the weights of the prefill path (linear.cpp), scale * q + zero per group.
  void (*bf16_rows)(const uint16_t* w, int64_t K, int64_t n0, int64_t n1, float* out);
  void (*q_rows)(const QArgs& a, int64_t n0, int64_t n1, float* out);
  // Panels [p0, p1) of a PanelArgs product (columns 16 * p0 ... 16 * p1 - 1).
  void (*panel_cols)(const PanelArgs& a, int64_t p0, int64_t p1);
  // Panels [p0, p1) of a PanelBf16Args product.
  void (*panel_bf16_cols)(const PanelBf16Args& a, int64_t p0, int64_t p1);
  // Rows [m0, m1) of x (row stride ldx, K columns) rounded to bf16 (to nearest even) as
  // PanelBf16Args pairs at out (kpairs a row; the pairs after K are left as they are).
  void (*bf16_pairs)(const float* x, int64_t ldx, int64_t K, int64_t kpairs, int64_t m0,
                     int64_t m1, uint32_t* out);
  // In place, for each of `rows` rows of s (stride ld): softmax over its first
  // visible[r] entries (>= 1), zeros in the entries after them up to `cols`.
  void (*softmax_rows)(float* s, int64_t rows, int64_t ld, const int64_t* visible, int64_t cols);
  // Rows [r0, r1) of C channels: y = LayerNorm(x) * w + b over the channels (biased
  // variance, as torch), then Mish if `mish`.
  void (*layer_norm_rows)(const float* x, const float* w, const float* b, float eps, bool mish,
                          float* y, int64_t C, int64_t r0, int64_t r1);
  // Rows [r0, r1): y = GELU(x + bias) with the exact (erf) GELU; bias (C,) or null.
  void (*gelu_rows)(const float* x, const float* bias, float* y, int64_t C, int64_t r0, int64_t r1);
  // One row of C: y = x + sin(alpha x)^2 * inv_alpha (HiFT's Snake, inv_alpha given), with
  // sin^2 as cosyvoice2.hift's `_sin_squared`: reduction by multiples of pi (Cody-Waite,
  // two parts) and an odd polynomial, each step one float32 multiply or add.
  void (*snake_row)(const float* x, const float* alpha, const float* inv_alpha, float* y,
                    int64_t C);
  // One attention head's keys and values for bf16 products (attention_blocks.cpp): rows
  // k[j] and v[j] (D fp32 each) for j < n rounded to bf16 (to nearest even) into the
  // PanelBf16Args panels of the two products: key j is column j of the scores' W (kp:
  // ceil(n / 16) panels of dpairs pairs of d), value j row j of the values' W (vp:
  // ceil(D / 16) panels of npairs pairs of j). Writes the columns of kp's panels (zeros
  // past n) for d < D and the first ceil(n / 2) pairs of vp's (a zero past n); the rest
  // (the pairs past D, past n) is left as it is: the caller zeroes the buffers first.
  void (*bf16_kv)(const float* const* k, const float* const* v, int64_t n, int64_t D,
                  int64_t dpairs, int64_t npairs, uint16_t* kp, uint16_t* vp);
};

const KernelTable* portable_table();
// The variant in use (COSYVOICE2_KERNELS_ISA, set_isa; defined in linear.cpp).
const KernelTable* active_table();
// bf16_pairs element by element (kernels_portable.cpp, baseline flags): the portable,
// AVX2 and AVX-512 variants' bf16_pairs.
void bf16_pairs_scalar(const float* x, int64_t ldx, int64_t K, int64_t kpairs, int64_t m0,
                       int64_t m1, uint32_t* out);
// bf16_kv element by element (kernels_portable.cpp): the portable, AVX2 and AVX-512 variants'.
void bf16_kv_scalar(const float* const* k, const float* const* v, int64_t n, int64_t D,
                    int64_t dpairs, int64_t npairs, uint16_t* kp, uint16_t* vp);
#if defined(CV2K_HAVE_X86)
const KernelTable* avx2_table();
const KernelTable* avx512_table();
#endif
#if defined(CV2K_HAVE_AVX512BF16)
// panel_bf16_cols on AVX-512 BF16 dot products (vdpbf16ps); the rest is avx512_table's.
void panel_bf16_cols_dot(const PanelBf16Args& a, int64_t p0, int64_t p1);
// bf16_kv with vcvtneps2bf16 (bf16_kv_scalar where D is not a multiple of 32 or above 256).
void bf16_kv_cvt(const float* const* k, const float* const* v, int64_t n, int64_t D,
                 int64_t dpairs, int64_t npairs, uint16_t* kp, uint16_t* vp);
// bf16_pairs with vcvtneps2bf16.
void bf16_pairs_cvt(const float* x, int64_t ldx, int64_t K, int64_t kpairs, int64_t m0,
                    int64_t m1, uint32_t* out);
#endif
#if defined(CV2K_HAVE_AMX)
// Asks Linux for the AMX tile data state (once per process); false if refused.
bool enable_amx();
// panel_bf16_cols on AMX tiles; x must hold zero rows up to the next multiple of 16.
void panel_bf16_cols_amx(const PanelBf16Args& a, int64_t p0, int64_t p1);
#endif

}  // namespace cv2k
