// Python bindings (nanobind, domain "mlx": MLX's own array type is shared with mlx.core).
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "attention_blocks.h"
#include "conv1d.h"
#include "decode_ops.h"
#include "decoder_layer.h"
#include "linear.h"
#include "row_ops.h"
#include "transformer_block.h"
#include "mlx/version.h"

namespace nb = nanobind;
using namespace nb::literals;

#define CV2K_STR2(x) #x
#define CV2K_STR(x) CV2K_STR2(x)

NB_MODULE(_ext, m) {
  m.doc() = "CPU matrix-vector kernels for MLX: y = x W^T with bf16 or 8-bit affine weights.";

  m.def("linear_dense", &cv2k::linear_dense, "x"_a, "w"_a, "bias"_a = nb::none(), nb::kw_only(),
        "stream"_a = nb::none(),
        "y = x @ w.T (+ bias): x (..., K) float, w (N, K) bfloat16 or float32, bias (N,) or None.\n"
        "Returns (..., N) float32 (fp32 accumulation). CPU stream only; lazy like any MLX op.");
  m.def("linear_quantized", &cv2k::linear_quantized, "x"_a, "w"_a, "scales"_a, "biases"_a,
        "bias"_a = nb::none(), nb::kw_only(), "group_size"_a = 64, "bits"_a = 8,
        "stream"_a = nb::none(),
        "y = x @ mx.dequantize(w, scales, biases, group_size, bits).T (+ bias), affine 8- or\n"
        "4-bit weights in mx.quantize's layout. Returns (..., N) float32. CPU stream only.");
  m.def("pack_panels",
        [](const std::variant<mlx::core::array, std::vector<mlx::core::array>>& w,
           bool bf16, mlx::core::StreamOrDevice s) {
          if (auto* one = std::get_if<mlx::core::array>(&w)) return cv2k::pack_panels(*one, bf16, s);
          return cv2k::pack_panels(std::get<std::vector<mlx::core::array>>(w), bf16, s);
        },
        "w"_a, nb::kw_only(), "bf16"_a = false, "stream"_a = nb::none(),
        "w (N, K) as the float32 panels linear_panels reads: (ceil(N / 16), K, 16), column n\n"
        "of w.T in panel n // 16 at lane n % 16, the last panel zero-padded. bf16=True: w\n"
        "rounded to bfloat16 as pair panels (ceil(N / 16), ceil(K / 32) * 16, 32), element\n"
        "(n, k) at [n // 16, k // 2, 2 * (n % 16) + k % 2], K zero-padded; linear_panels then\n"
        "rounds x to bfloat16 and sums the exact products in float32. w may be a list of\n"
        "arrays with the same K: the panels of their rows stacked (as mx.concatenate(w)),\n"
        "the float32 ones written straight from the arrays (no concatenated copy).");
  m.def("linear_panels", &cv2k::linear_panels, "x"_a, "wp"_a, "n"_a, "bias"_a = nb::none(),
        nb::kw_only(), "parallel"_a = true, "stream"_a = nb::none(),
        "y = x @ w.T (+ bias) with wp = pack_panels(w) and n = w.shape[0]: x (..., K) float,\n"
        "bias (n,) or None. Returns (..., n) float32. parallel=False computes on the calling\n"
        "stream's thread only. CPU stream only; lazy like any MLX op.");
  m.def("block_attention", &cv2k::block_attention, "qkv"_a, "blocks"_a, "heads"_a, "chunk"_a,
        nb::kw_only(), "parallel"_a = true, "bf16"_a = false, "stream"_a = nb::none(),
        "Chunk-masked self-attention of M new positions over cached blocks: qkv (1, M, 3 H D)\n"
        "(scaled queries | keys | values), blocks [(1, n_i, 2 H D)] (keys | values of the\n"
        "q0 = sum n_i earlier positions). Position q0 + r sees keys j < (floor((q0 + r) /\n"
        "chunk) + 1) * chunk (chunk 0: all). Returns (1, M, H D) float32, heads in order.\n"
        "bf16=True: queries, keys, values and the softmax's weights rounded to bfloat16 for\n"
        "the two products (exact products, float32 sums and softmax).");
  m.def("conv1d_panels", &cv2k::conv1d_panels, "x"_a, "wp"_a, "n"_a, "kernel_size"_a,
        "bias"_a = nb::none(), nb::kw_only(), "pad_left"_a = 0, "pad_right"_a = 0,
        "stride"_a = 1, "dilation"_a = 1, "snake"_a = std::vector<mlx::core::array>{},
        "parallel"_a = true, "stream"_a = nb::none(),
        "torch's Conv1d on channels-last x (B, L, C) float with wp = pack_panels(w.reshape(n,\n"
        "kernel_size * C)) of a float32 weight w (n, kernel_size, C) (MLX's conv layout),\n"
        "bias (n,) or None; x zero-padded by pad_left / pad_right rows. Returns (B, L_out, n)\n"
        "float32. No im2col buffer: the panel GEMM reads overlapping rows of the padded input\n"
        "(with dilation d, of its d phases). stride > 1 needs dilation 1. snake = [alpha,\n"
        "inv_alpha] ((C,) each): the input goes through x + sin(alpha x)**2 * inv_alpha first\n"
        "(HiFT's Snake; the zero pads stay zero), in the same pass as the padding.");
  m.def("layer_norm", &cv2k::layer_norm, "x"_a, "w"_a, "b"_a, "eps"_a, nb::kw_only(),
        "mish"_a = false, "parallel"_a = true, "stream"_a = nb::none(),
        "LayerNorm over the last axis (torch: biased variance) times w plus b, then Mish if\n"
        "mish: x (..., C), w and b (C,). float32.");
  m.def("gelu", &cv2k::gelu, "x"_a, "bias"_a = nb::none(), nb::kw_only(), "parallel"_a = true,
        "stream"_a = nb::none(), "The exact (erf) GELU of x + bias: x (..., C), bias (C,) or None.");
  m.def("transformer_block", &cv2k::transformer_block, "x"_a, "params"_a, "blocks"_a, "heads"_a,
        "inner"_a, "ff"_a, "chunk"_a, "eps1"_a, "eps3"_a, "keep"_a = 0, nb::kw_only(),
        "parallel"_a = true, "stream"_a = nb::none(),
        "The flow estimator's transformer block for x (1, M, C) over cached key/value blocks:\n"
        "LayerNorm, fused q/k/v (queries pre-scaled), block_attention, output projection and\n"
        "residual, LayerNorm, GELU feed-forward and residual. params: [ln1_w, ln1_b, qkv panels,\n"
        "out panels, out bias, ln3_w, ln3_b, ff1 panels, ff1 bias, ff2 panels, ff2 bias].\n"
        "Returns [y] or, keep > 0, [y, kv (1, keep, 2 inner)]: the first keep positions' keys\n"
        "and values.");
  m.def("rms_norm", &cv2k::rms_norm, "x"_a, "w"_a, "eps"_a, "residual"_a = nb::none(),
        nb::kw_only(), "stream"_a = nb::none(),
        "x * rsqrt(mean(x**2, -1) + eps) * w in float32, as a list [y]; with residual r,\n"
        "h = x + r first and the list is [h, rms_norm(h)].");
  m.def("rope_split", &cv2k::rope_split, "qkv"_a, "inv_freq"_a, "n_heads"_a, "n_kv_heads"_a,
        "dims"_a, "scale"_a, "offset"_a, nb::kw_only(), "stream"_a = nb::none(),
        "Fused projection (B, L, (Hq + 2 Hkv) * D) -> [q (B, Hq, L, D), k, v (B, Hkv, L, D)],\n"
        "rotary embeddings (non-traditional) on q and k at positions offset + t:\n"
        "theta_i = (offset + t) * scale * inv_freq[i].");
  m.def("attention", &cv2k::attention, "q"_a, "k"_a, "v"_a, "scale"_a, "causal"_a,
        nb::kw_only(), "stream"_a = nb::none(),
        "softmax(scale * q k^T) v, grouped heads, optional causal mask aligned to the last\n"
        "queries: q (B, Hq, L, D), k, v (B, Hkv, T, D) -> (B, L, Hq * D) float32.");
  m.def("swiglu", &cv2k::swiglu, "h"_a, nb::kw_only(), "stream"_a = nb::none(),
        "silu(h[..., :F]) * h[..., F:] for h (..., 2F), float32.");
  m.def("layer_input", &cv2k::layer_input, "x"_a, "norm_w"_a, "eps"_a, "weights"_a, "specs"_a,
        "inv_freq"_a, "n_heads"_a, "n_kv_heads"_a, "dims"_a, "rope_scale"_a, "offset"_a,
        nb::kw_only(), "stream"_a = nb::none(),
        "A Qwen2 decoder layer up to its KV cache: rms_norm(x) * norm_w, the fused q/k/v\n"
        "projection, rope_split at positions offset + t. x (B, L, C) -> [q (B, Hq, L, D), k, v\n"
        "(B, Hkv, L, D)]. A projection is its arrays in weights and four ints in specs (n,\n"
        "bits, group_size, has_bias): bits 32 [pack_panels(W)], 16 [W bfloat16], 8 or 4\n"
        "[w, scales, biases] of mx.quantize; then [bias] if has_bias. The results are those\n"
        "of rms_norm, linear_panels / linear_dense / linear_quantized and rope_split.");
  m.def("layer_output", &cv2k::layer_output, "x"_a, "q"_a, "k"_a, "v"_a, "attn_scale"_a,
        "causal"_a, "norm_w"_a, "eps"_a, "weights"_a, "specs"_a, nb::kw_only(),
        "stream"_a = nb::none(),
        "The rest of the layer, after the KV cache update: h = x + attention(q, k, v) Wo^T,\n"
        "y = h + swiglu(rms_norm(h) * norm_w Wgu^T) Wd^T; projections (o_proj, fused\n"
        "gate/up, down_proj) as for layer_input. x (B, L, C) -> y (B, L, C) float32; the\n"
        "results are those of attention, the projections, rms_norm and swiglu.");
  m.def("isa", &cv2k::isa, "The instruction-set variant in use.");
  m.def("available_isas", &cv2k::available_isas, "Variants this CPU can run, best first.");
  m.def("set_isa", &cv2k::set_isa, "name"_a, "Select a variant by name, or 'auto'.");
  m.def("num_threads", &cv2k::num_threads, "Threads the kernels use (the caller included).");
  m.def("set_num_threads", &cv2k::set_num_threads, "n"_a, "Rebuild the thread pool.");
  m.def("build_info", [] {
    nb::dict d;
    d["mlx_version"] = CV2K_STR(MLX_VERSION_MAJOR) "." CV2K_STR(MLX_VERSION_MINOR) "." CV2K_STR(
        MLX_VERSION_PATCH);
#if defined(CV2K_HAVE_X86)
    d["variants"] = nb::make_tuple("avx512", "avx2", "portable");
#else
    d["variants"] = nb::make_tuple("portable");
#endif
#if defined(__clang__)
    d["compiler"] = "clang " __clang_version__;
#elif defined(__GNUC__)
    d["compiler"] = "gcc " __VERSION__;
#endif
    return d;
  });
}
