// SIMT driver: mixops's fallback grouped GEMM through its real launch code
// (csrc/grouped_mm/fallback.cu, detail::launch_grouped_mm_fallback). grouped_mm_launch runs the
// zero fill first (grouped_mm_zero.cpp); the tests call both, in that order, on one output.
#include "simt_run.h"
// clang-format off: the launch file after the bridge
#include "grouped_mm/fallback.cu"
// clang-format on
#include "drivers/grouped_mm_params.h"

extern "C" {

int simt_grouped_mm_fallback(const SimtGroupedMm* s, int num_sms, const SimtRun* run, char* err,
                             int err_len) {
  return simt::run_with(run, err, err_len, [&] {
    mixops::cuda::detail::launch_grouped_mm_fallback(to_params(*s), launch_config(run, num_sms),
                                                     mixops::GroupAlignRule::kAny);
  });
}

// Only the groups that break a CUTLASS path's alignment rule (a GroupAlignRule): what
// dispatch_sm90.cu (kTma) and launch.cu (kCutlass2) launch after their CUTLASS GEMM.
int simt_grouped_mm_fallback_skipped(const SimtGroupedMm* s, int rule, int num_sms,
                                     const SimtRun* run, char* err, int err_len) {
  return simt::run_with(run, err, err_len, [&] {
    mixops::cuda::detail::launch_grouped_mm_fallback(to_params(*s), launch_config(run, num_sms),
                                                     static_cast<mixops::GroupAlignRule>(rule));
  });
}

}  // extern "C"
