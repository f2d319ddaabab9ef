// permute / unpermute validation shared by the CPU and CUDA op layers: one place for every
// message, naming the argument. Values in device memory (ids, row_map) are checked here only for
// CPU tensors; CUDA kernels treat bad values as "none" and set an error flag
// (permute_error_message gives its text under MIXOPS_DEBUG=1).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <vector>

#include "permute/permute.h"

namespace mixops {

// Checks permute's arguments; returns num_rows (the static row bound of x_sorted).
int64_t permute_check(const at::Tensor& x, const at::Tensor& ids, int64_t num_experts,
                      std::optional<int64_t> capacity, const std::optional<at::Tensor>& priority);
// Host check of ids values (CPU tensor): in [-1, num_experts).
void permute_check_ids_values(const at::Tensor& ids, int64_t num_experts);

void unpermute_check(const at::Tensor& y_sorted, const at::Tensor& row_map,
                     const std::optional<at::Tensor>& weights);
void unpermute_backward_check(const at::Tensor& grad_y, const at::Tensor& row_map,
                              const std::optional<at::Tensor>& weights, int64_t num_rows);
void unpermute_weights_backward_check(const at::Tensor& grad_y, const at::Tensor& y_sorted,
                                      const at::Tensor& row_map, const at::Tensor& weights);
// Host check of row_map values (CPU tensor): in [-1, num_rows), no row twice (raises at the first
// bad slot, naming it). Memory: a bit per row up to the largest value, whatever num_rows is.
void unpermute_check_row_map_values(const at::Tensor& row_map, int64_t num_rows, const char* op);
// The same check, returning the inverse map: slot_of[r] = the slot mapped to row r, or -1, for
// r < slot_of.size() = min(num_rows, 1 + the largest value); rows past it have no slot. Sized by
// the values, not by num_rows, so a huge num_rows (a SymInt argument) costs no memory here.
std::vector<int32_t> row_map_inverse(const at::Tensor& row_map, int64_t num_rows, const char* op);

// rows_to_slots / slots_to_rows (MoA slot layout, permute.h).
void rows_to_slots_check(const at::Tensor& rows, const at::Tensor& row_map, int64_t num_heads);
void slots_to_rows_check(const at::Tensor& slots, const at::Tensor& row_map, int64_t num_rows);

// scatter_rows / scatter_rows_backward (MoD's write-back, permute.h).
void scatter_rows_check(const at::Tensor& base, const at::Tensor& rows, const at::Tensor& index);
void scatter_rows_backward_check(const at::Tensor& grad, const at::Tensor& index);
// Host check of index values (CPU tensor), as row_map_inverse: slot_of[r] = i where index[i] = r.
std::vector<int32_t> scatter_index_inverse(const at::Tensor& index, int64_t num_rows,
                                           const char* op);

// reorder_chunks (expert parallelism's chunk regrouping, permute.h).
void reorder_chunks_check(const at::Tensor& x, const at::Tensor& counts);
// Host check of counts values (CPU tensor): every entry >= 0 and the sum <= num_rows (raises
// naming the first bad entry); returns the exclusive prefix sums in (a, b) order with the total
// appended (A * B + 1 entries): chunk (a, b) is rows off[a * B + b] .. off[a * B + b + 1] - 1.
std::vector<int64_t> reorder_chunks_source_offsets(const at::Tensor& counts, int64_t num_rows);

std::string permute_error_message(int32_t bits, const char* op, int64_t num_experts,
                                  int64_t num_rows);

}  // namespace mixops
