// 1-D convolution as the panel GEMM over overlapping rows of the padded input.
#include "conv1d.h"

#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"
#include "internal.h"
#include "kernels.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "pool.h"

namespace cv2k {

namespace {

// Output rows per task: a multiple of every variant's panel tile (12 and 6 rows), small
// enough that the task's rows of the input and of the output stay in L2 while all
// panels pass over them.
constexpr int64_t kConvRows = 192;

struct Shape {
  int64_t B, L, C, K, N, lo, hi, stride, dilation;
  int64_t padded() const { return lo + L + hi; }
  int64_t out() const { return (padded() - dilation * (K - 1) - 1) / stride + 1; }
};

// One batch item's work: tasks of kConvRows output rows within one phase.
struct ConvJob {
  const Shape* s;
  const float* xp;     // the padded input, phase after phase
  const float* wp;
  const float* bias;
  float* y;            // this batch item's output
  std::vector<int64_t> phase_start, phase_rows;  // offset (floats) and output rows per phase
  std::vector<int64_t> task_phase, task_row;     // per task: phase and first output row in it
};

void run_task(const ConvJob& j, int64_t i) {
  const Shape& s = *j.s;
  const int64_t ph = j.task_phase[i], u0 = j.task_row[i];
  const int64_t rows = j.phase_rows[ph] - u0 < kConvRows ? j.phase_rows[ph] - u0 : kConvRows;
  const int64_t ldx = s.stride * s.C;
  PanelArgs a{j.xp + j.phase_start[ph] + u0 * ldx, ldx, j.wp, j.bias,
              j.y + (u0 * s.dilation + ph) * s.N, s.dilation * s.N, rows, s.K * s.C, s.N};
  active_table()->panel_cols(a, 0, (s.N + kPanelWidth - 1) / kPanelWidth);
}

// x (L, C) zero-padded into buf as `dilation` phases (phase p: padded rows p, p + d, ...),
// through Snake (alpha, inv_alpha) where given.
void pad_phases(const Shape& s, const float* x, const float* alpha, const float* inv_alpha,
                std::vector<float>& buf, ConvJob& j) {
  const int64_t lp = s.padded(), d = s.dilation, C = s.C;
  buf.resize(static_cast<size_t>(lp * C));
  j.phase_start.assign(d, 0);
  for (int64_t p = 1; p < d; ++p) {
    j.phase_start[p] = j.phase_start[p - 1] + (lp - (p - 1) + d - 1) / d * C;
  }
  const KernelTable* t = active_table();
  for (int64_t r = 0; r < lp; ++r) {
    float* dst = buf.data() + j.phase_start[r % d] + (r / d) * C;
    const int64_t src = r - s.lo;
    if (src < 0 || src >= s.L) {
      std::memset(dst, 0, C * sizeof(float));
    } else if (alpha) {
      t->snake_row(x + src * C, alpha, inv_alpha, dst, C);
    } else {
      std::memcpy(dst, x + src * C, C * sizeof(float));
    }
  }
}

}  // namespace

mx::array conv1d_panels(const mx::array& x, const mx::array& wp, int n, int kernel_size,
                        const std::optional<mx::array>& bias, int pad_left, int pad_right,
                        int stride, int dilation, const std::vector<mx::array>& snake,
                        bool parallel, mx::StreamOrDevice s) {
  mx::Stream stream = cpu_stream(s, "conv1d_panels");
  if (kernel_size < 1 || stride < 1 || dilation < 1 || pad_left < 0 || pad_right < 0) {
    throw std::invalid_argument(
        "conv1d_panels: kernel_size, stride and dilation must be >= 1 and the pads >= 0");
  }
  if (stride > 1 && dilation > 1) {
    throw std::invalid_argument("conv1d_panels: stride > 1 needs dilation 1");
  }
  if (x.ndim() != 3 || x.shape(2) < 1) {
    throw std::invalid_argument("conv1d_panels: x must have shape (B, L, C) with C >= 1");
  }
  if (wp.ndim() != 3 || wp.dtype() != mx::float32 || wp.shape(2) != kPanelWidth ||
      wp.shape(1) != static_cast<int64_t>(kernel_size) * x.shape(2)) {
    throw std::invalid_argument(
        "conv1d_panels: wp must be pack_panels(w.reshape(n, kernel_size * C)) of a float32 "
        "weight (n, kernel_size, C), C = x.shape[-1]");
  }
  if (n < 1 || (n + kPanelWidth - 1) / kPanelWidth != wp.shape(0)) {
    throw std::invalid_argument("conv1d_panels: n must be the weight's output channel count");
  }
  const int64_t span = static_cast<int64_t>(dilation) * (kernel_size - 1) + 1;
  const int64_t padded = static_cast<int64_t>(x.shape(1)) + pad_left + pad_right;
  if (padded < span) {
    throw std::invalid_argument("conv1d_panels: the padded input (" + std::to_string(padded) +
                                " rows) is shorter than the kernel's span (" +
                                std::to_string(span) + ")");
  }
  std::vector<mx::array> inputs = {as_f32(x, stream), wp};
  if (bias) {
    if (bias->ndim() != 1 || bias->shape(0) != n) {
      throw std::invalid_argument("conv1d_panels: bias must have shape (n,)");
    }
    inputs.push_back(as_f32(*bias, stream));
  }
  if (!snake.empty()) {
    if (snake.size() != 2 || snake[0].ndim() != 1 || snake[0].shape(0) != x.shape(2) ||
        snake[1].ndim() != 1 || snake[1].shape(0) != x.shape(2)) {
      throw std::invalid_argument(
          "conv1d_panels: snake must be [alpha, inv_alpha], each of shape (C,)");
    }
    inputs.push_back(as_f32(snake[0], stream));
    inputs.push_back(as_f32(snake[1], stream));
  }
  const int l_out = static_cast<int>((padded - span) / stride + 1);
  Conv1dPrimitive::Attrs a{n, kernel_size, pad_left, pad_right, stride, dilation,
                           bias.has_value(), !snake.empty(), parallel};
  return mx::array({x.shape(0), l_out, n}, mx::float32,
                   std::make_shared<Conv1dPrimitive>(stream, a), std::move(inputs));
}

void Conv1dPrimitive::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  std::vector<Strided> views = start_task(encoder, inputs, out);
  const mx::array& x = inputs[0];
  Shape shape{x.shape(0), x.shape(1), x.shape(2), a_.kernel_size, a_.n,
              a_.pad_left, a_.pad_right, a_.stride, a_.dilation};
  if (out.size() == 0) return;
  encoder.dispatch([views = std::move(views), y = out.data<float>(), shape, a = a_] {
    Dense xd, wd, bd, ad, id;
    densify(views[0], xd);
    densify(views[1], wd);
    if (a.has_bias) densify(views[2], bd);
    if (a.has_snake) {
      densify(views[a.has_bias ? 3 : 2], ad);
      densify(views[a.has_bias ? 4 : 3], id);
    }
    const int64_t l_out = shape.out(), d = shape.dilation;
    thread_local std::vector<float> buf;  // the padded input, reused by the next call
    ConvJob job{&shape, nullptr, static_cast<const float*>(wd.ptr),
                static_cast<const float*>(bd.ptr), nullptr, {}, {}, {}, {}};
    job.phase_rows.assign(d, 0);
    for (int64_t p = 0; p < d && p < l_out; ++p) job.phase_rows[p] = (l_out - p + d - 1) / d;
    for (int64_t p = 0; p < d; ++p) {
      for (int64_t u = 0; u < job.phase_rows[p]; u += kConvRows) {
        job.task_phase.push_back(p);
        job.task_row.push_back(u);
      }
    }
    const int64_t tasks = static_cast<int64_t>(job.task_phase.size());
    Pool& pool = Pool::get();
    for (int64_t b = 0; b < shape.B; ++b) {
      pad_phases(shape, static_cast<const float*>(xd.ptr) + b * shape.L * shape.C,
                 static_cast<const float*>(ad.ptr), static_cast<const float*>(id.ptr), buf, job);
      job.xp = buf.data();
      job.y = y + b * l_out * shape.N;
      if (!a.parallel || pool.threads() == 1 || tasks < 2) {
        for (int64_t i = 0; i < tasks; ++i) run_task(job, i);
      } else {
        pool.run(tasks, [](const void* ctx, int64_t i) {
          run_task(*static_cast<const ConvJob*>(ctx), i);
        }, &job);
      }
    }
  });
}

void Conv1dPrimitive::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error(std::string(name()) + " has no GPU implementation");
}

bool Conv1dPrimitive::is_equivalent(const mx::Primitive& other) const {
  auto* o = dynamic_cast<const Conv1dPrimitive*>(&other);
  return o != nullptr && o->a_.n == a_.n && o->a_.kernel_size == a_.kernel_size &&
         o->a_.pad_left == a_.pad_left && o->a_.pad_right == a_.pad_right &&
         o->a_.stride == a_.stride && o->a_.dilation == a_.dilation &&
         o->a_.has_bias == a_.has_bias && o->a_.has_snake == a_.has_snake &&
         o->a_.parallel == a_.parallel;
}

std::vector<mx::Shape> Conv1dPrimitive::output_shapes(const std::vector<mx::array>& inputs) {
  const int64_t padded = inputs[0].shape(1) + a_.pad_left + a_.pad_right;
  const int64_t span = static_cast<int64_t>(a_.dilation) * (a_.kernel_size - 1) + 1;
  return {{inputs[0].shape(0), static_cast<int>((padded - span) / a_.stride + 1), a_.n}};
}

}  // namespace cv2k
