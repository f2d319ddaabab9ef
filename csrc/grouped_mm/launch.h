// grouped_mm on CUDA: the torch-free boundary between the op layer (cuda.cpp, which
// validates, allocates the output and the workspace through the torch allocator and picks the
// stream) and the kernels (CUTLASS grouped GEMMs and their argument builders).
//
// Contract for callers of grouped_mm_launch:
//  * params are validated except for the *values* of offsets (device memory; reading them would
//    need a host sync). Kernels clamp offsets to safe values and OR GroupedMmError bits into
//    params.error_flag (the op's device error slot, core/errors.h).
//  * layouts are one of: (A row, B row), (A row, B col), (A col, B row); out is row-major.
//  * workspace points to grouped_mm_workspace_bytes(...) bytes of device memory, 256-byte aligned.
//  * everything is enqueued on cfg.stream; nothing synchronises the host (CUDA-graph capturable).
//  * errors that are the caller's fault or a CUTLASS can_implement failure throw
// std::runtime_error.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "grouped_mm/grouped_mm.h"
#include "grouped_mm/path.h"

namespace mixops::cuda {

struct LaunchConfig {
  int cc_major = 0;  // compute capability of the current device
  int cc_minor = 0;
  int num_sms = 0;          // multiprocessor count of the current device
  bool allow_tf32 = false;  // torch.backends.cuda.matmul.allow_tf32
  cudaStream_t stream = nullptr;
};

// Which kernel family grouped_mm_launch will use for these params on this device (path.h).
GroupedMmPath grouped_mm_select_path(const GroupedMmParams& params, const LaunchConfig& cfg);

// Device workspace bytes needed for these params (host arithmetic only, no sync).
size_t grouped_mm_workspace_bytes(const GroupedMmParams& params, const LaunchConfig& cfg);

// Enqueues argument building, zeroing of rows/blocks no group writes, and the GEMMs.
void grouped_mm_launch(const GroupedMmParams& params, void* workspace, const LaunchConfig& cfg);

}  // namespace mixops::cuda
