// grouped_mm SM90 (sm_90a) instantiation: bf16, row-major A, row-major B. One CUTLASS grouped GEMM
// per
// translation unit so the six heavy instantiations compile in parallel; the template is in
// sm90.cuh and the dispatcher over the six in dispatch_sm90.cu.
#include "grouped_mm/sm90.cuh"

namespace mixops::cuda::sm90::detail {
template struct GroupedGemm<Dtype::kBFloat16, Layout::kRowMajor, Layout::kRowMajor>;
}  // namespace mixops::cuda::sm90::detail
