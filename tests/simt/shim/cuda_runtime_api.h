// SIMT harness shim of cuda_runtime_api.h: only the types our torch-free launch.h headers name
// (streams, error codes), so tests can include them for their params helpers. Nothing here
// launches or allocates: kernels run through simt::launch.
#pragma once

#include "vector_types.h"

struct CUstream_st;
using cudaStream_t = CUstream_st*;

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorMemoryAllocation = 2 };

inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : "simt: error";
}
