// One warp copies one row of raw units (device code, no torch): the inner loop of the row-copy
// kernels (rows_kernel.cuh, chunks_kernel.cuh). Lanes stride the row with kUnroll loads in flight
// per lane before any store; src null writes zeros.
#pragma once

#include <cstdint>

namespace mixops::cuda {

template <int kUnroll, typename U>
__device__ __forceinline__ void warp_copy_row(const U* __restrict__ src, U* __restrict__ dst,
                                              int64_t units, int lane) {
  for (int64_t e0 = 0; e0 < units; e0 += 32 * kUnroll) {
    U buf[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // all loads first: kUnroll in flight
      const int64_t e = e0 + u * 32 + lane;
      if (e < units) buf[u] = src == nullptr ? U{} : src[e];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t e = e0 + u * 32 + lane;
      if (e < units) dst[e] = buf[u];
    }
  }
}

}  // namespace mixops::cuda
