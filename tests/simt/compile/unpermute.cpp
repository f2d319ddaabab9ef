// Compile check: csrc/permute/unpermute_kernel.cuh under the SIMT harness (see use.h).
#include "permute/unpermute_kernel.cuh"
#include "use.h"

namespace u = mixops::cuda::unpermute_kernels;

struct Unpermute {
  template <class T>
  static void run() {
    constexpr int kVec = static_cast<int>(16 / sizeof(T));
    simt_compile::use(&u::unpermute_kernel<T, 1>, &u::unpermute_kernel<T, kVec>,
                      &u::backward_rows_kernel<T, 1>, &u::backward_rows_kernel<T, kVec>,
                      &u::backward_weights_kernel<T, 1>, &u::backward_weights_kernel<T, kVec>);
  }
};

void instantiate_unpermute() {
  simt_compile::each_dtype<Unpermute>();
  simt_compile::use(&u::scatter_kernel);
}
