// grouped_mm: bf16 tensor-op CUTLASS 2 GemmGrouped, A column-major, B row-major, row-major out.
// One instantiation per file so the build compiles them in parallel; the _sm80.cu suffix gives it
// SASS for the listed archs >= 8.0 and PTX from compute_80 up (cmake/MixopsArchs.cmake).
#include "grouped_mm/sm80.cuh"

namespace mixops::cuda::sm80 {

void run_bf16_cr(const GroupedMmParams& p, void* workspace, const LaunchConfig& cfg) {
  run_grouped<cutlass::bfloat16_t, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor,
              TensorOp16Config>(p, workspace, cfg);
}

}  // namespace mixops::cuda::sm80
