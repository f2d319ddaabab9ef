// Device error reporting on CUDA (core/errors.h): the torch-free boundary between the host readers
// (core/cuda.cpp: check_errors(); core/op_scratch.h: MIXOPS_DEBUG=1) and the kernel that reads and
// clears the record (core/errors.cu, core/errors_kernel.cuh).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace mixops::cuda {

// out[s] = record[s], record[s] = 0 for s in [0, n), as one atomic exchange per slot, enqueued on
// `stream` (device pointers; no host sync). Bits that kernels on other streams OR into the record
// meanwhile are either in out or stay in the record: none is lost.
void exchange_error_bits_launch(int32_t* record, int32_t* out, int64_t n, cudaStream_t stream);

}  // namespace mixops::cuda
