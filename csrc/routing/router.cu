// router_topk on CUDA: the launches of the kernels in router_kernel.cuh (the plan, the one dtype
// switch, the shared-memory opt-in), behind launch.h. Everything is enqueued on the caller's
// stream.
#include <cuda_runtime_api.h>
#include <nvtx3/nvtx3.hpp>

#include <cstdint>
#include <string>
#include <type_traits>

#include "core/cuda_launch.h"
#include "routing/launch.h"
#include "routing/router_kernel.cuh"

namespace mixops::cuda {
namespace {

// This file launches its kernels.
using namespace router;  // NOLINT(google-build-using-namespace)

// f(std::integral_constant<int, VPT>{}) for the plan's values per lane.
template <class F>
auto dispatch_vpt(int vpt, F&& f) {
  switch (vpt) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 8: return f(std::integral_constant<int, 8>{});
    case 16: return f(std::integral_constant<int, 16>{});
    default: return f(std::integral_constant<int, 0>{});
  }
}

}  // namespace

size_t router_topk_workspace_bytes(const RouterParams& p) {
  const Plan pl = fwd_plan(p);
  const int64_t E = p.opt.num_experts;
  return static_cast<size_t>(count_partials_offset(pl.num_blocks, E, acc_bytes(p.dtype)) +
                             pl.num_blocks * E * 4);
}

void router_topk_launch(const RouterParams& p, void* workspace, cudaStream_t stream) {
  nvtx3::scoped_range range{"mixops::router_topk"};
  constexpr const char* what = "router_topk";
  const int E = p.opt.num_experts;
  if (E <= 0) return;  // counts / score_sum are empty
  const Plan pl = fwd_plan(p);
  dispatch_dtype(p.dtype, what, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = acc_t<T>;
    auto* part_sum = static_cast<Acc*>(workspace);
    auto* part_count = reinterpret_cast<int32_t*>(
        static_cast<char*>(workspace) + count_partials_offset(pl.num_blocks, E, sizeof(Acc)));
    if (pl.num_blocks > 0) {  // T == 0: only the reduction runs (it writes zeros)
      auto* kernel =
          dispatch_vpt(pl.vpt, [](auto v) { return &router_fwd_kernel<T, decltype(v)::value>; });
      allow_dynamic_smem(kernel, pl.smem, what, "num_experts / k too large for this GPU");
      launch_kernel(kernel, static_cast<unsigned>(pl.num_blocks), pl.warps * kWarp, pl.smem, stream,
                    p, pl, part_sum, part_count);
      check_launch(what, "launch");
    }
    launch_kernel(&router_stats_reduce_kernel<Acc>, static_cast<unsigned>(ceil_div(E, kWarp)),
                  dim3(kWarp, kReduceParts), 0, stream, part_sum, part_count, pl.num_blocks, E,
                  static_cast<Acc*>(p.score_sum), p.counts);
    check_launch(what, "launch");
  });
}

void router_topk_backward_launch(const RouterBackwardParams& p, cudaStream_t stream) {
  nvtx3::scoped_range range{"mixops::router_topk_backward"};
  constexpr const char* what = "router_topk_backward";
  if (p.opt.num_experts <= 0 || p.num_tokens <= 0) return;
  const Plan pl = bwd_plan(p);
  dispatch_dtype(p.dtype, what, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto* kernel =
        dispatch_vpt(pl.vpt, [](auto v) { return &router_bwd_kernel<T, decltype(v)::value>; });
    allow_dynamic_smem(kernel, pl.smem, what, "num_experts / k too large for this GPU");
    launch_kernel(kernel, static_cast<unsigned>(pl.num_blocks), pl.warps * kWarp, pl.smem, stream,
                  p, pl);
    check_launch(what, "launch");
  });
}

}  // namespace mixops::cuda
