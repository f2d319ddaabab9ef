// SIMT driver: grouped_mm's zero fill through its real launch code (csrc/grouped_mm/zero.cu,
// detail::launch_grouped_mm_zero), which grouped_mm_launch enqueues before every GEMM path. Its own
// driver: zero.cu and fallback.cu each define kThreads in an anonymous namespace.
#include "simt_run.h"
// clang-format off: the launch file after the bridge
#include "grouped_mm/zero.cu"
// clang-format on
#include "drivers/grouped_mm_params.h"

extern "C" {

// num_sms: the LaunchConfig's multiprocessor count (sizes the grid; small values grid-stride).
int simt_grouped_mm_zero(const SimtGroupedMm* s, int num_sms, const SimtRun* run, char* err,
                         int err_len) {
  return simt::run_with(run, err, err_len, [&] {
    mixops::cuda::detail::launch_grouped_mm_zero(to_params(*s), launch_config(run, num_sms));
  });
}

}  // extern "C"
