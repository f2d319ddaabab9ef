// Small portability macros shared by host-only and CUDA translation units.
// Torch-free on purpose: kernel headers include this, not ATen.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MIXOPS_HOST_DEVICE __host__ __device__
#define MIXOPS_DEVICE __device__
#else
#define MIXOPS_HOST_DEVICE
#define MIXOPS_DEVICE
#endif

#define MIXOPS_INLINE MIXOPS_HOST_DEVICE inline
