// SIMT driver: the SM90 path's CUDA-core rescue kernel for misaligned groups
// (csrc/grouped_mm/rescue_kernel.cuh, sm90::rescue_misaligned_groups). Its launch lives in
// dispatch_sm90.cu beside CUTLASS code that cannot compile here, so this launches it the way that
// does (blocks x kRescueThreads, for bf16 or fp16) under simt::launch_checked, which runs it under
// the four harness runs itself and restores out before each.
#include "simt_run.h"
// clang-format off: the kernel header after the bridge
#include "grouped_mm/rescue_kernel.cuh"
#include "grouped_mm/launch.h"
// clang-format on
#include <stdexcept>
#include <vector>

#include "drivers/grouped_mm_params.h"

extern "C" {

// blocks: dispatch_sm90.cu launches num_sms * 4; out_bytes: the whole output buffer.
int simt_rescue_misaligned_groups(const SimtGroupedMm* s, int blocks, int64_t out_bytes,
                                  const SimtRun* run, char* err, int err_len) {
  return simt::run_with(run, err, err_len, [&] {
    const mixops::GroupedMmParams p = to_params(*s);
    const std::vector<simt::Region> written = {{p.out, static_cast<size_t>(out_bytes), "out"}};
    using mixops::cuda::sm90::kRescueThreads;
    using mixops::cuda::sm90::rescue_misaligned_groups;
    if (p.dtype == mixops::Dtype::kBFloat16) {
      simt::launch_checked(simt::launch_options, simt::default_runs(), written,
                           &rescue_misaligned_groups<__nv_bfloat16>, blocks, kRescueThreads, 0, p);
    } else if (p.dtype == mixops::Dtype::kFloat16) {
      simt::launch_checked(simt::launch_options, simt::default_runs(), written,
                           &rescue_misaligned_groups<__half>, blocks, kRescueThreads, 0, p);
    } else {
      throw std::runtime_error("the rescue kernel is launched for bf16/fp16 only");
    }
  });
}

}  // extern "C"
