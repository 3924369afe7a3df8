// The MLX side: operations, the primitive's eval_cpu, instruction-set dispatch.
#include "linear.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <limits>
#include <algorithm>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <vector>

#include "common.h"
#include "internal.h"
#include "kernels.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/transforms.h"
#include "mlx/utils.h"
#include "pool.h"

namespace cv2k {

namespace {

// ----------------------------------------------------------------- dispatch

#if defined(CV2K_HAVE_AVX512BF16)
// The avx512 variant with the bf16 panel GEMM on AVX-512 BF16 dot products.
const KernelTable* avx512bf16_table() {
  static const KernelTable table = [] {
    KernelTable t = *avx512_table();
    t.name = "avx512bf16";
    t.panel_bf16_cols = panel_bf16_cols_dot;
    t.bf16_pairs = bf16_pairs_cvt;
    t.bf16_kv = bf16_kv_cvt;
    return t;
  }();
  return &table;
}
#endif
#if defined(CV2K_HAVE_AMX)
// The avx512bf16 variant with the bf16 panel GEMM on AMX tiles.
const KernelTable* amx_table() {
  static const KernelTable table = [] {
    KernelTable t = *avx512bf16_table();
    t.name = "amx";
    t.panel_bf16_cols = panel_bf16_cols_amx;
    return t;
  }();
  return &table;
}
#endif

std::vector<const KernelTable*> supported_tables() {
  std::vector<const KernelTable*> out;
#if defined(CV2K_HAVE_X86)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#if defined(CV2K_HAVE_AVX512BF16)
  const bool bf16 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
#if defined(CV2K_HAVE_AMX)
  static const bool amx = bf16 && __builtin_cpu_supports("amx-tile") &&
                          __builtin_cpu_supports("amx-bf16") && enable_amx();
  if (amx) out.push_back(amx_table());
#endif
  if (bf16) out.push_back(avx512bf16_table());
#endif
  if (avx2 && __builtin_cpu_supports("avx512f")) out.push_back(avx512_table());
  if (avx2) out.push_back(avx2_table());
#endif
  out.push_back(portable_table());
  return out;
}

const KernelTable* find_table(const std::string& name) {
  for (auto* t : supported_tables()) {
    if (name == t->name) return t;
  }
  return nullptr;
}

std::atomic<const KernelTable*>& current_table() {
  static std::atomic<const KernelTable*> table{[] {
    const char* env = std::getenv("COSYVOICE2_KERNELS_ISA");
    if (env != nullptr && *env != '\0' && std::string(env) != "auto") {
      if (auto* t = find_table(env)) return t;
      std::cerr << "cosyvoice2_kernels: COSYVOICE2_KERNELS_ISA=" << env
                << " is not available on this CPU; using " << supported_tables()[0]->name << "\n";
    }
    return supported_tables()[0];
  }()};
  return table;
}

// ------------------------------------------------------------- parallel run

template <class Args>
struct Job {
  const Args* args;
  void (*cols)(const Args&, int64_t, int64_t);
  int64_t chunk;
  int64_t n;
};

template <class Args>
void run_chunk(const void* ctx, int64_t i) {
  auto* job = static_cast<const Job<Args>*>(ctx);
  int64_t n0 = i * job->chunk;
  int64_t n1 = n0 + job->chunk < job->n ? n0 + job->chunk : job->n;
  job->cols(*job->args, n0, n1);
}

// Split the N output columns into chunks (multiples of 16 columns, about 4 per thread)
// and run them on the pool; tiny problems run on the calling thread.
template <class Args>
void run_columns(const Args& a, void (*cols)(const Args&, int64_t, int64_t)) {
  Pool& pool = Pool::get();
  const int64_t work = a.M * a.N * a.K;
  const int threads = pool.threads();
  if (threads == 1 || work < (1 << 16) || a.N < 32) {
    cols(a, 0, a.N);
    return;
  }
  int64_t chunk = (a.N + 4 * threads - 1) / (4 * threads);
  chunk = (chunk + 15) / 16 * 16;
  Job<Args> job{&a, cols, chunk, a.N};
  pool.run((a.N + chunk - 1) / chunk, run_chunk<Args>, &job);
}

// Per-call scratch on the stream thread (reused across calls).
std::vector<float>& scratch(int i) {
  thread_local std::vector<float> buf[2];
  return buf[i];
}

// x permuted for the SIMD bf16 and 4-bit kernels: in each block of B elements, the
// B / 2 even-indexed ones, then the odd ones (the tail beyond a whole block is unused).
const float* permuted(const float* x, int64_t M, int64_t K, int64_t B) {
  const int64_t h = B / 2, Kv = K - K % B;
  auto& xp = scratch(0);
  xp.resize(static_cast<size_t>(M * K));
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    float* pr = xp.data() + m * K;
    for (int64_t b = 0; b < Kv; b += B) {
      for (int64_t j = 0; j < h; ++j) {
        pr[b + j] = xr[b + 2 * j];
        pr[b + h + j] = xr[b + 2 * j + 1];
      }
    }
  }
  return xp.data();
}

// ------------------------------------------------- prefill: weights expanded to fp32
//
// The bf16 and quantised kernels above read each weight once per block of 8 rows of
// x, converting it every time: right for decode (1-8 rows, bound by reading the
// weights), slower than the float32 panel GEMM for a prompt's hundred rows. From
// kExpandRows rows on, W is expanded to fp32 a block of rows at a time (once per
// call) and multiplied by the panel micro-kernel with the roles swapped: the
// expanded rows of W are its "x" and x, packed once per call into panels of 16 rows,
// its "W", so that neither the weights are re-laid nor stored in fp32; the product
// (W block x^T) is written back transposed. Numerics: the float32 product with the
// dequantised (or bf16-widened) weights, summed in another order.

constexpr int64_t kExpandRows = 16;
constexpr int64_t kExpandBlock = 48;  // rows of W per task: a multiple of every panel_rows

// x (M x K) as the panels of a PanelArgs "W" (ceil(M / 16) panels of K x 16, zero
// padded), in the order of xperm_block B within each whole block of B (0: in order).
const float* pack_rows(const float* x, int64_t M, int64_t K, int64_t B) {
  const int64_t panels = (M + kPanelWidth - 1) / kPanelWidth;
  const float* xs = B > 0 ? permuted(x, M, K, B) : x;  // whole blocks of B only
  const int64_t Kv = B > 0 ? K - K % B : K;
  auto& xp = scratch(1);
  xp.assign(static_cast<size_t>(panels * K * kPanelWidth), 0.0f);
  for (int64_t m = 0; m < M; ++m) {
    float* d = xp.data() + (m / kPanelWidth) * K * kPanelWidth + m % kPanelWidth;
    for (int64_t k = 0; k < Kv; ++k) d[k * kPanelWidth] = xs[m * K + k];
    for (int64_t k = Kv; k < K; ++k) d[k * kPanelWidth] = x[m * K + k];  // the tail in order
  }
  return xp.data();
}

struct ExpandJob {
  const KernelTable* t;
  const QArgs* q;          // quantised W, or null
  const uint16_t* wb;      // else bf16 W (N x K)
  const float* xpanels;    // pack_rows(x)
  const float* bias;       // N, or null
  float* y;                // M x N
  int64_t M, K, N;
};

void expand_block(const void* ctx, int64_t i) {
  auto* j = static_cast<const ExpandJob*>(ctx);
  const int64_t n0 = i * kExpandBlock;
  const int64_t rows = j->N - n0 < kExpandBlock ? j->N - n0 : kExpandBlock;
  const int64_t M = j->M, K = j->K;
  thread_local std::vector<float> w, yt;
  w.resize(static_cast<size_t>(rows * K));
  yt.resize(static_cast<size_t>(rows * M));
  if (j->q != nullptr) {
    j->t->q_rows(*j->q, n0, n0 + rows, w.data());
  } else {
    j->t->bf16_rows(j->wb, K, n0, n0 + rows, w.data());
  }
  const PanelArgs a{w.data(), K, j->xpanels, nullptr, yt.data(), M, rows, K, M};
  j->t->panel_cols(a, 0, (M + kPanelWidth - 1) / kPanelWidth);
  for (int64_t m = 0; m < M; ++m) {
    float* yr = j->y + m * j->N + n0;
    for (int64_t r = 0; r < rows; ++r) yr[r] = yt[r * M + m] + (j->bias ? j->bias[n0 + r] : 0.0f);
  }
}

void run_expanded(const ExpandJob& job) {
  const int64_t blocks = (job.N + kExpandBlock - 1) / kExpandBlock;
  if (Pool::get().threads() == 1 || blocks < 2) {
    for (int64_t i = 0; i < blocks; ++i) expand_block(&job, i);
    return;
  }
  Pool::get().run(blocks, expand_block, &job);
}

}  // namespace

void compute_bf16(const float* x, const uint16_t* w, const float* bias, float* y, int64_t M,
                  int64_t K, int64_t N) {
  const KernelTable* t = current_table().load();
  if (M >= kExpandRows) {
    run_expanded({t, nullptr, w, pack_rows(x, M, K, t->xperm_block), bias, y, M, K, N});
    return;
  }
  Bf16Args a{x, nullptr, w, bias, y, M, K, N};
  if (t->xperm_block > 0) a.xp = permuted(x, M, K, t->xperm_block);
  run_columns<Bf16Args>(a, t->bf16_cols);
}

namespace {

void compute_f32(const float* x, const float* w, const float* bias, float* y, int64_t M,
                 int64_t K, int64_t N) {
  const KernelTable* t = current_table().load();
  F32Args a{x, w, bias, y, M, K, N};
  run_columns<F32Args>(a, t->f32_cols);
}

}  // namespace

void compute_quantized(const float* x, const uint8_t* w, const void* scales, const void* zeros,
                       bool scale_bf16, const float* bias, float* y, int64_t M, int64_t K,
                       int64_t N, int group_size, int bits) {
  const KernelTable* t = current_table().load();
  if (M >= kExpandRows) {
    const QArgs q{x, nullptr, nullptr, w, scales, zeros, bias, y, M, K, N, group_size, bits, scale_bf16};
    const int64_t B = bits == 4 ? t->xperm_block : 0;
    run_expanded({t, &q, nullptr, pack_rows(x, M, K, B), bias, y, M, K, N});
    return;
  }
  const int64_t ng = K / group_size;
  auto& xs = scratch(1);
  xs.resize(static_cast<size_t>(M * ng));
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < ng; ++g) {
      const float* xr = x + m * K + g * group_size;
      float s = 0.0f;
      for (int k = 0; k < group_size; ++k) s += xr[k];
      xs[m * ng + g] = s;
    }
  }
  QArgs a{x, nullptr, xs.data(), w, scales, zeros, bias, y, M, K, N, group_size, bits, scale_bf16};
  if (bits == 4 && t->xperm_block > 0) a.xp = permuted(x, M, K, t->xperm_block);
  run_columns<QArgs>(a, bits == 4 ? t->q4_cols : t->q8_cols);
}

namespace {

mx::Shape output_shape(const mx::array& x, int n) {
  mx::Shape shape = x.shape();
  shape.back() = n;
  return shape;
}

}  // namespace

const KernelTable* active_table() { return current_table().load(); }

// Panels [0, panels) of a product split over the pool in chunks of about 4 per thread
// (claimed dynamically), each a multiple of `step` panels; a small product (`small`) runs
// on the calling thread.
template <class Args>
void run_panel_chunks(const Args& a, void (*cols)(const Args&, int64_t, int64_t), int64_t panels,
                      bool parallel, bool small, int64_t step) {
  const int threads = Pool::get().threads();
  if (!parallel || threads == 1 || small || panels < 2) {
    cols(a, 0, panels);
    return;
  }
  struct Ctx {
    const Args* a;
    void (*cols)(const Args&, int64_t, int64_t);
    int64_t chunk, panels;
  } ctx{&a, cols, ((panels + 4 * threads - 1) / (4 * threads) + step - 1) / step * step, panels};
  Pool::get().run((panels + ctx.chunk - 1) / ctx.chunk, [](const void* c, int64_t i) {
    auto* j = static_cast<const Ctx*>(c);
    int64_t p0 = i * j->chunk;
    j->cols(*j->a, p0, p0 + j->chunk < j->panels ? p0 + j->chunk : j->panels);
  }, &ctx);
}

void run_panels(const PanelArgs& a, bool parallel) {
  const int64_t panels = (a.N + kPanelWidth - 1) / kPanelWidth;
  // chunks of an even number of panels: the AVX-512 tiles span two
  run_panel_chunks(a, current_table().load()->panel_cols, panels, parallel,
                   a.M * a.N * a.K < (1 << 18), 2);
}

// x rounded to bf16 (to nearest even, as MLX's astype) as the pairs PanelBf16Args reads,
// K zero-padded to 2 * kpairs and zero rows up to a multiple of 16; in a per-thread
// buffer reused by the next call.
const uint32_t* bf16_pairs(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t kpairs) {
  thread_local std::vector<uint32_t> buf;
  uint32_t* b = pairs_buffer(buf, M, K, kpairs);
  current_table().load()->bf16_pairs(x, ldx, K, kpairs, 0, M, b);
  return b;
}

void run_panels_bf16(const PanelBf16Args& a, bool parallel) {
  // chunks of an even number of panels: the dot kernel's tiles span two
  const int64_t panels = (a.N + kPanelWidth - 1) / kPanelWidth;
  run_panel_chunks(a, current_table().load()->panel_bf16_cols, panels, parallel,
                   a.M * a.N * a.kpairs < (1 << 17), 2);
}

void run_any_panels(const float* x, int64_t ldx, const void* wp, bool bf16, const float* bias,
                    float* y, int64_t ldy, int64_t M, int64_t K, int64_t N, bool accumulate,
                    bool parallel) {
  if (!bf16) {
    PanelArgs a{x, ldx, static_cast<const float*>(wp), bias, y, ldy, M, K, N};
    a.accumulate = accumulate;
    run_panels(a, parallel);
    return;
  }
  const int64_t kpairs = bf16_kpairs(K);
  PanelBf16Args a{bf16_pairs(x, ldx, M, K, kpairs), static_cast<const uint16_t*>(wp), bias, y, ldy,
                  M, kpairs, N};
  a.accumulate = accumulate;
  run_panels_bf16(a, parallel);
}

// --------------------------------------------------------------- operations

mx::array linear_dense(const mx::array& x, const mx::array& w, const std::optional<mx::array>& bias,
                       mx::StreamOrDevice s) {
  mx::Stream stream = cpu_stream(s, "linear_dense");
  if (w.ndim() != 2 || (w.dtype() != mx::bfloat16 && w.dtype() != mx::float32)) {
    throw std::invalid_argument("linear_dense: w must be a 2-D bfloat16 or float32 array (N, K)");
  }
  if (x.ndim() < 1 || x.shape(-1) != w.shape(1)) {
    throw std::invalid_argument("linear_dense: x must have shape (..., K) with K = w.shape[1]");
  }
  const int n = w.shape(0);
  std::vector<mx::array> inputs = {as_f32(x, stream), w};
  if (bias) {
    if (bias->ndim() != 1 || bias->shape(0) != n) {
      throw std::invalid_argument("linear_dense: bias must have shape (N,)");
    }
    inputs.push_back(as_f32(*bias, stream));
  }
  auto kind = w.dtype() == mx::bfloat16 ? LinearPrimitive::Kind::Bf16 : LinearPrimitive::Kind::F32;
  return mx::array(output_shape(x, n), mx::float32,
                   std::make_shared<LinearPrimitive>(stream, kind, 0, bias.has_value()),
                   std::move(inputs));
}

mx::array linear_quantized(const mx::array& x, const mx::array& w, const mx::array& scales,
                           const mx::array& biases, const std::optional<mx::array>& bias,
                           int group_size, int bits, mx::StreamOrDevice s) {
  mx::Stream stream = cpu_stream(s, "linear_quantized");
  if (bits != 8 && bits != 4) throw std::invalid_argument("linear_quantized: bits must be 4 or 8");
  if (group_size != 32 && group_size != 64 && group_size != 128) {
    throw std::invalid_argument("linear_quantized: group_size must be 32, 64 or 128");
  }
  if (w.ndim() != 2 || w.dtype() != mx::uint32) {
    throw std::invalid_argument(
        "linear_quantized: w must be a 2-D uint32 array (N, K * bits / 32)");
  }
  const int n = w.shape(0);
  const int k = w.shape(1) * 32 / bits;
  if (x.ndim() < 1 || x.shape(-1) != k) {
    throw std::invalid_argument(
        "linear_quantized: x must have shape (..., K) with K = w.shape[1] * 32 / bits");
  }
  const mx::Shape sshape = {n, k / group_size};
  if (scales.shape() != sshape || biases.shape() != sshape) {
    throw std::invalid_argument(
        "linear_quantized: scales and biases must have shape (N, K / group_size)");
  }
  mx::Dtype sdt = scales.dtype() == mx::bfloat16 && biases.dtype() == mx::bfloat16 ? mx::bfloat16
                                                                                     : mx::float32;
  auto as = [&](const mx::array& a, mx::Dtype d) { return a.dtype() == d ? a : mx::astype(a, d, stream); };
  std::vector<mx::array> inputs = {as(x, mx::float32), w, as(scales, sdt), as(biases, sdt)};
  if (bias) {
    if (bias->ndim() != 1 || bias->shape(0) != n) {
      throw std::invalid_argument("linear_quantized: bias must have shape (N,)");
    }
    inputs.push_back(as(*bias, mx::float32));
  }
  return mx::array(output_shape(x, n), mx::float32,
                   std::make_shared<LinearPrimitive>(
                       stream, bits == 4 ? LinearPrimitive::Kind::Q4 : LinearPrimitive::Kind::Q8,
                       group_size, bias.has_value()),
                   std::move(inputs));
}

mx::array pack_panels(const mx::array& w, bool bf16, mx::StreamOrDevice s) {
  return pack_panels(std::vector<mx::array>{w}, bf16, s);
}

mx::array pack_panels(const std::vector<mx::array>& parts, bool bf16, mx::StreamOrDevice s) {
  mx::Stream stream = cpu_stream(s, "pack_panels");
  if (parts.empty()) throw std::invalid_argument("pack_panels: no arrays given");
  int64_t rows = 0;
  for (const auto& w : parts) {
    if (w.ndim() != 2) throw std::invalid_argument("pack_panels: w must be 2-D (N, K)");
    if (w.shape(1) != parts[0].shape(1)) {
      throw std::invalid_argument("pack_panels: the arrays must have the same K (columns)");
    }
    rows += w.shape(0);
  }
  if (rows > std::numeric_limits<int>::max()) {
    throw std::invalid_argument("pack_panels: too many rows");
  }
  const int n = static_cast<int>(rows), k = parts[0].shape(1);
  const int panels = (n + kPanelWidth - 1) / kPanelWidth;
  if (bf16) {  // (panels, kpairs, 32): per pair of k, 16 columns x 2 (kernels.h)
    const int kpairs = static_cast<int>(bf16_kpairs(k));
    mx::array wb = mx::astype(parts.size() == 1 ? parts[0] : mx::concatenate(parts, 0, stream),
                              mx::bfloat16, stream);
    wb = mx::pad(wb, {{0, panels * kPanelWidth - n}, {0, 2 * kpairs - k}}, mx::array(0, mx::bfloat16),
                 "constant", stream);
    wb = mx::reshape(wb, {panels, kPanelWidth, kpairs, 2}, stream);
    wb = mx::transpose(wb, {0, 2, 1, 3}, stream);
    return mx::contiguous(mx::reshape(wb, {panels, kpairs, 2 * kPanelWidth}, stream), false, stream);
  }
  std::vector<mx::array> inputs;
  for (const auto& w : parts) inputs.push_back(as_f32(w, stream));
  return mx::array({panels, k, kPanelWidth}, mx::float32,
                   std::make_shared<PackPanelsPrimitive>(stream), std::move(inputs));
}

namespace {

// Where the pack task's panels come from: the parts' rows, stacked.
struct PackJob {
  std::vector<const float*> src;  // each part's rows (K floats each)
  std::vector<int64_t> first;     // the stacked row each part starts at, then the total
  float* out;
  int64_t K;
};

// Panels [64 i, 64 i + 64) of a PackJob: each panel's K x 16 block from 16 rows.
void pack_chunk(const void* ctx, int64_t chunk) {
  const auto& job = *static_cast<const PackJob*>(ctx);
  const int64_t K = job.K, total = job.first.back();
  const int64_t panels = (total + kPanelWidth - 1) / kPanelWidth;
  const int64_t end = std::min(panels, (chunk + 1) * 64);
  size_t part = 0;
  for (int64_t p = chunk * 64; p < end; ++p) {
    float* dst = job.out + p * K * kPanelWidth;
    for (int lane = 0; lane < kPanelWidth; ++lane) {
      const int64_t r = p * kPanelWidth + lane;
      if (r >= total) {
        for (int64_t c = 0; c < K; ++c) dst[c * kPanelWidth + lane] = 0.0f;
        continue;
      }
      while (r >= job.first[part + 1]) ++part;
      const float* row = job.src[part] + (r - job.first[part]) * K;
      for (int64_t c = 0; c < K; ++c) dst[c * kPanelWidth + lane] = row[c];
    }
  }
}

}  // namespace

void PackPanelsPrimitive::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  std::vector<Strided> views = start_task(encoder, inputs, out);
  std::vector<int64_t> rows;
  for (const auto& in : inputs) rows.push_back(in.shape(0));
  encoder.dispatch([views = std::move(views), rows = std::move(rows), out = out.data<float>(),
                    K = static_cast<int64_t>(out.shape(1))] {
    std::vector<Dense> dense(views.size());
    PackJob job{{}, {0}, out, K};
    for (size_t i = 0; i < views.size(); ++i) {
      densify(views[i], dense[i]);
      job.src.push_back(static_cast<const float*>(dense[i].ptr));
      job.first.push_back(job.first.back() + rows[i]);
    }
    const int64_t panels = (job.first.back() + kPanelWidth - 1) / kPanelWidth;
    if (panels > 0 && K > 0) Pool::get().run((panels + 63) / 64, pack_chunk, &job);
  });
}

void PackPanelsPrimitive::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error(std::string(name()) + " has no GPU implementation");
}

bool PackPanelsPrimitive::is_equivalent(const mx::Primitive& other) const {
  return dynamic_cast<const PackPanelsPrimitive*>(&other) != nullptr;
}

std::vector<mx::Shape> PackPanelsPrimitive::output_shapes(const std::vector<mx::array>& inputs) {
  int rows = 0;
  for (const auto& in : inputs) rows += in.shape(0);
  return {{(rows + kPanelWidth - 1) / kPanelWidth, inputs[0].shape(1), kPanelWidth}};
}

mx::array linear_panels(const mx::array& x, const mx::array& wp, int n,
                        const std::optional<mx::array>& bias, bool parallel,
                        mx::StreamOrDevice s) {
  mx::Stream stream = cpu_stream(s, "linear_panels");
  const bool bf16 = wp.dtype() == mx::bfloat16;
  if (wp.ndim() != 3 || (wp.dtype() != mx::float32 && !bf16) ||
      wp.shape(2) != (bf16 ? 2 : 1) * kPanelWidth) {
    throw std::invalid_argument(
        "linear_panels: wp must be pack_panels(w), a float32 array (ceil(N / 16), K, 16), or "
        "pack_panels(w, bf16=True), a bfloat16 array (ceil(N / 16), ceil(K / 32) * 16, 32)");
  }
  if (n < 1 || (n + kPanelWidth - 1) / kPanelWidth != wp.shape(0)) {
    throw std::invalid_argument("linear_panels: n must be the packed matrix's row count N");
  }
  if (x.ndim() < 1 || (bf16 ? bf16_kpairs(x.shape(-1)) != wp.shape(1) || x.shape(-1) < 1
                            : x.shape(-1) != wp.shape(1))) {
    throw std::invalid_argument(
        "linear_panels: x must have shape (..., K) with K the packed matrix's column count");
  }
  std::vector<mx::array> inputs = {as_f32(x, stream), wp};
  if (bias) {
    if (bias->ndim() != 1 || bias->shape(0) != n) {
      throw std::invalid_argument("linear_panels: bias must have shape (n,)");
    }
    inputs.push_back(as_f32(*bias, stream));
  }
  return mx::array(output_shape(x, n), mx::float32,
                   std::make_shared<PanelLinearPrimitive>(stream, n, bias.has_value(), parallel),
                   std::move(inputs));
}

// ---------------------------------------------------------------- primitive

void LinearPrimitive::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  std::vector<Strided> views = start_task(encoder, inputs, out);

  const mx::array& x = inputs[0];
  const int64_t K = x.shape(-1);
  const int64_t N = out.shape(-1);
  const int64_t M = K > 0 ? static_cast<int64_t>(x.size()) / K : 0;
  float* y = out.data<float>();
  if (M == 0 || N == 0) return;
  if (K == 0) {
    encoder.dispatch([y, n = out.size()] { std::memset(y, 0, n * sizeof(float)); });
    return;
  }
  if (kind_ == Kind::Bf16 || kind_ == Kind::F32) {
    encoder.dispatch([views = std::move(views), y, M, K, N, has_bias = has_bias_,
                      f32 = kind_ == Kind::F32] {
      Dense xd, wd, bd;
      densify(views[0], xd);
      densify(views[1], wd);
      if (has_bias) densify(views[2], bd);
      const float* x = static_cast<const float*>(xd.ptr);
      const float* b = static_cast<const float*>(bd.ptr);
      if (f32) {
        compute_f32(x, static_cast<const float*>(wd.ptr), b, y, M, K, N);
      } else {
        compute_bf16(x, static_cast<const uint16_t*>(wd.ptr), b, y, M, K, N);
      }
    });
  } else {
    const bool scale_bf16 = inputs[2].dtype() == mx::bfloat16;
    const int bits = kind_ == Kind::Q4 ? 4 : 8;
    encoder.dispatch([views = std::move(views), y, M, K, N, has_bias = has_bias_,
                      gs = group_size_, scale_bf16, bits] {
      Dense xd, wd, sd, zd, bd;
      densify(views[0], xd);
      densify(views[1], wd);
      densify(views[2], sd);
      densify(views[3], zd);
      if (has_bias) densify(views[4], bd);
      compute_quantized(static_cast<const float*>(xd.ptr), static_cast<const uint8_t*>(wd.ptr),
                        sd.ptr, zd.ptr, scale_bf16, static_cast<const float*>(bd.ptr), y, M, K, N,
                        gs, bits);
    });
  }
}

void LinearPrimitive::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error(std::string(name()) + " has no GPU implementation");
}

bool LinearPrimitive::is_equivalent(const mx::Primitive& other) const {
  auto* o = dynamic_cast<const LinearPrimitive*>(&other);
  return o != nullptr && o->kind_ == kind_ && o->group_size_ == group_size_ &&
         o->has_bias_ == has_bias_;
}

std::vector<mx::Shape> LinearPrimitive::output_shapes(const std::vector<mx::array>& inputs) {
  return {output_shape(inputs[0], inputs[1].shape(0))};
}

void PanelLinearPrimitive::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  std::vector<Strided> views = start_task(encoder, inputs, out);

  const mx::array& x = inputs[0];
  const int64_t K = x.shape(-1);
  const int64_t N = n_;
  const int64_t M = K > 0 ? static_cast<int64_t>(x.size()) / K : 0;
  float* y = out.data<float>();
  if (M == 0) return;
  const bool bf16 = inputs[1].dtype() == mx::bfloat16;
  encoder.dispatch([views = std::move(views), y, M, K, N, has_bias = has_bias_,
                    parallel = parallel_, bf16] {
    Dense xd, wd, bd;
    densify(views[0], xd);
    densify(views[1], wd);
    if (has_bias) densify(views[2], bd);
    if (K == 0) {
      const float* b = static_cast<const float*>(bd.ptr);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t c = 0; c < N; ++c) y[m * N + c] = b ? b[c] : 0.0f;
      return;
    }
    run_any_panels(static_cast<const float*>(xd.ptr), K, wd.ptr, bf16,
                   static_cast<const float*>(bd.ptr), y, N, M, K, N, false, parallel);
  });
}

void PanelLinearPrimitive::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error(std::string(name()) + " has no GPU implementation");
}

bool PanelLinearPrimitive::is_equivalent(const mx::Primitive& other) const {
  auto* o = dynamic_cast<const PanelLinearPrimitive*>(&other);
  return o != nullptr && o->n_ == n_ && o->has_bias_ == has_bias_ && o->parallel_ == parallel_;
}

std::vector<mx::Shape> PanelLinearPrimitive::output_shapes(const std::vector<mx::array>& inputs) {
  return {output_shape(inputs[0], n_)};
}

// ------------------------------------------------------------- configuration

std::string isa() { return current_table().load()->name; }

std::vector<std::string> available_isas() {
  std::vector<std::string> out;
  for (auto* t : supported_tables()) out.emplace_back(t->name);
  return out;
}

void set_isa(const std::string& name) {
  const KernelTable* t = name == "auto" ? supported_tables()[0] : find_table(name);
  if (t == nullptr) throw std::invalid_argument("isa '" + name + "' is not available on this CPU");
  mx::synchronize();  // kernels already scheduled keep the variant they were built for
  current_table().store(t);
}

int num_threads() { return Pool::get().threads(); }

void set_num_threads(int n) {
  if (n < 1) throw std::invalid_argument("num_threads must be >= 1");
  mx::synchronize();
  Pool::get().resize(n);
}

}  // namespace cv2k
