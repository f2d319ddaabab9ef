// SIMT harness: a model of the CUDA execution model in host C++, so that our kernel headers
// (csrc/*/*_kernel.cuh: no launch syntax, no torch) compile unchanged with g++ and their kernels
// run on the CPU. Test code, not product code. Compile a kernel header as
//
//   g++ -std=c++20 -ffp-contract=off -include tests/simt/simt.h -I tests/simt/shim -I csrc ...
//
// This file plays the part of what nvcc adds implicitly (cuda_runtime.h): the execution-space
// keywords as no-ops, dim3 and the vector types, the per-thread built-ins (threadIdx, ...), the
// device functions, and the shared-memory macros of core/macros.h, which the harness defines
// first. The pieces:
//   simt_fiber.h       fibers (one per CUDA thread), ASan-annotated switches
//   simt_block.h       the block scheduler: schedules, barriers, deadlock and divergence errors
//   simt_warp.h        __syncthreads, __syncwarp, shuffles, votes, __match_*_sync
//   simt_intrinsics.h  atomics, bit intrinsics, math, loads
//   simt_launch.h      simt::launch, simt::launch_checked, launch limits, shared memory
//   shim/              cuda_bf16.h, cuda_fp16.h, cuda_runtime_api.h, cub/ for the kernel headers
// Not modelled: the memory model (every access is sequentially consistent), warp convergence
// (__activemask returns the lanes that have not exited), clocks, textures, cooperative groups.
#pragma once

// ---- execution-space keywords and attributes ---------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) __attribute__((aligned(n)))
#define __device_builtin__
// __noinline__ stays undefined: libstdc++ spells __attribute__((__noinline__)) (<memory>).
// Raw __shared__ declarations cannot be given per-block, poisoned storage: kernels declare shared
// memory with MIXOPS_STATIC_SMEM / MIXOPS_DYNAMIC_SMEM (core/macros.h) instead.
#define __shared__                                                                    \
  static_assert(false,                                                                \
                "simt: declare shared memory with MIXOPS_STATIC_SMEM(type, name) or " \
                "MIXOPS_DYNAMIC_SMEM(type, name) (core/macros.h)");

#include "shim/vector_types.h"
#include "simt_block.h"
#include "simt_intrinsics.h"
#include "simt_launch.h"
#include "simt_warp.h"

// ---- shared memory (core/macros.h defines these for nvcc only when they are not defined) -------
// The block's dynamic shared memory as a `type*`.
#define MIXOPS_DYNAMIC_SMEM(type, name) type* const name = ::simt::detail::dynamic_smem<type>()
// A static shared variable of `type` (an array type is fine: float[16][33]).
#define MIXOPS_STATIC_SMEM(type, name)                          \
  static constinit ::simt::detail::SmemSlot simt_slot_##name{}; \
  ::simt::detail::type_t<type>& name = simt_slot_##name.get<::simt::detail::type_t<type>>()
