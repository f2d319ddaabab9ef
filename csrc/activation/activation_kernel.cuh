// gated_activation and its backward on CUDA, device code (activation.cu launches it; no launch
// syntax, no torch, no CUTLASS): a 2-D grid of (column vector, row) with 16-byte accesses when
// aligned (coalesced: consecutive threads read consecutive vectors of the gate and up halves), no
// per-element division. Math in fp32 (fp64 for fp64) through activation.h, the code the CPU
// kernel runs, element by element, so the vector width never changes a result.
#pragma once

#include <cstdint>

#include "activation/activation.h"
#include "core/acc_convert.cuh"

namespace mixops::cuda::activation_kernels {

constexpr int kThreads = 256;  // per block, as blockDim.x columns x blockDim.y rows

// N elements moved as one access (16 bytes when N * sizeof(T) == 16).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Threads walk (row, column vector) pairs of a 2-D grid: x over the f / N column vectors of a
// half row, y over rows, both grid-strided. N > 1 only when every row start of every operand and f
// are N-element aligned (the launcher checks), so a vector never straddles the gate/up boundary.
template <GatedAct Act, typename T, int N>
__global__ void __launch_bounds__(kThreads)
    gated_act_kernel(const T* __restrict__ h, int64_t ld, T* __restrict__ out, int64_t rows,
                     int64_t f) {
  using A = acc_t<T>;
  using P = Pack<T, N>;
  const int32_t fv = static_cast<int32_t>(f / N);  // f < 2^31 (the launcher checks)
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < rows;
       r += static_cast<int64_t>(gridDim.y) * blockDim.y) {
    const P* gate = reinterpret_cast<const P*>(h + r * ld);
    const P* up = reinterpret_cast<const P*>(h + r * ld + f);
    P* o = reinterpret_cast<P*>(out + r * f);
    for (int32_t c = blockIdx.x * blockDim.x + threadIdx.x; c < fv; c += gridDim.x * blockDim.x) {
      const P g = gate[c], u = up[c];
      P y;
#pragma unroll
      for (int j = 0; j < N; ++j) {
        y.v[j] = from_acc<T>(det::mul(act::value<Act, A>(to_acc(g.v[j])), to_acc(u.v[j])));
      }
      o[c] = y;
    }
  }
}

template <GatedAct Act, typename T, int N>
__global__ void __launch_bounds__(kThreads)
    gated_act_backward_kernel(const T* __restrict__ grad, const T* __restrict__ h, int64_t ld,
                              T* __restrict__ dh, int64_t rows, int64_t f) {
  using A = acc_t<T>;
  using P = Pack<T, N>;
  const int32_t fv = static_cast<int32_t>(f / N);  // f < 2^31 (the launcher checks)
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < rows;
       r += static_cast<int64_t>(gridDim.y) * blockDim.y) {
    const T* hr = h + r * ld;  // gate columns, then up columns at + f
    T* dr = dh + r * 2 * f;    // the same layout, contiguous
    const P* go = reinterpret_cast<const P*>(grad + r * f);
    for (int32_t c = blockIdx.x * blockDim.x + threadIdx.x; c < fv; c += gridDim.x * blockDim.x) {
      const P g = reinterpret_cast<const P*>(hr)[c], u = reinterpret_cast<const P*>(hr + f)[c];
      const P gr = go[c];
      P dg, du;
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const A gj = to_acc(g.v[j]), uj = to_acc(u.v[j]), goj = to_acc(gr.v[j]);
        A v, d;
        act::value_and_grad<Act, A>(gj, v, d);
        dg.v[j] = from_acc<T>(det::mul(det::mul(goj, uj), d));
        du.v[j] = from_acc<T>(det::mul(goj, v));
      }
      reinterpret_cast<P*>(dr)[c] = dg;
      reinterpret_cast<P*>(dr + f)[c] = du;
    }
  }
}

}  // namespace mixops::cuda::activation_kernels
