// permute / unpermute validation: every message in one place (see check.h).
#include "permute/check.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <vector>

#include "core/error_record.h"

namespace mixops {
namespace {

void check_float(const at::Tensor& t, const char* op, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble, op,
              ": ", name, " must be float32, bfloat16 or float16 (or float64), got ", dt);
}

void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                       const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on the same device as ",
              ref_name, " (", ref.device(), "), got ", t.device());
}

void check_row_map(const at::Tensor& row_map, int64_t num_tokens, const char* op,
                   const char* tokens_from) {
  TORCH_CHECK(row_map.scalar_type() == at::kInt, op,
              ": row_map must be int32 (from permute), "
              "got ",
              row_map.scalar_type());
  TORCH_CHECK(row_map.dim() == 2 && row_map.size(0) == num_tokens, op,
              ": row_map must have "
              "shape [num_tokens, k] with num_tokens = ",
              tokens_from, " = ", num_tokens, ", got ", row_map.sizes(),
              "; is it from a permute call of another shape?");
  TORCH_CHECK(row_map.size(1) >= 1, op, ": row_map must have k >= 1 columns, got ",
              row_map.sizes());
  TORCH_CHECK(row_map.numel() < INT32_MAX, op,
              ": row_map must have num_tokens * k < 2^31 - 1 "
              "slots (as permute gives), got shape ",
              row_map.sizes());
}

// scatter_rows' index: int32 [n] on data's device (n: rows' count; -1 in the backward: any),
// and data's row count within int32 (index values are rows of it).
void scatter_rows_check_index(const at::Tensor& index, int64_t n, const at::Tensor& data,
                              const char* op) {
  TORCH_CHECK(index.scalar_type() == at::kInt, op, ": index must be int32, got ",
              index.scalar_type());
  if (n >= 0) {
    TORCH_CHECK(index.dim() == 1 && index.size(0) == n, op,
                ": index must be 1-D [n] with n = rows.size(0) = ", n, ", got shape ",
                index.sizes());
  } else {
    TORCH_CHECK(index.dim() == 1, op, ": index must be 1-D [n], got shape ", index.sizes());
  }
  TORCH_CHECK(index.size(0) < INT32_MAX, op, ": index must have < 2^31 - 1 entries, got ",
              index.size(0));
  check_same_device(index, data, op, "index", "the data");
  TORCH_CHECK(data.size(0) < INT32_MAX, op, ": the number of rows (", data.size(0),
              ") must be < 2^31 - 1 (index is int32)");
}

void check_weights(const std::optional<at::Tensor>& weights, const at::Tensor& row_map,
                   const at::Tensor& data, const char* op) {
  if (!weights) return;
  TORCH_CHECK(weights->sizes() == row_map.sizes(), op, ": weights must have the shape of row_map ",
              row_map.sizes(), " [num_tokens, k], got ", weights->sizes());
  const auto dt = weights->scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == data.scalar_type(), op,
              ": weights must be float32, float64 or the data's dtype (", data.scalar_type(),
              "), got ", dt);
  check_same_device(*weights, data, op, "weights", "the data");
}

}  // namespace

int64_t permute_check(const at::Tensor& x, const at::Tensor& ids, int64_t num_experts,
                      std::optional<int64_t> capacity, const std::optional<at::Tensor>& priority) {
  TORCH_CHECK(x.dim() == 2, "permute: x must be 2-D [num_tokens, hidden], got shape ", x.sizes());
  check_float(x, "permute", "x");
  TORCH_CHECK(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong,
              "permute: ids must be int32 or int64, got ", ids.scalar_type());
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == x.size(0),
              "permute: ids must have shape "
              "[num_tokens, k] with num_tokens = x.size(0) = ",
              x.size(0), ", got ", ids.sizes());
  TORCH_CHECK(ids.size(1) >= 1, "permute: ids must have k >= 1 columns, got ", ids.sizes());
  check_same_device(ids, x, "permute", "ids", "x");
  TORCH_CHECK(num_experts >= 1 && num_experts <= INT32_MAX,
              "permute: num_experts must be in "
              "[1, 2^31), got ",
              num_experts);
  const int64_t slots = ids.size(0) * ids.size(1);
  TORCH_CHECK(slots < INT32_MAX,
              "permute: num_tokens * k must be < 2^31 - 1 (row_map is int32), "
              "got ids of shape ",
              ids.sizes());
  if (capacity) TORCH_CHECK(*capacity >= 0, "permute: capacity must be >= 0, got ", *capacity);
  if (priority) {
    TORCH_CHECK(capacity.has_value(),
                "permute: priority only orders slots competing for "
                "capacity; give capacity too");
    TORCH_CHECK(priority->sizes() == ids.sizes(), "permute: priority must have the shape of ids ",
                ids.sizes(), ", got ", priority->sizes());
    TORCH_CHECK(at::isFloatingType(priority->scalar_type()),
                "permute: priority must be a "
                "floating point tensor, got ",
                priority->scalar_type());
    check_same_device(*priority, x, "permute", "priority", "x");
  }
  return permute::num_rows(ids.size(0), ids.size(1), num_experts, capacity ? *capacity : -1);
}

void permute_check_ids_values(const at::Tensor& ids, int64_t num_experts) {
  const at::Tensor c = ids.to(at::kLong).contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  const int64_t k = ids.size(1);
  for (int64_t i = 0; i < c.numel(); ++i)
    TORCH_CHECK(p[i] >= -1 && p[i] < num_experts,
                "permute: ids values must be in [-1, "
                "num_experts = ",
                num_experts, ") (-1: no expert), got ids[", i / k, ", ", i % k, "] = ", p[i]);
}

void unpermute_check(const at::Tensor& y_sorted, const at::Tensor& row_map,
                     const std::optional<at::Tensor>& weights) {
  TORCH_CHECK(y_sorted.dim() == 2,
              "unpermute: y_sorted must be 2-D [num_rows, hidden], got "
              "shape ",
              y_sorted.sizes());
  check_float(y_sorted, "unpermute", "y_sorted");
  TORCH_CHECK(row_map.dim() == 2, "unpermute: row_map must be 2-D [num_tokens, k], got shape ",
              row_map.sizes());
  check_row_map(row_map, row_map.size(0), "unpermute", "row_map.size(0)");
  check_same_device(row_map, y_sorted, "unpermute", "row_map", "y_sorted");
  check_weights(weights, row_map, y_sorted, "unpermute");
}

void unpermute_backward_check(const at::Tensor& grad_y, const at::Tensor& row_map,
                              const std::optional<at::Tensor>& weights, int64_t num_rows) {
  TORCH_CHECK(grad_y.dim() == 2,
              "unpermute_backward: grad_y must be 2-D [num_tokens, hidden], "
              "got shape ",
              grad_y.sizes());
  check_float(grad_y, "unpermute_backward", "grad_y");
  check_row_map(row_map, grad_y.size(0), "unpermute_backward", "grad_y.size(0)");
  check_same_device(row_map, grad_y, "unpermute_backward", "row_map", "grad_y");
  check_weights(weights, row_map, grad_y, "unpermute_backward");
  TORCH_CHECK(num_rows >= 0, "unpermute_backward: num_rows must be >= 0, got ", num_rows);
}

void unpermute_weights_backward_check(const at::Tensor& grad_y, const at::Tensor& y_sorted,
                                      const at::Tensor& row_map, const at::Tensor& weights) {
  const char* op = "unpermute_weights_backward";
  TORCH_CHECK(grad_y.dim() == 2 && y_sorted.dim() == 2, op,
              ": grad_y [num_tokens, hidden] and "
              "y_sorted [num_rows, hidden] must be 2-D, got ",
              grad_y.sizes(), " and ", y_sorted.sizes());
  check_float(grad_y, op, "grad_y");
  TORCH_CHECK(y_sorted.scalar_type() == grad_y.scalar_type() && y_sorted.size(1) == grad_y.size(1),
              op,
              ": y_sorted must match grad_y in dtype "
              "and hidden size, got ",
              y_sorted.scalar_type(), " ", y_sorted.sizes(), " and ", grad_y.scalar_type(), " ",
              grad_y.sizes());
  check_same_device(y_sorted, grad_y, op, "y_sorted", "grad_y");
  check_row_map(row_map, grad_y.size(0), op, "grad_y.size(0)");
  check_same_device(row_map, grad_y, op, "row_map", "grad_y");
  check_weights(weights, row_map, grad_y, op);
}

void rows_to_slots_check(const at::Tensor& rows, const at::Tensor& row_map, int64_t num_heads) {
  const char* op = "rows_to_slots";
  TORCH_CHECK(rows.dim() == 2, op, ": rows must be 2-D [num_rows, hidden], got shape ",
              rows.sizes());
  check_float(rows, op, "rows");
  TORCH_CHECK(row_map.dim() == 2, op, ": row_map must be 2-D [num_tokens, k], got shape ",
              row_map.sizes());
  check_row_map(row_map, row_map.size(0), op, "row_map.size(0)");
  check_same_device(row_map, rows, op, "row_map", "rows");
  TORCH_CHECK(num_heads >= 1, op, ": num_heads must be >= 1, got ", num_heads);
  TORCH_CHECK(rows.size(1) % num_heads == 0, op, ": rows.size(1) = ", rows.size(1),
              " must be divisible by num_heads = ", num_heads, " (hidden = num_heads * head_dim)");
}

void slots_to_rows_check(const at::Tensor& slots, const at::Tensor& row_map, int64_t num_rows) {
  const char* op = "slots_to_rows";
  TORCH_CHECK(slots.dim() == 4, op,
              ": slots must be 4-D [num_tokens, num_heads, k, head_dim], got shape ",
              slots.sizes());
  check_float(slots, op, "slots");
  check_row_map(row_map, slots.size(0), op, "slots.size(0)");
  TORCH_CHECK(row_map.size(1) == slots.size(2), op,
              ": row_map must have k = slots.size(2) = ", slots.size(2), " columns, got shape ",
              row_map.sizes());
  check_same_device(row_map, slots, op, "row_map", "slots");
  TORCH_CHECK(slots.size(1) >= 1, op,
              ": slots must have num_heads = slots.size(1) >= 1, got shape ", slots.sizes());
  TORCH_CHECK(num_rows >= 0, op, ": num_rows must be >= 0, got ", num_rows);
}

namespace {

// Walks row_map in slot order, raising at the first value outside [-1, num_rows) or row seen
// twice; seen: a container of min(num_rows, 1 + largest value) entries, mark(seen, r, i) records
// slot i on row r and returns whether r had a slot already. arg: the argument's name in messages
// (row_map [T, k] or scatter_rows' index [R]); hint: where valid values come from.
template <class Seen, class Mark>
Seen check_row_map_values(const at::Tensor& row_map, int64_t num_rows, const char* op,
                          typename Seen::value_type none, const Mark& mark,
                          const char* arg = "row_map", const char* what = "slots",
                          const char* hint =
                              "row_map must come from the permute call that "
                              "produced these rows") {
  const at::Tensor c = row_map.contiguous();
  const int32_t* p = c.data_ptr<int32_t>();
  const int64_t k = row_map.dim() == 2 ? row_map.size(1) : 1, n = c.numel();
  const auto where = [&](int64_t i) {
    return row_map.dim() == 2 ? std::to_string(i / k) + ", " + std::to_string(i % k)
                              : std::to_string(i);
  };
  int32_t largest = -1;
  for (int64_t i = 0; i < n; ++i) largest = std::max(largest, p[i]);
  Seen seen(static_cast<size_t>(std::min<int64_t>(num_rows, int64_t{largest} + 1)), none);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = p[i];
    TORCH_CHECK(r >= -1 && r < num_rows, op, ": ", arg,
                " values must be in [-1, num_rows = ", num_rows, "), got ", arg, "[", where(i),
                "] = ", r, "; ", hint);
    if (r < 0) continue;  // here r <= largest < seen.size()
    TORCH_CHECK(!mark(seen, r, i), op, ": ", arg, " maps two ", what, " to row ", r, " (at ", arg,
                "[", where(i), "]); ", hint);
  }
  return seen;
}

}  // namespace

void unpermute_check_row_map_values(const at::Tensor& row_map, int64_t num_rows, const char* op) {
  check_row_map_values<std::vector<bool>>(row_map, num_rows, op, false,
                                          [](std::vector<bool>& seen, int64_t r, int64_t) {
                                            const bool was = seen[r];
                                            seen[r] = true;
                                            return was;
                                          });
}

namespace {
bool mark_slot(std::vector<int32_t>& slot_of, int64_t r, int64_t i) {
  const bool was = slot_of[r] >= 0;
  slot_of[r] = static_cast<int32_t>(i);
  return was;
}
}  // namespace

std::vector<int32_t> row_map_inverse(const at::Tensor& row_map, int64_t num_rows, const char* op) {
  return check_row_map_values<std::vector<int32_t>>(row_map, num_rows, op, -1, mark_slot);
}

std::vector<int32_t> scatter_index_inverse(const at::Tensor& index, int64_t num_rows,
                                           const char* op) {
  return check_row_map_values<std::vector<int32_t>>(index, num_rows, op, -1, mark_slot, "index",
                                                    "entries",
                                                    "index must hold distinct rows of base, or -1");
}

void scatter_rows_check(const at::Tensor& base, const at::Tensor& rows, const at::Tensor& index) {
  const char* op = "scatter_rows";
  TORCH_CHECK(base.dim() == 2, op, ": base must be 2-D [num_rows, hidden], got shape ",
              base.sizes());
  check_float(base, op, "base");
  TORCH_CHECK(rows.dim() == 2 && rows.size(1) == base.size(1), op,
              ": rows must be 2-D [n, hidden = base.size(1) = ", base.size(1), "], got shape ",
              rows.sizes());
  TORCH_CHECK(rows.scalar_type() == base.scalar_type(), op, ": rows must have base's dtype ",
              base.scalar_type(), ", got ", rows.scalar_type());
  check_same_device(rows, base, op, "rows", "base");
  scatter_rows_check_index(index, rows.size(0), base, op);
}

void scatter_rows_backward_check(const at::Tensor& grad, const at::Tensor& index) {
  const char* op = "scatter_rows_backward";
  TORCH_CHECK(grad.dim() == 2, op, ": grad must be 2-D [num_rows, hidden], got shape ",
              grad.sizes());
  check_float(grad, op, "grad");
  scatter_rows_check_index(index, index.dim() == 1 ? index.size(0) : -1, grad, op);
}

void reorder_chunks_check(const at::Tensor& x, const at::Tensor& counts) {
  const char* op = "reorder_chunks";
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [num_rows, hidden], got shape ", x.sizes());
  check_float(x, op, "x");
  TORCH_CHECK(counts.scalar_type() == at::kInt, op, ": counts must be int32, got ",
              counts.scalar_type());
  TORCH_CHECK(counts.dim() == 2, op,
              ": counts must be 2-D [A, B] (chunk (a, b) has counts[a, b] rows), got shape ",
              counts.sizes());
  TORCH_CHECK(counts.size(0) >= 1 && counts.size(1) >= 1, op,
              ": counts must have A >= 1 and B >= 1, got shape ", counts.sizes());
  TORCH_CHECK(counts.numel() <= INT32_MAX, op, ": counts must have A * B < 2^31 chunks, got shape ",
              counts.sizes());
  check_same_device(counts, x, op, "counts", "x");
  TORCH_CHECK(x.size(0) <= INT32_MAX, op, ": x must have fewer than 2^31 rows (row offsets are ",
              "int32), got ", x.size(0));
}

std::vector<int64_t> reorder_chunks_source_offsets(const at::Tensor& counts, int64_t num_rows) {
  const at::Tensor c = counts.contiguous();
  const int32_t* p = c.data_ptr<int32_t>();
  const int64_t b = counts.size(1), n = c.numel();
  std::vector<int64_t> off(static_cast<size_t>(n) + 1);
  int64_t sum = 0;  // < 2^31 * 2^31: no overflow
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(p[i] >= 0, "reorder_chunks: counts[", i / b, ", ", i % b, "] = ", p[i],
                " must be >= 0");
    off[i] = sum;
    sum += p[i];
  }
  off[n] = sum;
  TORCH_CHECK(sum <= num_rows, "reorder_chunks: counts sum to ", sum, " rows, more than x has (",
              num_rows, ")");
  return off;
}

std::string permute_error_message(int32_t bits, const char* op, int64_t num_experts,
                                  int64_t num_rows) {
  std::string msg = std::string(op) + ": invalid input values:";
  if (bits & kIdsOutOfRange)
    msg += " ids values must be in [-1, num_experts = " + std::to_string(num_experts) +
           ") (treated as -1);";
  if (bits & kRowMapOutOfRange)
    msg += " row_map values must be in [-1, num_rows = " + std::to_string(num_rows) +
           ") (treated as -1); row_map must come from the permute call that produced the rows;";
  if (bits & kRowMapDuplicate)
    msg +=
        " row_map maps two slots to one row (only the last of them was written); "
        "row_map must come from the permute call that produced the rows;";
  return msg;
}

std::string scatter_rows_error_message(int32_t bits, const char* op, int64_t num_rows) {
  std::string msg = std::string(op) + ": invalid input values:";
  if (bits & kRowMapOutOfRange)
    msg += " index values must be in [-1, num_rows = " + std::to_string(num_rows) +
           ") (treated as -1);";
  if (bits & kRowMapDuplicate)
    msg += " index holds a row twice (one of them was written); index must hold distinct rows;";
  return msg;
}

std::string reorder_chunks_error_message(int32_t bits, const char* op, int64_t num_rows) {
  std::string msg = std::string(op) + ": invalid input values:";
  if (bits & kCountsNegative) msg += " counts values must be >= 0 (treated as 0);";
  if (bits & kCountsPastRows)
    msg += " counts sum to more rows than x has (num_rows = " + std::to_string(num_rows) +
           "; the chunks were cut at row " + std::to_string(num_rows) + ");";
  return msg;
}

// The messages of the permute family's device error slots (mixops.check_errors, MIXOPS_DEBUG=1);
// contexts: a = num_experts, b = num_rows.
const bool kPermuteMessagesRegistered = [] {
  register_error_message(ErrorSlot::kPermute, [](int32_t bits, const ErrorContext& c) {
    return permute_error_message(bits, "permute", c.a, c.b);
  });
  register_error_message(ErrorSlot::kUnpermute, [](int32_t bits, const ErrorContext& c) {
    return permute_error_message(bits, "unpermute", c.a, c.b);
  });
  register_error_message(ErrorSlot::kUnpermuteBackward, [](int32_t bits, const ErrorContext& c) {
    return permute_error_message(bits, "unpermute_backward", c.a, c.b);
  });
  register_error_message(
      ErrorSlot::kUnpermuteWeightsBackward, [](int32_t bits, const ErrorContext& c) {
        return permute_error_message(bits, "unpermute_weights_backward", c.a, c.b);
      });
  register_error_message(ErrorSlot::kRowsToSlots, [](int32_t bits, const ErrorContext& c) {
    return permute_error_message(bits, "rows_to_slots", c.a, c.b);
  });
  register_error_message(ErrorSlot::kSlotsToRows, [](int32_t bits, const ErrorContext& c) {
    return permute_error_message(bits, "slots_to_rows", c.a, c.b);
  });
  register_error_message(ErrorSlot::kScatterRows, [](int32_t bits, const ErrorContext& c) {
    return scatter_rows_error_message(bits, "scatter_rows", c.b);
  });
  register_error_message(ErrorSlot::kScatterRowsBackward, [](int32_t bits, const ErrorContext& c) {
    return scatter_rows_error_message(bits, "scatter_rows_backward", c.b);
  });
  register_error_message(ErrorSlot::kReorderChunks, [](int32_t bits, const ErrorContext& c) {
    return reorder_chunks_error_message(bits, "reorder_chunks", c.b);
  });
  return true;
}();

}  // namespace mixops
