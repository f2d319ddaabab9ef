// permute / unpermute: the parameter structs handed to the CPU and CUDA kernels and the index
// arithmetic both call (MIXOPS_HOST_DEVICE). No torch here.
//
// Slots. Token t's j-th choice is slot i = t * k + j ("token-major"); ids[t, j] names its expert,
// -1 meaning "no expert" (no row). Each slot with an expert gets one row of x_sorted:
//   rows of expert e are offsets[e-1] .. offsets[e]-1 (offsets[-1] = 0), in slot order (token
//   order, then choice), i.e. a stable sort of the slots by expert;
//   rows offsets[E-1] .. num_rows-1 are zero (no-expert and dropped slots leave the tail empty).
//
// Row map (the format MoA and expert parallelism reuse): row_map [num_tokens, k] int32,
//   row_map[t, j] = the row of x_sorted holding slot (t, j), or -1 (kNoRow) when the slot has no
//   expert or was dropped by capacity. unpermute gathers y[t] = sum_j w[t, j] * y_sorted[row_map
//   [t, j]] over the slots with a row, in order j = 0..k-1, in fp32 (each token its own rows: no
//   atomics, deterministic); permute's backward is the same gather with w = 1.
//
// Capacity (optional): each expert keeps at most `capacity` slots. Which ones: slots compete in
// priority order (as in GShard/Switch) -- every first choice (j = 0) before any second choice,
// and so on; inside one choice rank, token order, or with `priority` given, higher priority
// first (ties and NaN: token order, NaN last). The first `capacity` slots of each expert in that
// order are kept; the rest are dropped (row_map -1) and counted in dropped[e]. Kept slots are
// then laid out as above (slot order). num_rows = min(T * k, E * capacity), a static bound.
//
// Slot layout (MoA): the rows of permute's order as attention queries. Each row [num_heads * d]
// is num_heads heads of d columns; slots [T, num_heads, k, d] holds, at [t, h, j], head h of the
// row of slot (t, j) (zeros when row_map[t, j] == -1). Viewed as [B, S, num_heads * k, d] and
// transposed to [B, num_heads * k, S, d] it is SDPA's query layout with enable_gqa (query head
// h * k + j uses kv head h), without a copy. rows_to_slots gathers rows into slots (a token per
// task, no atomics); slots_to_rows is its inverse and backward: each row takes its slot's heads,
// rows no slot maps to are zero (CUDA: permute's inverse map row -> slot, as unpermute_backward).
//
// Row write-back (MoD): scatter_rows(base [T, H], rows [n, H], index [n]) is base with row
// index[i] replaced by rows[i] (index -1: none; the others distinct). Both backends walk the
// output in row order through the inverse map row -> i (a gather: no atomics, and the copy of
// base is the same pass): out[r] = rows[slot_of[r]] or base[r]. The backward: grad_base[r] = 0
// for written rows, else grad[r]; grad_rows[i] = grad[index[i]] (zeros for -1).
//
// Chunk reorder (expert parallelism: received rows regrouped by local expert): reorder_chunks(x
// [N, H], counts [A, B] int32) holds A * B chunks back to back in (a, b) order, chunk (a, b)
// being counts[a, b] consecutive rows; y [N, H] holds the same chunks in (b, a) order (the chunk
// order of counts.t()), rows past S = sum(counts) zero (x's rows past S are not read). Both
// backends take exclusive prefix sums of counts in both orders (src_off in (a, b) order, dst_off
// in (b, a) order, each with the total appended) and write y in row order: row r lies in the
// chunk whose dst_off range holds it (a binary search over dst_off) and copies x[src_off + r -
// dst_off]. The backward is the inverse reorder, reorder_chunks(grad_y, counts.t()). Bad counts
// (negative, or summing past N) raise on CPU; CUDA flags them (kCountsNegative, kCountsPastRows)
// and clamps: a negative count is 0, and the chunks are cut at row N of x (a chunk past it is
// empty, the one across it truncated), so y still holds exactly the rows of x below N that the
// clamped counts name.
#pragma once

#include <cstdint>

#include "core/dtype.h"
#include "core/macros.h"

namespace mixops {

constexpr int32_t kNoRow = -1;

// Bits of the CUDA error flag (value checks the host cannot make without a sync).
enum PermuteError : int32_t {
  kIdsOutOfRange = 1,     // some ids[t, j] outside [-1, num_experts): treated as -1
  kRowMapOutOfRange = 2,  // some row_map[t, j] outside [-1, num_rows): treated as -1
  kRowMapDuplicate = 4,   // unpermute_backward, slots_to_rows: two slots map to one row (the last
                          // slot is kept)
  kCountsNegative = 8,    // reorder_chunks: some counts[a, b] < 0: treated as 0
  kCountsPastRows = 16,   // reorder_chunks: the counts sum past x's rows: chunks cut at row N
};

struct PermuteParams {
  Dtype dtype;          // of x and x_sorted
  int64_t num_tokens;   // T
  int32_t k;            // choices per token
  int32_t num_experts;  // E
  int64_t hidden;       // H
  int64_t capacity;     // slots per expert; < 0: dropless
  int64_t num_rows;     // permute_num_rows(T, k, E, capacity)
  const void* x;        // [T, H], row stride x_stride, unit column stride
  int64_t x_stride;
  const void* ids;  // [T, k] contiguous, int32 or int64 (ids_int64)
  bool ids_int64;
  const float* priority;  // [T, k] contiguous fp32, nullable (capacity priority by weight)
  void* x_sorted;         // [num_rows, H] contiguous
  int32_t* offsets;       // [E] cumulative row ends
  int32_t* row_map;       // [T, k]
  int32_t* dropped;       // [E] dropped slots per expert
  int32_t* error_flag;    // nullable; CUDA: the op's device error slot (core/errors.h)
};

struct UnpermuteParams {
  Dtype dtype;          // of y_sorted and y
  Dtype weights_dtype;  // fp32, fp64, or y's dtype
  int64_t num_tokens;   // T
  int32_t k;
  int64_t hidden;        // H
  int64_t num_rows;      // rows of y_sorted
  const void* y_sorted;  // [num_rows, H], row stride y_sorted_stride, unit column stride
  int64_t y_sorted_stride;
  const int32_t* row_map;  // [T, k] contiguous
  const void* weights;     // [T, k] contiguous, nullable (= all ones)
  void* y;                 // [T, H] contiguous
  int32_t* error_flag;
};

// Backward of unpermute (rows): grad_y_sorted[row_map[t, j]] = w[t, j] * grad_y[t], rows no slot
// maps to are zero. Backward (weights): grad_w[t, j] = <grad_y[t], y_sorted[row_map[t, j]]>
// (0 for slots without a row), accumulated in fp32 (fp64 for fp64).
struct UnpermuteBackwardParams {
  Dtype dtype;  // of grad_y, y_sorted, grad_y_sorted
  Dtype weights_dtype;
  int64_t num_tokens, hidden, num_rows;
  int32_t k;
  const void* grad_y;    // [T, H] contiguous
  const void* y_sorted;  // [num_rows, H] row stride y_sorted_stride (weights backward only)
  int64_t y_sorted_stride;
  const int32_t* row_map;  // [T, k]
  const void* weights;     // [T, k], nullable (= ones)
  void* grad_y_sorted;     // [num_rows, H] contiguous (rows backward)
  void* grad_weights;      // [T, k] in weights_dtype (weights backward)
  int32_t* error_flag;
};

// scatter_rows and its backward as row selections: dst[r] = a[map[r]] when 0 <= map[r] < a_rows
// (zeros when a is null), else b[r] (zeros when b is null). Forward: dst = out, map = the inverse
// of index, a = rows, b = base. Backward: grad_base (map = the inverse, a null, b = grad), then
// grad_rows (map = index, a = grad, b null).
struct SelectRowsParams {
  Dtype dtype;         // of a, b and dst
  int64_t dst_rows;    // rows of dst (and of b, and of map)
  int64_t a_rows;      // rows of a: map values in [0, a_rows) pick a row of a
  int64_t hidden;      // H
  const int32_t* map;  // [dst_rows] contiguous
  const void* a;       // [a_rows, H], row stride a_stride, unit column stride; nullable
  int64_t a_stride;
  const void* b;  // [dst_rows, H], row stride b_stride; nullable
  int64_t b_stride;
  void* dst;            // [dst_rows, H] contiguous
  int32_t* error_flag;  // nullable: map values outside [-1, a_rows) set kRowMapOutOfRange
};

// reorder_chunks (chunks of x in (a, b) order -> y in (b, a) order; the backward is the same op
// with counts transposed).
struct ReorderChunksParams {
  Dtype dtype;            // of x and y
  int64_t num_rows;       // N, rows of x and of y (< 2^31)
  int64_t hidden;         // H
  int64_t num_a;          // A: counts [A, B], A * B < 2^31
  int64_t num_b;          // B
  const int32_t* counts;  // [A, B] contiguous
  const void* x;          // [N, H], row stride x_stride, unit column stride
  int64_t x_stride;
  void* y;              // [N, H] contiguous
  int32_t* error_flag;  // nullable: kCountsNegative, kCountsPastRows
};

// rows_to_slots (rows -> slots) and slots_to_rows (slots -> rows): one struct, both directions.
struct SlotsParams {
  Dtype dtype;            // of rows and slots
  int64_t num_tokens;     // T
  int32_t k;              // slots per token
  int64_t num_heads;      // heads per row (>= 1)
  int64_t head_dim;       // d; rows have num_heads * d columns
  int64_t num_rows;       // rows of `rows`
  void* rows;             // [num_rows, num_heads * d], row stride rows_stride, unit column stride
  int64_t rows_stride;    // (rows_to_slots reads it; slots_to_rows writes it, contiguous)
  void* slots;            // [T, num_heads, k, d], strides slot_stride_{t,h,j}, unit last stride
  int64_t slot_stride_t;  // (slots_to_rows reads it; rows_to_slots writes it, contiguous)
  int64_t slot_stride_h;
  int64_t slot_stride_j;
  const int32_t* row_map;  // [T, k] contiguous
  int32_t* error_flag;
};

namespace permute {

// min(T * k, E * capacity) without forming E * capacity, which wraps for huge capacities
// (2^62 + 100 with E = 4 gave 400 rows for 2000 slots): E * capacity >= slots exactly when
// capacity > slots / E (floor), so any capacity >= slots means "nothing dropped", and the product
// is only formed when it is <= slots. num_experts >= 1 (permute_check).
MIXOPS_INLINE int64_t num_rows(int64_t num_tokens, int64_t k, int64_t num_experts,
                               int64_t capacity) {
  const int64_t slots = num_tokens * k;
  if (capacity < 0 || capacity > slots / num_experts) return slots;
  return num_experts * capacity;
}

// The expert of a slot's id, or -1 (no expert). An id outside [-1, E) sets *bad and gives -1.
MIXOPS_INLINE int32_t expert_of(int64_t id, int32_t num_experts, bool* bad) {
  if (id == -1) return -1;
  if (id < 0 || id >= num_experts) {
    *bad = true;
    return -1;
  }
  return static_cast<int32_t>(id);
}

// The row a row-map entry points at, or -1. Outside [-1, num_rows) sets *bad and gives -1.
MIXOPS_INLINE int64_t row_of(int32_t r, int64_t num_rows, bool* bad) {
  if (r == kNoRow) return -1;
  if (r < 0 || r >= num_rows) {
    *bad = true;
    return -1;
  }
  return r;
}

// Capacity priority inside one choice rank and expert: does slot a (priority pa, token ta) come
// before slot b? By priority (higher first, NaN last) when by_priority, then by token.
MIXOPS_INLINE bool priority_before(bool by_priority, float pa, int64_t ta, float pb, int64_t tb) {
  if (by_priority) {
    const bool na = pa != pa, nb = pb != pb;
    if (na != nb) return nb;
    if (!na && pa != pb) return pa > pb;
  }
  return ta < tb;
}

// A float priority as an unsigned key whose ascending order is priority_before's order (higher
// first, NaN last); ties are left to a stable sort by token. For radix sorts.
MIXOPS_INLINE uint32_t priority_sort_key(float p) {
  if (p != p) return 0xffffffffu;
  if (p == 0.0f) p = 0.0f;  // -0 == +0
  uint32_t b;
#if defined(__CUDA_ARCH__)
  b = __float_as_uint(p);
#else
  __builtin_memcpy(&b, &p, sizeof b);
#endif
  const uint32_t ascending = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  return ~ascending;  // descending; < 0xffffffff for every non-NaN value
}

// Slots are counted in chunks of this many (a chunk = one CUDA block's share; the CPU uses the
// same chunks so its per-chunk partial counts are laid out alike).
constexpr int64_t kChunkSlots = 2048;

// reorder_chunks: the (a, b) chunk that is the j-th in (b, a) order, as its index a * B + b in
// counts (row-major). j in [0, A * B).
MIXOPS_INLINE int64_t chunk_of_transposed(int64_t j, int64_t num_a, int64_t num_b) {
  return (j % num_a) * num_b + j / num_a;
}

// The chunk j < n whose rows off[j] .. off[j + 1] - 1 hold row r, for non-decreasing offsets
// off[0..n] with off[0] <= r < off[n]: the last j with off[j] <= r (so never an empty chunk).
template <class Off>
MIXOPS_INLINE int64_t chunk_holding(const Off* off, int64_t n, int64_t r) {
  int64_t lo = 0, hi = n;  // off[lo] <= r < off[hi]
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (off[mid] <= r) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

MIXOPS_INLINE int64_t num_chunks(int64_t slots) { return (slots + kChunkSlots - 1) / kChunkSlots; }

}  // namespace permute
}  // namespace mixops
