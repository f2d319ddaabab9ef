// gated_activation and its backward on CUDA: one thread per output column element, grid-stride
// over rows * f (coalesced: consecutive threads read consecutive columns of the gate and up
// halves). Math in fp32 (fp64 for fp64) through csrc/include/mixops/activation.h, the code the
// CPU kernel runs.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <nvtx3/nvtx3.hpp>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <type_traits>

#include "acc_convert.cuh"
#include "activation_launch.h"
#include "mixops/activation.h"

namespace mixops::cuda {
namespace {

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

unsigned grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(blocks, 1 << 20)));
}

template <typename F>
void with_types(const GatedActParams& p, const F& f) {
  auto with_act = [&](auto tag) {
    switch (p.act) {
      case GatedAct::kSilu: return f(std::integral_constant<GatedAct, GatedAct::kSilu>{}, tag);
      case GatedAct::kGelu: return f(std::integral_constant<GatedAct, GatedAct::kGelu>{}, tag);
      case GatedAct::kGeluTanh:
        return f(std::integral_constant<GatedAct, GatedAct::kGeluTanh>{}, tag);
      case GatedAct::kRelu: return f(std::integral_constant<GatedAct, GatedAct::kRelu>{}, tag);
    }
    throw std::invalid_argument("unknown activation");
  };
  switch (p.dtype) {
    case Dtype::kFloat32: return with_act(float{});
    case Dtype::kFloat64: return with_act(double{});
    case Dtype::kBFloat16: return with_act(__nv_bfloat16{});
    case Dtype::kFloat16: return with_act(__half{});
  }
  throw std::invalid_argument("unsupported dtype");
}

}  // namespace

void gated_act_launch(const GatedActParams& p, cudaStream_t stream) {
  nvtx3::scoped_range range{"mixops::gated_activation"};
  const int64_t n = p.rows * p.f;
  if (n == 0) return;
  with_types(p, [&](auto act, auto tag) {
    using T = decltype(tag);
    gated_act_kernel<decltype(act)::value, T><<<grid_for(n), kThreads, 0, stream>>>(
        static_cast<const T*>(p.gate_up), p.gate_up_stride, static_cast<T*>(p.out), p.rows, p.f);
  });
}

void gated_act_backward_launch(const GatedActParams& p, cudaStream_t stream) {
  nvtx3::scoped_range range{"mixops::gated_activation_backward"};
  const int64_t n = p.rows * p.f;
  if (n == 0) return;
  with_types(p, [&](auto act, auto tag) {
    using T = decltype(tag);
    gated_act_backward_kernel<decltype(act)::value, T><<<grid_for(n), kThreads, 0, stream>>>(
        static_cast<const T*>(p.grad_out), static_cast<const T*>(p.gate_up), p.gate_up_stride,
        static_cast<T*>(p.grad_gate_up), p.rows, p.f);
  });
}

}  // namespace mixops::cuda
