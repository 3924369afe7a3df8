// The fused transformer block: the panel GEMM, block attention and row operations of
// internal.h in sequence on scratch buffers, residuals accumulated in place.
#include "transformer_block.h"

#include <cstring>
#include <stdexcept>
#include <string>

#include "common.h"
#include "internal.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"

namespace cv2k {

namespace {

constexpr int kParams = 11;

int64_t panels_of(int64_t n) { return (n + kPanelWidth - 1) / kPanelWidth; }

void check(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("transformer_block: " + what);
}

void check_panels(const mx::array& p, int64_t n, int64_t k, const char* name) {
  const bool f32 = p.dtype() == mx::float32, bf16 = p.dtype() == mx::bfloat16;
  check(p.ndim() == 3 && p.shape(0) == panels_of(n) &&
            ((f32 && p.shape(1) == k && p.shape(2) == kPanelWidth) ||
             (bf16 && p.shape(1) == bf16_kpairs(k) && p.shape(2) == 2 * kPanelWidth)),
        std::string(name) + " must be pack_panels of a (" + std::to_string(n) + ", " +
            std::to_string(k) + ") weight (float32 or bf16=True)");
}

bool is_panels(int i) { return i == 2 || i == 3 || i == 7 || i == 9; }

void check_vector(const mx::array& v, int64_t n, const char* name) {
  check(v.ndim() == 1 && v.shape(0) == n, std::string(name) + " must have shape (" +
                                              std::to_string(n) + ",)");
}

}  // namespace

std::vector<mx::array> transformer_block(const mx::array& x, const std::vector<mx::array>& params,
                                         const std::vector<mx::array>& blocks, int heads, int inner,
                                         int ff, int chunk, float eps1, float eps3, int keep,
                                         bool parallel, mx::StreamOrDevice s) {
  mx::Stream stream = cpu_stream(s, "transformer_block");
  check(heads >= 1 && inner >= heads && inner % heads == 0 && ff >= 1 && chunk >= 0,
        "heads, inner (a multiple of heads), ff must be positive and chunk >= 0");
  check(x.ndim() == 3 && x.shape(0) == 1 && x.shape(1) >= 1, "x must have shape (1, M, C)");
  check(static_cast<int>(params.size()) == kParams, "params must hold 11 arrays");
  const int m = x.shape(1), c = x.shape(2);
  check(keep >= 0 && keep <= m, "keep must be in [0, M]");
  check_vector(params[0], c, "ln1_w");
  check_vector(params[1], c, "ln1_b");
  check_panels(params[2], 3 * inner, c, "qkv");
  check_panels(params[3], c, inner, "out");
  check_vector(params[4], c, "out bias");
  check_vector(params[5], c, "ln3_w");
  check_vector(params[6], c, "ln3_b");
  check_panels(params[7], ff, c, "ff1");
  check_vector(params[8], ff, "ff1 bias");
  check_panels(params[9], c, ff, "ff2");
  check_vector(params[10], c, "ff2 bias");
  std::vector<mx::array> inputs = {as_f32(x, stream)};
  for (int i = 0; i < kParams; ++i) {  // bf16 pair panels stay bf16
    const mx::array& p = params[i];
    inputs.push_back(is_panels(i) && p.dtype() == mx::bfloat16 ? p : as_f32(p, stream));
  }
  for (auto& b : blocks) {
    check(b.ndim() == 3 && b.shape(0) == 1 && b.shape(2) == 2 * inner,
          "each block must have shape (1, n, 2 * inner)");
  }
  push_blocks(inputs, blocks, params[2].dtype() == mx::bfloat16, stream);
  TransformerBlockPrimitive::Attrs a{heads, inner, ff, chunk, keep,
                                     static_cast<int>(blocks.size()), eps1, eps3, parallel};
  std::vector<mx::Shape> shapes = {{1, m, c}};
  if (keep > 0) shapes.push_back({1, keep, 2 * inner});
  std::vector<mx::Dtype> dtypes(shapes.size(), mx::float32);
  return mx::array::make_arrays(std::move(shapes), std::move(dtypes),
                                std::make_shared<TransformerBlockPrimitive>(stream, a),
                                std::move(inputs));
}

void TransformerBlockPrimitive::eval_cpu(const std::vector<mx::array>& inputs,
                                         std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  std::vector<Strided> views = start_task(encoder, inputs, outputs);
  float* y = outputs[0].data<float>();
  float* kv = outputs.size() > 1 ? outputs[1].data<float>() : nullptr;
  bool bf16[1 + kParams] = {};
  for (int i = 0; i < kParams; ++i) bf16[1 + i] = inputs[1 + i].dtype() == mx::bfloat16;
  const bool blocks16 =
      static_cast<int>(inputs.size()) > 1 + kParams && inputs[1 + kParams].dtype() == mx::bfloat16;
  encoder.dispatch([views = std::move(views), y, kv, a = a_, qkv16 = bf16[3], out16 = bf16[4],
                    ff1_16 = bf16[8], ff2_16 = bf16[10], blocks16] {
    std::vector<Dense> d(views.size());
    for (size_t i = 0; i < views.size(); ++i) densify(views[i], d[i]);
    auto in = [&](int i) { return static_cast<const float*>(d[i].ptr); };
    const int64_t M = views[0].shape[1], C = views[0].shape[2], I = a.inner, F = a.ff;
    thread_local std::vector<float> h, qkv, att, f;
    h.resize(M * C);
    qkv.resize(M * 3 * I);
    att.resize(M * I);
    f.resize(M * F);
    const float* x = in(0);
    run_layer_norm(x, in(1), in(2), a.eps1, false, h.data(), C, M, a.parallel);
    run_any_panels(h.data(), C, d[3].ptr, qkv16, nullptr, qkv.data(), 3 * I, M, C, 3 * I, false,
                   a.parallel);
    AttentionProblem p;
    p.qkv = qkv.data();
    p.out = att.data();
    p.M = M;
    p.H = a.heads;
    p.D = I / a.heads;
    p.chunk = a.chunk;
    p.bf16 = qkv16;  // bf16 q/k/v projections: bf16 attention products too
    p.q0 = 0;
    for (int b = 0; b < a.n_blocks; ++b) {
      add_block(p, d[1 + kParams + b].ptr, views[1 + kParams + b].shape[1], blocks16);
    }
    run_attention(p, a.parallel);
    std::memcpy(y, x, M * C * sizeof(float));
    run_any_panels(att.data(), I, d[4].ptr, out16, in(5), y, C, M, I, C, true, a.parallel);
    run_layer_norm(y, in(6), in(7), a.eps3, false, h.data(), C, M, a.parallel);
    run_any_panels(h.data(), C, d[8].ptr, ff1_16, in(9), f.data(), F, M, C, F, false, a.parallel);
    run_gelu(f.data(), nullptr, f.data(), F, M, a.parallel);
    run_any_panels(f.data(), F, d[10].ptr, ff2_16, in(11), y, C, M, F, C, true, a.parallel);
    for (int64_t r = 0; r < a.keep; ++r) {
      std::memcpy(kv + r * 2 * I, qkv.data() + r * 3 * I + I, 2 * I * sizeof(float));
    }
  });
}

void TransformerBlockPrimitive::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error(std::string(name()) + " has no GPU implementation");
}

bool TransformerBlockPrimitive::is_equivalent(const mx::Primitive& other) const {
  auto* o = dynamic_cast<const TransformerBlockPrimitive*>(&other);
  return o != nullptr && o->a_ == a_;
}

std::vector<mx::Shape> TransformerBlockPrimitive::output_shapes(
    const std::vector<mx::array>& inputs) {
  std::vector<mx::Shape> shapes = {inputs[0].shape()};
  if (a_.keep > 0) shapes.push_back({1, a_.keep, 2 * a_.inner});
  return shapes;
}

}  // namespace cv2k
