// router_topk on CUDA: the launches of the kernels in router_kernel.cuh (the plan, the one dtype
// switch, the shared-memory opt-in), behind launch.h. Everything is enqueued on the caller's
// stream.
#include <cuda_runtime_api.h>
#include <nvtx3/nvtx3.hpp>

#include <cstdint>
#include <string>
#include <type_traits>

#include "core/align.h"
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

// The current device's dynamic shared memory opt-in per block (the plans move their scratch to
// global memory past it).
int64_t smem_optin(const char* op) {
  int dev = 0, bytes = 0;
  check_cuda(cudaGetDevice(&dev), op, "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), op,
             "cudaDeviceGetAttribute");
  return bytes;
}

// Forward workspace: probability partials [num_blocks, E] acc_t, count partials [num_blocks, E]
// int32, then the global-memory scratch of the blocks (when the plan uses it).
struct FwdWorkspace {
  size_t counts, scratch, total;
};
FwdWorkspace fwd_workspace(const RouterParams& p, const Plan& pl) {
  const int64_t E = p.opt.num_experts;
  FwdWorkspace w;
  w.counts = static_cast<size_t>(count_partials_offset(pl.num_blocks, E, acc_bytes(p.dtype)));
  w.scratch = align_up(w.counts + static_cast<size_t>(pl.num_blocks * E * 4));
  w.total = w.scratch + static_cast<size_t>(pl.num_blocks * pl.global_stride);
  return w;
}

}  // namespace

size_t router_topk_workspace_bytes(const RouterParams& p) {
  return fwd_workspace(p, fwd_plan(p, smem_optin("router_topk"))).total;
}

size_t router_topk_backward_workspace_bytes(const RouterBackwardParams& p) {
  if (p.opt.num_experts <= 0 || p.num_tokens <= 0) return 0;
  const Plan pl = bwd_plan(p, smem_optin("router_topk_backward"));
  return static_cast<size_t>(pl.num_blocks * pl.global_stride);
}

void router_topk_launch(const RouterParams& p, void* workspace, cudaStream_t stream) {
  nvtx3::scoped_range range{"mixops::router_topk"};
  constexpr const char* what = "router_topk";
  const int E = p.opt.num_experts;
  if (E <= 0) return;  // counts / score_sum are empty
  const Plan pl = fwd_plan(p, smem_optin(what));
  const FwdWorkspace w = fwd_workspace(p, pl);
  dispatch_dtype(p.dtype, what, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = acc_t<T>;
    auto* part_sum = static_cast<Acc*>(workspace);
    auto* part_count = reinterpret_cast<int32_t*>(static_cast<char*>(workspace) + w.counts);
    auto* scratch = static_cast<unsigned char*>(workspace) + w.scratch;
    if (pl.num_blocks > 0) {  // T == 0: only the reduction runs (it writes zeros)
      auto* kernel =
          pl.global_stride > 0 ? &router_fwd_kernel<T, 0, true> : dispatch_vpt(pl.vpt, [](auto v) {
            return &router_fwd_kernel<T, decltype(v)::value>;
          });
      allow_dynamic_smem(kernel, pl.smem, what, "num_experts / k too large for this GPU");
      launch_kernel(kernel, static_cast<unsigned>(pl.num_blocks), pl.warps * kWarp, pl.smem, stream,
                    p, pl, part_sum, part_count, scratch);
      check_launch(what, "launch");
    }
    launch_kernel(&router_stats_reduce_kernel<Acc>, static_cast<unsigned>(ceil_div(E, kWarp)),
                  dim3(kWarp, kReduceParts), 0, stream, part_sum, part_count, pl.num_blocks, E,
                  static_cast<Acc*>(p.score_sum), p.counts);
    check_launch(what, "launch");
  });
}

void router_topk_backward_launch(const RouterBackwardParams& p, void* workspace,
                                 cudaStream_t stream) {
  nvtx3::scoped_range range{"mixops::router_topk_backward"};
  constexpr const char* what = "router_topk_backward";
  if (p.opt.num_experts <= 0 || p.num_tokens <= 0) return;
  const Plan pl = bwd_plan(p, smem_optin(what));
  dispatch_dtype(p.dtype, what, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto* kernel =
        pl.global_stride > 0 ? &router_bwd_kernel<T, 0, true> : dispatch_vpt(pl.vpt, [](auto v) {
          return &router_bwd_kernel<T, decltype(v)::value>;
        });
    allow_dynamic_smem(kernel, pl.smem, what, "num_experts / k too large for this GPU");
    launch_kernel(kernel, static_cast<unsigned>(pl.num_blocks), pl.warps * kWarp, pl.smem, stream,
                  p, pl, static_cast<unsigned char*>(workspace));
    check_launch(what, "launch");
  });
}

}  // namespace mixops::cuda
