// SIMT driver: permute's real launch code (csrc/permute/permute.cu) on the CPU.
//
// The bridge records every kernel a call launches (simt::launched), so a test can tell which paths
// its case took (shared or global histogram and rank counters, the gather's vector width, the
// priority sort) and the grid provably covers them.
#include <cstdlib>
#include <cstring>
#include <vector>

#include "simt_run.h"

// clang-format off
#include "permute/permute.cu"
// clang-format on

namespace {

namespace pk = mixops::cuda::permute_kernels;

using simt::ran;

// paths[0]: histogram in global memory (E > 8192); paths[1]: rank counters in global memory
// (E > 1024); paths[2]: bytes per gather unit (0: no gather); paths[3]: the radix sort ran
// (priority capacity); paths[4]: a rank pass ran (capacity can drop).
void record_paths(int32_t* paths) {
  using pk::Seq;
  paths[0] = ran(&pk::hist_kernel<Seq::kSlot, false>);
  paths[1] = ran(&pk::rank_kernel<Seq::kSlot, false, true>);
  paths[2] = ran(&pk::gather_kernel<uint4>)      ? 16
             : ran(&pk::gather_kernel<uint2>)    ? 8
             : ran(&pk::gather_kernel<uint32_t>) ? 4
             : ran(&pk::gather_kernel<uint16_t>) ? 2
             : ran(&pk::gather_kernel<uint8_t>)  ? 1
                                                 : 0;
  paths[3] =
      ran(&pk::hist_kernel<Seq::kSorted, true>) || ran(&pk::hist_kernel<Seq::kSorted, false>);
  paths[4] = paths[3] || ran(&pk::hist_kernel<Seq::kChoiceMajor, true>) ||
             ran(&pk::hist_kernel<Seq::kChoiceMajor, false>);
}

}  // namespace

extern "C" {

// The params as csrc/permute/cuda.cpp fills them. dtype: mixops::Dtype. capacity < 0: None.
// x [T, H] with row stride x_stride (elements), ids [T, k] contiguous int32 or int64, priority
// [T, k] fp32 or null; outputs x_sorted [num_rows, H] contiguous (num_rows =
// permute::num_rows(T, k, E, capacity), as permute_check), offsets [E], row_map [T, k],
// dropped [E]; error_flag an int32 (or null) the kernels OR PermuteError bits into.
// The workspace is the real permute_workspace_bytes, 256-byte aligned, filled with the run's
// poison byte (device memory is not cleared). radix_bits (> 0) sets the CUB shim's digit width,
// so the DoubleBuffer selector ends flipped or not (see the shim); the shim's poison for the
// buffer not holding the sort result is the run's. paths[5] (or null): record_paths.
int simt_permute(int dtype, int64_t num_tokens, int32_t k, int32_t num_experts, int64_t hidden,
                 int64_t capacity, const void* x, int64_t x_stride, const void* ids, int ids_int64,
                 const float* priority, void* x_sorted, int32_t* offsets, int32_t* row_map,
                 int32_t* dropped, int32_t* error_flag, int radix_bits, int32_t* paths,
                 const SimtRun* run, char* err, int err_len) {
  return simt::run_with(run, err, err_len, [&] {
    mixops::PermuteParams p{};
    p.dtype = static_cast<mixops::Dtype>(dtype);
    p.num_tokens = num_tokens;
    p.k = k;
    p.num_experts = num_experts;
    p.hidden = hidden;
    p.capacity = capacity;
    p.num_rows = mixops::permute::num_rows(num_tokens, k, num_experts, capacity);
    p.x = x;
    p.x_stride = x_stride;
    p.ids = ids;
    p.ids_int64 = ids_int64 != 0;
    p.priority = priority;
    p.x_sorted = x_sorted;
    p.offsets = offsets;
    p.row_map = row_map;
    p.dropped = dropped;
    p.error_flag = error_flag;
    const simt::Workspace ws(mixops::cuda::permute_workspace_bytes(p), run->poison);
    simt::cub_radix_bits = radix_bits > 0 ? radix_bits : 8;
    simt::cub_poison = run->poison;
    simt::launched.clear();
    mixops::cuda::permute_launch(p, ws.get(), nullptr);
    if (paths != nullptr) record_paths(paths);
  });
}

// The rows permute_launch writes (permute::num_rows, as permute_check returns).
int64_t simt_permute_num_rows(int64_t num_tokens, int32_t k, int32_t num_experts,
                              int64_t capacity) {
  return mixops::permute::num_rows(num_tokens, k, num_experts, capacity);
}

}  // extern "C"
