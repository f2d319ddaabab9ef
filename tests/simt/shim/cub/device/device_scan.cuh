// SIMT harness shim of cub::DeviceScan: prefix sums on the host, run at once, with CUB's
// two-call temporary-storage convention (see device_radix_sort.cuh).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

namespace cub {

struct DeviceScan {
  template <typename In, typename Out>
  static cudaError_t ExclusiveSum(void* d_temp_storage, size_t& temp_storage_bytes, In d_in,
                                  Out d_out, int num_items, cudaStream_t stream = nullptr) {
    return Scan(d_temp_storage, temp_storage_bytes, d_in, d_out, num_items, false, stream);
  }
  template <typename In, typename Out>
  static cudaError_t InclusiveSum(void* d_temp_storage, size_t& temp_storage_bytes, In d_in,
                                  Out d_out, int num_items, cudaStream_t stream = nullptr) {
    return Scan(d_temp_storage, temp_storage_bytes, d_in, d_out, num_items, true, stream);
  }

 private:
  template <typename In, typename Out>
  static cudaError_t Scan(void* temp, size_t& bytes, In in, Out out, int n, bool inclusive,
                          cudaStream_t) {
    if (temp == nullptr) {
      bytes = 256;
      return cudaSuccess;
    }
    if (bytes < 256) return cudaErrorInvalidValue;
    auto acc = decltype(+in[0]){};
    for (int i = 0; i < n; ++i) {  // in place is fine: in[i] is read before out[i] is written
      const auto x = in[i];
      if (!inclusive) out[i] = acc;
      acc = acc + x;
      if (inclusive) out[i] = acc;
    }
    return cudaSuccess;
  }
};

}  // namespace cub
