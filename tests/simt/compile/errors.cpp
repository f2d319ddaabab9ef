// Compile check: csrc/core/errors_kernel.cuh under the SIMT harness (see use.h).
#include "core/errors_kernel.cuh"
#include "use.h"

void instantiate_errors() {
  simt_compile::use(&mixops::cuda::errors_kernels::exchange_error_bits_kernel);
}
