// Shared by the CUDA op layers: the current stream of a tensor, and running a torch-free
// launcher so that its std::exception becomes a torch error naming the op, followed by the
// launch-error check.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <exception>

namespace mixops::cuda {

inline cudaStream_t stream_of(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.get_device()).stream();
}

template <class F>
void launch_checked(const char* op, const F& f) {
  try {
    f();
  } catch (const std::exception& ex) {
    TORCH_CHECK(false, op, " (CUDA): ", ex.what());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace mixops::cuda
