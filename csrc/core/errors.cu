// The launch of the error-record exchange (errors_kernel.cuh) behind errors_launch.h.
#include <cuda_runtime_api.h>
#include <nvtx3/nvtx3.hpp>

#include <algorithm>
#include <cstdint>

#include "core/cuda_launch.h"
#include "core/errors_kernel.cuh"
#include "core/errors_launch.h"

namespace mixops::cuda {

void exchange_error_bits_launch(int32_t* record, int32_t* out, int64_t n, cudaStream_t stream) {
  namespace ek = errors_kernels;
  nvtx3::scoped_range range{"mixops::exchange_error_bits"};
  if (n <= 0) return;
  const auto blocks =
      static_cast<unsigned>(std::min<int64_t>((n + ek::kThreads - 1) / ek::kThreads, 1024));
  launch_kernel(&ek::exchange_error_bits_kernel, blocks, ek::kThreads, 0, stream, record, out, n);
  check_launch("exchange_error_bits", "launch");
}

}  // namespace mixops::cuda
