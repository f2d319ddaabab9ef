// scatter_rows and its backward on CUDA, device code (rows.cu launches it; no launch syntax, no
// torch). Formats: permute.h (SelectRowsParams); contract: launch.h.
//   select_rows_kernel  one warp per dst row r: dst[r] = a[map[r]] when map[r] is a row of a
//                       (zeros when a is null), else b[r] (zeros when b is null); map values
//                       outside [-1, a_rows) count as -1 and set kRowMapOutOfRange.
// A pure copy, so the kernel moves raw bytes in units U (uint4 when every address, stride and row
// length is 16-byte aligned, else the widest of 8/4/2/1 bytes that is), lane-strided with kUnroll
// loads in flight per lane. Written in dst order: no atomics, and the forward's copy of base is
// the same pass as the scatter (map = the inverse of index, from unpermute's scatter_kernel).
#pragma once

#include <cstdint>

#include "permute/permute.h"
#include "permute/row_copy.cuh"

namespace mixops::cuda::rows_kernels {

constexpr int kWarps = 8;   // warps per block, one dst row each
constexpr int kUnroll = 4;  // units per lane in flight

// Row lengths and strides of SelectRowsParams in units of U.
struct RowUnits {
  int64_t row;       // units per row
  int64_t a_stride;  // of a
  int64_t b_stride;  // of b
};

template <typename U>
__global__ void __launch_bounds__(kWarps * 32, 1)
    select_rows_kernel(SelectRowsParams p, RowUnits s) {
  const U* a = static_cast<const U*>(p.a);
  const U* b = static_cast<const U*>(p.b);
  U* dst = static_cast<U*>(p.dst);
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarps;
  bool bad = false;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; r < p.dst_rows;
       r += warps) {
    const int64_t m = permute::row_of(p.map[r], p.a_rows, &bad);  // warp-uniform
    const U* src = m >= 0 ? (a != nullptr ? a + m * s.a_stride : nullptr)
                          : (b != nullptr ? b + r * s.b_stride : nullptr);
    U* out = dst + r * s.row;
    warp_copy_row<kUnroll>(src, out, s.row, lane);
  }
  if (bad && lane == 0 && p.error_flag != nullptr) atomicOr(p.error_flag, kRowMapOutOfRange);
}

}  // namespace mixops::cuda::rows_kernels
