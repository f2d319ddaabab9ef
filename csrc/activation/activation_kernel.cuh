// gated_activation and its backward on CUDA, device code (activation.cu launches it; no launch
// syntax, no torch, no CUTLASS): one thread per output column element, grid-stride over rows * f
// (coalesced: consecutive threads read consecutive columns of the gate and up halves). Math in
// fp32 (fp64 for fp64) through activation.h, the code the CPU kernel runs.
#pragma once

#include <cstdint>

#include "activation/activation.h"
#include "core/acc_convert.cuh"

namespace mixops::cuda::activation_kernels {

constexpr int kThreads = 256;

template <GatedAct Act, typename T>
__global__ void __launch_bounds__(kThreads)
    gated_act_kernel(const T* __restrict__ h, int64_t ld, T* __restrict__ out, int64_t rows,
                     int64_t f) {
  using A = acc_t<T>;
  const int64_t n = rows * f;
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * kThreads) {
    const int64_t r = i / f, c = i - r * f;
    const T* row = h + r * ld;
    const A g = to_acc(row[c]), u = to_acc(row[f + c]);
    out[i] = from_acc<T>(det::mul(act::value<Act, A>(g), u));
  }
}

template <GatedAct Act, typename T>
__global__ void __launch_bounds__(kThreads)
    gated_act_backward_kernel(const T* __restrict__ grad, const T* __restrict__ h, int64_t ld,
                              T* __restrict__ dh, int64_t rows, int64_t f) {
  using A = acc_t<T>;
  const int64_t n = rows * f;
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * kThreads) {
    const int64_t r = i / f, c = i - r * f;
    const T* row = h + r * ld;
    const A g = to_acc(row[c]), u = to_acc(row[f + c]), go = to_acc(grad[i]);
    A v, d;
    act::value_and_grad<Act, A>(g, v, d);
    T* drow = dh + r * 2 * f;
    drow[c] = from_acc<T>(det::mul(det::mul(go, u), d));
    drow[f + c] = from_acc<T>(det::mul(go, v));
  }
}

}  // namespace mixops::cuda::activation_kernels
