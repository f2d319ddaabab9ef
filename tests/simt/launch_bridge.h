// Runs our real launch code (csrc/*/*.cu: plans, workspace carving, dtype switches, CUB calls) on
// the CPU: core/cuda_launch.h leaves launch_kernel to whoever defines MIXOPS_HOST_LAUNCH, and this
// defines it as simt::launch under simt::launch_options (schedule, seed, poison, arch). A driver
// includes this first, then the .cu files it exercises, e.g.
//   #include "launch_bridge.h"
//   #include "permute/permute.cu"
// and calls mixops::cuda::permute_launch(params, workspace, nullptr) on host buffers. Running the
// same call under several launch_options and comparing the outputs bit for bit is the
// multi-schedule check of a whole op.
#pragma once

#define MIXOPS_HOST_LAUNCH 1

#include <cuda_runtime_api.h>

#include <utility>
#include <vector>

#include "simt_launch.h"

namespace simt {
inline thread_local Options launch_options;  // what every bridged launch runs under
// Every kernel a bridged launch ran, in order (a driver clears it before a call), so tests can
// tell which paths a case took.
inline thread_local std::vector<const void*> launched;
// The grid and block of the latest bridged launch.
inline thread_local dim3 last_grid, last_block;
template <class K>
bool ran(K* kernel) {
  for (const void* p : launched)
    if (p == reinterpret_cast<const void*>(kernel)) return true;
  return false;
}
}  // namespace simt

namespace mixops::cuda {

template <class... Params, class... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                   cudaStream_t /*stream*/, Args&&... args) {
  simt::launched.push_back(reinterpret_cast<const void*>(kernel));
  simt::last_grid = grid, simt::last_block = block;
  simt::launch(simt::launch_options, kernel, grid, block, smem, std::forward<Args>(args)...);
}

}  // namespace mixops::cuda
