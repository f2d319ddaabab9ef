// grouped_mm: the zero-fill kernel, enqueued before every GEMM path (launched by zero.cu). It
// writes zeros to exactly what no group writes (so the GEMM kernels never have to, and empty
// groups get no tiles):
//   !ragged_k: rows [end of group E-1, m) of out (all rows when k == 0 or E == 0);
//   ragged_k : the whole [m, n] block of every group whose clamped length is 0.
// It also ORs offset-error bits for every group into params.error_flag, so every path (including
// the SM90 one) reports bad offsets even when its own kernels do not. grouped_mm_packed's modes
// have their own kernel (zero_fill_packed_kernel) on the shared rectangles of grouped_mm.h.
// Device code only: no launch syntax, no torch, no CUTLASS.
#pragma once

#include <cstdint>

#include "grouped_mm/grouped_mm.h"

namespace mixops::cuda::zero_fill {

constexpr int kThreads = 256;

// V is the store unit: uint4 (16 bytes) when rows, strides and base are 16-byte aligned, else
// an integer as wide as one element. Sizes below are in units of V.
template <typename V>
__global__ void __launch_bounds__(kThreads)
    zero_fill_kernel(GroupedMmParams p, int64_t row_v, int64_t stride_m_v, int64_t stride_e_v) {
  const int64_t total = grouped_mm_total(p);
  V* out = static_cast<V*>(p.out);
  const V zero{};

  // Error bits: one block scans all groups (E is small; the atomics only fire on bad offsets).
  if (blockIdx.x == 0 && blockIdx.y == 0 && p.error_flag != nullptr) {
    for (int32_t g = threadIdx.x; g < p.num_groups; g += blockDim.x) {
      int64_t b, e;
      int32_t err = 0;
      grouped_mm_group_bounds(p.offsets, g, total, &b, &e, &err);
      if (err != 0) atomicOr(p.error_flag, err);
    }
  }

  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * blockDim.x;

  if (!p.ragged_k) {
    // First row no group writes: the clamped end of the last group, or 0 when no GEMM runs
    // (k == 0 or E == 0). Clamping makes each group start at or before the previous group's
    // end, so groups 0..E-1 cover [0, end of E-1) without gaps even for invalid offsets; rows
    // zeroed here that a group also covers are overwritten by the GEMM, which runs after.
    int64_t first = 0;
    if (p.num_groups > 0 && p.k > 0) {
      int64_t b;
      int32_t err;
      grouped_mm_group_bounds(p.offsets, p.num_groups - 1, total, &b, &first, &err);
    }
    const int64_t count = (p.m - first) * row_v;
    for (int64_t i = tid; i < count; i += nthreads) {
      const int64_t r = first + i / row_v, c = i % row_v;
      out[r * stride_m_v + c] = zero;
    }
    return;
  }

  // ragged_k: grid.y strides over groups, grid.x over the [m, n] block of an empty group.
  const int64_t count = p.m * row_v;
  for (int64_t g = blockIdx.y; g < p.num_groups; g += gridDim.y) {
    int64_t b, e;
    int32_t err;
    grouped_mm_group_bounds(p.offsets, static_cast<int32_t>(g), total, &b, &e, &err);
    if (e != b) continue;  // a non-empty group's GEMM writes its whole block
    V* blk = out + g * stride_e_v;
    for (int64_t i = tid; i < count; i += nthreads) {
      const int64_t r = i / row_v, c = i % row_v;
      blk[r * stride_m_v + c] = zero;
    }
  }
}

// grouped_mm_packed (p.packed != kNone): grid.y strides over E + 1 rectangles (each group's
// grouped_mm_packed_zero_rect, then grouped_mm_packed_tail_rect), grid.x over a rectangle's
// elements. V: an integer as wide as one element (the rectangles start at any column). The
// first block also ORs the offsets and ends bits of every group.
template <typename V>
__global__ void __launch_bounds__(kThreads) zero_fill_packed_kernel(GroupedMmParams p) {
  V* out = static_cast<V*>(p.out);
  const V zero{};
  if (blockIdx.x == 0 && blockIdx.y == 0 && p.error_flag != nullptr) {
    for (int32_t g = threadIdx.x; g < p.num_groups; g += blockDim.x) {
      int32_t err = 0;
      grouped_mm_group_problem(p, g, &err);
      if (err != 0) atomicOr(p.error_flag, err);
    }
  }
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = blockIdx.y; g <= p.num_groups; g += gridDim.y) {
    int32_t err;
    OutRect r;
    if (g < p.num_groups) {
      r = grouped_mm_packed_zero_rect(p,
                                      grouped_mm_group_problem(p, static_cast<int32_t>(g), &err));
    } else {
      int64_t end = 0, pend = 0;  // E == 0: the whole output
      if (p.num_groups > 0) {
        const GroupProblem q = grouped_mm_group_problem(p, p.num_groups - 1, &err);
        end = q.end;
        pend = q.pend;
      }
      r = grouped_mm_packed_tail_rect(p, end, pend);
    }
    if (r.rows <= 0 || r.cols <= 0) continue;
    const int64_t count = r.rows * r.cols;
    for (int64_t i = tid; i < count; i += nthreads) {
      out[(r.row0 + i / r.cols) * p.out_stride_m + r.col0 + i % r.cols] = zero;
    }
  }
}

}  // namespace mixops::cuda::zero_fill
