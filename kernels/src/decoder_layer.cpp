// The Qwen2 decoder layer as two operations (see decoder_layer.h). Each task runs the
// loops of the single operations (internal.h) one after the other on the stream's
// thread; the projections and a large attention split their work over the pool.
#include "decoder_layer.h"

#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"
#include "internal.h"
#include "kernels.h"
#include "mlx/backend/cpu/encoder.h"

namespace cv2k {

namespace {

// One projection: its spec, checked shapes, and where its arrays start among the inputs.
struct Projection {
  int bits = 32;
  int group_size = 0;
  bool has_bias = false;
  bool scale_bf16 = false;
  int64_t n = 0, k = 0;
  size_t first = 0;
  bool operator==(const Projection&) const = default;
};

[[noreturn]] void fail(const char* op, const std::string& what) {
  std::ostringstream msg;
  msg << op << ": " << what;
  throw std::invalid_argument(msg.str());
}

// `count` projections read from weights/specs (widths[i]: the input width of the i-th, or
// -1 where the op takes it from the weights), their arrays appended to `inputs`.
std::vector<Projection> read_projections(const char* op, const std::vector<mx::array>& weights,
                                         const std::vector<int>& specs, size_t count,
                                         const std::vector<int64_t>& widths,
                                         std::vector<mx::array>& inputs, mx::Stream st) {
  if (specs.size() != 4 * count) fail(op, "specs must hold 4 ints per projection");
  std::vector<Projection> out;
  size_t next = 0;
  auto take = [&](const char* what) -> const mx::array& {
    if (next >= weights.size()) fail(op, std::string("weights end before ") + what);
    return weights[next++];
  };
  for (size_t i = 0; i < count; ++i) {
    Projection p;
    p.n = specs[4 * i];
    p.bits = specs[4 * i + 1];
    p.group_size = specs[4 * i + 2];
    p.has_bias = specs[4 * i + 3] != 0;
    p.first = inputs.size();
    const std::string name = "projection " + std::to_string(i);
    if (p.n < 1) fail(op, name + ": n must be >= 1");
    const mx::array& w = take("a projection's weight");
    if (p.bits == 32) {
      if (w.dtype() != mx::float32 || w.ndim() != 3 || w.shape(2) != kPanelWidth ||
          w.shape(0) != (p.n + kPanelWidth - 1) / kPanelWidth) {
        fail(op, name + ": bits 32 takes pack_panels(W), float32 (ceil(n / 16), K, 16)");
      }
      p.k = w.shape(1);
      inputs.push_back(w);
    } else if (p.bits == 16) {
      if (w.dtype() != mx::bfloat16 || w.ndim() != 2 || w.shape(0) != p.n) {
        fail(op, name + ": bits 16 takes W, bfloat16 (n, K)");
      }
      p.k = w.shape(1);
      inputs.push_back(w);
    } else if (p.bits == 8 || p.bits == 4) {
      if (p.group_size != 32 && p.group_size != 64 && p.group_size != 128) {
        fail(op, name + ": group_size must be 32, 64 or 128");
      }
      if (w.dtype() != mx::uint32 || w.ndim() != 2 || w.shape(0) != p.n) {
        fail(op, name + ": w must be uint32 (n, K * bits / 32)");
      }
      p.k = static_cast<int64_t>(w.shape(1)) * 32 / p.bits;
      const mx::array& sc = take("a projection's scales");
      const mx::array& zs = take("a projection's biases");
      const mx::Shape sshape = {static_cast<int>(p.n), static_cast<int>(p.k / p.group_size)};
      if (p.k % p.group_size != 0 || sc.shape() != sshape || zs.shape() != sshape) {
        fail(op, name + ": scales and biases must have shape (n, K / group_size)");
      }
      p.scale_bf16 = sc.dtype() == mx::bfloat16 && zs.dtype() == mx::bfloat16;
      const mx::Dtype sdt = p.scale_bf16 ? mx::bfloat16 : mx::float32;
      inputs.push_back(w);
      inputs.push_back(sc.dtype() == sdt ? sc : mx::astype(sc, sdt, st));
      inputs.push_back(zs.dtype() == sdt ? zs : mx::astype(zs, sdt, st));
    } else {
      fail(op, name + ": bits must be 32, 16, 8 or 4");
    }
    if (widths[i] >= 0 && p.k != widths[i]) {
      fail(op, name + ": its input width is " + std::to_string(p.k) + ", expected " +
                   std::to_string(widths[i]));
    }
    if (p.has_bias) {
      const mx::array& b = take("a projection's bias");
      if (b.ndim() != 1 || b.shape(0) != p.n) fail(op, name + ": bias must have shape (n,)");
      inputs.push_back(as_f32(b, st));
    }
    out.push_back(p);
  }
  if (next != weights.size()) fail(op, "more weights than the specs describe");
  return out;
}

// y (M x n) = x (M x k) W^T (+ bias), W as `p` describes, its arrays in `d`.
void project(const Projection& p, const std::vector<Dense>& d, const float* x, int64_t M,
             float* y) {
  const size_t b = p.first + (p.bits == 8 || p.bits == 4 ? 3 : 1);
  const float* bias = p.has_bias ? static_cast<const float*>(d[b].ptr) : nullptr;
  if (p.bits == 32) {
    const PanelArgs a{x, p.k, static_cast<const float*>(d[p.first].ptr), bias, y, p.n, M, p.k, p.n};
    run_panels(a, true);
  } else if (p.bits == 16) {
    compute_bf16(x, static_cast<const uint16_t*>(d[p.first].ptr), bias, y, M, p.k, p.n);
  } else {
    compute_quantized(x, static_cast<const uint8_t*>(d[p.first].ptr), d[p.first + 1].ptr,
                      d[p.first + 2].ptr, p.scale_bf16, bias, y, M, p.k, p.n, p.group_size,
                      p.bits);
  }
}

std::vector<Dense> densify_all(const std::vector<Strided>& views) {
  std::vector<Dense> d(views.size());
  for (size_t i = 0; i < views.size(); ++i) densify(views[i], d[i]);
  return d;
}

float* sized(std::vector<float>& buf, int64_t n) {
  buf.resize(static_cast<size_t>(n));
  return buf.data();
}

// -------------------------------------------------------------- input side

class LayerInput : public mx::Primitive {
 public:
  struct Attrs {
    float eps, rope_scale;
    int hq, hkv, dims, offset;
    bool operator==(const Attrs&) const = default;
  };

  LayerInput(mx::Stream s, Attrs a, Projection qkv) : mx::Primitive(s), a_(a), qkv_(qkv) {}

  // inputs: x, norm_w, inv_freq, the projection's arrays
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& enc = mx::cpu::get_command_encoder(stream());
    std::vector<Strided> views = start_task(enc, inputs, outputs);
    const int64_t B = inputs[0].shape(0), L = inputs[0].shape(1), C = inputs[0].shape(2);
    const int64_t D = outputs[0].shape(3);
    float* out[3] = {outputs[0].data<float>(), outputs[1].data<float>(), outputs[2].data<float>()};
    enc.dispatch([views = std::move(views), q = out[0], k = out[1], v = out[2], B, L, C, D,
                  a = a_, p = qkv_] {
      const std::vector<Dense> d = densify_all(views);
      const int64_t M = B * L;
      thread_local std::vector<float> nbuf, qkvbuf;
      float* n = sized(nbuf, M * C);
      float* h = sized(qkvbuf, M * p.n);
      rms_norm_rows(static_cast<const float*>(d[0].ptr), nullptr,
                    static_cast<const float*>(d[1].ptr), a.eps, nullptr, n, C, M);
      project(p, d, n, M, h);
      rope_split_rows(h, static_cast<const float*>(d[2].ptr), q, k, v, B, L, D, a.hq, a.hkv,
                      a.dims, a.rope_scale, a.offset);
    });
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("CosyVoice2LayerInput has no GPU implementation");
  }
  const char* name() const override { return "CosyVoice2LayerInput"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const LayerInput*>(&other);
    return o != nullptr && o->a_ == a_ && o->qkv_ == qkv_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    const auto& x = inputs[0];
    const int d = static_cast<int>(qkv_.n) / (a_.hq + 2 * a_.hkv);
    return {{x.shape(0), a_.hq, x.shape(1), d},
            {x.shape(0), a_.hkv, x.shape(1), d},
            {x.shape(0), a_.hkv, x.shape(1), d}};
  }

 private:
  Attrs a_;
  Projection qkv_;
};

// ------------------------------------------------------------- output side

class LayerOutput : public mx::UnaryPrimitive {
 public:
  struct Attrs {
    float attn_scale, eps;
    bool causal;
    bool operator==(const Attrs&) const = default;
  };

  LayerOutput(mx::Stream s, Attrs a, std::vector<Projection> proj)
      : mx::UnaryPrimitive(s), a_(a), proj_(std::move(proj)) {}

  // inputs: x, q, k, v, norm_w, then o_proj's, gate_up's and down_proj's arrays
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& enc = mx::cpu::get_command_encoder(stream());
    std::vector<Strided> views = start_task(enc, inputs, out);
    const int64_t C = inputs[0].shape(-1);
    enc.dispatch([views = std::move(views), C, y = out.data<float>(), a = a_, proj = proj_] {
      std::vector<Dense> d(views.size());
      for (size_t i = 0; i < views.size(); ++i) {
        if (i < 1 || i > 3) densify(views[i], d[i]);  // q, k and v: decode_attention_job
      }
      DecodeAttention job = decode_attention_job(views[1], views[2], views[3], a.attn_scale,
                                                 a.causal, d[1], d[2], d[3]);
      const Projection &o = proj[0], &gu = proj[1], &dn = proj[2];
      const int64_t M = job.B * job.L, F = gu.n / 2, D = job.D;
      thread_local std::vector<float> abuf, obuf, hbuf, nbuf, gbuf, sbuf, dbuf;
      job.y = sized(abuf, M * job.Hq * D);
      run_decode_attention(job);
      float* ob = sized(obuf, M * C);
      project(o, d, job.y, M, ob);
      float* h = sized(hbuf, M * C);
      float* n = sized(nbuf, M * C);
      rms_norm_rows(ob, static_cast<const float*>(d[0].ptr), static_cast<const float*>(d[4].ptr),
                    a.eps, h, n, C, M);
      float* g = sized(gbuf, M * gu.n);
      project(gu, d, n, M, g);
      float* s = sized(sbuf, M * F);
      swiglu_rows(g, s, F, M);
      float* dd = sized(dbuf, M * C);
      project(dn, d, s, M, dd);
      for (int64_t i = 0; i < M * C; ++i) y[i] = h[i] + dd[i];
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("CosyVoice2LayerOutput has no GPU implementation");
  }
  const char* name() const override { return "CosyVoice2LayerOutput"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const LayerOutput*>(&other);
    return o != nullptr && o->a_ == a_ && o->proj_ == proj_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }

 private:
  Attrs a_;
  std::vector<Projection> proj_;
};

}  // namespace

// ---------------------------------------------------------------- operations

std::vector<mx::array> layer_input(const mx::array& x, const mx::array& norm_w, float eps,
                                   const std::vector<mx::array>& weights,
                                   const std::vector<int>& specs, const mx::array& inv_freq,
                                   int n_heads, int n_kv_heads, int dims, float rope_scale,
                                   int offset, mx::StreamOrDevice s) {
  constexpr const char* op = "layer_input";
  mx::Stream st = cpu_stream(s, op);
  if (x.ndim() != 3) fail(op, "x must have shape (B, L, C)");
  const int64_t C = x.shape(2);
  if (norm_w.ndim() != 1 || norm_w.shape(0) != C) fail(op, "norm_w must have shape (C,)");
  if (n_heads < 1 || n_kv_heads < 1 || n_heads % n_kv_heads != 0) {
    fail(op, "n_heads must be a positive multiple of n_kv_heads");
  }
  std::vector<mx::array> inputs = {as_f32(x, st), as_f32(norm_w, st), as_f32(inv_freq, st)};
  auto proj = read_projections(op, weights, specs, 1, {C}, inputs, st);
  const int64_t heads = n_heads + 2 * n_kv_heads;
  if (proj[0].n % heads != 0) fail(op, "the projection's n must be (n_heads + 2 n_kv_heads) * D");
  const int d = static_cast<int>(proj[0].n / heads);
  if (dims <= 0 || dims % 2 != 0 || dims > d) {
    fail(op, "dims must be even and at most the head size");
  }
  if (inv_freq.ndim() != 1 || inv_freq.shape(0) != dims / 2) {
    fail(op, "inv_freq must have shape (dims / 2,)");
  }
  const int b = x.shape(0), l = x.shape(1);
  return mx::array::make_arrays(
      {{b, n_heads, l, d}, {b, n_kv_heads, l, d}, {b, n_kv_heads, l, d}},
      {mx::float32, mx::float32, mx::float32},
      std::make_shared<LayerInput>(
          st, LayerInput::Attrs{eps, rope_scale, n_heads, n_kv_heads, dims, offset}, proj[0]),
      std::move(inputs));
}

mx::array layer_output(const mx::array& x, const mx::array& q, const mx::array& k,
                       const mx::array& v, float attn_scale, bool causal, const mx::array& norm_w,
                       float eps, const std::vector<mx::array>& weights,
                       const std::vector<int>& specs, mx::StreamOrDevice s) {
  constexpr const char* op = "layer_output";
  mx::Stream st = cpu_stream(s, op);
  if (x.ndim() != 3) fail(op, "x must have shape (B, L, C)");
  if (q.ndim() != 4 || k.ndim() != 4 || v.shape() != k.shape() || q.shape(0) != x.shape(0) ||
      q.shape(2) != x.shape(1) || k.shape(0) != q.shape(0) || k.shape(3) != q.shape(3) ||
      q.shape(1) % k.shape(1) != 0) {
    fail(op, "q (B, Hq, L, D), k and v (B, Hkv, T, D) with Hq a multiple of Hkv expected");
  }
  if (causal && q.shape(2) > k.shape(2)) fail(op, "causal needs at least as many keys as queries");
  const int64_t C = x.shape(2);
  if (norm_w.ndim() != 1 || norm_w.shape(0) != C) fail(op, "norm_w must have shape (C,)");
  std::vector<mx::array> inputs = {as_f32(x, st), as_f32(q, st), as_f32(k, st), as_f32(v, st),
                                   as_f32(norm_w, st)};
  const int64_t hd = static_cast<int64_t>(q.shape(1)) * q.shape(3);
  auto proj = read_projections(op, weights, specs, 3, {hd, C, -1}, inputs, st);
  if (proj[0].n != C || proj[2].n != C) fail(op, "o_proj and down_proj must have n = C");
  if (proj[1].n % 2 != 0 || proj[2].k != proj[1].n / 2) {
    fail(op, "the gate/up projection must have n = 2F and down_proj input width F");
  }
  return mx::array(x.shape(), mx::float32,
                   std::make_shared<LayerOutput>(st, LayerOutput::Attrs{attn_scale, eps, causal},
                                                 std::move(proj)),
                   std::move(inputs));
}

}  // namespace cv2k
