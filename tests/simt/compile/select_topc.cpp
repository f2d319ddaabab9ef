// Compile check: csrc/routing/topc_kernel.cuh under the SIMT harness (see use.h).
#include "routing/topc_kernel.cuh"
#include "use.h"

namespace t = mixops::cuda::topc_kernels;

struct SelectTopc {
  template <class T>
  static void run() {
    simt_compile::use(&t::select_topc_kernel<T>);
  }
};

void instantiate_select_topc() { simt_compile::each_dtype<SelectTopc>(); }
