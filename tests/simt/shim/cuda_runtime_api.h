// SIMT harness shim of cuda_runtime_api.h: the types and the few runtime calls our launch code
// (csrc/*/*.cu) makes, so it runs on the CPU through launch_bridge.h. There is one "device" with
// the sm_90 limits of simt::launch_options; streams are ignored (everything runs at once, in
// order); memsets write host memory. Kernels run through simt::launch.
#pragma once

#include "vector_types.h"

struct CUstream_st;
using cudaStream_t = CUstream_st*;

#include <cstddef>
#include <cstring>

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorMemoryAllocation = 2 };

inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : "simt: error";
}

// Launch errors are thrown by simt::launch, so there is never a pending one.
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t = nullptr) {
  if (bytes > 0) std::memset(p, value, bytes);
  return cudaSuccess;
}

enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace simt {
// The modelled device's facts (an H100-like sm_90 by default; tests may change them).
inline thread_local int device_sm_count = 132;
inline thread_local int device_cc_major = 9, device_cc_minor = 0;
inline thread_local int device_max_smem_optin = 232448;
}  // namespace simt

inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  switch (a) {
    case cudaDevAttrMultiProcessorCount: *v = simt::device_sm_count; break;
    case cudaDevAttrComputeCapabilityMajor: *v = simt::device_cc_major; break;
    case cudaDevAttrComputeCapabilityMinor: *v = simt::device_cc_minor; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = simt::device_max_smem_optin; break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
// The opt-in itself is checked by simt::launch against Options::arch's limit.
template <class F>
cudaError_t cudaFuncSetAttribute(F*, cudaFuncAttribute, int) {
  return cudaSuccess;
}
