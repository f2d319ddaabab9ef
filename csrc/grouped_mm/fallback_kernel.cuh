// grouped_mm: mixops's own fallback kernel, for whatever the CUTLASS paths do not take (fp64,
// misaligned bf16/fp16 pointers or strides, sizes past int32, GPUs below sm_80 in PTX builds).
// It is written for clarity and generality, not speed: every operand is addressed through its
// general element strides (a_stride_m/a_stride_k, b_stride_*, out strides), so any layout and
// any alignment works, with 64-bit index math throughout.
//
// Grid: x = 64-column tiles of n; y walks ONE sequence of the 64-row tiles of all groups (group g
// owns tiles [first_g, first_g + ceil(rows_g / 64))), grid-strided. Offsets are on the device, so
// the host sizes y from a bound on the work (ceil(m / 64) + E tiles in the 2-D x 3-D mode, where the
// groups share m rows; E * ceil(m / 64) in the 2-D x 2-D mode) instead of launching every group's
// worst case. Each block walks the groups once, in order, as its tiles increase, clamping their
// bounds with grouped_mm_group_problem (shared with the CPU kernel). Groups with no rows or no k
// are the zero-fill kernel's, which also reports bad offsets. Device code only (no launch syntax,
// no torch, no CUTLASS); fallback.cu launches it.
#pragma once

#include <cstdint>

#include "core/acc_convert.cuh"
#include "core/macros.h"
#include "grouped_mm/grouped_mm.h"

namespace mixops::cuda::fallback {

constexpr int kBM = 64, kBN = 64, kBK = 16;  // output tile and k step
constexpr int kThreads = 256;                // 16 x 16 threads, 4 x 4 outputs each

// kSkipped: GroupAlignRule::kAny computes every group; another rule only the groups that break it
// (grouped_mm_group_aligned), which a CUTLASS path's argument builder gave no tiles.
template <typename T, typename Acc, GroupAlignRule kSkipped>
__global__ void __launch_bounds__(kThreads) grouped_mm_fallback_kernel(GroupedMmParams p) {
  // k-major tiles, padded by one to keep the transposing stores free of bank conflicts.
  MIXOPS_STATIC_SMEM(Acc[kBK][kBM + 1], As);
  MIXOPS_STATIC_SMEM(Acc[kBK][kBN + 1], Bs);
  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;  // this thread owns rows ty + 16i, cols tx + 16j
  // Load mappings: walk the operand's unit-stride dimension fastest (coalesced when one exists).
  const bool a_k_fast = p.a_stride_k == 1;
  const bool b_n_fast = p.b_stride_n == 1;

  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kBN;
  // The group holding tile t, its first tile and its tile count: block-uniform, so every thread
  // reaches the __syncthreads below.
  int32_t g = 0;
  int64_t first = 0, tiles = 0;
  GroupProblem q{};
  auto load = [&] {
    int32_t err = 0;  // reported by the zero-fill kernel
    q = grouped_mm_group_problem(p, g, &err);
    const bool mine = kSkipped == GroupAlignRule::kAny || !grouped_mm_group_aligned(p, q, kSkipped);
    tiles = (mine && q.gm > 0 && q.gk > 0 && n0 < q.gn) ? (q.gm + kBM - 1) / kBM : 0;
  };
  if (p.num_groups > 0) load();
  for (int64_t t = blockIdx.y;; t += gridDim.y) {
    while (g < p.num_groups && t >= first + tiles) {
      first += tiles;
      if (++g < p.num_groups) load();
    }
    if (g >= p.num_groups) break;
    const int64_t m0 = (t - first) * kBM;
    const T* A = static_cast<const T*>(p.a) + q.a_offset;
    const T* B = static_cast<const T*>(p.b) + q.b_offset;
    T* O = static_cast<T*>(p.out) + q.out_offset;
    {
      Acc acc[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = Acc(0);

      for (int64_t k0 = 0; k0 < q.gk; k0 += kBK) {
        // Stage a 64 x 16 slice of A and a 16 x 64 slice of B, zero-padded at the edges.
#pragma unroll
        for (int l = 0; l < (kBM * kBK) / kThreads; ++l) {
          const int idx = tid + l * kThreads;
          const int r = a_k_fast ? idx / kBK : idx % kBM;
          const int kk = a_k_fast ? idx % kBK : idx / kBM;
          const int64_t gr = m0 + r, gk = k0 + kk;
          As[kk][r] =
              (gr < q.gm && gk < q.gk) ? to_acc(A[gr * p.a_stride_m + gk * p.a_stride_k]) : Acc(0);
        }
#pragma unroll
        for (int l = 0; l < (kBN * kBK) / kThreads; ++l) {
          const int idx = tid + l * kThreads;
          const int c = b_n_fast ? idx % kBN : idx / kBK;
          const int kk = b_n_fast ? idx / kBN : idx % kBK;
          const int64_t gc = n0 + c, gk = k0 + kk;
          Bs[kk][c] =
              (gc < q.gn && gk < q.gk) ? to_acc(B[gk * p.b_stride_k + gc * p.b_stride_n]) : Acc(0);
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kBK; ++kk) {
          Acc a[4], b[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) a[i] = As[kk][ty + 16 * i];
#pragma unroll
          for (int j = 0; j < 4; ++j) b[j] = Bs[kk][tx + 16 * j];
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
        }
        __syncthreads();  // before the next k step overwrites the tiles
      }

#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t r = m0 + ty + 16 * i;
        if (r >= q.gm) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int64_t c = n0 + tx + 16 * j;
          if (c < q.gn)
            O[r * p.out_stride_m + c] = from_acc<T>(acc[i][j]);  // out is unit-stride in n
        }
      }
    }
  }
}

}  // namespace mixops::cuda::fallback
