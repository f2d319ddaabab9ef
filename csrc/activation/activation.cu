// gated_activation and its backward on CUDA: the launches of the kernels in activation_kernel.cuh,
// behind launch.h. Everything is enqueued on the caller's stream.
#include <cuda_runtime_api.h>
#include <nvtx3/nvtx3.hpp>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "activation/activation_kernel.cuh"
#include "activation/launch.h"
#include "core/align.h"
#include "core/cuda_launch.h"

namespace mixops::cuda {
namespace {

// This file launches its kernels.
using namespace activation_kernels;  // NOLINT(google-build-using-namespace)

// Block shape and grid for rows x fv column vectors: blockDim.x a power of two >= 32 covering fv
// (up to kThreads), the rest of the block on rows; both grid dimensions grid-stride.
struct Shape2d {
  dim3 grid, block;
};
Shape2d shape_for(int64_t rows, int64_t fv) {
  unsigned bx = 32;
  while (bx < kThreads && bx < fv) bx *= 2;
  const unsigned by = kThreads / bx;
  const int64_t gx = std::min<int64_t>((fv + bx - 1) / bx, 1 << 16);
  const int64_t gy = std::clamp<int64_t>((rows + by - 1) / by, 1, 65535);
  return {dim3(static_cast<unsigned>(std::max<int64_t>(gx, 1)), static_cast<unsigned>(gy)),
          dim3(bx, by)};
}

// The up rows: p.up (split form), the second half of each gate_up row (fused form), or gate_up
// itself (interleaved form: the kernel reads up from the gate rows and ignores this pointer).
template <typename T>
const T* up_of(const GatedActParams& p) {
  if (p.up != nullptr) return static_cast<const T*>(p.up);
  return static_cast<const T*>(p.gate_up) + (p.interleaved ? 0 : p.f);
}

// f(std::bool_constant<interleaved>).
template <typename F>
void with_form(const GatedActParams& p, const F& f) {
  if (p.interleaved) return f(std::true_type{});
  return f(std::false_type{});
}

// Calls f.template operator()<N>() with N = 16 bytes of elements when every pointer (gate, up and
// the others: a separate up buffer may be misaligned on its own), the row stride and f allow
// 16-byte accesses, else N = 1.
template <typename T, typename F>
void with_width(const GatedActParams& p, const std::initializer_list<const void*>& ptrs,
                const F& f) {
  // fp64 (gradcheck) stays scalar: its division and exp are calls, and two elements in flight
  // across them spill registers.
  constexpr int kVec = std::is_same_v<T, double> ? 1 : static_cast<int>(16 / sizeof(T));
  bool ok = p.f % kVec == 0 && p.gate_up_stride % kVec == 0;
  for (const void* q : ptrs) ok = ok && is_aligned(q, 16);
  if (ok && kVec > 1) {
    f.template operator()<kVec>();
  } else {
    f.template operator()<1>();
  }
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
    const T* up = up_of<T>(p);
    with_width<T>(p, {p.gate_up, up, p.out}, [&]<int N>() {
      const Shape2d s = shape_for(p.rows, p.f / N);
      with_form(p, [&](auto il) {
        launch_kernel(&gated_act_kernel<decltype(act)::value, T, N, decltype(il)::value>, s.grid,
                      s.block, 0, stream, static_cast<const T*>(p.gate_up), up, p.gate_up_stride,
                      static_cast<T*>(p.out), p.rows, p.f);
      });
    });
  });
  check_launch("gated_activation", "launch");
}

void gated_activation_backward_launch(const GatedActParams& p, cudaStream_t stream) {
  nvtx3::scoped_range range{"mixops::gated_activation_backward"};
  const int64_t n = p.rows * p.f;
  if (n == 0) return;
  with_types(p, "gated_activation_backward", [&](auto act, auto tag) {
    using T = typename decltype(tag)::type;
    const T* up = up_of<T>(p);
    with_width<T>(p, {p.gate_up, up, p.grad_out, p.grad_gate_up}, [&]<int N>() {
      const Shape2d s = shape_for(p.rows, p.f / N);
      with_form(p, [&](auto il) {
        launch_kernel(&gated_act_backward_kernel<decltype(act)::value, T, N, decltype(il)::value>,
                      s.grid, s.block, 0, stream, static_cast<const T*>(p.grad_out),
                      static_cast<const T*>(p.gate_up), up, p.gate_up_stride,
                      static_cast<T*>(p.grad_gate_up), p.rows, p.f);
      });
    });
  });
  check_launch("gated_activation_backward", "launch");
}

}  // namespace mixops::cuda
