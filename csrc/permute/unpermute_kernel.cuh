// unpermute and its backward on CUDA, device code (unpermute.cu launches it; no launch syntax, no
// torch, no CUTLASS). Formats: permute.h; contract: launch.h.
//   unpermute        one warp per token: y[t] = sum_j w[t, j] * y_sorted[row_map[t, j]], j in
//                    order, accumulated in fp32 (fp64 for fp64) in registers, each product and
//                    add rounded (never an FMA), as on the CPU: the same bits;
//   backward rows    row_slot[row] = the slot mapping to it (memset -1, scatter with atomicMax so a
//                    duplicated row deterministically keeps its last slot), then one warp per
//                    row: grad_y_sorted[r] = w[row_slot[r]] * grad_y[token of row_slot[r]],
//                    or zeros;
//   backward weights one warp per slot: <grad_y[t], y_sorted[row]> in lane-strided partials and
//                    a fixed xor butterfly (deterministic), 0 without a row.
// Rows move in vectors of N elements (16 bytes) when every row start is 16-byte aligned, else
// one element at a time; each lane keeps kUnroll vectors in flight. No float atomics.
#pragma once

#include <cstdint>

#include "core/acc_convert.cuh"
#include "core/det_math.h"
#include "permute/permute.h"

namespace mixops::cuda::unpermute_kernels {

constexpr int kWarps = 8;   // warps per block; each owns a token, row or slot
constexpr int kUnroll = 4;  // vectors per lane in flight
constexpr int kScatterThreads = 256;
constexpr unsigned kFull = 0xffffffffu;

// Weight i in its own dtype (1 when there are no weights), as A.
template <typename A>
__device__ __forceinline__ A load_weight(const void* w, Dtype d, int64_t i) {
  if (w == nullptr) return A(1);
  switch (d) {
    case Dtype::kFloat64: return static_cast<A>(static_cast<const double*>(w)[i]);
    case Dtype::kBFloat16: return static_cast<A>(to_acc(static_cast<const __nv_bfloat16*>(w)[i]));
    case Dtype::kFloat16: return static_cast<A>(to_acc(static_cast<const __half*>(w)[i]));
    default: return static_cast<A>(static_cast<const float*>(w)[i]);
  }
}

template <typename A>
__device__ __forceinline__ void store_weight(void* w, Dtype d, int64_t i, A v) {
  switch (d) {
    case Dtype::kFloat64: static_cast<double*>(w)[i] = static_cast<double>(v); break;
    case Dtype::kBFloat16: static_cast<__nv_bfloat16*>(w)[i] = from_acc<__nv_bfloat16>(v); break;
    case Dtype::kFloat16: static_cast<__half*>(w)[i] = from_acc<__half>(v); break;
    default: static_cast<float*>(w)[i] = static_cast<float>(v); break;
  }
}

// N elements moved as one load/store (16 bytes when N * sizeof(T) == 16).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x % 32); }
__device__ __forceinline__ int64_t first_warp() {
  return static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
}
__device__ __forceinline__ int64_t num_warps() { return static_cast<int64_t>(gridDim.x) * kWarps; }

// y[t] = sum_j w[t, j] * y_sorted[row_map[t, j]]. hv = vectors per row, stride_v = y_sorted's row
// stride in vectors. A tile of 32 * kUnroll vectors per pass over the token's rows; row_map and
// weights come 32 slots at a time, one per lane, and are broadcast with shuffles.
template <typename T, int N>
__global__ void __launch_bounds__(kWarps * 32, 1)
    unpermute_kernel(UnpermuteParams p, int64_t hv, int64_t stride_v) {
  using A = acc_t<T>;
  using V = Vec<T, N>;
  const V* __restrict__ ys = static_cast<const V*>(p.y_sorted);
  V* __restrict__ y = static_cast<V*>(p.y);
  const int lane = lane_id();
  bool bad = false;
  for (int64_t t = first_warp(); t < p.num_tokens; t += num_warps()) {
    for (int64_t c0 = 0; c0 < hv; c0 += 32 * kUnroll) {
      A acc[kUnroll][N];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int n = 0; n < N; ++n) acc[u][n] = A(0);
      }
      // Slots in batches of 32 (k > 32 is rare); j stays in order 0..k-1 across batches.
      for (int32_t jb = 0; jb < p.k; jb += 32) {
        const int nj = min(32, p.k - jb);
        int32_t my_row = -1;
        A my_w = A(0);
        if (lane < nj) {
          const int64_t i = t * p.k + jb + lane;
          my_row = static_cast<int32_t>(permute::row_of(p.row_map[i], p.num_rows, &bad));
          my_w = load_weight<A>(p.weights, p.weights_dtype, i);
        }
        for (int jj = 0; jj < nj; ++jj) {
          const int32_t r = __shfl_sync(kFull, my_row, jj);
          const A w = __shfl_sync(kFull, my_w, jj);
          if (r < 0) continue;  // warp-uniform
          const V* src = ys + r * stride_v;
          V buf[kUnroll];  // all loads first: kUnroll independent 16-byte loads in flight
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            const int64_t c = c0 + u * 32 + lane;
            if (c < hv) buf[u] = src[c];
          }
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            if (c0 + u * 32 + lane >= hv) continue;
#pragma unroll
            for (int n = 0; n < N; ++n) {
              // A rounded product, then a rounded add (no FMA): the CPU's bits (det_math.h).
              acc[u][n] = det::add(acc[u][n], det::mul(w, to_acc(buf[u].v[n])));
            }
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t c = c0 + u * 32 + lane;
        if (c >= hv) continue;
        V out;
#pragma unroll
        for (int n = 0; n < N; ++n) out.v[n] = from_acc<T>(acc[u][n]);
        y[t * hv + c] = out;
      }
    }
  }
  if (bad && p.error_flag != nullptr) atomicOr(p.error_flag, kRowMapOutOfRange);
}

// row_slot[row_map[i]] = max slot i mapping there (row_slot preset to -1). A row reached twice is
// flagged (whatever the order, exactly the later atomicMax of the two sees a slot already there).
__global__ void __launch_bounds__(kScatterThreads, 1)
    scatter_kernel(const int32_t* __restrict__ row_map, int64_t slots, int64_t num_rows,
                   int32_t* __restrict__ row_slot, int32_t* error_flag) {
  bool bad = false, twice = false;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kScatterThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kScatterThreads + threadIdx.x; i < slots;
       i += stride) {
    const int64_t r = permute::row_of(row_map[i], num_rows, &bad);
    if (r >= 0 && atomicMax(&row_slot[r], static_cast<int32_t>(i)) != -1) twice = true;
  }
  if (bad && error_flag != nullptr) atomicOr(error_flag, kRowMapOutOfRange);
  if (twice && error_flag != nullptr) atomicOr(error_flag, kRowMapDuplicate);
}

// grad_y_sorted[r] = w[i] * grad_y[i / k] for i = row_slot[r] >= 0, else zeros. One warp per row.
template <typename T, int N>
__global__ void __launch_bounds__(kWarps * 32, 1)
    backward_rows_kernel(UnpermuteBackwardParams p, const int32_t* __restrict__ row_slot,
                         int64_t hv) {
  using A = acc_t<T>;
  using V = Vec<T, N>;
  const V* __restrict__ g = static_cast<const V*>(p.grad_y);
  V* __restrict__ out = static_cast<V*>(p.grad_y_sorted);
  const int lane = lane_id();
  for (int64_t r = first_warp(); r < p.num_rows; r += num_warps()) {
    const int32_t i = row_slot[r];  // warp-uniform
    V* dst = out + r * hv;
    if (i < 0) {
      V zero;
#pragma unroll
      for (int n = 0; n < N; ++n) zero.v[n] = from_acc<T>(A(0));
      for (int64_t c = lane; c < hv; c += 32) dst[c] = zero;
      continue;
    }
    const A w = load_weight<A>(p.weights, p.weights_dtype, i);
    const V* src = g + static_cast<int64_t>(i / p.k) * hv;
    for (int64_t c0 = 0; c0 < hv; c0 += 32 * kUnroll) {
      V buf[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t c = c0 + u * 32 + lane;
        if (c < hv) buf[u] = src[c];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t c = c0 + u * 32 + lane;
        if (c >= hv) continue;
        V o;
#pragma unroll
        for (int n = 0; n < N; ++n) o.v[n] = from_acc<T>(w * to_acc(buf[u].v[n]));
        dst[c] = o;
      }
    }
  }
}

// grad_weights[i] = <grad_y[i / k], y_sorted[row_map[i]]> (0 without a row). One warp per slot.
template <typename T, int N>
__global__ void __launch_bounds__(kWarps * 32, 1)
    backward_weights_kernel(UnpermuteBackwardParams p, int64_t hv, int64_t stride_v) {
  using A = acc_t<T>;
  using V = Vec<T, N>;
  const V* __restrict__ g = static_cast<const V*>(p.grad_y);
  const V* __restrict__ ys = static_cast<const V*>(p.y_sorted);
  const int lane = lane_id();
  const int64_t slots = p.num_tokens * p.k;
  bool bad = false;
  for (int64_t i = first_warp(); i < slots; i += num_warps()) {
    const int64_t r = permute::row_of(p.row_map[i], p.num_rows, &bad);
    A acc = A(0);
    if (r >= 0) {
      const V* a = g + (i / p.k) * hv;
      const V* b = ys + r * stride_v;
      for (int64_t c0 = 0; c0 < hv; c0 += 32 * kUnroll) {
        V va[kUnroll], vb[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t c = c0 + u * 32 + lane;
          if (c < hv) {
            va[u] = a[c];
            vb[u] = b[c];
          }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (c0 + u * 32 + lane >= hv) continue;
#pragma unroll
          for (int n = 0; n < N; ++n) acc += to_acc(va[u].v[n]) * to_acc(vb[u].v[n]);
        }
      }
    }
    // Fixed butterfly: the same association order on every run (lane 0's sum is stored).
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(kFull, acc, o);
    if (lane == 0) store_weight<A>(p.grad_weights, p.weights_dtype, i, acc);
  }
  if (bad && lane == 0 && p.error_flag != nullptr) atomicOr(p.error_flag, kRowMapOutOfRange);
}

}  // namespace mixops::cuda::unpermute_kernels
