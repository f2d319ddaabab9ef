// Compile check: csrc/permute/chunks_kernel.cuh under the SIMT harness (see use.h): the offsets
// kernel and the copy kernel for every unit chunks.cu launches it with.
#include <cstdint>

#include "permute/chunks_kernel.cuh"
#include "use.h"

namespace c = mixops::cuda::chunks_kernels;

void instantiate_chunks() {
  simt_compile::use(&c::chunk_offsets_kernel, &c::reorder_rows_kernel<uint4>,
                    &c::reorder_rows_kernel<uint2>, &c::reorder_rows_kernel<uint32_t>,
                    &c::reorder_rows_kernel<uint16_t>, &c::reorder_rows_kernel<uint8_t>);
}
