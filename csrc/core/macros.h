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

// The block's dynamic shared memory as an array of `type` (16-byte aligned). Every kernel that
// uses dynamic shared memory declares it through this macro, so a host model of the execution
// model (the SIMT test harness) can supply its own per-block buffer.
#define MIXOPS_DYNAMIC_SMEM(type, name) extern __shared__ __align__(16) type name[]
