// 1-D convolution (torch's Conv1d, channels-last) on the panel GEMM, as one MLX operation.
#pragma once

#include <optional>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace cv2k {

namespace mx = mlx::core;

// y[b, t, o] = bias[o] + sum_{j, c} w[o, j, c] * xpad[b, t * stride + j * dilation, c]
// with xpad = x zero-padded by `pad_left` / `pad_right` rows: x (B, L, C) float,
// wp = pack_panels(w.reshape(n, kernel_size * C)) (float32 panels), bias (n,) or none.
// Returns (B, L_out, n) float32, L_out = (L + pads - dilation * (K - 1) - 1) / stride + 1.
// stride > 1 needs dilation 1. No im2col: row t of the unfolded input is the contiguous
// range of K * C values at row t * stride of xpad (dilation 1), or, with dilation d, of
// the padded input's phase t % d (rows r = t % d (mod d), stored contiguously).
// snake = [alpha, inv_alpha] ((C,) each), or empty: the input goes through HiFT's Snake,
// x + sin(alpha x)^2 * inv_alpha, as it is padded (the pads stay zero), which costs no
// pass of its own.
mx::array conv1d_panels(const mx::array& x, const mx::array& wp, int n, int kernel_size,
                        const std::optional<mx::array>& bias, int pad_left, int pad_right,
                        int stride, int dilation, const std::vector<mx::array>& snake,
                        bool parallel, mx::StreamOrDevice s = {});

class Conv1dPrimitive : public mx::UnaryPrimitive {
 public:
  struct Attrs {
    int n, kernel_size, pad_left, pad_right, stride, dilation;
    bool has_bias, has_snake, parallel;
  };
  Conv1dPrimitive(mx::Stream stream, Attrs a) : mx::UnaryPrimitive(stream), a_(a) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override { return "CosyVoice2Conv1d"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  Attrs a_;
};

}  // namespace cv2k
