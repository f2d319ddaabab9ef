// grouped_mm: exact fp32 SIMT (FFMA) CUTLASS 2 GemmGrouped, A row-major, B row-major, row-major
// out.
// One instantiation per file so the build compiles them in parallel; the _sm80.cu suffix gives it
// SASS for the listed archs >= 8.0 (sm_80 and sm_90a: the fp32 path on Hopper too) and PTX from
// compute_80 up (cmake/MixopsArchs.cmake).
#include "grouped_mm/sm80.cuh"

namespace mixops::cuda::sm80 {

void run_fp32_simt_rr(const GroupedMmParams& p, void* workspace, const LaunchConfig& cfg) {
  run_grouped<float, cutlass::layout::RowMajor, cutlass::layout::RowMajor, SimtConfig>(p, workspace,
                                                                                       cfg);
}

}  // namespace mixops::cuda::sm80
