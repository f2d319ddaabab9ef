// SIMT driver: rows_to_slots and slots_to_rows' real launch code (csrc/permute/slots.cu, with the
// row -> slot scatter of unpermute.cu it shares) on the CPU, with the params csrc/permute/cuda.cpp
// fills. Both .cu files share this translation unit, so slots.cu's helpers have names of their
// own. The bridge records the kernels a call ran: the copy's unit width and the scatter.
#include <cstdint>

#include "simt_run.h"

// clang-format off
#include "permute/unpermute.cu"
#include "permute/slots.cu"
// clang-format on

namespace {

namespace sk = mixops::cuda::slots_kernels;

template <class U>
bool ran_unit() {
  return simt::ran(&sk::rows_to_slots_kernel<U>) || simt::ran(&sk::slots_to_rows_kernel<U>);
}

// paths[0]: bytes per unit of the copy kernel that ran (0: none); paths[1]: the scatter ran.
void record_paths(int32_t* paths) {
  if (paths == nullptr) return;
  paths[0] = ran_unit<uint4>()      ? 16
             : ran_unit<uint2>()    ? 8
             : ran_unit<uint32_t>() ? 4
             : ran_unit<uint16_t>() ? 2
             : ran_unit<uint8_t>()  ? 1
                                    : 0;
  paths[1] = simt::ran(&mixops::cuda::unpermute_kernels::scatter_kernel);
}

// As cuda.cpp's slots_params: slots [T, heads, k, d] with strides st, sh, sj (elements), rows
// [num_rows, heads * d] with row stride rows_stride.
mixops::SlotsParams params(int dtype, int64_t num_tokens, int32_t k, int64_t num_heads,
                           int64_t head_dim, int64_t num_rows, const void* rows,
                           int64_t rows_stride, const void* slots, const int64_t* slot_strides,
                           const int32_t* row_map, int32_t* error_flag) {
  mixops::SlotsParams p{};
  p.dtype = static_cast<mixops::Dtype>(dtype);
  p.num_tokens = num_tokens;
  p.k = k;
  p.num_heads = num_heads;
  p.head_dim = head_dim;
  p.num_rows = num_rows;
  p.rows = const_cast<void*>(rows);
  p.rows_stride = rows_stride;
  p.slots = const_cast<void*>(slots);
  p.slot_stride_t = slot_strides[0];
  p.slot_stride_h = slot_strides[1];
  p.slot_stride_j = slot_strides[2];
  p.row_map = row_map;
  p.error_flag = error_flag;
  return p;
}

}  // namespace

extern "C" {

// slots (written; strides slot_strides[3] of the contiguous output) from rows.
int simt_rows_to_slots(int dtype, int64_t num_tokens, int32_t k, int64_t num_heads,
                       int64_t head_dim, int64_t num_rows, const void* rows, int64_t rows_stride,
                       const int32_t* row_map, void* slots, const int64_t* slot_strides,
                       int32_t* error_flag, int32_t* paths, const SimtRun* run, char* err,
                       int err_len) {
  return simt::run_with(run, err, err_len, [&] {
    const mixops::SlotsParams p = params(dtype, num_tokens, k, num_heads, head_dim, num_rows, rows,
                                         rows_stride, slots, slot_strides, row_map, error_flag);
    simt::launched.clear();
    mixops::cuda::rows_to_slots_launch(p, nullptr);
    record_paths(paths);
  });
}

// rows (written, row stride rows_stride) from slots (strides slot_strides[3]). The workspace is
// the real slots_to_rows_workspace_bytes, filled with the run's poison byte.
int simt_slots_to_rows(int dtype, int64_t num_tokens, int32_t k, int64_t num_heads,
                       int64_t head_dim, int64_t num_rows, const void* slots,
                       const int64_t* slot_strides, const int32_t* row_map, void* rows,
                       int64_t rows_stride, int32_t* error_flag, int32_t* paths, const SimtRun* run,
                       char* err, int err_len) {
  return simt::run_with(run, err, err_len, [&] {
    const mixops::SlotsParams p = params(dtype, num_tokens, k, num_heads, head_dim, num_rows, rows,
                                         rows_stride, slots, slot_strides, row_map, error_flag);
    const simt::Workspace ws(mixops::cuda::slots_to_rows_workspace_bytes(p), run->poison);
    simt::launched.clear();
    mixops::cuda::slots_to_rows_launch(p, ws.get(), nullptr);
    record_paths(paths);
  });
}

}  // extern "C"
