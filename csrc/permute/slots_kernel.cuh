// rows_to_slots and slots_to_rows on CUDA, device code (slots.cu launches it; no launch syntax, no
// torch). Formats: permute.h (slot layout); contract: launch.h.
//   rows_to_slots  one warp per slot (t, j): slots[t, h, j] = head h of rows[row_map[t, j]] for
//                  every head h, or zeros; a bad row_map value counts as -1 and sets the flag;
//   slots_to_rows  one warp per row r, once unpermute's scatter_kernel has set row_slot[r] (the
//                  slot mapped to r, or -1; bad values and duplicated rows flagged there): the
//                  row's heads from that slot, or zeros.
// Pure copies, so the kernels move raw bytes in units U (uint4 = 16 bytes when every address,
// stride and head length is 16-byte aligned, else the widest of 8/4/2/1 bytes that is). A row
// of num_heads * d elements is hv = d * sizeof(T) / sizeof(U) units per head; its units are
// walked lane-strided with kUnroll loads in flight per lane. The row side is contiguous; the slot
// side is one piece of hv units per head, head_stride apart: each lane carries its (head,
// column) from step to step (RowWalk), so no unit costs a division.
//
// Self-contained on purpose: including unpermute_kernel.cuh would define its non-template
// scatter_kernel in slots.cu's object too, a duplicate symbol at link time.
#pragma once

#include <cstdint>

#include "permute/permute.h"

namespace mixops::cuda::slots_kernels {

constexpr int kWarps = 8;   // warps per block; each owns a slot or a row (as unpermute's kernels)
constexpr int kUnroll = 4;  // units per lane in flight

__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x % 32); }
__device__ __forceinline__ int64_t first_warp() {
  return static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
}
__device__ __forceinline__ int64_t num_warps() { return static_cast<int64_t>(gridDim.x) * kWarps; }

// The geometry of SlotsParams in units of the kernel's U.
struct SlotUnits {
  int64_t hv;          // units per head (d * sizeof(T) / sizeof(U))
  int64_t row_stride;  // of rows
  int64_t t, h, j;     // slot strides
};

// A lane's place in a row of units e = head * hv + col (col < hv); step() moves it 32 units on.
struct RowWalk {
  int64_t head, col, hv;
  int64_t step_head, step_col;  // 32 = step_head * hv + step_col
  __device__ __forceinline__ void step() {
    head += step_head;
    col += step_col;
    if (col >= hv) {
      col -= hv;
      ++head;
    }
  }
};

// Where unit `lane` is (hv == 0: rows are empty, any walk will do).
__device__ __forceinline__ RowWalk lane_walk(int64_t hv) {
  const int64_t lane = lane_id(), v = hv > 0 ? hv : 1;
  return RowWalk{lane / v, lane % v, v, 32 / v, 32 % v};
}

// Copies one row of `total` units between its row form (contiguous) and its slot form (head h at
// slot + h * head_stride): kToSlots copies src = row to dst = slot, else src = slot to dst = row.
// src null: zeros. The warp's lanes call it together.
template <bool kToSlots, typename U>
__device__ __forceinline__ void copy_row(const U* __restrict__ src, U* __restrict__ dst, RowWalk w,
                                         int64_t total, int64_t head_stride) {
  const int lane = lane_id();
  for (int64_t e0 = 0; e0 < total; e0 += 32 * kUnroll) {
    U buf[kUnroll];
    int64_t piece[kUnroll];  // the slot-side place of each unit
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // all loads first: kUnroll in flight
      const int64_t e = e0 + u * 32 + lane;
      piece[u] = w.head * head_stride + w.col;
      w.step();
      if (e < total) buf[u] = src == nullptr ? U{} : src[kToSlots ? e : piece[u]];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t e = e0 + u * 32 + lane;
      if (e < total) dst[kToSlots ? piece[u] : e] = buf[u];
    }
  }
}

// slots[t, :, j] = the heads of rows[row_map[t, j]] (zeros for -1 and bad values), one warp per
// slot i = t * k + j.
template <typename U>
__global__ void __launch_bounds__(kWarps * 32, 1) rows_to_slots_kernel(SlotsParams p, SlotUnits s) {
  const U* rows = static_cast<const U*>(p.rows);
  U* slots = static_cast<U*>(p.slots);
  const RowWalk start = lane_walk(s.hv);
  const int64_t total = p.num_heads * s.hv, items = p.num_tokens * p.k;
  bool bad = false;
  for (int64_t i = first_warp(); i < items; i += num_warps()) {
    const int64_t r = permute::row_of(p.row_map[i], p.num_rows, &bad);  // warp-uniform
    copy_row<true>(r >= 0 ? rows + r * s.row_stride : nullptr,
                   slots + (i / p.k) * s.t + (i % p.k) * s.j, start, total, s.h);
  }
  if (bad && lane_id() == 0 && p.error_flag != nullptr) {
    atomicOr(p.error_flag, kRowMapOutOfRange);
  }
}

// rows[r] = the heads of slot row_slot[r] (zeros for -1), one warp per row; rows contiguous.
template <typename U>
__global__ void __launch_bounds__(kWarps * 32, 1)
    slots_to_rows_kernel(SlotsParams p, SlotUnits s, const int32_t* __restrict__ row_slot) {
  const U* slots = static_cast<const U*>(p.slots);
  U* rows = static_cast<U*>(p.rows);
  const RowWalk start = lane_walk(s.hv);
  const int64_t total = p.num_heads * s.hv;
  for (int64_t r = first_warp(); r < p.num_rows; r += num_warps()) {
    const int64_t i = row_slot[r];  // warp-uniform
    copy_row<false>(i >= 0 ? slots + (i / p.k) * s.t + (i % p.k) * s.j : nullptr,
                    rows + r * s.row_stride, start, total, s.h);
  }
}

}  // namespace mixops::cuda::slots_kernels
