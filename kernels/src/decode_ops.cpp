// Decode-step operations as single MLX primitives (see decode_ops.h). Portable C++
// (baseline flags): the loops are short and written so compilers vectorise them.
#include "decode_ops.h"

#include <cmath>
#include <cstring>
#include <vector>

#include "common.h"
#include "internal.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "pool.h"

namespace cv2k {

namespace {

constexpr int kLanes = 8;

// exp(x) for float32, branch-free so loops over it vectorise: 2^n * p(r), |r| <= ln2 / 2,
// degree-6 Taylor polynomial (relative error about 2e-7); inputs clamped to [-87, 88].
inline float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float shift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float n = (x * 1.44269504088896341f + shift) - shift;
  float r = x - n * 0.693145751953125f;
  r = r - n * 1.428606765330187e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline float dot(const float* a, const float* b, int64_t n) {
  float acc[kLanes] = {};
  const int64_t nv = n - n % kLanes;
  for (int64_t i = 0; i < nv; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += a[i + j] * b[i + j];
  float s = 0.0f;
  for (int64_t i = nv; i < n; ++i) s += a[i] * b[i];
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

void alloc(mx::array& out) { out.set_data(mx::allocator::malloc(out.nbytes())); }

void attention_task(const void* ctx, int64_t task) {
  const DecodeAttention& a = *static_cast<const DecodeAttention*>(ctx);
  thread_local std::vector<float> buf;
  const int64_t l = task % a.L, h = (task / a.L) % a.Hq, b = task / (a.L * a.Hq);
  const int64_t kvh = h / (a.Hq / a.Hkv);
  const int64_t n = a.causal ? a.T - a.L + l + 1 : a.T;
  buf.resize(static_cast<size_t>(n + a.D));
  float* p = buf.data();
  float* qs = p + n;
  const float* qr = a.q + ((b * a.Hq + h) * a.L + l) * a.D;
  for (int64_t d = 0; d < a.D; ++d) qs[d] = qr[d] * a.scale;  // scaled first, as MLX does
  const float* kb = a.k + b * a.ks[0] + kvh * a.ks[1];
  const float* vb = a.v + b * a.vs[0] + kvh * a.vs[1];
  float mx_score = -INFINITY;
  for (int64_t t = 0; t < n; ++t) {
    p[t] = dot(qs, kb + t * a.ks[2], a.D);
    mx_score = p[t] > mx_score ? p[t] : mx_score;
  }
  float sum = 0.0f;
  for (int64_t t = 0; t < n; ++t) {
    p[t] = fast_exp(p[t] - mx_score);
    sum += p[t];
  }
  const float inv = 1.0f / sum;
  float* out = a.y + (b * a.L + l) * (a.Hq * a.D) + h * a.D;
  for (int64_t d = 0; d < a.D; ++d) out[d] = 0.0f;
  for (int64_t t = 0; t < n; ++t) {
    const float w = p[t] * inv;
    const float* vr = vb + t * a.vs[2];
    for (int64_t d = 0; d < a.D; ++d) out[d] += w * vr[d];
  }
}


}  // namespace

// ------------------------------------------------------------- the loops (internal.h)

void rms_norm_rows(const float* x, const float* residual, const float* w, float eps, float* h,
                   float* y, int64_t d, int64_t rows) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* xi = x + i * d;
    if (residual != nullptr) {
      const float* r = residual + i * d;
      float* hi = h + i * d;
      for (int64_t j = 0; j < d; ++j) hi[j] = xi[j] + r[j];
      xi = hi;
    }
    const float ms = dot(xi, xi, d) / static_cast<float>(d);
    const float inv = 1.0f / std::sqrt(ms + eps);
    float* yi = y + i * d;
    for (int64_t j = 0; j < d; ++j) yi[j] = (xi[j] * inv) * w[j];
  }
}

void rope_split_rows(const float* x, const float* inv_freq, float* q, float* k, float* v,
                     int64_t B, int64_t L, int64_t D, int hq, int hkv, int dims, float scale,
                     int64_t offset) {
  const int half = dims / 2;
  const int64_t width = (hq + 2 * hkv) * D;
  std::vector<float> cs(2 * half);
  for (int64_t t = 0; t < L; ++t) {
    // as mx.fast.rope's CPU path: theta = ((t + offset) * scale) * inv_freq in float32
    const float pos = static_cast<float>(t + offset) * scale;
    for (int i = 0; i < half; ++i) {
      const float theta = pos * inv_freq[i];
      cs[i] = std::cos(theta);
      cs[half + i] = std::sin(theta);
    }
    for (int64_t b = 0; b < B; ++b) {
      const float* row = x + (b * L + t) * width;
      for (int h = 0; h < hq + 2 * hkv; ++h) {
        const float* src = row + h * D;
        float* dst;
        if (h < hq) {
          dst = q + ((b * hq + h) * L + t) * D;
        } else if (h < hq + hkv) {
          dst = k + ((b * hkv + (h - hq)) * L + t) * D;
        } else {
          dst = v + ((b * hkv + (h - hq - hkv)) * L + t) * D;
          std::memcpy(dst, src, D * sizeof(float));
          continue;
        }
        for (int i = 0; i < half; ++i) {
          const float x1 = src[i], x2 = src[half + i];
          const float c = cs[i], s = cs[half + i];
          dst[i] = x1 * c - x2 * s;
          dst[half + i] = x1 * s + x2 * c;
        }
        for (int64_t i = dims; i < D; ++i) dst[i] = src[i];
      }
    }
  }
}

DecodeAttention decode_attention_job(const Strided& q, const Strided& k, const Strided& v,
                                     float scale, bool causal, Dense& qd, Dense& kd, Dense& vd) {
  DecodeAttention job{};
  job.B = q.shape[0];
  job.Hq = q.shape[1];
  job.L = q.shape[2];
  job.D = q.shape[3];
  job.Hkv = k.shape[1];
  job.T = k.shape[2];
  job.scale = scale;
  job.causal = causal;
  densify(q, qd);
  job.q = static_cast<const float*>(qd.ptr);
  // k and v are usually slices of the KV cache's buffers: strided over T and heads but
  // unit-stride over D, which the kernel reads as they are
  const int64_t dense[3] = {job.Hkv * job.T * job.D, job.T * job.D, job.D};
  auto bind = [&](const Strided& a, Dense& ad, const float*& ptr, int64_t* strides) {
    if (a.strides[3] == 1) {
      ptr = reinterpret_cast<const float*>(a.base);
      for (int i = 0; i < 3; ++i) strides[i] = a.strides[i];
    } else {
      densify(a, ad);
      ptr = static_cast<const float*>(ad.ptr);
      for (int i = 0; i < 3; ++i) strides[i] = dense[i];
    }
  };
  bind(k, kd, job.k, job.ks);
  bind(v, vd, job.v, job.vs);
  return job;
}

void run_decode_attention(const DecodeAttention& job) {
  const int64_t tasks = job.B * job.Hq * job.L;
  if (tasks * job.T * job.D < (1 << 15)) {
    for (int64_t i = 0; i < tasks; ++i) attention_task(&job, i);
  } else {
    Pool::get().run(tasks, attention_task, &job);
  }
}

void swiglu_rows(const float* h, float* y, int64_t f, int64_t rows) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* g = h + i * 2 * f;
    const float* u = g + f;
    float* yi = y + i * f;
    for (int64_t j = 0; j < f; ++j) {
      const float sig = 1.0f / (1.0f + fast_exp(-g[j]));
      yi[j] = (g[j] * sig) * u[j];
    }
  }
}

namespace {

// ------------------------------------------------------------------ rms_norm

class RmsNorm : public mx::Primitive {
 public:
  RmsNorm(mx::Stream s, float eps, bool residual)
      : mx::Primitive(s), eps_(eps), residual_(residual) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    for (auto& o : outputs) alloc(o);
    auto& enc = mx::cpu::get_command_encoder(stream());
    const int64_t d = inputs[0].shape(-1);
    const int64_t rows = d > 0 ? static_cast<int64_t>(inputs[0].size()) / d : 0;
    std::vector<Strided> views;
    for (auto& in : inputs) views.push_back(describe(in));
    float* h = residual_ ? outputs[0].data<float>() : nullptr;
    float* y = outputs.back().data<float>();
    enc.dispatch([views = std::move(views), h, y, d, rows, eps = eps_, res = residual_] {
      Dense xd, rd, wd;
      densify(views[0], xd);
      if (res) densify(views[1], rd);
      densify(views.back(), wd);
      rms_norm_rows(static_cast<const float*>(xd.ptr),
                    res ? static_cast<const float*>(rd.ptr) : nullptr,
                    static_cast<const float*>(wd.ptr), eps, h, y, d, rows);
    });
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("CosyVoice2RmsNorm has no GPU implementation");
  }
  const char* name() const override { return "CosyVoice2RmsNorm"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const RmsNorm*>(&other);
    return o && o->eps_ == eps_ && o->residual_ == residual_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    if (residual_) return {inputs[0].shape(), inputs[0].shape()};
    return {inputs[0].shape()};
  }

 private:
  float eps_;
  bool residual_;
};

// ---------------------------------------------------------------- rope_split

class RopeSplit : public mx::Primitive {
 public:
  RopeSplit(mx::Stream s, int hq, int hkv, int dims, float scale, int offset)
      : mx::Primitive(s), hq_(hq), hkv_(hkv), dims_(dims), scale_(scale), offset_(offset) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    for (auto& o : outputs) alloc(o);
    auto& enc = mx::cpu::get_command_encoder(stream());
    const auto& qkv = inputs[0];
    const int64_t B = qkv.shape(0), L = qkv.shape(1);
    const int64_t D = outputs[0].shape(3);
    std::vector<Strided> views = {describe(inputs[0]), describe(inputs[1])};
    float* out[3] = {outputs[0].data<float>(), outputs[1].data<float>(), outputs[2].data<float>()};
    enc.dispatch([views = std::move(views), q = out[0], k = out[1], v = out[2], B, L, D,
                  hq = hq_, hkv = hkv_, dims = dims_, scale = scale_, offset = offset_] {
      Dense xd, fd;
      densify(views[0], xd);
      densify(views[1], fd);
      rope_split_rows(static_cast<const float*>(xd.ptr), static_cast<const float*>(fd.ptr), q, k,
                      v, B, L, D, hq, hkv, dims, scale, offset);
    });
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("CosyVoice2RopeSplit has no GPU implementation");
  }
  const char* name() const override { return "CosyVoice2RopeSplit"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const RopeSplit*>(&other);
    return o && o->hq_ == hq_ && o->hkv_ == hkv_ && o->dims_ == dims_ && o->scale_ == scale_ &&
           o->offset_ == offset_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    const auto& x = inputs[0];
    const int d = x.shape(2) / (hq_ + 2 * hkv_);
    return {{x.shape(0), hq_, x.shape(1), d},
            {x.shape(0), hkv_, x.shape(1), d},
            {x.shape(0), hkv_, x.shape(1), d}};
  }

 private:
  int hq_, hkv_, dims_;
  float scale_;
  int offset_;
};

// ----------------------------------------------------------------- attention

class Attention : public mx::UnaryPrimitive {
 public:
  Attention(mx::Stream s, float scale, bool causal)
      : mx::UnaryPrimitive(s), scale_(scale), causal_(causal) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    alloc(out);
    auto& enc = mx::cpu::get_command_encoder(stream());
    std::vector<Strided> views = {describe(inputs[0]), describe(inputs[1]), describe(inputs[2])};
    enc.dispatch([views = std::move(views), y = out.data<float>(), scale = scale_,
                  causal = causal_] {
      Dense qd, kd, vd;
      DecodeAttention job =
          decode_attention_job(views[0], views[1], views[2], scale, causal, qd, kd, vd);
      job.y = y;
      run_decode_attention(job);
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("CosyVoice2Attention has no GPU implementation");
  }
  const char* name() const override { return "CosyVoice2Attention"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const Attention*>(&other);
    return o && o->scale_ == scale_ && o->causal_ == causal_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    const auto& q = inputs[0];
    return {{q.shape(0), q.shape(2), q.shape(1) * q.shape(3)}};
  }

 private:
  float scale_;
  bool causal_;
};

// -------------------------------------------------------------------- swiglu

class Swiglu : public mx::UnaryPrimitive {
 public:
  explicit Swiglu(mx::Stream s) : mx::UnaryPrimitive(s) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    alloc(out);
    auto& enc = mx::cpu::get_command_encoder(stream());
    const int64_t f = out.shape(-1);
    const int64_t rows = f > 0 ? static_cast<int64_t>(out.size()) / f : 0;
    std::vector<Strided> views = {describe(inputs[0])};
    float* y = out.data<float>();
    enc.dispatch([views = std::move(views), y, f, rows] {
      Dense hd;
      densify(views[0], hd);
      swiglu_rows(static_cast<const float*>(hd.ptr), y, f, rows);
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("CosyVoice2Swiglu has no GPU implementation");
  }
  const char* name() const override { return "CosyVoice2Swiglu"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return dynamic_cast<const Swiglu*>(&other) != nullptr;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    mx::Shape shape = inputs[0].shape();
    shape.back() /= 2;
    return {shape};
  }
};

}  // namespace

// ---------------------------------------------------------------- operations

std::vector<mx::array> rms_norm(const mx::array& x, const mx::array& w, float eps,
                                const std::optional<mx::array>& residual, mx::StreamOrDevice s) {
  mx::Stream st = cpu_stream(s, "rms_norm");
  if (x.ndim() < 1 || w.ndim() != 1 || w.shape(0) != x.shape(-1)) {
    throw std::invalid_argument("rms_norm: x (..., D) and w (D,) expected");
  }
  std::vector<mx::array> inputs = {as_f32(x, st)};
  if (residual) {
    if (residual->shape() != x.shape()) {
      throw std::invalid_argument("rms_norm: residual must have the shape of x");
    }
    inputs.push_back(as_f32(*residual, st));
  }
  inputs.push_back(as_f32(w, st));
  const int n = residual ? 2 : 1;
  return mx::array::make_arrays(std::vector<mx::Shape>(n, x.shape()),
                                std::vector<mx::Dtype>(n, mx::float32),
                                std::make_shared<RmsNorm>(st, eps, residual.has_value()),
                                std::move(inputs));
}

std::vector<mx::array> rope_split(const mx::array& qkv, const mx::array& inv_freq, int n_heads,
                                  int n_kv_heads, int dims, float scale, int offset,
                                  mx::StreamOrDevice s) {
  mx::Stream st = cpu_stream(s, "rope_split");
  if (qkv.ndim() != 3 || n_heads <= 0 || n_kv_heads <= 0 ||
      qkv.shape(2) % (n_heads + 2 * n_kv_heads) != 0) {
    throw std::invalid_argument("rope_split: qkv must be (B, L, (n_heads + 2 n_kv_heads) * D)");
  }
  const int d = qkv.shape(2) / (n_heads + 2 * n_kv_heads);
  if (dims <= 0 || dims % 2 != 0 || dims > d) {
    throw std::invalid_argument("rope_split: dims must be even and at most the head size");
  }
  if (inv_freq.ndim() != 1 || inv_freq.shape(0) != dims / 2) {
    throw std::invalid_argument("rope_split: inv_freq must have shape (dims / 2,)");
  }
  const int b = qkv.shape(0), l = qkv.shape(1);
  return mx::array::make_arrays(
      {{b, n_heads, l, d}, {b, n_kv_heads, l, d}, {b, n_kv_heads, l, d}},
      {mx::float32, mx::float32, mx::float32},
      std::make_shared<RopeSplit>(st, n_heads, n_kv_heads, dims, scale, offset),
      {as_f32(qkv, st), as_f32(inv_freq, st)});
}

mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                    bool causal, mx::StreamOrDevice s) {
  mx::Stream st = cpu_stream(s, "attention");
  if (q.ndim() != 4 || k.ndim() != 4 || v.shape() != k.shape() || q.shape(0) != k.shape(0) ||
      q.shape(3) != k.shape(3) || q.shape(1) % k.shape(1) != 0) {
    throw std::invalid_argument(
        "attention: q (B, Hq, L, D), k and v (B, Hkv, T, D) with Hq a multiple of Hkv expected");
  }
  if (causal && q.shape(2) > k.shape(2)) {
    throw std::invalid_argument("attention: causal needs at least as many keys as queries");
  }
  return mx::array({q.shape(0), q.shape(2), q.shape(1) * q.shape(3)}, mx::float32,
                   std::make_shared<Attention>(st, scale, causal),
                   {as_f32(q, st), as_f32(k, st), as_f32(v, st)});
}

mx::array swiglu(const mx::array& h, mx::StreamOrDevice s) {
  mx::Stream st = cpu_stream(s, "swiglu");
  if (h.ndim() < 1 || h.shape(-1) % 2 != 0) {
    throw std::invalid_argument("swiglu: h (..., 2F) expected");
  }
  mx::Shape shape = h.shape();
  shape.back() /= 2;
  return mx::array(shape, mx::float32, std::make_shared<Swiglu>(st), {as_f32(h, st)});
}

}  // namespace cv2k
