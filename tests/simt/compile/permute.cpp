// Compile check: csrc/permute/permute_kernel.cuh under the SIMT harness (see use.h).
#include <cstdint>

#include "permute/permute_kernel.cuh"
#include "use.h"

namespace p = mixops::cuda::permute_kernels;

template <p::Seq kSeq>
void per_sequence() {
  simt_compile::use(&p::hist_kernel<kSeq, true>, &p::hist_kernel<kSeq, false>,
                    &p::rank_kernel<kSeq, true, false>, &p::rank_kernel<kSeq, false, false>,
                    &p::rank_kernel<kSeq, true, true>, &p::rank_kernel<kSeq, false, true>);
}

void instantiate_permute() {
  per_sequence<p::Seq::kSlot>();
  per_sequence<p::Seq::kChoiceMajor>();
  per_sequence<p::Seq::kSorted>();
  simt_compile::use(&p::prep_kernel, &p::colscan_kernel, &p::expert_scan_kernel,
                    &p::gather_kernel<uint4>, &p::gather_kernel<uint2>, &p::gather_kernel<uint32_t>,
                    &p::gather_kernel<uint16_t>, &p::gather_kernel<uint8_t>);
}
