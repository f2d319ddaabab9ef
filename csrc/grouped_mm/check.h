// grouped_mm argument validation shared by the CPU and CUDA op layers: shapes, dtypes, devices
// (everything knowable without reading device memory) and, separately, the offsets values
// (done on the host for CPU tensors; CUDA clamps on the device and reports through a flag).
#pragma once

#include <ATen/core/Tensor.h>

#include "grouped_mm/grouped_mm.h"

namespace mixops {

// Checks a, b, offsets and returns the output shape. Throws c10::Error naming the argument.
std::vector<int64_t> grouped_mm_check(const at::Tensor& a, const at::Tensor& b,
                                      const at::Tensor& offsets);

// Host check of the offsets' values (CPU tensor): non-negative, non-decreasing, <= total.
void grouped_mm_check_offsets_values(const at::Tensor& offsets, int64_t total, const char* what);

// The message for a set of GroupedMmError bits (used by the CUDA debug mode).
std::string grouped_mm_error_message(int32_t bits, int64_t total, const char* what);

}  // namespace mixops
