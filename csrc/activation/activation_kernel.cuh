// gated_activation and its backward on CUDA, device code (activation.cu launches it; no launch
// syntax, no torch, no CUTLASS): a 2-D grid of (column vector, row) with 16-byte accesses when
// aligned (coalesced: consecutive threads read consecutive vectors of gate and of up), no
// per-element division. The kernels take gate and up as two row pointers with one row stride, so
// the fused [rows, 2f] input (up = gate + f, set by the launcher) and two separate [rows, f]
// tensors run the same code; the interleaved [rows, 2f] input (IL: g_0, u_0, g_1, u_1, ...) reads
// two vectors of 2N elements for N outputs and splits them in registers. Math in fp32 (fp64 for fp64) through activation.h, the code the CPU
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

// The gate (k = 0) or up (k = 1) element j of the N pairs held by the two vectors a, b of an
// interleaved row (a: elements 0..N-1, b: N..2N-1); j and k are compile-time constants.
template <int N, int K, typename P>
MIXOPS_INLINE auto pair_elem(const P& a, const P& b, int j) {
  const int e = 2 * j + K;
  return e < N ? a.v[e] : b.v[e - N];
}
template <int N, int K, typename P, typename T>
MIXOPS_INLINE void set_pair_elem(P& a, P& b, int j, T value) {
  const int e = 2 * j + K;
  if (e < N) {
    a.v[e] = value;
  } else {
    b.v[e - N] = value;
  }
}

// Threads walk (row, column vector) pairs of a 2-D grid: x over the f / N column vectors of a
// row of gate (and of up), y over rows, both grid-strided. N > 1 only when every row start of
// every operand (gate, up, out / grad, d gate_up) and f are N-element aligned (the launcher
// checks), so a vector never straddles the gate/up boundary of a fused row; d up starts fv = f / N
// vectors after d gate in each [2f] row of d gate_up. IL (interleaved): output vector c reads gate
// vectors 2c and 2c + 1 of its row (up is unused) and the backward writes d gate_up's vectors 2c and
// 2c + 1 in the same interleaved order.
// Indices are 64-bit: a row of gate may hold 2^31 columns or more, and the column stride is up to
// 2^16 blocks x 256 threads, so a 32-bit column index would wrap past its last column (negative,
// out of bounds, never ending) once f / N passes 2^31 - 2^24 (tests/simt/wide_columns.cpp).
// The column loops are not unrolled: nvcc did not unroll them before either, but with 64-bit
// indices it computed a trip count with a 64-bit division call, and the fp64 gelu_tanh backward
// then spilled 20 bytes on sm_90a (ptxas -v; 0 with unroll 1, and the same loads and stores).
template <GatedAct Act, typename T, int N, bool IL>
__global__ void __launch_bounds__(kThreads)
    gated_act_kernel(const T* __restrict__ gate, const T* __restrict__ up, int64_t ld,
                     T* __restrict__ out, int64_t rows, int64_t f) {
  using A = acc_t<T>;
  using P = Pack<T, N>;
  const int64_t fv = f / N;
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < rows;
       r += static_cast<int64_t>(gridDim.y) * blockDim.y) {
    const P* gr = reinterpret_cast<const P*>(gate + r * ld);
    const P* ur = reinterpret_cast<const P*>(up + r * ld);
    P* o = reinterpret_cast<P*>(out + r * f);
#pragma unroll 1
    for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < fv;
         c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      P y;
      if constexpr (IL) {
        const P a = gr[2 * c], b = gr[2 * c + 1];
#pragma unroll
        for (int j = 0; j < N; ++j) {
          const A gj = to_acc(pair_elem<N, 0>(a, b, j)), uj = to_acc(pair_elem<N, 1>(a, b, j));
          y.v[j] = from_acc<T>(det::mul(act::value<Act, A>(gj), uj));
        }
      } else {
        const P g = gr[c], u = ur[c];
#pragma unroll
        for (int j = 0; j < N; ++j) {
          y.v[j] = from_acc<T>(det::mul(act::value<Act, A>(to_acc(g.v[j])), to_acc(u.v[j])));
        }
      }
      o[c] = y;
    }
  }
}

template <GatedAct Act, typename T, int N, bool IL>
__global__ void __launch_bounds__(kThreads)
    gated_act_backward_kernel(const T* __restrict__ grad, const T* __restrict__ gate,
                              const T* __restrict__ up, int64_t ld, T* __restrict__ dh,
                              int64_t rows, int64_t f) {
  using A = acc_t<T>;
  using P = Pack<T, N>;
  const int64_t fv = f / N;
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < rows;
       r += static_cast<int64_t>(gridDim.y) * blockDim.y) {
    const P* gr = reinterpret_cast<const P*>(gate + r * ld);
    const P* ur = reinterpret_cast<const P*>(up + r * ld);
    P* dr = reinterpret_cast<P*>(dh + r * 2 * f);  // d gate vectors, then d up at + fv
    const P* go = reinterpret_cast<const P*>(grad + r * f);
#pragma unroll 1
    for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < fv;
         c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const P dy = go[c];
      if constexpr (IL) {
        const P a = gr[2 * c], b = gr[2 * c + 1];
        P da, db;
#pragma unroll
        for (int j = 0; j < N; ++j) {
          const A gj = to_acc(pair_elem<N, 0>(a, b, j)), uj = to_acc(pair_elem<N, 1>(a, b, j));
          const A goj = to_acc(dy.v[j]);
          A v, d;
          act::value_and_grad<Act, A>(gj, v, d);
          set_pair_elem<N, 0>(da, db, j, from_acc<T>(det::mul(det::mul(goj, uj), d)));
          set_pair_elem<N, 1>(da, db, j, from_acc<T>(det::mul(goj, v)));
        }
        dr[2 * c] = da;
        dr[2 * c + 1] = db;
      } else {
        const P g = gr[c], u = ur[c];
        P dg, du;
#pragma unroll
        for (int j = 0; j < N; ++j) {
          const A gj = to_acc(g.v[j]), uj = to_acc(u.v[j]), goj = to_acc(dy.v[j]);
          A v, d;
          act::value_and_grad<Act, A>(gj, v, d);
          dg.v[j] = from_acc<T>(det::mul(det::mul(goj, uj), d));
          du.v[j] = from_acc<T>(det::mul(goj, v));
        }
        dr[c] = dg;
        dr[fv + c] = du;
      }
    }
  }
}

}  // namespace mixops::cuda::activation_kernels
