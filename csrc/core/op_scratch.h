// Shared by the CUDA op layers: the per-call workspace (one torch-allocator block) and the op's
// error slot (core/errors.h: a persistent per-device int32 its kernels OR bits into). Under
// MIXOPS_DEBUG=1, check() reads and clears the bits this call set (one atomic exchange on the op's
// stream), synchronises that stream and raises the CPU path's error; otherwise the bits stay for
// mixops.check_errors(). While the op's stream is being captured into a CUDA graph, check() does
// nothing even under MIXOPS_DEBUG=1 (core/debug_check.h). Without MIXOPS_DEBUG nothing here
// synchronises the host.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime_api.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "core/debug_check.h"
#include "core/error_record.h"
#include "core/errors.h"

namespace mixops::cuda {

inline bool debug_mode() {
  static const bool on = debug_env_on(std::getenv("MIXOPS_DEBUG"));
  return on;
}

// Whether `stream` is being captured into a CUDA graph (a query, legal during capture).
inline CaptureState capture_state(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  const cudaError_t e = cudaStreamIsCapturing(stream, &status);
  if (e == cudaErrorStreamCaptureImplicit) {
    (void)cudaGetLastError();  // an answer, not a failure: do not leave it for the next check
    return CaptureState::kImplicit;
  }
  C10_CUDA_CHECK(e);
  switch (status) {
    case cudaStreamCaptureStatusActive: return CaptureState::kActive;
    case cudaStreamCaptureStatusInvalidated: return CaptureState::kInvalidated;
    default: return CaptureState::kNone;
  }
}

// The slot of `device`'s error record (core/cuda.cpp); allocated on first use.
int32_t* device_error_slot(int device, ErrorSlot slot);

// Reads and clears slots [first, first + n) of `device`'s record in one device step (an atomic
// exchange per slot, core/errors.cu) enqueued on `stream`, then synchronises `stream` and returns
// the bits (core/cuda.cpp). `device` must be the current device.
std::vector<int32_t> take_error_bits(int device, ErrorSlot first, int n, cudaStream_t stream);

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

  // Under MIXOPS_DEBUG=1 (and not capturing): read and clear the slot, synchronise, and raise the
  // CPU path's message if it had bits (the next call starts clean).
  void check() const {
    switch (debug_action(debug_mode(), [this] { return capture_state(stream_); })) {
      case DebugAction::kNone: return;
      case DebugAction::kSkipCapturing:
        TORCH_WARN_ONCE(
            "mixops: MIXOPS_DEBUG=1 does not check ops while their stream is captured into a CUDA "
            "graph (a synchronisation is illegal there); call mixops.check_errors() after "
            "replaying the graph");
        return;
      case DebugAction::kCheck: break;
    }
    const int32_t bits = take_error_bits(device_, slot_, 1, stream_)[0];
    if (bits == 0) return;
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
