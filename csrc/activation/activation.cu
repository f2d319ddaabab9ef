// gated_activation and its backward on CUDA: the launches of the kernels in activation_kernel.cuh,
// behind launch.h. Everything is enqueued on the caller's stream.
#include <cuda_runtime_api.h>
#include <nvtx3/nvtx3.hpp>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "activation/activation_kernel.cuh"
#include "activation/launch.h"
#include "core/cuda_launch.h"

namespace mixops::cuda {
namespace {

// This file launches its kernels.
using namespace activation_kernels;  // NOLINT(google-build-using-namespace)

unsigned grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(blocks, 1 << 20)));
}

// f(activation tag, std::type_identity<T>) for p's activation and dtype.
template <typename F>
void with_types(const GatedActParams& p, const char* op, const F& f) {
  dispatch_dtype(p.dtype, op, [&](auto tag) {
    switch (p.act) {
      case GatedAct::kSilu: return f(std::integral_constant<GatedAct, GatedAct::kSilu>{}, tag);
      case GatedAct::kGelu: return f(std::integral_constant<GatedAct, GatedAct::kGelu>{}, tag);
      case GatedAct::kGeluTanh:
        return f(std::integral_constant<GatedAct, GatedAct::kGeluTanh>{}, tag);
      case GatedAct::kRelu: return f(std::integral_constant<GatedAct, GatedAct::kRelu>{}, tag);
    }
    fail(op, "unknown activation");
  });
}

}  // namespace

void gated_activation_launch(const GatedActParams& p, cudaStream_t stream) {
  nvtx3::scoped_range range{"mixops::gated_activation"};
  const int64_t n = p.rows * p.f;
  if (n == 0) return;
  with_types(p, "gated_activation", [&](auto act, auto tag) {
    using T = typename decltype(tag)::type;
    launch_kernel(&gated_act_kernel<decltype(act)::value, T>, grid_for(n), kThreads, 0, stream,
                  static_cast<const T*>(p.gate_up), p.gate_up_stride, static_cast<T*>(p.out),
                  p.rows, p.f);
  });
  check_launch("gated_activation", "launch");
}

void gated_activation_backward_launch(const GatedActParams& p, cudaStream_t stream) {
  nvtx3::scoped_range range{"mixops::gated_activation_backward"};
  const int64_t n = p.rows * p.f;
  if (n == 0) return;
  with_types(p, "gated_activation_backward", [&](auto act, auto tag) {
    using T = typename decltype(tag)::type;
    launch_kernel(&gated_act_backward_kernel<decltype(act)::value, T>, grid_for(n), kThreads, 0,
                  stream, static_cast<const T*>(p.grad_out), static_cast<const T*>(p.gate_up),
                  p.gate_up_stride, static_cast<T*>(p.grad_gate_up), p.rows, p.f);
  });
  check_launch("gated_activation_backward", "launch");
}

}  // namespace mixops::cuda
