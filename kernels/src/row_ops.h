// Row-wise operations of the flow estimator (LayerNorm with optional Mish, GELU), as
// MLX operations: one graph node each where a numba kernel needs an evaluation and a
// buffer hand-off per call.
#pragma once

#include <optional>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace cv2k {

namespace mx = mlx::core;

// LayerNorm over the last axis (torch semantics: biased variance, eps inside the root),
// times w plus b, then Mish (x * tanh(softplus(x))) if `mish`. x (..., C), w and b (C,).
mx::array layer_norm(const mx::array& x, const mx::array& w, const mx::array& b, float eps,
                     bool mish, bool parallel, mx::StreamOrDevice s = {});

// The exact (erf) GELU of x + bias: x (..., C), bias (C,) or none.
mx::array gelu(const mx::array& x, const std::optional<mx::array>& bias, bool parallel,
               mx::StreamOrDevice s = {});

class RowsPrimitive : public mx::UnaryPrimitive {
 public:
  enum class Kind { LayerNorm, LayerNormMish, Gelu };

  RowsPrimitive(mx::Stream stream, Kind kind, float eps, bool has_bias, bool parallel)
      : mx::UnaryPrimitive(stream), kind_(kind), eps_(eps), has_bias_(has_bias), parallel_(parallel) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override {
    return kind_ == Kind::Gelu ? "CosyVoice2Gelu" : "CosyVoice2LayerNorm";
  }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }

 private:
  Kind kind_;
  float eps_;
  bool has_bias_;
  bool parallel_;
};

}  // namespace cv2k
