// Shared by the CUDA op layers: the per-call workspace (one torch-allocator block) and the op's
// error slot (core/errors.h: a persistent per-device int32 its kernels OR bits into). Under
// MIXOPS_DEBUG=1, check() synchronises after the launch and raises the CPU path's error for the
// bits this call set; otherwise the bits stay for mixops.check_errors(). Without MIXOPS_DEBUG
// nothing here synchronises the host.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime_api.h>

#include <cstdlib>
#include <string>

#include "core/error_record.h"
#include "core/errors.h"

namespace mixops::cuda {

inline bool debug_mode() {
  static const bool on = [] {
    const char* v = std::getenv("MIXOPS_DEBUG");
    return v != nullptr && v[0] != '\0' && v[0] != '0';
  }();
  return on;
}

// The slot of `device`'s error record (core/cuda.cpp); allocated on first use.
int32_t* device_error_slot(int device, ErrorSlot slot);

class OpScratch {
 public:
  // workspace_bytes of device memory (256-byte aligned, none when 0) and the error slot of this
  // op on the tensors' device; ctx is what the slot's message will show.
  OpScratch(const at::TensorOptions& opts, size_t workspace_bytes, cudaStream_t stream,
            ErrorSlot slot, const ErrorContext& ctx)
      : stream_(stream), slot_(slot), device_(opts.device().index()) {
    if (workspace_bytes > 0) {
      buf_ = at::empty({static_cast<int64_t>(workspace_bytes)}, opts.dtype(at::kByte));
    }
    record_error_context(device_, slot, ctx);
    flag_ = device_error_slot(device_, slot);
  }
  int32_t* flag() const { return flag_; }
  void* workspace() const { return buf_.defined() ? buf_.data_ptr() : nullptr; }

  // Under MIXOPS_DEBUG=1: synchronise, and raise the CPU path's message if the slot has bits
  // (they are cleared first, so the next call starts clean).
  void check() const {
    if (!debug_mode()) return;
    int32_t bits = 0;
    C10_CUDA_CHECK(cudaMemcpyAsync(&bits, flag_, sizeof bits, cudaMemcpyDeviceToHost, stream_));
    C10_CUDA_CHECK(cudaStreamSynchronize(stream_));
    if (bits == 0) return;
    C10_CUDA_CHECK(cudaMemsetAsync(flag_, 0, sizeof bits, stream_));
    int32_t all[kNumErrorSlots] = {};
    all[static_cast<int>(slot_)] = bits;
    TORCH_CHECK(false, describe_device_errors(device_, all));
  }

 private:
  at::Tensor buf_;
  cudaStream_t stream_;
  ErrorSlot slot_;
  int device_;
  int32_t* flag_ = nullptr;
};

}  // namespace mixops::cuda
