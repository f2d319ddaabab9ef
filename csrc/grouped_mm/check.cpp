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

void grouped_mm_check_offsets_values(const at::Tensor& offsets, int64_t total, const char* what,
                                     const char* op) {
  const at::Tensor off = offsets.contiguous();
  const int32_t* p = off.data_ptr<int32_t>();
  int64_t prev = 0;
  for (int64_t g = 0; g < off.numel(); ++g) {
    const int64_t v = p[g];
    TORCH_CHECK(v >= 0, op, ": invalid offsets: offsets must be non-negative, got offsets[", g,
                "] = ", v);
    TORCH_CHECK(v >= prev, op, ": invalid offsets: offsets must be non-decreasing, got offsets[", g,
                "] = ", v, " < offsets[", g - 1, "] = ", prev);
    TORCH_CHECK(v <= total, op, ": invalid offsets: offsets must be <= ", what, " = ", total,
                " (offsets past the end), got offsets[", g, "] = ", v);
    prev = v;
  }
}

// ---- grouped_mm_packed (python/mixops/ops/grouped_mm_packed.py mirrors this line by line) ----

PackedModeShape grouped_mm_packed_mode(c10::string_view mode) {
  if (mode == "mn") return {false, PackedDim::kN, {}};
  if (mode == "mk") return {false, PackedDim::kK, {}};
  if (mode == "km") return {true, PackedDim::kM, {}};
  if (mode == "kn") return {true, PackedDim::kN, {}};
  TORCH_CHECK(false, "grouped_mm_packed: mode must be one of 'mn', 'mk', 'km', 'kn', got '",
              std::string(mode), "'");
}

PackedModeShape grouped_mm_packed_check(const at::Tensor& a, const at::Tensor& b,
                                        const at::Tensor& offsets, const at::Tensor& ends,
                                        c10::string_view mode_name, int64_t width, int64_t total) {
  PackedModeShape mode = grouped_mm_packed_mode(mode_name);
  const std::string md(mode_name);
  // The operands' shapes in this mode (csrc/ops.cpp's table).
  const char* a_doc = md == "mn"   ? "[m, k]"
                      : md == "mk" ? "[m, width]"
                      : md == "km" ? "[width, r]"
                                   : "[m, r]";
  const char* b_doc = md == "mn"   ? "[k, total]"
                      : md == "mk" ? "[total, n]"
                      : md == "km" ? "[r, n]"
                                   : "[r, width]";
  TORCH_CHECK(a.dim() == 2, "grouped_mm_packed: a must be 2-D ", a_doc, " in mode '", md,
              "', got a ", a.dim(), "-D tensor of shape ", a.sizes());
  TORCH_CHECK(b.dim() == 2, "grouped_mm_packed: b must be 2-D ", b_doc, " in mode '", md,
              "', got a ", b.dim(), "-D tensor of shape ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(),
              "grouped_mm_packed: a and b must have the same dtype, got a ", a.scalar_type(),
              " and b ", b.scalar_type());
  const auto dt = a.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble,
              "grouped_mm_packed: a must be float32, bfloat16, float16 or float64, got ", dt);
  TORCH_CHECK(a.device() == b.device(),
              "grouped_mm_packed: a and b must be on the same device, got a on ", a.device(),
              " and b on ", b.device());
  for (const auto& [t, name] : {std::pair{&offsets, "offsets"}, std::pair{&ends, "ends"}}) {
    TORCH_CHECK(t->scalar_type() == at::kInt, "grouped_mm_packed: ", name, " must be int32, got ",
                t->scalar_type());
    TORCH_CHECK(t->dim() == 1, "grouped_mm_packed: ", name,
                " must be 1-D [num_experts], got shape ", t->sizes());
    TORCH_CHECK(t->device() == a.device(), "grouped_mm_packed: ", name,
                " must be on the same device as a (", a.device(), "), got ", t->device());
  }
  TORCH_CHECK(ends.size(0) == offsets.size(0),
              "grouped_mm_packed: ends must have the length of offsets (num_experts = ",
              offsets.size(0), "), got ", ends.size(0));
  TORCH_CHECK(width >= 0, "grouped_mm_packed: width must be >= 0, got ", width);
  TORCH_CHECK(total >= 0, "grouped_mm_packed: total must be >= 0, got ", total);
  auto equal = [&](int64_t x, const char* x_name, int64_t y, const char* y_name) {
    TORCH_CHECK(x == y, "grouped_mm_packed: mode '", md, "': ", x_name, " must equal ", y_name,
                " = ", y, ", got ", x, " (a is ", a_doc, " = ", a.sizes(), ", b is ", b_doc, " = ",
                b.sizes(), ")");
  };
  const int64_t a0 = a.size(0), a1 = a.size(1), b0 = b.size(0), b1 = b.size(1);
  if (md == "mn") {
    equal(b0, "b.size(0)", a1, "a.size(1)");
    equal(b1, "b.size(1)", total, "total");
    mode.out_shape = {a0, width};
  } else if (md == "mk") {
    equal(a1, "a.size(1)", width, "width");
    equal(b0, "b.size(0)", total, "total");
    mode.out_shape = {a0, b1};
  } else if (md == "km") {
    equal(a0, "a.size(0)", width, "width");
    equal(b0, "b.size(0)", a1, "a.size(1)");
    mode.out_shape = {total, b1};
  } else {
    equal(b0, "b.size(0)", a1, "a.size(1)");
    equal(b1, "b.size(1)", width, "width");
    mode.out_shape = {a0, total};
  }
  return mode;
}

void grouped_mm_packed_check_ends_values(const at::Tensor& ends, int64_t total, int64_t width) {
  const at::Tensor e = ends.contiguous();
  const int32_t* p = e.data_ptr<int32_t>();
  int64_t prev = 0;
  for (int64_t g = 0; g < e.numel(); ++g) {
    const int64_t v = p[g];
    TORCH_CHECK(v >= 0, "grouped_mm_packed: invalid ends: ends must be non-negative, got ends[", g,
                "] = ", v);
    TORCH_CHECK(v >= prev,
                "grouped_mm_packed: invalid ends: ends must be non-decreasing, got ends[", g,
                "] = ", v, " < ends[", g - 1, "] = ", prev);
    TORCH_CHECK(v <= total, "grouped_mm_packed: invalid ends: ends must be <= total = ", total,
                " (ends past the end), got ends[", g, "] = ", v);
    TORCH_CHECK(v - prev <= width,
                "grouped_mm_packed: invalid ends: group widths ends[g] - ends[g-1] must be <= "
                "width = ",
                width, ", got ", v - prev, " for group ", g);
    prev = v;
  }
}

std::string grouped_mm_packed_error_message(int32_t bits, int64_t ragged_total, const char* what,
                                            int64_t total) {
  std::string msg = "grouped_mm_packed: invalid offsets or ends:";
  if (bits & kOffsetsNegative) msg += " offsets must be non-negative;";
  if (bits & kOffsetsDecreasing) msg += " offsets must be non-decreasing;";
  if (bits & kOffsetsPastEnd) {
    msg += " offsets must be <= " + std::string(what) + " = " + std::to_string(ragged_total) +
           " (offsets past the end);";
  }
  if (bits & kEndsNegative) msg += " ends must be non-negative;";
  if (bits & kEndsDecreasing) msg += " ends must be non-decreasing;";
  if (bits & kEndsPastEnd) {
    msg += " ends must be <= total = " + std::to_string(total) + " (ends past the end);";
  }
  if (bits & kWidthPastMax) msg += " group widths ends[g] - ends[g-1] must be <= width;";
  return msg;
}

// The message of grouped_mm's device error slot (mixops.check_errors, MIXOPS_DEBUG=1).
const bool kGroupedMmMessageRegistered =
    register_error_message(ErrorSlot::kGroupedMm, [](int32_t bits, const ErrorContext& c) {
      return grouped_mm_error_message(bits, c.a, c.what);
    });

// grouped_mm_packed's slot: a = the ragged size (named by what), b = total.
const bool kGroupedMmPackedMessageRegistered =
    register_error_message(ErrorSlot::kGroupedMmPacked, [](int32_t bits, const ErrorContext& c) {
      return grouped_mm_packed_error_message(bits, c.a, c.what, c.b);
    });

}  // namespace mixops
