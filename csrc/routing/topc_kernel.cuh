// select_topc on CUDA, device code (topc.cu launches it; no launch syntax, no torch): one block
// per row (grid-strided over rows), streaming the row from global memory, so any N <= 2^31 - 1
// runs with the same fixed shared memory and no workspace.
//
// Per row:
//   1. count the eligible entries (block sum); if there are <= c, every eligible entry is chosen;
//   2. else radix-select the c-th best order key (topc::order_key, 8 bits per pass from the top:
//      4 passes for fp32/bf16/fp16, 8 for fp64): a shared histogram of the candidates' next digit,
//      one thread walks it from the top bin; after the last pass `threshold` is the c-th best key
//      and `need_eq` how many entries with exactly that key are taken (the lowest indices: the
//      tie rule of routing::better);
//   3. walk the row in index order, kThreads entries per step: two block scans give each entry
//      its rank among the equal-to-threshold entries and its output position, so the chosen
//      entries land in ascending index order (values copied bit for bit);
//   4. positions take..c-1 get index -1, value -inf.
// Cost: (2 + passes) reads of the row; the row loop stops once every choice is written.
// Limits (correct, but not yet tuned or timed on a GPU): one block per row, so a few very long
// rows use a few SMs; bf16/fp16 keys carry 16 significant bits but take the 4 fp32 passes; many
// equal scores put the histogram's shared atomics on one bin.
#pragma once

#include <cub/block/block_scan.cuh>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "core/acc_convert.cuh"
#include "core/macros.h"
#include "routing/topc.h"

namespace mixops::cuda::topc_kernels {

constexpr int kThreads = 256;  // per block (one row)
constexpr int kRadixBits = 8;
constexpr int kBins = 1 << kRadixBits;

// The order key type: 32 bits for fp32/bf16/fp16 (ranked as fp32, exact), 64 for fp64.
template <typename T>
using key_t = std::conditional_t<std::is_same_v<T, double>, uint64_t, uint32_t>;

template <typename T>
__device__ __forceinline__ key_t<T> key_of(T v) {
  return topc::order_key(to_acc(v));
}

__device__ __forceinline__ bool eligible(const uint8_t* mask, int64_t i) {
  return mask == nullptr || mask[i] != 0;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) select_topc_kernel(TopcParams p) {
  using K = key_t<T>;
  using BlockScan = cub::BlockScan<int32_t, kThreads>;
  MIXOPS_STATIC_SMEM(typename BlockScan::TempStorage, scan);
  MIXOPS_STATIC_SMEM(int32_t[kBins], hist);
  MIXOPS_STATIC_SMEM(int32_t[2], pick);  // the chosen digit and what is left to take inside it
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t n = p.n, c = p.c;
  for (int64_t row = blockIdx.x; row < p.batch; row += gridDim.x) {
    const T* x = static_cast<const T*>(p.scores) + row * n;
    const uint8_t* m = p.mask == nullptr ? nullptr : p.mask + row * n;
    T* values = static_cast<T*>(p.values) + row * c;
    int64_t* indices = p.indices + row * c;

    // 1. Eligible entries (n < 2^31: an int32 count).
    int32_t mine = 0;
    for (int64_t i = tid; i < n; i += kThreads) mine += eligible(m, i) ? 1 : 0;
    int32_t unused = 0, num_eligible = 0;
    BlockScan(scan).ExclusiveSum(mine, unused, num_eligible);
    __syncthreads();                          // scan is reused
    const bool take_all = num_eligible <= c;  // block-uniform
    const int32_t take = take_all ? num_eligible : static_cast<int32_t>(c);

    // 2. Radix select of the take-th best key among the eligible entries (take >= 1 here).
    K threshold = 0, known = 0;  // the key bits fixed so far, and which bits those are
    int32_t need_eq = take;      // how many of the candidates matching `threshold` to take
    if (!take_all && take > 0) {
      for (int shift = static_cast<int>(sizeof(K)) * 8 - kRadixBits; shift >= 0;
           shift -= kRadixBits) {
        for (int b = tid; b < kBins; b += kThreads) hist[b] = 0;
        __syncthreads();
        for (int64_t i = tid; i < n; i += kThreads) {
          if (!eligible(m, i)) continue;
          const K k = key_of(x[i]);
          if ((k & known) == threshold) atomicAdd(&hist[(k >> shift) & (kBins - 1)], 1);
        }
        __syncthreads();
        if (tid == 0) {  // the bin holding the need_eq-th best candidate, from the top
          int32_t left = need_eq;
          int b = kBins - 1;
          for (; b > 0 && hist[b] < left; --b) left -= hist[b];
          pick[0] = b;
          pick[1] = left;
        }
        __syncthreads();
        threshold |= static_cast<K>(pick[0]) << shift;
        known |= static_cast<K>(kBins - 1) << shift;
        need_eq = pick[1];
        __syncthreads();  // pick and hist are rewritten by the next pass
      }
    }

    // 3. The chosen entries in index order: key > threshold, or == threshold among the first
    // need_eq such entries.
    int32_t written = 0, eq_before = 0;  // block-uniform running totals
    for (int64_t i0 = 0; i0 < n && written < take; i0 += kThreads) {
      const int64_t i = i0 + tid;
      const bool in = i < n && eligible(m, i);
      const K k = in ? key_of(x[i]) : K(0);
      const bool eq = in && !take_all && k == threshold;
      int32_t eq_rank = 0, eq_count = 0;
      BlockScan(scan).ExclusiveSum(eq ? 1 : 0, eq_rank, eq_count);
      __syncthreads();
      const bool chosen =
          in && (take_all || k > threshold || (eq && eq_before + eq_rank < need_eq));
      int32_t pos = 0, count = 0;
      BlockScan(scan).ExclusiveSum(chosen ? 1 : 0, pos, count);
      __syncthreads();
      if (chosen) {
        values[written + pos] = x[i];
        indices[written + pos] = i;
      }
      written += count;
      eq_before += eq_count;
    }

    // 4. Rows with fewer than c eligible entries: index -1, value -inf.
    for (int64_t j = take + tid; j < c; j += kThreads) {
      values[j] = from_acc<T>(-INFINITY);
      indices[j] = -1;
    }
  }
}

}  // namespace mixops::cuda::topc_kernels
