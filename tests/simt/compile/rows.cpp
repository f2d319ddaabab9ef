// Compile check: csrc/permute/rows_kernel.cuh under the SIMT harness (see use.h): the select
// kernel for every unit rows.cu launches it with.
#include <cstdint>

#include "permute/rows_kernel.cuh"
#include "use.h"

namespace r = mixops::cuda::rows_kernels;

void instantiate_rows() {
  simt_compile::use(&r::select_rows_kernel<uint4>, &r::select_rows_kernel<uint2>,
                    &r::select_rows_kernel<uint32_t>, &r::select_rows_kernel<uint16_t>,
                    &r::select_rows_kernel<uint8_t>);
}
