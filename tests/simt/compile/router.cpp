// Compile check: csrc/routing/router_kernel.cuh under the SIMT harness (see use.h).
#include "routing/router_kernel.cuh"
#include "use.h"

namespace r = mixops::cuda::router;

struct Router {
  template <class T>
  static void run() {
    simt_compile::use(
        &r::router_fwd_kernel<T, 0>, &r::router_fwd_kernel<T, 1>, &r::router_fwd_kernel<T, 2>,
        &r::router_fwd_kernel<T, 4>, &r::router_fwd_kernel<T, 8>, &r::router_fwd_kernel<T, 16>,
        &r::router_bwd_kernel<T, 0>, &r::router_bwd_kernel<T, 1>, &r::router_bwd_kernel<T, 2>,
        &r::router_bwd_kernel<T, 4>, &r::router_bwd_kernel<T, 8>, &r::router_bwd_kernel<T, 16>,
        &r::router_stats_reduce_kernel<mixops::cuda::acc_t<T>>);
  }
};

void instantiate_router() { simt_compile::each_dtype<Router>(); }
