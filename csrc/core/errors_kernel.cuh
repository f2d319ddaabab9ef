// Device code of check_errors() and MIXOPS_DEBUG=1 (core/errors.cu launches it; no launch syntax,
// no torch): reading and clearing the per-device error record (core/errors.h) in one device step.
// A read (device-to-host copy) followed by a separate clear (memset) loses every bit a kernel on
// another stream ORs in between the two; an atomic exchange per slot cannot: each bit is either
// in the value it returns (reported now) or left in the record (reported by the next check).
#pragma once

#include <cstdint>

namespace mixops::cuda::errors_kernels {

constexpr int kThreads = 32;  // one warp: the record has a dozen slots

// out[s] = record[s] and record[s] = 0, as one atomicExch, for every slot s in [0, n).
__global__ void __launch_bounds__(kThreads)
    exchange_error_bits_kernel(int32_t* __restrict__ record, int32_t* __restrict__ out, int64_t n) {
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; s < n;
       s += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[s] = atomicExch(record + s, 0);
  }
}

}  // namespace mixops::cuda::errors_kernels
