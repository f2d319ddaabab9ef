// grouped_mm SM90 path, the dispatcher: supported(), workspace_bytes() and run() over the six
// CUTLASS instantiations (gemm_<dtype>_<ab>_sm90.cu), then the tiled fallback kernel for the
// groups whose start breaks TMA's 16-byte alignment. Kept apart from the instantiations so it
// compiles fast and without CUTLASS; named *_sm90.cu so it is built for sm_90a only, like them.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "core/align.h"
#include "core/cuda_launch.h"
#include "grouped_mm/path.h"
#include "grouped_mm/sm90.h"

namespace mixops::cuda {
namespace detail {
// Defined in fallback.cu.
void launch_grouped_mm_fallback(const GroupedMmParams& p, const LaunchConfig& cfg,
                                GroupAlignRule skipped);
}  // namespace detail

namespace sm90 {
namespace {

using detail::GroupedGemm;
constexpr Layout kRow = Layout::kRowMajor;
constexpr Layout kCol = Layout::kColMajor;

// Calls f.template operator()<GroupedGemm<...>>() for p's dtype and layouts (supported() holds).
template <class F>
auto dispatch(const GroupedMmParams& p, F&& f) {
  const bool bf16 = p.dtype == Dtype::kBFloat16;
  if (p.a_layout == kRow && p.b_layout == kRow) {
    return bf16 ? f.template operator()<GroupedGemm<Dtype::kBFloat16, kRow, kRow>>()
                : f.template operator()<GroupedGemm<Dtype::kFloat16, kRow, kRow>>();
  }
  if (p.a_layout == kRow) {
    return bf16 ? f.template operator()<GroupedGemm<Dtype::kBFloat16, kRow, kCol>>()
                : f.template operator()<GroupedGemm<Dtype::kFloat16, kRow, kCol>>();
  }
  return bf16 ? f.template operator()<GroupedGemm<Dtype::kBFloat16, kCol, kRow>>()
              : f.template operator()<GroupedGemm<Dtype::kFloat16, kCol, kRow>>();
}

}  // namespace

bool supported(const GroupedMmParams& p) { return grouped_mm_sm90_supported(p); }

size_t workspace_bytes(const GroupedMmParams& p, const LaunchConfig& cfg) {
  if (!supported(p) || p.num_groups <= 0) return 0;
  return dispatch(p, [&]<class G>() { return G::workspace_bytes(p, cfg); });
}

void run(const GroupedMmParams& p, void* workspace, const LaunchConfig& cfg) {
  if (!supported(p)) {
    throw std::runtime_error(
        "grouped_mm sm90: parameters not supported (dtype, layout or alignment)");
  }
  if (p.num_groups <= 0) return;
  if (workspace == nullptr || !is_aligned(workspace, kWorkspaceAlign)) {
    throw std::runtime_error("grouped_mm sm90: workspace must be non-null and 256-byte aligned");
  }
  dispatch(p, [&]<class G>() { G::run(p, workspace, cfg); });
  // Groups whose start breaks TMA's alignment got no CUTLASS tiles: the tiled fallback kernel
  // computes exactly those (only for layouts where a group can start misaligned).
  if (grouped_mm_may_misalign(p)) {
    cuda::detail::launch_grouped_mm_fallback(p, cfg, GroupAlignRule::kTma);
  }
}

}  // namespace sm90
}  // namespace mixops::cuda
