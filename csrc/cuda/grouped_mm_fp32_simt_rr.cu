// grouped_mm: exact fp32 SIMT (FFMA) CUTLASS 2 GemmGrouped, A row-major, B row-major, row-major out.
// One instantiation per file so the build compiles them in parallel; compiled for every arch in
// the list (sm_80 and sm_90a SASS, compute_80 PTX): this is the fp32 path on Hopper too.
#include "grouped_mm_sm80.cuh"

namespace mixops::cuda::sm80 {

void run_fp32_simt_rr(const GroupedMmParams& p, void* workspace, const LaunchConfig& cfg) {
  run_grouped<float, cutlass::layout::RowMajor, cutlass::layout::RowMajor, SimtConfig>(p, workspace, cfg);
}

}  // namespace mixops::cuda::sm80
