// SIMT driver: grouped_mm_packed's zero fill through the real launch code (csrc/grouped_mm/zero.cu,
// detail::launch_grouped_mm_zero, which dispatches on params.packed to zero_fill_packed_kernel).
#include "simt_run.h"
// clang-format off: the launch file after the bridge
#include "grouped_mm/zero.cu"
// clang-format on
#include "drivers/grouped_mm_packed_params.h"

extern "C" {

int simt_grouped_mm_packed_zero(const SimtGroupedMmPacked* s, int num_sms, const SimtRun* run,
                                char* err, int err_len) {
  return simt::run_with(run, err, err_len, [&] {
    mixops::cuda::detail::launch_grouped_mm_zero(to_packed_params(*s), launch_config(run, num_sms));
  });
}

}  // extern "C"
