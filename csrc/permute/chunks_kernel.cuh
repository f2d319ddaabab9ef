// reorder_chunks on CUDA, device code (chunks.cu launches it; no launch syntax, no torch).
// Format: permute.h (ReorderChunksParams); contract: launch.h.
//   chunk_offsets_kernel  one block: the exclusive prefix sums of the counts, clamped, in (a, b)
//                         order (src_off: where each chunk starts in x) and of the chunk sizes
//                         that leaves in (b, a) order (dst_off: where it starts in y), each with
//                         its total appended; flags negative counts and counts past N.
//   reorder_rows_kernel   one warp per row r of y: the chunk j holding r by binary search over
//                         dst_off (warp-uniform), then a copy of x's row
//                         src_off[i] + r - dst_off[j] (i: chunk j's index in counts), zeros for
//                         r >= dst_off[A * B].
// The offsets are one block's work: tiles of kScanThreads * kScanItems = 1024 chunks, a block scan
// per tile (int64, so no sum of 2^31 counts can wrap) and a running carry. That is correct for any
// A * B < 2^31 but serial in the tiles (two block scans per 1024 chunks): meant for expert
// parallelism's A * B (ranks x local experts, thousands to some 10^5), not for millions of chunks
// (one block would then be slow, unmeasured: a multi-block scan would be the fix).
// Clamping: a negative count is 0; the chunks are cut at row N of x (src_off[i] = min(prefix, N),
// so a chunk's size src_off[i + 1] - src_off[i] is 0 past N and truncated across it). Then
// dst_off[A * B] = min(S, N) and every row read is below N, whatever the counts hold.
// The copy moves raw bytes in units U (uint4 when every address, stride and row length is 16-byte
// aligned, else the widest of 8/4/2/1 bytes that is), lane-strided with kUnroll loads in flight
// per lane, as rows_kernel.cuh. Written in y's row order: no atomics but the error flag's.
#pragma once

#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <cstdint>

#include "core/macros.h"
#include "permute/permute.h"
#include "permute/row_copy.cuh"

namespace mixops::cuda::chunks_kernels {

constexpr int kScanThreads = 256;  // the offsets block
constexpr int kScanItems = 4;      // consecutive chunks per thread per tile
constexpr int64_t kScanTile = int64_t{kScanThreads} * kScanItems;
constexpr int kWarps = 8;   // warps per copy block, one row of y each
constexpr int kUnroll = 4;  // units per lane in flight

// Row length and x's row stride in units of U.
struct ChunkRowUnits {
  int64_t row;
  int64_t x_stride;
};

// src_off [A * B + 1], dst_off [A * B + 1] (int32: every value is <= N < 2^31).
__global__ void __launch_bounds__(kScanThreads, 1)
    chunk_offsets_kernel(const int32_t* counts, int64_t num_a, int64_t num_b, int64_t num_rows,
                         int32_t* src_off, int32_t* dst_off, int32_t* error_flag) {
  using BlockScan = cub::BlockScan<int64_t, kScanThreads>;
  MIXOPS_STATIC_SMEM(typename BlockScan::TempStorage, tmp);
  const int64_t chunks = num_a * num_b;
  bool negative = false;
  // (a, b) order: src_off[i] = min(sum of max(counts[i'], 0) over i' < i, N)
  int64_t carry = 0;
  for (int64_t i0 = 0; i0 < chunks; i0 += kScanTile) {
    const int64_t first = i0 + static_cast<int64_t>(threadIdx.x) * kScanItems;
    int64_t v[kScanItems], mine = 0;
#pragma unroll
    for (int k = 0; k < kScanItems; ++k) {
      int64_t c = first + k < chunks ? counts[first + k] : 0;
      if (c < 0) {
        negative = true;
        c = 0;
      }
      v[k] = c;
      mine += c;
    }
    int64_t run, tile;
    BlockScan(tmp).ExclusiveSum(mine, run, tile);
    run += carry;
#pragma unroll
    for (int k = 0; k < kScanItems; ++k) {
      if (first + k < chunks) src_off[first + k] = static_cast<int32_t>(std::min(run, num_rows));
      run += v[k];
    }
    carry += tile;
    __syncthreads();  // tmp is reused
  }
  const int64_t sum = carry;  // S, the clamped counts' sum
  if (threadIdx.x == 0) src_off[chunks] = static_cast<int32_t>(std::min(sum, num_rows));
  // one barrier: every thread's src_off visible to the block, and whether any count was < 0
  const bool any_negative = __syncthreads_or(negative) != 0;
  // (b, a) order: dst_off[j] = the sizes of the chunks before the j-th summed
  carry = 0;
  for (int64_t j0 = 0; j0 < chunks; j0 += kScanTile) {
    const int64_t first = j0 + static_cast<int64_t>(threadIdx.x) * kScanItems;
    int64_t v[kScanItems], mine = 0;
#pragma unroll
    for (int k = 0; k < kScanItems; ++k) {
      v[k] = 0;
      if (first + k < chunks) {
        const int64_t i = permute::chunk_of_transposed(first + k, num_a, num_b);
        v[k] = src_off[i + 1] - src_off[i];
      }
      mine += v[k];
    }
    int64_t run, tile;
    BlockScan(tmp).ExclusiveSum(mine, run, tile);
    run += carry;
#pragma unroll
    for (int k = 0; k < kScanItems; ++k) {
      if (first + k < chunks) dst_off[first + k] = static_cast<int32_t>(run);
      run += v[k];
    }
    carry += tile;
    __syncthreads();  // tmp is reused
  }
  if (threadIdx.x == 0) {
    dst_off[chunks] = static_cast<int32_t>(carry);  // min(S, N)
    const int32_t bits =
        (any_negative ? kCountsNegative : 0) | (sum > num_rows ? kCountsPastRows : 0);
    if (bits != 0 && error_flag != nullptr) atomicOr(error_flag, bits);
  }
}

template <typename U>
__global__ void __launch_bounds__(kWarps * 32, 1)
    reorder_rows_kernel(ReorderChunksParams p, const int32_t* src_off, const int32_t* dst_off,
                        ChunkRowUnits s) {
  const U* x = static_cast<const U*>(p.x);
  U* y = static_cast<U*>(p.y);
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int64_t chunks = p.num_a * p.num_b;
  const int64_t copied = dst_off[chunks];  // rows of y that come from x: min(S, N)
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; r < p.num_rows;
       r += warps) {
    const U* src = nullptr;  // warp-uniform
    if (r < copied) {
      const int64_t j = permute::chunk_holding(dst_off, chunks, r);
      const int64_t i = permute::chunk_of_transposed(j, p.num_a, p.num_b);
      src = x + (src_off[i] + (r - dst_off[j])) * s.x_stride;
    }
    U* out = y + r * s.row;
    warp_copy_row<kUnroll>(src, out, s.row, lane);
  }
}

}  // namespace mixops::cuda::chunks_kernels
