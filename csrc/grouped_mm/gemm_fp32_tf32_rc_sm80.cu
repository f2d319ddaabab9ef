// grouped_mm: fp32 via TF32 tensor ops (allow_tf32) CUTLASS 2 GemmGrouped, A row-major, B
// column-major, row-major out.
// One instantiation per file so the build compiles them in parallel; the _sm80.cu suffix gives it
// SASS for the listed archs >= 8.0 (sm_80 and sm_90a: the fp32 path on Hopper too) and PTX from
// compute_80 up (cmake/MixopsArchs.cmake).
#include "grouped_mm/sm80.cuh"

namespace mixops::cuda::sm80 {

void run_fp32_tf32_rc(const GroupedMmParams& p, void* workspace, const LaunchConfig& cfg) {
  run_grouped<float, cutlass::layout::RowMajor, cutlass::layout::ColumnMajor, Tf32Config>(
      p, workspace, cfg);
}

}  // namespace mixops::cuda::sm80
