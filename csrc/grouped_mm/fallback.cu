// grouped_mm: launches mixops's own fallback GEMM kernel (fallback_kernel.cuh) for whatever the
// CUTLASS paths do not take. Its own all-arch file: small, and independent of CUTLASS.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>

#include "core/cuda_launch.h"
#include "grouped_mm/fallback_kernel.cuh"
#include "grouped_mm/launch.h"

namespace mixops::cuda::detail {
namespace {

using fallback::grouped_mm_fallback_kernel;
using fallback::kBM;
using fallback::kBN;
using fallback::kThreads;

template <typename T, typename Acc, GroupAlignRule kSkipped>
void launch_typed(const GroupedMmParams& p, const LaunchConfig& cfg) {
  const int64_t tiles_n = (p.n + kBN - 1) / kBN;
  const int64_t tiles_m = (p.m + kBM - 1) / kBM;
  if (tiles_n > 0x7fffffff) fail("grouped_mm", "n too large for the fallback kernel");
  // Row tiles of all groups together, bounded from host-known sizes (offsets stay on the device):
  // 2-D x 3-D groups split m rows, each adding at most one partial tile; 2-D x 2-D groups each
  // have all m rows. The kernel grid-strides past 65535.
  const int64_t bound = p.ragged_k ? tiles_m * p.num_groups : tiles_m + p.num_groups;
  const dim3 grid(static_cast<unsigned>(tiles_n),
                  static_cast<unsigned>(std::clamp<int64_t>(bound, 1, 65535)), 1);
  launch_kernel(&grouped_mm_fallback_kernel<T, Acc, kSkipped>, grid, kThreads, 0, cfg.stream, p);
}

}  // namespace

// Enqueues the fallback GEMM on cfg.stream (after the zero fill) for every group (kAny), or for
// just the groups that break a CUTLASS path's alignment rule, which its argument builder skipped
// (the SM90 path with kTma, the SM80 tensor-op and TF32 paths with kCutlass2).
void launch_grouped_mm_fallback(const GroupedMmParams& p, const LaunchConfig& cfg,
                                GroupAlignRule skipped) {
  // Nothing for a GEMM to write: every output element is the zero-fill kernel's.
  if (p.num_groups <= 0 || p.m <= 0 || p.n <= 0 || p.k <= 0) return;
  dispatch_dtype(p.dtype, "grouped_mm", [&](auto tag) {
    using T = typename decltype(tag)::type;
    switch (skipped) {
      case GroupAlignRule::kAny: return launch_typed<T, acc_t<T>, GroupAlignRule::kAny>(p, cfg);
      case GroupAlignRule::kTma: return launch_typed<T, acc_t<T>, GroupAlignRule::kTma>(p, cfg);
      case GroupAlignRule::kCutlass2:
        return launch_typed<T, acc_t<T>, GroupAlignRule::kCutlass2>(p, cfg);
    }
  });
  check_launch("grouped_mm", "fallback launch");
}

}  // namespace mixops::cuda::detail
