// Device-side error reporting, torch-free: every CUDA op that can meet bad input *values* (offsets,
// ids, row_map, modality, counts: reading them on the host would need a sync) has one slot in a
// small per-device int32 array that lives for the whole process. Its kernels clamp the bad values
// and OR the family's error bits (GroupedMmError, RouterError, PermuteError) into the slot; bits
// stay set until mixops.check_errors() (or MIXOPS_DEBUG=1 after every call) reads and clears them.
#pragma once

#include <cstdint>
#include <string>

namespace mixops {

enum class ErrorSlot : int32_t {
  kGroupedMm = 0,
  kRouterTopk,
  kRouterTopkBackward,
  kPermute,
  kUnpermute,
  kUnpermuteBackward,
  kUnpermuteWeightsBackward,
  kRowsToSlots,
  kSlotsToRows,
  kScatterRows,
  kScatterRowsBackward,
  kReorderChunks,
  kGroupedMmPacked,
  kCount,
};
constexpr int kNumErrorSlots = static_cast<int>(ErrorSlot::kCount);

// The op name of a slot ("grouped_mm", ...), nullptr for an invalid slot.
inline const char* error_slot_name(ErrorSlot s) {
  constexpr const char* kNames[kNumErrorSlots] = {
      "grouped_mm",       "router_topk",        "router_topk_backward",       "permute",
      "unpermute",        "unpermute_backward", "unpermute_weights_backward", "rows_to_slots",
      "slots_to_rows",    "scatter_rows",       "scatter_rows_backward",      "reorder_chunks",
      "grouped_mm_packed"};
  const int i = static_cast<int>(s);
  return i >= 0 && i < kNumErrorSlots ? kNames[i] : nullptr;
}

// What a message needs besides the bits (e.g. num_experts, num_rows): two sizes and a name, as
// the op layer knew them when it launched.
struct ErrorContext {
  int64_t a = 0, b = 0;
  const char* what = "";  // a string literal
};

// The CPU path's message for these bits of this slot (each family registers its own).
using ErrorMessageFn = std::string (*)(int32_t bits, const ErrorContext& ctx);

}  // namespace mixops
