// grouped_mm validation: one place for every error message, so CPU, CUDA and every caller of
// torch.ops.mixops.grouped_mm from another framework get the same clear errors.
#include "grouped_mm/check.h"

#include <c10/util/Exception.h>

#include "core/error_record.h"

namespace mixops {

std::vector<int64_t> grouped_mm_check(const at::Tensor& a, const at::Tensor& b,
                                      const at::Tensor& offsets) {
  TORCH_CHECK(a.dim() == 2, "grouped_mm: a must be 2-D [m, k], got a ", a.dim(),
              "-D tensor of shape ", a.sizes());
  TORCH_CHECK(b.dim() == 2 || b.dim() == 3,
              "grouped_mm: b must be 3-D [num_experts, k, n] (2-D x 3-D mode) or 2-D [k, n] "
              "(2-D x 2-D mode), got a ",
              b.dim(), "-D tensor of shape ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "grouped_mm: a and b must have the same dtype, ",
              "got a ", a.scalar_type(), " and b ", b.scalar_type());
  const auto dt = a.scalar_type();
  TORCH_CHECK(
      dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble,
      "grouped_mm: a must be float32, bfloat16 or float16 (or float64, for gradcheck), got ", dt);
  TORCH_CHECK(a.device() == b.device(), "grouped_mm: a and b must be on the same device, got a on ",
              a.device(), " and b on ", b.device());
  TORCH_CHECK(offsets.scalar_type() == at::kInt, "grouped_mm: offsets must be int32, got ",
              offsets.scalar_type());
  TORCH_CHECK(offsets.dim() == 1, "grouped_mm: offsets must be 1-D [num_experts], got shape ",
              offsets.sizes());
  TORCH_CHECK(offsets.device() == a.device(),
              "grouped_mm: offsets must be on the same device as a (", a.device(), "), got ",
              offsets.device());
  const int64_t m = a.size(0);
  const int64_t k = a.size(1);
  if (b.dim() == 3) {
    TORCH_CHECK(b.size(1) == k, "grouped_mm: K mismatch: a is [m, k] = ", a.sizes(),
                " but b is [num_experts, k, n] = ", b.sizes());
    TORCH_CHECK(offsets.size(0) == b.size(0),
                "grouped_mm: offsets must have length num_experts = "
                "b.size(0) = ",
                b.size(0), ", got ", offsets.size(0));
    return {m, b.size(2)};
  }
  TORCH_CHECK(b.size(0) == k, "grouped_mm: K mismatch: a is [m, r] = ", a.sizes(),
              " but b is [r, n] = ", b.sizes());
  TORCH_CHECK(offsets.size(0) >= 1,
              "grouped_mm: offsets must have length num_experts >= 1 in the "
              "2-D x 2-D mode, got 0");
  return {offsets.size(0), m, b.size(1)};
}

std::string grouped_mm_error_message(int32_t bits, int64_t total, const char* what) {
  std::string msg = "grouped_mm: invalid offsets:";
  if (bits & kOffsetsNegative) msg += " offsets must be non-negative;";
  if (bits & kOffsetsDecreasing) msg += " offsets must be non-decreasing;";
  if (bits & kOffsetsPastEnd) {
    msg += " offsets must be <= " + std::string(what) + " = " + std::to_string(total) +
           " (offsets past the end);";
  }
  return msg;
}

void grouped_mm_check_offsets_values(const at::Tensor& offsets, int64_t total, const char* what) {
  const at::Tensor off = offsets.contiguous();
  const int32_t* p = off.data_ptr<int32_t>();
  int64_t prev = 0;
  for (int64_t g = 0; g < off.numel(); ++g) {
    const int64_t v = p[g];
    TORCH_CHECK(v >= 0, "grouped_mm: invalid offsets: offsets must be non-negative, got offsets[",
                g, "] = ", v);
    TORCH_CHECK(v >= prev,
                "grouped_mm: invalid offsets: offsets must be non-decreasing, got offsets[", g,
                "] = ", v, " < offsets[", g - 1, "] = ", prev);
    TORCH_CHECK(v <= total, "grouped_mm: invalid offsets: offsets must be <= ", what, " = ", total,
                " (offsets past the end), got offsets[", g, "] = ", v);
    prev = v;
  }
}

// The message of grouped_mm's device error slot (mixops.check_errors, MIXOPS_DEBUG=1).
const bool kGroupedMmMessageRegistered =
    register_error_message(ErrorSlot::kGroupedMm, [](int32_t bits, const ErrorContext& c) {
      return grouped_mm_error_message(bits, c.a, c.what);
    });

}  // namespace mixops
