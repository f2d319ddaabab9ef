// SIMT driver: scatter_rows and scatter_rows_backward's real launch code (csrc/permute/rows.cu,
// with the row -> i scatter of unpermute.cu it shares) on the CPU, with the params
// csrc/permute/cuda.cpp fills (select_params). Both .cu files share this translation unit, so
// rows.cu's helpers have names of their own. The bridge records the kernels a call ran: the
// copy's unit width and the scatter.
#include <cstdint>

#include "simt_run.h"

// clang-format off
#include "permute/unpermute.cu"
#include "permute/rows.cu"
// clang-format on

namespace {

namespace rk = mixops::cuda::rows_kernels;

// Bytes per unit of the select_rows_kernel that ran since the last clear (0: none).
int unit_ran() {
  return simt::ran(&rk::select_rows_kernel<uint4>)      ? 16
         : simt::ran(&rk::select_rows_kernel<uint2>)    ? 8
         : simt::ran(&rk::select_rows_kernel<uint32_t>) ? 4
         : simt::ran(&rk::select_rows_kernel<uint16_t>) ? 2
         : simt::ran(&rk::select_rows_kernel<uint8_t>)  ? 1
                                                        : 0;
}

bool scatter_ran() { return simt::ran(&mixops::cuda::unpermute_kernels::scatter_kernel); }

// As cuda.cpp's select_params: dst [dst_rows, H] contiguous; a (nullable) with row stride
// a_stride and a_rows rows; b (nullable) with row stride b_stride. A null a or b has stride 0.
mixops::SelectRowsParams params(int dtype, int64_t dst_rows, int64_t a_rows, int64_t hidden,
                                const void* a, int64_t a_stride, const void* b, int64_t b_stride,
                                void* dst) {
  mixops::SelectRowsParams p{};
  p.dtype = static_cast<mixops::Dtype>(dtype);
  p.dst_rows = dst_rows;
  p.a_rows = a_rows;
  p.hidden = hidden;
  p.a = a;
  p.a_stride = a != nullptr ? a_stride : 0;
  p.b = b;
  p.b_stride = b != nullptr ? b_stride : 0;
  p.dst = dst;
  return p;
}

}  // namespace

extern "C" {

// out [T, H] contiguous (written) = base [T, H] (row stride base_stride) with row index[i]
// replaced by rows[i] (rows [n, H], row stride rows_stride). The workspace is the real
// scatter_rows_workspace_bytes(T), filled with the run's poison byte. paths[2] (or null): the
// copy's unit in bytes (0: none ran), the scatter ran.
int simt_scatter_rows(int dtype, int64_t num_rows, int64_t n, int64_t hidden, const void* base,
                      int64_t base_stride, const void* rows, int64_t rows_stride,
                      const int32_t* index, void* out, int32_t* error_flag, int32_t* paths,
                      const SimtRun* run, char* err, int err_len) {
  return simt::run_with(run, err, err_len, [&] {
    mixops::SelectRowsParams p =
        params(dtype, num_rows, n, hidden, rows, rows_stride, base, base_stride, out);
    const simt::Workspace ws(mixops::cuda::scatter_rows_workspace_bytes(num_rows), run->poison);
    p.error_flag = error_flag;
    simt::launched.clear();
    mixops::cuda::scatter_rows_launch(p, index, n, ws.get(), "mixops::scatter_rows", nullptr);
    if (paths != nullptr) {
      paths[0] = unit_ran();
      paths[1] = scatter_ran();
    }
  });
}

// grad_base [T, H] and grad_rows [n, H] (contiguous, written) from grad [T, H] (row stride
// grad_stride): grad_base through scatter_rows_launch (the inverse of index, a null), grad_rows
// through select_rows_launch (map = index, b null), as scatter_rows_backward_cuda. paths[3] (or
// null): grad_base's unit, the scatter ran, grad_rows' unit.
int simt_scatter_rows_backward(int dtype, int64_t num_rows, int64_t n, int64_t hidden,
                               const void* grad, int64_t grad_stride, const int32_t* index,
                               void* grad_base, void* grad_rows, int32_t* error_flag,
                               int32_t* paths, const SimtRun* run, char* err, int err_len) {
  return simt::run_with(run, err, err_len, [&] {
    mixops::SelectRowsParams pb =
        params(dtype, num_rows, n, hidden, nullptr, 0, grad, grad_stride, grad_base);
    mixops::SelectRowsParams pr =
        params(dtype, n, num_rows, hidden, grad, grad_stride, nullptr, 0, grad_rows);
    pr.map = index;
    const simt::Workspace ws(mixops::cuda::scatter_rows_workspace_bytes(num_rows), run->poison);
    pb.error_flag = pr.error_flag = error_flag;
    simt::launched.clear();
    mixops::cuda::scatter_rows_launch(pb, index, n, ws.get(), "mixops::scatter_rows_backward",
                                      nullptr);
    const int base_unit = unit_ran();
    const bool scattered = scatter_ran();
    simt::launched.clear();
    mixops::cuda::select_rows_launch(pr, nullptr);
    if (paths != nullptr) {
      paths[0] = base_unit;
      paths[1] = scattered;
      paths[2] = unit_ran();
    }
  });
}

// select_rows_launch alone, its launch.h contract: dst [dst_rows, H] contiguous (written),
// dst[r] = a[map[r]] for map[r] in [0, a_rows), else b[r]; a, b nullable (zeros). paths[1] (or
// null): the copy's unit.
int simt_select_rows(int dtype, int64_t dst_rows, int64_t a_rows, int64_t hidden, const void* a,
                     int64_t a_stride, const void* b, int64_t b_stride, const int32_t* map,
                     void* dst, int32_t* error_flag, int32_t* paths, const SimtRun* run, char* err,
                     int err_len) {
  return simt::run_with(run, err, err_len, [&] {
    mixops::SelectRowsParams p =
        params(dtype, dst_rows, a_rows, hidden, a, a_stride, b, b_stride, dst);
    p.map = map;
    p.error_flag = error_flag;
    simt::launched.clear();
    mixops::cuda::select_rows_launch(p, nullptr);
    if (paths != nullptr) paths[0] = unit_ran();
  });
}

}  // extern "C"
