// MLX operations y = x W^T for bf16 and 8-bit affine-quantised weights on the CPU.
#pragma once

#include <optional>
#include <string>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace cv2k {

namespace mx = mlx::core;

// y = x W^T (+ bias): x (..., K) float, w (N, K) bfloat16 or float32, bias (N,) or none.
// Output (..., N) float32; x is converted to float32 and accumulation is in float32.
mx::array linear_dense(
    const mx::array& x,
    const mx::array& w,
    const std::optional<mx::array>& bias,
    mx::StreamOrDevice s = {});

// y = x dequantize(w, scales, biases)^T (+ bias), the layout of mx.quantize (affine,
// `bits` 8 or 4): w (N, K * bits / 32) uint32, scales and biases (N, K / group_size)
// float32 or bfloat16 (float16 is converted to float32). Output (..., N) float32.
mx::array linear_quantized(
    const mx::array& x,
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    const std::optional<mx::array>& bias,
    int group_size,
    int bits,
    mx::StreamOrDevice s = {});

// W (N, K) as the panels linear_panels reads: (ceil(N / 16), K, 16) float32, column n
// of W^T in panel n / 16 at lane n % 16, the last panel zero-padded. Pack once, at load.
// bf16: W rounded to bf16 as pair panels (ceil(N / 16), ceil(K / 32) * 16, 32) bfloat16
// (kernels.h, PanelBf16Args), for products with x rounded to bf16 and fp32 sums.
mx::array pack_panels(const mx::array& w, bool bf16 = false, mx::StreamOrDevice s = {});
// The same for the rows of `parts` (each (N_i, K)) stacked: the panels of their
// concatenation, written straight from the parts (float32 panels: one pass, no
// concatenated copy). For the fused projections (q/k/v, gate/up), packed at load.
mx::array pack_panels(const std::vector<mx::array>& parts, bool bf16 = false,
                      mx::StreamOrDevice s = {});

// y = x W^T (+ bias) with W given as pack_panels(W) and its row count n: x (..., K)
// float, bias (n,) or none. Output (..., n) float32. With bf16 pair panels x is rounded
// to bf16 (the products are then exact, the sums fp32). `parallel`: split the panels over
// the kernels' thread pool (else the calling stream's thread computes them all, for
// callers that already run one product per core).
mx::array linear_panels(
    const mx::array& x,
    const mx::array& wp,
    int n,
    const std::optional<mx::array>& bias,
    bool parallel,
    mx::StreamOrDevice s = {});

// The instruction-set variant in use ("avx512", "avx2" or "portable").
std::string isa();
// Variants this CPU can run, best first.
std::vector<std::string> available_isas();
// Select a variant by name (must be available); "auto" picks the best one.
void set_isa(const std::string& name);

int num_threads();
void set_num_threads(int n);

class LinearPrimitive : public mx::UnaryPrimitive {
 public:
  enum class Kind { Bf16, F32, Q8, Q4 };

  LinearPrimitive(mx::Stream stream, Kind kind, int group_size, bool has_bias)
      : mx::UnaryPrimitive(stream), kind_(kind), group_size_(group_size), has_bias_(has_bias) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override {
    switch (kind_) {
      case Kind::Bf16: return "CosyVoice2LinearBf16";
      case Kind::F32: return "CosyVoice2LinearF32";
      case Kind::Q8: return "CosyVoice2LinearQ8";
      default: return "CosyVoice2LinearQ4";
    }
  }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  Kind kind_;
  int group_size_;
  bool has_bias_;
};

// Float32 panels of the stacked rows of its inputs (pack_panels).
class PackPanelsPrimitive : public mx::UnaryPrimitive {
 public:
  explicit PackPanelsPrimitive(mx::Stream stream) : mx::UnaryPrimitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override { return "CosyVoice2PackPanels"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
};

class PanelLinearPrimitive : public mx::UnaryPrimitive {
 public:
  PanelLinearPrimitive(mx::Stream stream, int n, bool has_bias, bool parallel)
      : mx::UnaryPrimitive(stream), n_(n), has_bias_(has_bias), parallel_(parallel) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override { return "CosyVoice2LinearPanels"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  int n_;
  bool has_bias_;
  bool parallel_;
};

}  // namespace cv2k
