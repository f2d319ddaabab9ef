// SIMT driver: the fallback grouped GEMM on grouped_mm_packed's params (csrc/grouped_mm/fallback.cu,
// detail::launch_grouped_mm_fallback): every group (kAny) or only those that break a CUTLASS
// path's rule (the rescue launch after the SM90 / SM80 GEMMs). The tests run the zero fill first.
#include "simt_run.h"
// clang-format off: the launch file after the bridge
#include "grouped_mm/fallback.cu"
// clang-format on
#include "drivers/grouped_mm_packed_params.h"

extern "C" {

int simt_grouped_mm_packed_fallback(const SimtGroupedMmPacked* s, int rule, int num_sms,
                                    const SimtRun* run, char* err, int err_len) {
  return simt::run_with(run, err, err_len, [&] {
    mixops::cuda::detail::launch_grouped_mm_fallback(to_packed_params(*s),
                                                     launch_config(run, num_sms),
                                                     static_cast<mixops::GroupAlignRule>(rule));
  });
}

}  // extern "C"
