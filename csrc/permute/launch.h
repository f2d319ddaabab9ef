// permute / unpermute / rows_to_slots / slots_to_rows on CUDA: the torch-free boundary between
// the op layer (cuda.cpp: validation, allocation through the torch allocator, stream) and the
// kernels (permute.cu + permute_kernel.cuh, unpermute.cu + unpermute_kernel.cuh, slots.cu +
// slots_kernel.cuh, rows.cu + rows_kernel.cuh, chunks.cu + chunks_kernel.cuh). Formats: permute.h.
//
// Contract for callers:
//  * params are validated except for values in device memory (ids, row_map, index, counts):
//    kernels treat bad values as "no expert"/"no row" (counts: clamped) and OR PermuteError bits
//    into error_flag (core/errors.h).
//  * workspace points to the matching *_workspace_bytes(...) bytes of device memory, 256-byte
//    aligned.
//  * everything is enqueued on `stream`; nothing synchronises the host (CUDA-graph capturable);
//    results are deterministic (no floating-point atomics).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "permute/permute.h"

namespace mixops::cuda {

size_t permute_workspace_bytes(const PermuteParams& p);
// Fills x_sorted (every row; the tail zero), offsets, row_map, dropped.
void permute_launch(const PermuteParams& p, void* workspace, cudaStream_t stream);

// y[t] = sum_j w[t, j] * y_sorted[row_map[t, j]] (every row of y written).
void unpermute_launch(const UnpermuteParams& p, cudaStream_t stream);

size_t unpermute_backward_workspace_bytes(const UnpermuteBackwardParams& p);
// grad_y_sorted (every row written; rows no slot maps to are zero).
void unpermute_backward_launch(const UnpermuteBackwardParams& p, void* workspace,
                               cudaStream_t stream);
// grad_weights [T, k].
void unpermute_weights_backward_launch(const UnpermuteBackwardParams& p, cudaStream_t stream);

// The inverse row map (unpermute.cu, shared by unpermute_backward and slots_to_rows): row_slot
// [num_rows] (row_slot_workspace_bytes of workspace) = the slot mapped to each row, or -1; bad
// row_map values and rows two slots map to (the last slot is kept) set bits in error_flag.
size_t row_slot_workspace_bytes(int64_t num_rows);
void row_slot_launch(const int32_t* row_map, int64_t slots, int64_t num_rows, int32_t* row_slot,
                     int32_t* error_flag, const char* op, cudaStream_t stream);

// slots [T, heads, k, d] contiguous from rows (every slot written; zeros for -1).
void rows_to_slots_launch(const SlotsParams& p, cudaStream_t stream);
size_t slots_to_rows_workspace_bytes(const SlotsParams& p);
// rows [num_rows, heads * d] contiguous from slots (every row written; zeros where no slot maps).
void slots_to_rows_launch(const SlotsParams& p, void* workspace, cudaStream_t stream);

// scatter_rows / scatter_rows_backward (rows.cu + rows_kernel.cuh). select_rows_launch: dst[r]
// = a[map[r]] or b[r] (SelectRowsParams). scatter_rows_launch: the same with map = the inverse
// of index [n] (built in scatter_rows_workspace_bytes(dst_rows) of workspace; repeated rows and
// bad values flagged), p.map ignored.
void select_rows_launch(const SelectRowsParams& p, cudaStream_t stream);
size_t scatter_rows_workspace_bytes(int64_t num_rows);
void scatter_rows_launch(const SelectRowsParams& p, const int32_t* index, int64_t n,
                         void* workspace, const char* op, cudaStream_t stream);

// reorder_chunks (chunks.cu + chunks_kernel.cuh): y [N, H] contiguous (every row written; rows
// past the clamped counts' sum zero) from x, ReorderChunksParams. workspace:
// reorder_chunks_workspace_bytes(A * B) (the counts' prefix sums in both orders). Negative counts
// count as 0 and chunks are cut at row N of x, flagged (kCountsNegative, kCountsPastRows).
size_t reorder_chunks_workspace_bytes(int64_t num_chunks);
void reorder_chunks_launch(const ReorderChunksParams& p, void* workspace, cudaStream_t stream);

}  // namespace mixops::cuda
