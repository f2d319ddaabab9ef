// grouped_mm SM90 path: the CUDA-core rescue kernel for groups whose start breaks TMA's 16-byte
// alignment (dispatch_sm90.cu launches it after the CUTLASS GEMM). Device code only: no launch
// syntax, no torch, no CUTLASS.
#pragma once

#include <cstdint>

#include "core/acc_convert.cuh"
#include "grouped_mm/grouped_mm.h"

namespace mixops::cuda::sm90 {

constexpr int kRescueThreads = 256;

// Computes, on CUDA cores with fp32 accumulation, exactly the groups the argument builder gave no
// CUTLASS tiles for because their start is misaligned (same predicate:
// grouped_mm_group_tma_aligned).
// Only launched for layouts where that can happen (grouped_mm_may_misalign). Correct but slow (one
// output element
// per thread, operands from L1/L2): a safety net for offsets that are not multiples of 8, not a
// fast path. Every block walks all groups; aligned ones cost two offset loads.
template <class T>
__global__ void __launch_bounds__(kRescueThreads) rescue_misaligned_groups(GroupedMmParams p) {
  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);
  T* out = static_cast<T*>(p.out);
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int32_t g = 0; g < p.num_groups; ++g) {
    int32_t err = 0;  // already reported by the argument builder
    const GroupProblem q = grouped_mm_group_problem(p, g, &err);
    if (q.gm == 0 || q.gn == 0 || q.gk == 0 || grouped_mm_group_tma_aligned(q)) continue;
    const int64_t total = q.gm * q.gn;
    for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
         idx += step) {
      const int64_t i = idx / q.gn, j = idx - i * q.gn;  // j fastest: coalesced B/out rows
      const T* ar = a + q.a_offset + i * p.a_stride_m;
      const T* bc = b + q.b_offset + j * p.b_stride_n;
      float acc = 0.f;
      for (int64_t kk = 0; kk < q.gk; ++kk) {
        acc = fmaf(to_acc(ar[kk * p.a_stride_k]), to_acc(bc[kk * p.b_stride_k]), acc);
      }
      out[q.out_offset + i * p.out_stride_m + j] = from_acc<T>(acc);
    }
  }
}

}  // namespace mixops::cuda::sm90
