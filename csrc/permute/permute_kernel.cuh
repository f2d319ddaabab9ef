// permute on CUDA, device code (permute.cu launches it; no launch syntax, no torch, no CUTLASS):
// ids -> offsets, row_map, dropped, and the row gather x -> x_sorted. Formats and semantics:
// permute.h; contract: launch.h.
//
// Everything is a "stable rank within expert" over a sequence of slots, cut into chunks of
// permute::kChunkSlots positions (as on the CPU):
//   hist_kernel     per-chunk expert histograms hist[chunk, e] (shared or global int atomics);
//   colscan_kernel  per expert, an exclusive scan down the chunks (hist becomes each chunk's
//                   first rank per expert) and the expert's total;
//   rank_kernel     one warp per chunk walks it in order, 32 positions a step: __match_any_sync
//                   ranks equal experts inside the step, a per-expert counter carries the rest.
// Capacity first runs that machinery over the slots in priority order (choice-major i' = j*T + t,
// or a stable CUB radix sort by (j, priority key) when priority is given), so a slot's rank is
// its place among its expert's slots in priority order; ranks >= capacity drop the slot (its
// expert becomes -1). The layout pass then runs it over the slots in slot order, adding each
// expert's first row (expert_scan_kernel): row = start[e] + rank, and records row -> token.
// gather_kernel copies one row per warp (raw bytes, widest aligned vector), zeros past the end.
// Integer atomics only feed order-independent counts: every output is deterministic.
#pragma once

#include <cub/block/block_scan.cuh>

#include <climits>
#include <cstdint>

#include "core/macros.h"
#include "permute/permute.h"

namespace mixops::cuda::permute_kernels {

constexpr int kChunk = static_cast<int>(permute::kChunkSlots);
constexpr int kPrepThreads = 256;
constexpr int kHistThreads = 256;
constexpr int kHistSharedMaxE = 8192;  // shared-memory histogram up to 32 KiB
constexpr int kRankWarps = 4;          // chunks per rank block
constexpr int kRankSharedMaxE = 1024;  // shared counters: kRankWarps * E * 4 bytes <= 16 KiB
constexpr int kRankBatch = 8;          // steps of 32 positions whose loads are issued together
constexpr int kScanThreads = 1024;
constexpr int kGatherWarps = 8;
constexpr int kGatherUnroll = 4;  // vectors per lane in flight

// Which slot sits at position q of the sequence being ranked.
enum class Seq { kSlot, kChoiceMajor, kSorted };

struct SeqView {
  int32_t* expert;        // [S] expert of each slot (-1: none or dropped)
  const int32_t* sorted;  // kSorted: [S] slot at each position
  int32_t num_tokens, k, slots;
};

template <Seq kSeq>
__device__ __forceinline__ int32_t slot_at(const SeqView& v, int32_t q) {
  if constexpr (kSeq == Seq::kSlot) {
    return q;
  } else if constexpr (kSeq == Seq::kChoiceMajor) {  // q = j * T + t
    const uint32_t j = static_cast<uint32_t>(q) / static_cast<uint32_t>(v.num_tokens);
    const uint32_t t = static_cast<uint32_t>(q) - j * static_cast<uint32_t>(v.num_tokens);
    return static_cast<int32_t>(t * static_cast<uint32_t>(v.k) + j);
  } else {
    return v.sorted[q];
  }
}

// Decodes ids into expert[] (flagging bad ids); with keys, also the priority sort input:
// key = (j << 32) | priority_sort_key, value = slot.
__global__ void __launch_bounds__(kPrepThreads, 1)
    prep_kernel(PermuteParams p, int32_t slots, int32_t* expert, uint64_t* keys, int32_t* vals) {
  bool bad = false;
  // uint32: slots < 2^31 and stride <= 2^24, so i + stride cannot wrap.
  const uint32_t stride = gridDim.x * kPrepThreads;
  for (uint32_t i = blockIdx.x * kPrepThreads + threadIdx.x; i < static_cast<uint32_t>(slots);
       i += stride) {
    const int64_t id =
        p.ids_int64 ? static_cast<const int64_t*>(p.ids)[i] : static_cast<const int32_t*>(p.ids)[i];
    expert[i] = permute::expert_of(id, p.num_experts, &bad);
    if (keys != nullptr) {
      const uint64_t j = i % static_cast<uint32_t>(p.k);
      keys[i] = (j << 32) | permute::priority_sort_key(p.priority[i]);
      vals[i] = static_cast<int32_t>(i);
    }
  }
  if (bad && p.error_flag != nullptr) atomicOr(p.error_flag, kIdsOutOfRange);
}

// hist[c, e] = slots of expert e among positions [c * kChunk, (c + 1) * kChunk). Global mode
// needs hist zeroed first.
template <Seq kSeq, bool kShared>
__global__ void __launch_bounds__(kHistThreads, 1)
    hist_kernel(SeqView v, int32_t num_experts, int32_t* hist) {
  MIXOPS_DYNAMIC_SMEM(int32_t, sh_hist);
  const int64_t c = blockIdx.x;
  const int64_t end = std::min<int64_t>(c * kChunk + kChunk, v.slots);
  int32_t* row = hist + c * num_experts;
  if constexpr (kShared) {
    for (int32_t e = threadIdx.x; e < num_experts; e += kHistThreads) sh_hist[e] = 0;
    __syncthreads();
  }
  for (int64_t q = c * kChunk + threadIdx.x; q < end; q += kHistThreads) {
    const int32_t e = v.expert[slot_at<kSeq>(v, static_cast<int32_t>(q))];
    if (e < 0) continue;
    if constexpr (kShared) {
      atomicAdd(&sh_hist[e], 1);
    } else {
      atomicAdd(&row[e], 1);
    }
  }
  if constexpr (kShared) {
    __syncthreads();
    for (int32_t e = threadIdx.x; e < num_experts; e += kHistThreads) row[e] = sh_hist[e];
  }
}

// Per expert (a block owns 32), hist[c, e] <- sum of hist[c' < c, e], in 32 x 32 tiles (coalesced
// loads, a warp scan per column). The column total goes to totals[e] (if given) and
// max(total - capacity, 0) to dropped[e] (if given).
__global__ void __launch_bounds__(kScanThreads, 1)
    colscan_kernel(int32_t* hist, int32_t num_chunks, int32_t num_experts, int32_t* totals,
                   int32_t* dropped, int64_t capacity) {
  MIXOPS_STATIC_SMEM(int32_t[32][33], tile);
  const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * 32 + lane;
  int32_t carry = 0;  // running total of column w (uniform across warp w)
  const bool e_in = e < num_experts;
  int32_t next = w < num_chunks && e_in ? hist[static_cast<int64_t>(w) * num_experts + e] : 0;
  for (int64_t c0 = 0; c0 < num_chunks; c0 += 32) {
    const int64_t c = c0 + w;
    const bool in = c < num_chunks && e_in;
    tile[w][lane] = next;
    __syncthreads();
    // Prefetch the next tile while this one is scanned.
    next = c + 32 < num_chunks && e_in ? hist[(c + 32) * num_experts + e] : 0;
    const int32_t x = tile[lane][w];
    int32_t incl = x;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int32_t y = __shfl_up_sync(0xffffffffu, incl, d);
      if (lane >= d) incl += y;
    }
    tile[lane][w] = carry + incl - x;
    carry += __shfl_sync(0xffffffffu, incl, 31);
    __syncthreads();
    if (in) hist[c * num_experts + e] = tile[w][lane];
    __syncthreads();
  }
  const int64_t ew = static_cast<int64_t>(blockIdx.x) * 32 + w;
  if (lane == 0 && ew < num_experts) {
    if (totals != nullptr) totals[ew] = carry;
    if (dropped != nullptr) {
      dropped[ew] = static_cast<int32_t>(std::max<int64_t>(carry - capacity, 0));
    }
  }
}

// One block: start[e] = sum of totals[e' < e] (in place over totals), offsets[e] = start + total.
__global__ void __launch_bounds__(kScanThreads, 1)
    expert_scan_kernel(int32_t* totals, int32_t num_experts, int32_t* offsets) {
  using BlockScan = cub::BlockScan<int32_t, kScanThreads>;
  MIXOPS_STATIC_SMEM(typename BlockScan::TempStorage, tmp);
  int32_t carry = 0;
  for (int64_t e0 = 0; e0 < num_experts; e0 += kScanThreads) {
    const int64_t e = e0 + threadIdx.x;
    const int32_t v = e < num_experts ? totals[e] : 0;
    int32_t excl, sum;
    BlockScan(tmp).ExclusiveSum(v, excl, sum);
    if (e < num_experts) {
      totals[e] = carry + excl;
      offsets[e] = carry + excl + v;
    }
    carry += sum;
    __syncthreads();  // tmp is reused
  }
}

// One warp per chunk, positions in order, 32 per step. rank = base[c, e] + earlier equal experts
// in the chunk. Rank pass (!kLayout): drop slots with rank >= capacity (expert[s] = -1). Layout
// pass (kLayout, kSeq == kSlot): row = start[e] + rank -> row_map[s], row_token[row] = token of s.
// Counters live in shared memory (kShared) or in the chunk's own row of base (global).
template <Seq kSeq, bool kShared, bool kLayout>
__global__ void __launch_bounds__(kRankWarps * 32, 1)
    rank_kernel(SeqView v, int32_t num_experts, int32_t num_chunks, int32_t* base,
                const int32_t* start, int64_t capacity, int32_t* row_map, int32_t* row_token,
                int64_t num_rows) {
  MIXOPS_DYNAMIC_SMEM(int32_t, sh_cnt);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kRankWarps + warp;
  if (c >= num_chunks) return;  // warp-uniform; no block barriers below
  int32_t* cnt = base + c * num_experts;
  if constexpr (kShared) {
    int32_t* own = sh_cnt + warp * num_experts;
    for (int32_t e = lane; e < num_experts; e += 32) own[e] = cnt[e] + (kLayout ? start[e] : 0);
    cnt = own;
    __syncwarp();
  }
  const unsigned lanes_below = (1u << lane) - 1u;
  const int64_t end = std::min<int64_t>(c * kChunk + kChunk, v.slots);
  for (int64_t q0 = c * kChunk; q0 < end; q0 += 32 * kRankBatch) {
    int32_t s[kRankBatch], e[kRankBatch];
#pragma unroll
    for (int b = 0; b < kRankBatch; ++b) {
      const int64_t q = q0 + b * 32 + lane;
      s[b] = q < end ? slot_at<kSeq>(v, static_cast<int32_t>(q)) : -1;
    }
#pragma unroll
    for (int b = 0; b < kRankBatch; ++b) e[b] = s[b] >= 0 ? v.expert[s[b]] : -1;
#pragma unroll
    for (int b = 0; b < kRankBatch; ++b) {
      const int32_t ex = e[b];
      const unsigned peers = __match_any_sync(0xffffffffu, ex);
      int32_t r = ex >= 0 ? cnt[ex] : 0;
      __syncwarp();  // every lane has read its counter before the leader bumps it
      if (ex >= 0) {
        if (lane == 31 - __clz(peers)) cnt[ex] = r + __popc(peers);
        r += __popc(peers & lanes_below);
        if constexpr (kLayout) {
          if constexpr (!kShared) r += start[ex];
          row_map[s[b]] = r;
          if (r < num_rows) row_token[r] = s[b] / v.k;
        } else if (r >= capacity) {
          v.expert[s[b]] = -1;
        }
      } else if (kLayout && s[b] >= 0) {
        row_map[s[b]] = kNoRow;
      }
      __syncwarp();  // the bump is visible to the next step
    }
  }
}

// x_sorted[r] = x[row_token[r]] for r < offsets[E-1], zero after; one warp per row, V-wide units.
template <typename V>
__global__ void __launch_bounds__(kGatherWarps * 32, 1)
    gather_kernel(const V* __restrict__ x, int64_t x_stride_v, V* __restrict__ out, int64_t row_v,
                  const int32_t* __restrict__ row_token, const int32_t* __restrict__ offsets,
                  int32_t num_experts, int64_t num_rows, int64_t num_tokens) {
  const int lane = threadIdx.x % 32;
  const int64_t used = std::min<int64_t>(offsets[num_experts - 1], num_rows);
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kGatherWarps;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kGatherWarps + threadIdx.x / 32; r < num_rows;
       r += warps) {
    const int64_t t = r < used ? row_token[r] : -1;
    V* dst = out + r * row_v;
    if (t < 0 || t >= num_tokens) {
      for (int64_t c = lane; c < row_v; c += 32) dst[c] = V{};
      continue;
    }
    const V* src = x + t * x_stride_v;
    for (int64_t c0 = 0; c0 < row_v; c0 += 32 * kGatherUnroll) {
      V buf[kGatherUnroll];
#pragma unroll
      for (int u = 0; u < kGatherUnroll; ++u) {
        const int64_t c = c0 + u * 32 + lane;
        if (c < row_v) buf[u] = src[c];
      }
#pragma unroll
      for (int u = 0; u < kGatherUnroll; ++u) {
        const int64_t c = c0 + u * 32 + lane;
        if (c < row_v) dst[c] = buf[u];
      }
    }
  }
}

}  // namespace mixops::cuda::permute_kernels
