// select_topc on CUDA: the launch of topc_kernel.cuh's kernel (one block per row, grid-strided),
// behind launch.h. Everything is enqueued on the caller's stream; nothing synchronises the host.
#include <cuda_runtime_api.h>
#include <nvtx3/nvtx3.hpp>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "core/cuda_launch.h"
#include "routing/launch.h"
#include "routing/topc_kernel.cuh"

namespace mixops::cuda {

// At most this many blocks; each strides over the rows (grid.x's limit is far above).
constexpr int64_t kTopcMaxBlocks = int64_t{1} << 20;

void select_topc_launch(const TopcParams& p, cudaStream_t stream) {
  nvtx3::scoped_range range{"mixops::select_topc"};
  constexpr const char* what = "select_topc";
  if (p.batch == 0 || p.c == 0) return;  // nothing to write
  if (p.n > INT32_MAX) fail(what, "rows must have < 2^31 entries");
  dispatch_dtype(p.dtype, what, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto blocks = static_cast<unsigned>(std::min(p.batch, kTopcMaxBlocks));
    launch_kernel(&topc_kernels::select_topc_kernel<T>, blocks, topc_kernels::kThreads, 0, stream,
                  p);
  });
  check_launch(what, "launch");
}

}  // namespace mixops::cuda
