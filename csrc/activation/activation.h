// Gated expert activations, shared by the CPU and CUDA kernels (MIXOPS_HOST_DEVICE, torch-free):
// out[r, c] = act(gate[r, c]) * up[r, c] on the [rows, 2*F] output of the fused gate/up projection
// (gate in columns [0, F), up in [F, 2F): HF transformers' chunk(2) layout), on an interleaved
// [rows, 2*F] (g_0, u_0, g_1, u_1, ...: GPT-OSS's layout, mixops' packed experts) or on separate gate
// and up [rows, F] (torchtitan's w1 and w3 GEMMs), and its backward
//   d gate = d out * up * act'(gate),   d up = d out * act(gate).
// Math in float for bf16/fp16/fp32 (double for double). silu uses det::sigmoid (our exp), so the
// host loops vectorise and CPU and GPU agree to the bit for silu and relu; gelu uses erf/tanh.
#pragma once

#include <cmath>
#include <cstdint>

#include "core/det_math.h"
#include "core/dtype.h"
#include "core/macros.h"

namespace mixops {

enum class GatedAct : int32_t { kSilu = 0, kGelu = 1, kGeluTanh = 2, kRelu = 3 };

namespace act {

MIXOPS_INLINE float erf_(float x) { return ::erff(x); }
MIXOPS_INLINE double erf_(double x) { return ::erf(x); }
MIXOPS_INLINE float tanh_(float x) { return ::tanhf(x); }
MIXOPS_INLINE double tanh_(double x) { return ::tanh(x); }

// act(g) and act'(g) together (the backward needs both).
template <GatedAct A, class T>
MIXOPS_INLINE void value_and_grad(T g, T& value, T& grad) {
  if constexpr (A == GatedAct::kSilu) {
    const T s = det::sigmoid(g);
    value = det::mul(g, s);
    grad = det::mul(s, det::add(T(1), det::mul(g, det::sub(T(1), s))));
  } else if constexpr (A == GatedAct::kGelu) {
    const T cdf = T(0.5) * (T(1) + erf_(g * T(0.70710678118654752440)));
    value = g * cdf;
    grad = cdf + g * T(0.39894228040143267794) * det::exp(T(-0.5) * g * g);
  } else if constexpr (A == GatedAct::kGeluTanh) {
    constexpr T kBeta = T(0.79788456080286535588), kKappa = T(0.044715);
    const T inner = kBeta * (g + kKappa * g * g * g);
    const T t = tanh_(inner);
    value = T(0.5) * g * (T(1) + t);
    grad =
        T(0.5) * (T(1) + t) + T(0.5) * g * (T(1) - t * t) * kBeta * (T(1) + T(3) * kKappa * g * g);
  } else {  // kRelu; NaN stays NaN as in torch.relu
    value = g > T(0) ? g : (g != g ? g : T(0));
    grad = g > T(0) ? T(1) : T(0);
  }
}

template <GatedAct A, class T>
MIXOPS_INLINE T value(T g) {
  if constexpr (A == GatedAct::kSilu) {
    return det::mul(g, det::sigmoid(g));
  } else if constexpr (A == GatedAct::kRelu) {
    return g > T(0) ? g : (g != g ? g : T(0));
  } else {
    T v, d;
    value_and_grad<A>(g, v, d);
    return v;
  }
}

}  // namespace act

// One call of the CUDA launchers (launch.h). Three forms of the input: fused (up == nullptr), gate_up
// [rows, 2f] with gate then up in each row; interleaved (up == nullptr), gate_up [rows, 2f] with
// gate at the even columns and up at the odd ones; split, gate_up the gate [rows, f] and up its own
// [rows, f] buffer (two GEMM outputs read where they are). Both rows share one stride.
struct GatedActParams {
  Dtype dtype = Dtype::kFloat32;
  GatedAct act = GatedAct::kSilu;
  int64_t rows = 0, f = 0;         // out and grad_out [rows, f]
  const void* gate_up = nullptr;   // fused: [rows, 2f]; split: the gate [rows, f]
  const void* up = nullptr;        // split: [rows, f]; nullptr: fused, up = gate_up + f
  int64_t gate_up_stride = 0;      // elements between rows of gate_up and of up (unit columns)
  bool interleaved = false;        // gate_up [rows, 2f] interleaved (up must be nullptr)
  void* out = nullptr;             // forward: [rows, f] contiguous
  const void* grad_out = nullptr;  // backward: [rows, f] contiguous
  void* grad_gate_up = nullptr;    // backward: [rows, 2f] contiguous: d gate then d up (fused,
                                   // split), or interleaved like gate_up (interleaved)
};

}  // namespace mixops
