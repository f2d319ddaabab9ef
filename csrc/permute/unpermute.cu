// unpermute and its backward on CUDA: the launches of the kernels in unpermute_kernel.cuh, behind
// launch.h. Everything is enqueued on the caller's stream; nothing synchronises the host.
#include <cuda_runtime_api.h>
#include <nvtx3/nvtx3.hpp>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "core/align.h"
#include "core/cuda_launch.h"
#include "permute/launch.h"
#include "permute/unpermute_kernel.cuh"

namespace mixops::cuda {
namespace {

// This file launches its kernels.
using namespace unpermute_kernels;  // NOLINT(google-build-using-namespace)

// Calls f.template operator()<T, N>() for the data dtype (core's one dtype switch), N = 16 bytes
// of elements when `vec16` (every row start 16-byte aligned), else N = 1.
template <typename F>
void dispatch(Dtype d, bool vec16, const char* op, const F& f) {
  dispatch_dtype(d, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (vec16) {
      f.template operator()<T, static_cast<int>(16 / sizeof(T))>();
    } else {
      f.template operator()<T, 1>();
    }
  });
}

// Blocks for `items` warps of work (grid-strided past 2^20 blocks).
unsigned blocks_for(int64_t items) {
  return static_cast<unsigned>(std::clamp<int64_t>((items + kWarps - 1) / kWarps, 1, 1 << 20));
}

}  // namespace

void unpermute_launch(const UnpermuteParams& p, cudaStream_t stream) {
  nvtx3::scoped_range range{"mixops::unpermute"};
  if (p.num_tokens <= 0 || p.hidden <= 0) return;  // y is empty
  // 16-byte vectors need every row start of both operands and the row length 16-byte aligned.
  const int64_t es = dtype_size(p.dtype);
  const bool vec16 = is_aligned(p.y_sorted, 16) && is_aligned(p.y, 16) &&
                     (p.hidden * es) % 16 == 0 && (p.y_sorted_stride * es) % 16 == 0;
  dispatch(p.dtype, vec16, "unpermute", [&]<typename T, int N>() {
    launch_kernel(&unpermute_kernel<T, N>, blocks_for(p.num_tokens), kWarps * 32, 0, stream, p,
                  p.hidden / N, p.y_sorted_stride / N);
  });
  check_launch("unpermute", "launch");
}

size_t row_slot_workspace_bytes(int64_t num_rows) {
  return static_cast<size_t>(std::max<int64_t>(num_rows, 0)) * sizeof(int32_t);
}

void row_slot_launch(const int32_t* row_map, int64_t slots, int64_t num_rows, int32_t* row_slot,
                     int32_t* error_flag, const char* op, cudaStream_t stream) {
  if (slots > INT32_MAX) {
    fail(op, "num_tokens * k must be < 2^31");
  }
  if (num_rows > 0) {  // row_slot is unused (maybe null) when num_rows == 0
    check_cuda(cudaMemsetAsync(row_slot, 0xff, num_rows * sizeof(int32_t), stream), op, "memset");
  }
  if (slots > 0) {  // also flags bad row_map values when num_rows == 0
    const unsigned blocks = static_cast<unsigned>(
        std::min<int64_t>((slots + kScatterThreads - 1) / kScatterThreads, 1 << 16));
    launch_kernel(&scatter_kernel, blocks, kScatterThreads, 0, stream, row_map, slots, num_rows,
                  row_slot, error_flag);
    check_launch(op, "scatter launch");
  }
}

size_t unpermute_backward_workspace_bytes(const UnpermuteBackwardParams& p) {
  return row_slot_workspace_bytes(p.num_rows);
}

void unpermute_backward_launch(const UnpermuteBackwardParams& p, void* workspace,
                               cudaStream_t stream) {
  nvtx3::scoped_range range{"mixops::unpermute_backward"};
  int32_t* row_slot = static_cast<int32_t*>(workspace);
  row_slot_launch(p.row_map, p.num_tokens * p.k, p.num_rows, row_slot, p.error_flag,
                  "unpermute_backward", stream);
  if (p.num_rows <= 0 || p.hidden <= 0) return;  // grad_y_sorted is empty
  const int64_t es = dtype_size(p.dtype);
  const bool vec16 =
      is_aligned(p.grad_y, 16) && is_aligned(p.grad_y_sorted, 16) && (p.hidden * es) % 16 == 0;
  dispatch(p.dtype, vec16, "unpermute_backward", [&]<typename T, int N>() {
    launch_kernel(&backward_rows_kernel<T, N>, blocks_for(p.num_rows), kWarps * 32, 0, stream, p,
                  row_slot, p.hidden / N);
  });
  check_launch("unpermute_backward", "rows launch");
}

void unpermute_weights_backward_launch(const UnpermuteBackwardParams& p, cudaStream_t stream) {
  nvtx3::scoped_range range{"mixops::unpermute_backward"};
  const int64_t slots = p.num_tokens * p.k;
  if (slots <= 0 || p.grad_weights == nullptr) return;  // grad_weights is empty
  const int64_t es = dtype_size(p.dtype);
  const bool vec16 = is_aligned(p.grad_y, 16) && is_aligned(p.y_sorted, 16) &&
                     (p.hidden * es) % 16 == 0 && (p.y_sorted_stride * es) % 16 == 0;
  dispatch(p.dtype, vec16, "unpermute_weights_backward", [&]<typename T, int N>() {
    launch_kernel(&backward_weights_kernel<T, N>, blocks_for(slots), kWarps * 32, 0, stream, p,
                  p.hidden / N, p.y_sorted_stride / N);
  });
  check_launch("unpermute_backward", "weights launch");
}

}  // namespace mixops::cuda
