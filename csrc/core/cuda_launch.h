// Torch-free host helpers of the .cu launch files, each exactly once: the error path (a
// std::runtime_error naming the op, which the op layer turns into a torch error), the one dtype
// switch from mixops::Dtype to the CUDA element type, and opting a kernel into more than 48 KB of
// dynamic shared memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "core/dtype.h"

namespace mixops::cuda {

[[noreturn]] inline void fail(const char* op, const std::string& msg) {
  throw std::runtime_error(std::string("mixops::") + op + ": " + msg);
}

inline void check_cuda(cudaError_t e, const char* op, const char* what) {
  if (e != cudaSuccess) fail(op, std::string(what) + " failed: " + cudaGetErrorString(e));
}

// After a <<<...>>> launch: the launch error, if any (never synchronises).
inline void check_launch(const char* op, const char* what) {
  check_cuda(cudaGetLastError(), op, what);
}

// The one dtype switch: returns f(std::type_identity<T>{}) with T the CUDA element type of d.
template <class F>
decltype(auto) dispatch_dtype(Dtype d, const char* op, F&& f) {
  switch (d) {
    case Dtype::kFloat32: return f(std::type_identity<float>{});
    case Dtype::kBFloat16: return f(std::type_identity<__nv_bfloat16>{});
    case Dtype::kFloat16: return f(std::type_identity<__half>{});
    case Dtype::kFloat64: return f(std::type_identity<double>{});
  }
  fail(op, "unknown dtype");
}

// The one launch syntax of mixops: enqueues kernel<<<grid, block, smem, stream>>>(args...). Every
// .cu file launches through it, so the SIMT harness (tests/simt), which defines
// MIXOPS_HOST_LAUNCH and its own launch_kernel, runs the same launch code on the CPU.
#ifndef MIXOPS_HOST_LAUNCH
template <class... Params, class... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                   cudaStream_t stream, Args&&... args) {
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
}
#endif

// Dynamic shared memory above the default 48 KB needs an opt-in per kernel; more than the device
// allows is an error naming the op and both sizes.
template <class Kernel>
void allow_dynamic_smem(Kernel* kernel, int64_t bytes, const char* op, const char* why) {
  constexpr int64_t kDefault = 48 * 1024;
  if (bytes <= kDefault) return;
  int dev = 0, max_optin = 0;
  check_cuda(cudaGetDevice(&dev), op, "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&max_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), op,
             "cudaDeviceGetAttribute");
  if (bytes > max_optin) {
    fail(op, std::string(why) + ": one block needs " + std::to_string(bytes) +
                 " bytes of shared memory, the device allows " + std::to_string(max_optin));
  }
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(bytes)),
             op, "cudaFuncSetAttribute");
}

// The same for a kernel whose shared memory is a compile-time constant (the CUTLASS kernels): the
// attribute belongs to the function on each device, so it is set once per device, not on every
// call (it is host state, not stream work: safe under CUDA-graph capture).
template <auto* kKernel, int64_t kBytes>
void allow_dynamic_smem_once(const char* op, const char* why) {
  constexpr int kMaxDevices = 64;
  static std::atomic<bool> done[kMaxDevices];
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), op, "cudaGetDevice");
  const bool cached = dev >= 0 && dev < kMaxDevices;
  if (cached && done[dev].load(std::memory_order_acquire)) return;
  allow_dynamic_smem(kKernel, kBytes, op, why);  // a race sets it twice, harmlessly
  if (cached) done[dev].store(true, std::memory_order_release);
}

}  // namespace mixops::cuda
