// Compile check: csrc/permute/slots_kernel.cuh under the SIMT harness (see use.h): both copy
// kernels for every unit slots.cu launches them with.
#include <cstdint>

#include "permute/slots_kernel.cuh"
#include "use.h"

namespace s = mixops::cuda::slots_kernels;

template <class U>
void per_unit() {
  simt_compile::use(&s::rows_to_slots_kernel<U>, &s::slots_to_rows_kernel<U>);
}

void instantiate_slots() {
  per_unit<uint4>();
  per_unit<uint2>();
  per_unit<uint32_t>();
  per_unit<uint16_t>();
  per_unit<uint8_t>();
}
