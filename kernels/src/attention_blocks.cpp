// Block attention: per head, keys and values gathered into panels, scores and weighted
// values by the panel GEMM, the masked softmax in place (kernels.h).
#include "attention_blocks.h"

#include <algorithm>
#include <cstring>
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

// Row j of keys (values: + H * D) among all positions.
const float* key_row(const AttentionProblem& p, int64_t j) {
  const int64_t hd = p.H * p.D;
  if (j >= p.q0) return p.qkv + (j - p.q0) * 3 * hd + hd;
  for (size_t b = 0; b < p.blocks.size(); ++b) {
    if (j < p.lengths[b]) return p.blocks[b] + j * 2 * hd;
    j -= p.lengths[b];
  }
  return nullptr;  // unreachable: j < q0 = sum of lengths
}

// Row j < q0 of the keys (values: + H * D) among the bf16 blocks.
const uint16_t* key_row16(const AttentionProblem& p, int64_t j) {
  const int64_t hd = p.H * p.D;
  for (size_t b = 0; b < p.blocks16.size(); ++b) {
    if (j < p.lengths[b]) return p.blocks16[b] + j * 2 * hd;
    j -= p.lengths[b];
  }
  return nullptr;  // unreachable: j < q0 = sum of lengths
}

// The same with the products in bf16 (AttentionProblem::bf16): keys and values as bf16
// pair panels, the queries and the softmax's weights rounded to bf16 as their pairs.
void one_head_bf16(const AttentionProblem& p, int64_t h, const int64_t* visible, int64_t n) {
  constexpr int64_t W = kPanelWidth;
  const KernelTable* t = active_table();
  const int64_t hd = p.H * p.D, D = p.D;
  const int64_t dpairs = bf16_kpairs(D), npairs = bf16_kpairs(n);
  const int64_t kpanels = (n + W - 1) / W, vpanels = (D + W - 1) / W;
  thread_local std::vector<uint16_t> kp, vp;
  thread_local std::vector<uint32_t> xp;
  thread_local std::vector<float> s;
  kp.assign(kpanels * dpairs * 2 * W, 0);
  vp.assign(vpanels * npairs * 2 * W, 0);
  s.resize(p.M * n);
  // Every position's key and value rows in fp32, rounded by the variant's bf16_kv. Positions
  // cached in bf16 (the streaming flow's cache) are widened first: rounding them again gives
  // them back exactly.
  thread_local std::vector<const float*> krows, vrows;
  thread_local std::vector<float> widened;
  const int64_t cached = p.blocks16.empty() ? 0 : std::min(p.q0, n);
  krows.resize(n);
  vrows.resize(n);
  widened.resize(cached * 2 * D);
  for (int64_t j = 0; j < n; ++j) {
    if (j >= cached) {
      krows[j] = key_row(p, j) + h * D;
      vrows[j] = krows[j] + hd;
      continue;
    }
    const uint16_t* kv16 = key_row16(p, j) + h * D;
    float* kv = widened.data() + j * 2 * D;
    for (int64_t d = 0; d < D; ++d) {
      kv[d] = bf16_to_float(kv16[d]);
      kv[D + d] = bf16_to_float(kv16[hd + d]);
    }
    krows[j] = kv;
    vrows[j] = kv + D;
  }
  t->bf16_kv(krows.data(), vrows.data(), n, D, dpairs, npairs, kp.data(), vp.data());
  t->bf16_pairs(p.qkv + h * D, 3 * hd, D, dpairs, 0, p.M, pairs_buffer(xp, p.M, D, dpairs));
  PanelBf16Args scores{xp.data(), kp.data(), nullptr, s.data(), n, p.M, dpairs, n};
  t->panel_bf16_cols(scores, 0, kpanels);
  t->softmax_rows(s.data(), p.M, n, visible, n);
  t->bf16_pairs(s.data(), n, n, npairs, 0, p.M, pairs_buffer(xp, p.M, n, npairs));
  PanelBf16Args values{xp.data(), vp.data(), nullptr, p.out + h * D, hd, p.M, npairs, D};
  t->panel_bf16_cols(values, 0, vpanels);
}

void one_head(const AttentionProblem& p, int64_t h) {
  constexpr int64_t W = kPanelWidth;
  const KernelTable* t = active_table();
  const int64_t hd = p.H * p.D, T = p.q0 + p.M, D = p.D;
  thread_local std::vector<int64_t> visible;
  thread_local std::vector<float> kp, vp, s;
  visible.resize(p.M);
  for (int64_t r = 0; r < p.M; ++r) {
    int64_t end = p.chunk > 0 ? ((p.q0 + r) / p.chunk + 1) * p.chunk : T;
    visible[r] = end < T ? end : T;
  }
  const int64_t n = visible[p.M - 1];  // keys any query sees
  if (p.bf16) {
    one_head_bf16(p, h, visible.data(), n);
    return;
  }
  const int64_t kpanels = (n + W - 1) / W, vpanels = (D + W - 1) / W;
  kp.assign(kpanels * D * W, 0.0f);
  vp.assign(vpanels * n * W, 0.0f);
  s.resize(p.M * n);
  for (int64_t j0 = 0; j0 < n; j0 += W) {  // 16 keys: one panel of the keys, written row by row
    const int64_t cols = n - j0 < W ? n - j0 : W;
    const float* k[W];
    for (int64_t c = 0; c < cols; ++c) k[c] = key_row(p, j0 + c) + h * D;
    float* kpanel = kp.data() + (j0 / W) * D * W;
    for (int64_t d = 0; d < D; ++d) {
      for (int64_t c = 0; c < cols; ++c) kpanel[d * W + c] = k[c][d];
    }
    for (int64_t c = 0; c < cols; ++c) {
      const float* v = k[c] + hd;
      for (int64_t d = 0; d < D; ++d) vp[(d / W) * n * W + (j0 + c) * W + d % W] = v[d];
    }
  }
  PanelArgs scores{p.qkv + h * D, 3 * hd, kp.data(), nullptr, s.data(), n, p.M, D, n};
  t->panel_cols(scores, 0, kpanels);
  t->softmax_rows(s.data(), p.M, n, visible.data(), n);
  PanelArgs values{s.data(), n, vp.data(), nullptr, p.out + h * D, hd, p.M, n, D};
  t->panel_cols(values, 0, vpanels);
}

}  // namespace

void push_blocks(std::vector<mx::array>& inputs, const std::vector<mx::array>& blocks, bool bf16,
                 mx::Stream stream) {
  // bf16 blocks stay bf16 where the products are bf16 (all of them, or none, stay)
  bool keep = bf16 && !blocks.empty();
  for (auto& b : blocks) keep = keep && b.dtype() == mx::bfloat16;
  for (auto& b : blocks) inputs.push_back(keep ? b : as_f32(b, stream));
}

void add_block(AttentionProblem& p, const void* data, int64_t length, bool bf16) {
  if (bf16) {
    p.blocks16.push_back(static_cast<const uint16_t*>(data));
  } else {
    p.blocks.push_back(static_cast<const float*>(data));
  }
  p.lengths.push_back(length);
  p.q0 += length;
}

void run_attention(const AttentionProblem& p, bool parallel) {
  if (p.D == 0 || p.M == 0) return;
  Pool& pool = Pool::get();
  if (!parallel || pool.threads() == 1) {
    for (int64_t h = 0; h < p.H; ++h) one_head(p, h);
    return;
  }
  pool.run(p.H, [](const void* ctx, int64_t h) {
    one_head(*static_cast<const AttentionProblem*>(ctx), h);
  }, &p);
}

mx::array block_attention(const mx::array& qkv, const std::vector<mx::array>& blocks, int heads,
                          int chunk, bool parallel, bool bf16, mx::StreamOrDevice s) {
  mx::Stream stream = cpu_stream(s, "block_attention");
  if (heads < 1 || chunk < 0) {
    throw std::invalid_argument("block_attention: heads must be >= 1 and chunk >= 0");
  }
  if (qkv.ndim() != 3 || qkv.shape(0) != 1 || qkv.shape(1) < 1 || qkv.shape(2) % (3 * heads)) {
    throw std::invalid_argument(
        "block_attention: qkv must have shape (1, M, 3 * heads * D) with M >= 1");
  }
  const int hd = qkv.shape(2) / 3;
  std::vector<mx::array> inputs = {as_f32(qkv, stream)};
  for (auto& b : blocks) {
    if (b.ndim() != 3 || b.shape(0) != 1 || b.shape(2) != 2 * hd) {
      throw std::invalid_argument(
          "block_attention: each block must have shape (1, n, 2 * heads * D)");
    }
  }
  push_blocks(inputs, blocks, bf16, stream);
  return mx::array({1, qkv.shape(1), hd}, mx::float32,
                   std::make_shared<BlockAttentionPrimitive>(stream, heads, chunk, parallel, bf16),
                   std::move(inputs));
}

void BlockAttentionPrimitive::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  std::vector<Strided> views = start_task(encoder, inputs, out);
  const bool blocks16 = inputs.size() > 1 && inputs[1].dtype() == mx::bfloat16;
  encoder.dispatch([views = std::move(views), y = out.data<float>(), heads = heads_,
                    chunk = chunk_, parallel = parallel_, bf16 = bf16_, blocks16] {
    std::vector<Dense> dense(views.size());
    for (size_t i = 0; i < views.size(); ++i) densify(views[i], dense[i]);
    AttentionProblem p;
    p.qkv = static_cast<const float*>(dense[0].ptr);
    p.M = views[0].shape[1];
    p.H = heads;
    p.D = views[0].shape[2] / (3 * heads);
    p.q0 = 0;
    for (size_t i = 1; i < views.size(); ++i) {
      add_block(p, dense[i].ptr, views[i].shape[1], blocks16);
    }
    p.out = y;
    p.chunk = chunk;
    p.bf16 = bf16;
    run_attention(p, parallel);
  });
}

void BlockAttentionPrimitive::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error(std::string(name()) + " has no GPU implementation");
}

bool BlockAttentionPrimitive::is_equivalent(const mx::Primitive& other) const {
  auto* o = dynamic_cast<const BlockAttentionPrimitive*>(&other);
  return o != nullptr && o->heads_ == heads_ && o->chunk_ == chunk_ && o->parallel_ == parallel_ &&
         o->bf16_ == bf16_;
}

std::vector<mx::Shape> BlockAttentionPrimitive::output_shapes(
    const std::vector<mx::array>& inputs) {
  return {{1, inputs[0].shape(1), inputs[0].shape(2) / 3}};
}

}  // namespace cv2k
