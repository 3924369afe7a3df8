// Helpers shared by the MLX-facing files (baseline compiler flags only).
#pragma once

#include <cstdint>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/utils.h"

namespace cv2k {

namespace mx = mlx::core;

// A row-major view of an evaluated input; non-contiguous inputs are copied into `own`.
struct Dense {
  const void* ptr = nullptr;
  std::vector<uint8_t> own;
};

// What the scheduled task needs of an input (captured by value: arrays stay alive
// through MLX's eval, which holds the inputs' buffers until the task ran).
struct Strided {
  const uint8_t* base;
  size_t itemsize;
  mx::Shape shape;
  mx::Strides strides;
  bool contiguous;
};

inline Strided describe(const mx::array& a) {
  return {static_cast<const uint8_t*>(a.data<void>()), a.itemsize(), a.shape(), a.strides(),
          static_cast<bool>(a.flags().row_contiguous)};
}

inline void densify(const Strided& s, Dense& d) {
  if (s.contiguous) {
    d.ptr = s.base;
    return;
  }
  size_t n = 1;
  for (auto v : s.shape) n *= static_cast<size_t>(v);
  d.own.resize(n * s.itemsize);
  const int nd = static_cast<int>(s.shape.size());
  std::vector<int64_t> idx(nd, 0);
  for (size_t i = 0; i < n; ++i) {
    int64_t off = 0;
    for (int a = 0; a < nd; ++a) off += idx[a] * s.strides[a];
    std::memcpy(d.own.data() + i * s.itemsize, s.base + off * static_cast<int64_t>(s.itemsize),
                s.itemsize);
    for (int a = nd - 1; a >= 0; --a) {
      if (++idx[a] < s.shape[a]) break;
      idx[a] = 0;
    }
  }
  d.ptr = d.own.data();
}

// The start of a primitive's eval_cpu: allocates the outputs, registers inputs and
// outputs with the stream's command encoder (which keeps their buffers alive until the
// dispatched task ran) and returns what the task needs of the inputs.
inline std::vector<Strided> start_task(mx::cpu::CommandEncoder& enc,
                                       const std::vector<mx::array>& inputs,
                                       std::vector<mx::array>& outputs) {
  for (auto& out : outputs) {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    enc.set_output_array(out);
  }
  std::vector<Strided> views;
  for (auto& in : inputs) {
    enc.set_input_array(in);
    views.push_back(describe(in));
  }
  return views;
}

inline std::vector<Strided> start_task(mx::cpu::CommandEncoder& enc,
                                       const std::vector<mx::array>& inputs, mx::array& out) {
  std::vector<mx::array> outputs = {out};  // arrays share their data: `out` is set too
  return start_task(enc, inputs, outputs);
}

inline mx::Stream cpu_stream(mx::StreamOrDevice s, const char* op) {
  mx::Stream stream = mx::to_stream(s);
  if (stream.device.type != mx::Device::DeviceType::cpu) {
    std::ostringstream msg;
    msg << op << ": CPU only (use MLX's own ops on other devices)";
    throw std::invalid_argument(msg.str());
  }
  return stream;
}

// float32 input: `a` itself, or a conversion added to the graph.
inline mx::array as_f32(const mx::array& a, const mx::Stream& s) {
  return a.dtype() == mx::float32 ? a : mx::astype(a, mx::float32, s);
}

}  // namespace cv2k
