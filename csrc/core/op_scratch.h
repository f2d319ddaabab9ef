// Shared by the CUDA op layers: the per-call scratch (an error flag the kernels OR bits into,
// then the launcher's workspace, in one torch-allocator block) and MIXOPS_DEBUG=1, which
// synchronises after the launch and turns flag bits into the CPU path's error message.
// Without MIXOPS_DEBUG nothing here synchronises the host.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime_api.h>

#include <cstdlib>
#include <string>

namespace mixops::cuda {

inline bool debug_mode() {
  static const bool on = [] {
    const char* v = std::getenv("MIXOPS_DEBUG");
    return v != nullptr && v[0] != '\0' && v[0] != '0';
  }();
  return on;
}

class OpScratch {
 public:
  // 256 bytes for the flag (zeroed on `stream`), then workspace_bytes (256-byte aligned).
  OpScratch(const at::TensorOptions& opts, size_t workspace_bytes, cudaStream_t stream)
      : stream_(stream) {
    buf_ = at::empty({static_cast<int64_t>(256 + workspace_bytes)}, opts.dtype(at::kByte));
    C10_CUDA_CHECK(cudaMemsetAsync(buf_.data_ptr(), 0, sizeof(int32_t), stream));
  }
  int32_t* flag() const { return static_cast<int32_t*>(buf_.data_ptr()); }
  void* workspace() const { return static_cast<uint8_t*>(buf_.data_ptr()) + 256; }

  // Under MIXOPS_DEBUG=1: synchronise and raise message(bits) if any bit is set.
  template <class Message>
  void check(const Message& message) const {
    if (!debug_mode()) return;
    int32_t bits = 0;
    C10_CUDA_CHECK(cudaMemcpyAsync(&bits, flag(), sizeof bits, cudaMemcpyDeviceToHost, stream_));
    C10_CUDA_CHECK(cudaStreamSynchronize(stream_));
    TORCH_CHECK(bits == 0, message(bits));
  }

 private:
  at::Tensor buf_;
  cudaStream_t stream_;
};

}  // namespace mixops::cuda
