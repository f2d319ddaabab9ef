// Compile checks of the kernel headers under the SIMT harness: each compile/<name>.cpp includes
// one csrc/*_kernel.cuh and instantiates the kernels its .cu launches, for every dtype, by taking
// their addresses here (tests/test_simt_harness.py compiles each). A kernel that nvcc accepts but
// the harness cannot compile shows up here first, before any test grid needs it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace simt_compile {

// Odr-uses every kernel passed, so each is instantiated.
template <class... K>
void use(K... kernels) {
  const void* all[] = {reinterpret_cast<const void*>(kernels)..., nullptr};
  (void)all;
}

// Calls F::template run<T>() for each storage dtype the CUDA kernels take.
template <class F>
void each_dtype() {
  F::template run<float>();
  F::template run<double>();
  F::template run<__nv_bfloat16>();
  F::template run<__half>();
}

}  // namespace simt_compile
