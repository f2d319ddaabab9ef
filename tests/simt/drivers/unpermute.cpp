// SIMT driver: unpermute's real launch code (csrc/permute/unpermute.cu) on the CPU: unpermute,
// unpermute_backward (rows) and unpermute_weights_backward, with the params csrc/permute/cuda.cpp
// fills. The bridge records every kernel a call launches (simt::launched), so a test can tell
// whether its case took the 16-byte vector path or the element path.
#include <cstdlib>
#include <cstring>
#include <vector>

#include "simt_run.h"

// clang-format off
#include "permute/unpermute.cu"
// clang-format on

namespace {

namespace uk = mixops::cuda::unpermute_kernels;

using simt::ran;

// Which row kernel of T the call ran: 16 (16-byte vectors), 1 (element path) or 0 (none).
template <class T>
int width_of() {
  constexpr int kN = 16 / sizeof(T);
  if (ran(&uk::unpermute_kernel<T, kN>) || ran(&uk::backward_rows_kernel<T, kN>) ||
      ran(&uk::backward_weights_kernel<T, kN>)) {
    return 16;
  }
  if (ran(&uk::unpermute_kernel<T, 1>) || ran(&uk::backward_rows_kernel<T, 1>) ||
      ran(&uk::backward_weights_kernel<T, 1>)) {
    return 1;
  }
  return 0;
}

// paths[0]: the row kernel's width (width_of); paths[1]: the scatter kernel ran.
void record_paths(int32_t* paths) {
  if (paths == nullptr) return;
  paths[0] =
      width_of<float>() | width_of<double>() | width_of<__nv_bfloat16>() | width_of<__half>();
  paths[1] = ran(&uk::scatter_kernel);
}

void start_call() { simt::launched.clear(); }

}  // namespace

extern "C" {

// y [T, H] contiguous = sum_j w[t, j] * y_sorted[row_map[t, j]]; y_sorted [num_rows, H] with row
// stride y_sorted_stride (elements); weights [T, k] in weights_dtype, or null (ones).
// dtype, weights_dtype: mixops::Dtype. paths[2] (or null): record_paths.
int simt_unpermute(int dtype, int weights_dtype, int64_t num_tokens, int32_t k, int64_t hidden,
                   int64_t num_rows, const void* y_sorted, int64_t y_sorted_stride,
                   const int32_t* row_map, const void* weights, void* y, int32_t* error_flag,
                   int32_t* paths, const SimtRun* run, char* err, int err_len) {
  return simt::run_with(run, err, err_len, [&] {
    mixops::UnpermuteParams p{};
    p.dtype = static_cast<mixops::Dtype>(dtype);
    p.weights_dtype = static_cast<mixops::Dtype>(weights_dtype);
    p.num_tokens = num_tokens;
    p.k = k;
    p.hidden = hidden;
    p.num_rows = num_rows;
    p.y_sorted = y_sorted;
    p.y_sorted_stride = y_sorted_stride;
    p.row_map = row_map;
    p.weights = weights;
    p.y = y;
    p.error_flag = error_flag;
    start_call();
    mixops::cuda::unpermute_launch(p, nullptr);
    record_paths(paths);
  });
}

// grad_y_sorted [num_rows, H] contiguous from grad_y [T, H] contiguous (cuda.cpp's
// backward_params). The workspace is the real unpermute_backward_workspace_bytes, 256-byte
// aligned, filled with the run's poison byte.
int simt_unpermute_backward(int dtype, int weights_dtype, int64_t num_tokens, int32_t k,
                            int64_t hidden, int64_t num_rows, const void* grad_y,
                            const int32_t* row_map, const void* weights, void* grad_y_sorted,
                            int32_t* error_flag, int32_t* paths, const SimtRun* run, char* err,
                            int err_len) {
  return simt::run_with(run, err, err_len, [&] {
    mixops::UnpermuteBackwardParams p{};
    p.dtype = static_cast<mixops::Dtype>(dtype);
    p.weights_dtype = static_cast<mixops::Dtype>(weights_dtype);
    p.num_tokens = num_tokens;
    p.hidden = hidden;
    p.num_rows = num_rows;
    p.k = k;
    p.grad_y = grad_y;
    p.row_map = row_map;
    p.weights = weights;
    p.grad_y_sorted = grad_y_sorted;
    p.error_flag = error_flag;
    const simt::Workspace ws(mixops::cuda::unpermute_backward_workspace_bytes(p), run->poison);
    start_call();
    mixops::cuda::unpermute_backward_launch(p, ws.get(), nullptr);
    record_paths(paths);
  });
}

// grad_weights [T, k] in weights_dtype = <grad_y[t], y_sorted[row_map[t, j]]>; y_sorted
// [num_rows, H] with row stride y_sorted_stride. As cuda.cpp: weights is not passed (null), only
// its dtype.
int simt_unpermute_weights_backward(int dtype, int weights_dtype, int64_t num_tokens, int32_t k,
                                    int64_t hidden, int64_t num_rows, const void* grad_y,
                                    const void* y_sorted, int64_t y_sorted_stride,
                                    const int32_t* row_map, void* grad_weights, int32_t* error_flag,
                                    int32_t* paths, const SimtRun* run, char* err, int err_len) {
  return simt::run_with(run, err, err_len, [&] {
    mixops::UnpermuteBackwardParams p{};
    p.dtype = static_cast<mixops::Dtype>(dtype);
    p.weights_dtype = static_cast<mixops::Dtype>(weights_dtype);
    p.num_tokens = num_tokens;
    p.hidden = hidden;
    p.num_rows = num_rows;
    p.k = k;
    p.grad_y = grad_y;
    p.row_map = row_map;
    p.weights = nullptr;  // not read: only its dtype matters
    p.y_sorted = y_sorted;
    p.y_sorted_stride = y_sorted_stride;
    p.grad_weights = grad_weights;
    p.error_flag = error_flag;
    start_call();
    mixops::cuda::unpermute_weights_backward_launch(p, nullptr);
    record_paths(paths);
  });
}

}  // extern "C"
