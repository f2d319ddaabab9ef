// Small portability macros shared by host-only and CUDA translation units. Torch-free on purpose:
// kernel headers include this, not ATen.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MIXOPS_HOST_DEVICE __host__ __device__
#define MIXOPS_DEVICE __device__
#else
#define MIXOPS_HOST_DEVICE
#define MIXOPS_DEVICE
#endif

#define MIXOPS_INLINE MIXOPS_HOST_DEVICE inline

// Shared memory. Kernels declare it only through these two macros, never with a raw __shared__,
// so the host model of the execution model (the SIMT test harness, tests/simt/) can define them
// first and give every block its own poisoned storage; nvcc sees exactly these declarations.
// The block's dynamic shared memory as an array of `type` (16-byte aligned).
#ifndef MIXOPS_DYNAMIC_SMEM
#define MIXOPS_DYNAMIC_SMEM(type, name) extern __shared__ __align__(16) type name[]
#endif
// A static shared variable of `type`; array types are fine: MIXOPS_STATIC_SMEM(float[16][33], t).
#ifndef MIXOPS_STATIC_SMEM
#define MIXOPS_STATIC_SMEM(type, name) __shared__ ::mixops::smem_type<type> name
#endif

namespace mixops {
template <class T>
using smem_type = T;  // lets MIXOPS_STATIC_SMEM name array types
}  // namespace mixops
