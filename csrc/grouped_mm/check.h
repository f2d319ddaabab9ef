// grouped_mm argument validation shared by the CPU and CUDA op layers: shapes, dtypes, devices
// (everything knowable without reading device memory) and, separately, the offsets values
// (done on the host for CPU tensors; CUDA clamps on the device and reports through a flag).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include "grouped_mm/grouped_mm.h"

namespace mixops {

// Checks a, b, offsets and returns the output shape. Throws c10::Error naming the argument.
std::vector<int64_t> grouped_mm_check(const at::Tensor& a, const at::Tensor& b,
                                      const at::Tensor& offsets);

// Host check of the offsets' values (CPU tensor): non-negative, non-decreasing, <= total.
// op: the op named in the messages.
void grouped_mm_check_offsets_values(const at::Tensor& offsets, int64_t total, const char* what,
                                     const char* op = "grouped_mm");

// grouped_mm_packed's mode (ragged_k and packed of GroupedMmParams) and output shape.
struct PackedModeShape {
  bool ragged_k;
  PackedDim packed;
  std::vector<int64_t> out_shape;
};

// "mn", "mk", "km" or "kn" -> (ragged_k, packed); throws naming the argument otherwise.
PackedModeShape grouped_mm_packed_mode(c10::string_view mode);

// Checks a, b, offsets, ends, mode, width, total (everything but the index values) and returns
// the mode and output shape. Throws c10::Error naming the argument.
PackedModeShape grouped_mm_packed_check(const at::Tensor& a, const at::Tensor& b,
                                        const at::Tensor& offsets, const at::Tensor& ends,
                                        c10::string_view mode, int64_t width, int64_t total);

// Host check of the ends' values (CPU tensor): non-negative, non-decreasing, <= total, and each
// width ends[g] - ends[g-1] <= width.
void grouped_mm_packed_check_ends_values(const at::Tensor& ends, int64_t total, int64_t width);

// The message for GroupedMmError bits of grouped_mm_packed (offsets and ends; CUDA debug mode).
std::string grouped_mm_packed_error_message(int32_t bits, int64_t ragged_total, const char* what,
                                            int64_t total);

// The message for a set of GroupedMmError bits (used by the CUDA debug mode).
std::string grouped_mm_error_message(int32_t bits, int64_t total, const char* what);

}  // namespace mixops
