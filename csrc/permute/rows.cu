// scatter_rows and scatter_rows_backward on CUDA: the launches of rows_kernel.cuh behind launch.h.
// The forward and grad_base first build the inverse map row -> i with unpermute_backward's
// scatter (row_slot_launch, unpermute.cu), which also flags repeated rows and bad values; every
// output is then one row-order gather. Everything is enqueued on the caller's stream; nothing
// synchronises the host.
//
// The helpers below have names of their own: the SIMT driver (tests/simt/drivers/rows.cpp)
// compiles this file and unpermute.cu as one translation unit.
#include <cuda_runtime_api.h>
#include <nvtx3/nvtx3.hpp>

#include <algorithm>
#include <cstdint>

#include "core/align.h"
#include "core/cuda_launch.h"
#include "permute/launch.h"
#include "permute/rows_kernel.cuh"

namespace mixops::cuda {
namespace {

namespace rk = rows_kernels;

// Do `bytes`-wide units divide every address, stride and the row length?
bool row_units_fit(const SelectRowsParams& p, int64_t bytes) {
  const int64_t es = dtype_size(p.dtype);
  return is_aligned(p.a, bytes) && is_aligned(p.b, bytes) && is_aligned(p.dst, bytes) &&
         (p.hidden * es) % bytes == 0 && (p.a_stride * es) % bytes == 0 &&
         (p.b_stride * es) % bytes == 0;
}

template <typename U>
void launch_select(const SelectRowsParams& p, cudaStream_t stream) {
  const int64_t es = dtype_size(p.dtype), u = static_cast<int64_t>(sizeof(U));
  const rk::RowUnits s{p.hidden * es / u, p.a_stride * es / u, p.b_stride * es / u};
  const auto blocks = static_cast<unsigned>(
      std::clamp<int64_t>((p.dst_rows + rk::kWarps - 1) / rk::kWarps, 1, int64_t{1} << 20));
  launch_kernel(&rk::select_rows_kernel<U>, blocks, rk::kWarps * 32, 0, stream, p, s);
}

}  // namespace

void select_rows_launch(const SelectRowsParams& p, cudaStream_t stream) {
  if (p.dst_rows <= 0) return;  // runs for hidden == 0: the map values are still checked
  if (row_units_fit(p, 16)) {
    launch_select<uint4>(p, stream);
  } else if (row_units_fit(p, 8)) {
    launch_select<uint2>(p, stream);
  } else if (row_units_fit(p, 4)) {
    launch_select<uint32_t>(p, stream);
  } else if (row_units_fit(p, 2)) {
    launch_select<uint16_t>(p, stream);
  } else {
    launch_select<uint8_t>(p, stream);
  }
  check_launch("select_rows", "launch");
}

size_t scatter_rows_workspace_bytes(int64_t num_rows) { return row_slot_workspace_bytes(num_rows); }

void scatter_rows_launch(const SelectRowsParams& p, const int32_t* index, int64_t n,
                         void* workspace, const char* op, cudaStream_t stream) {
  nvtx3::scoped_range range{op};
  int32_t* row_slot = static_cast<int32_t*>(workspace);
  row_slot_launch(index, n, p.dst_rows, row_slot, p.error_flag, op, stream);
  SelectRowsParams q = p;
  q.map = row_slot;
  select_rows_launch(q, stream);
}

}  // namespace mixops::cuda
