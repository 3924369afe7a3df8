// Row-wise flow operations: validation, the primitive's eval_cpu, rows split over the pool.
#include "row_ops.h"

#include <stdexcept>
#include <string>

#include "common.h"
#include "internal.h"
#include "kernels.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "pool.h"

namespace cv2k {

namespace {

struct RowsJob {
  RowsPrimitive::Kind kind;
  const float *x, *w, *b;
  float eps;
  float* y;
  int64_t C, rows, chunk;
};

void run_rows(const RowsJob& j, int64_t r0, int64_t r1) {
  const KernelTable* t = active_table();
  if (j.kind == RowsPrimitive::Kind::Gelu) {
    t->gelu_rows(j.x, j.b, j.y, j.C, r0, r1);
  } else {
    t->layer_norm_rows(j.x, j.w, j.b, j.eps, j.kind == RowsPrimitive::Kind::LayerNormMish, j.y,
                       j.C, r0, r1);
  }
}

void run_rows_job(RowsJob& job, bool parallel) {
  Pool& pool = Pool::get();
  const int threads = pool.threads();
  if (!parallel || threads == 1 || job.rows * job.C < (1 << 15)) {
    run_rows(job, 0, job.rows);
    return;
  }
  job.chunk = (job.rows + 2 * threads - 1) / (2 * threads);
  pool.run((job.rows + job.chunk - 1) / job.chunk, [](const void* ctx, int64_t i) {
    auto* j = static_cast<const RowsJob*>(ctx);
    int64_t r0 = i * j->chunk;
    run_rows(*j, r0, r0 + j->chunk < j->rows ? r0 + j->chunk : j->rows);
  }, &job);
}

void check_vector(const mx::array& v, int c, const char* what) {
  if (v.ndim() != 1 || v.shape(0) != c) {
    throw std::invalid_argument(std::string(what) + " must have shape (C,), C = x.shape[-1]");
  }
}

}  // namespace

void run_layer_norm(const float* x, const float* w, const float* b, float eps, bool mish, float* y,
                    int64_t C, int64_t rows, bool parallel) {
  RowsJob job{mish ? RowsPrimitive::Kind::LayerNormMish : RowsPrimitive::Kind::LayerNorm,
              x, w, b, eps, y, C, rows, rows};
  run_rows_job(job, parallel);
}

void run_gelu(const float* x, const float* bias, float* y, int64_t C, int64_t rows, bool parallel) {
  RowsJob job{RowsPrimitive::Kind::Gelu, x, nullptr, bias, 0.0f, y, C, rows, rows};
  run_rows_job(job, parallel);
}

mx::array layer_norm(const mx::array& x, const mx::array& w, const mx::array& b, float eps,
                     bool mish, bool parallel, mx::StreamOrDevice s) {
  mx::Stream stream = cpu_stream(s, "layer_norm");
  if (x.ndim() < 1) throw std::invalid_argument("layer_norm: x must have at least one axis");
  check_vector(w, x.shape(-1), "layer_norm: w");
  check_vector(b, x.shape(-1), "layer_norm: b");
  auto kind = mish ? RowsPrimitive::Kind::LayerNormMish : RowsPrimitive::Kind::LayerNorm;
  return mx::array(x.shape(), mx::float32,
                   std::make_shared<RowsPrimitive>(stream, kind, eps, true, parallel),
                   {as_f32(x, stream), as_f32(w, stream), as_f32(b, stream)});
}

mx::array gelu(const mx::array& x, const std::optional<mx::array>& bias, bool parallel,
               mx::StreamOrDevice s) {
  mx::Stream stream = cpu_stream(s, "gelu");
  if (x.ndim() < 1) throw std::invalid_argument("gelu: x must have at least one axis");
  std::vector<mx::array> inputs = {as_f32(x, stream)};
  if (bias) {
    check_vector(*bias, x.shape(-1), "gelu: bias");
    inputs.push_back(as_f32(*bias, stream));
  }
  return mx::array(x.shape(), mx::float32,
                   std::make_shared<RowsPrimitive>(stream, RowsPrimitive::Kind::Gelu, 0.0f,
                                                   bias.has_value(), parallel),
                   std::move(inputs));
}

void RowsPrimitive::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  std::vector<Strided> views = start_task(encoder, inputs, out);
  const int64_t C = out.ndim() > 0 ? out.shape(-1) : 1;
  const int64_t rows = C > 0 ? static_cast<int64_t>(out.size()) / C : 0;
  if (rows == 0) return;
  encoder.dispatch([views = std::move(views), y = out.data<float>(), C, rows, kind = kind_,
                    eps = eps_, has_bias = has_bias_, parallel = parallel_] {
    std::vector<Dense> d(views.size());
    for (size_t i = 0; i < views.size(); ++i) densify(views[i], d[i]);
    auto f = [&](size_t i) { return i < d.size() ? static_cast<const float*>(d[i].ptr) : nullptr; };
    RowsJob job{kind, f(0), nullptr, nullptr, eps, y, C, rows, rows};
    if (kind == Kind::Gelu) {
      job.b = has_bias ? f(1) : nullptr;
    } else {
      job.w = f(1);
      job.b = f(2);
    }
    run_rows_job(job, parallel);
  });
}

void RowsPrimitive::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error(std::string(name()) + " has no GPU implementation");
}

bool RowsPrimitive::is_equivalent(const mx::Primitive& other) const {
  auto* o = dynamic_cast<const RowsPrimitive*>(&other);
  return o != nullptr && o->kind_ == kind_ && o->eps_ == eps_ && o->has_bias_ == has_bias_ &&
         o->parallel_ == parallel_;
}

}  // namespace cv2k
