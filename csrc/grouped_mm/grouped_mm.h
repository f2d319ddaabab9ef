// grouped_mm: the plain parameter struct handed from the op layer to the CPU and CUDA kernels,
// and the per-group problem arithmetic both backends share (MIXOPS_HOST_DEVICE), so CPU tests
// exercise the exact index math the GPU runs. No torch, no CUDA, no CUTLASS here.
//
// Two modes (see csrc/ops.cpp for the op contract):
//   ragged_k == false ("2-D x 3-D"): a [m, k], b [E, k, n], out [m, n]; group g owns rows
//       [offsets[g-1], offsets[g]) of a and out; rows >= offsets[E-1] of out are zero.
//   ragged_k == true  ("2-D x 2-D"): a [m, k], b [k, n], out [E, m, n]; group g owns the shared
//       columns/rows [offsets[g-1], offsets[g]) of a/b; an empty group gives a zero block.
// And the four packed modes of grouped_mm_packed (packed != kNone): groups differ in one more
// dimension, group g owning [ends[g-1], ends[g]) (width w_g <= width) of a packed dimension of
// size total; see PackedDim below and csrc/ops.cpp.
#pragma once

#include <cstdint>

#include "core/dtype.h"
#include "core/macros.h"

namespace mixops {

// Bits written to GroupedMmParams::error_flag (OR-ed together).
enum GroupedMmError : int32_t {
  kOffsetsNegative = 1,    // some offsets[g] < 0
  kOffsetsDecreasing = 2,  // some offsets[g] < offsets[g-1]
  kOffsetsPastEnd = 4,     // some offsets[g] > total (m for 2-D x 3-D, k for 2-D x 2-D)
  // grouped_mm_packed's ends (the bits of offsets, shifted by kEndsShift), and widths:
  kEndsNegative = 8,     // some ends[g] < 0
  kEndsDecreasing = 16,  // some ends[g] < ends[g-1]
  kEndsPastEnd = 32,     // some ends[g] > total
  kWidthPastMax = 64,    // some ends[g] - ends[g-1] > width
};
constexpr int kEndsShift = 3;

// Which GEMM dimension of grouped_mm_packed's groups is packed (offsets group the ragged one):
//   kNone  grouped_mm's two modes;
//   kN     mode "mn" (!ragged_k: a [m, k], b [k, total], out [m, width], p.n = width) or
//          mode "kn" (ragged_k: a [m, r], b [r, width], out [m, total], p.n = width);
//   kK     mode "mk" (!ragged_k: a [m, width], b [total, n], out [m, n], p.k = width);
//   kM     mode "km" (ragged_k: a [width, r], b [r, n], out [total, n], p.m = width).
// b is 2-D in every packed mode (b_stride_e and out_stride_e unused). Zero-initialised params
// (packed = kNone, ends = nullptr, width = total = 0) are grouped_mm's.
enum class PackedDim : int32_t { kNone = 0, kN = 1, kK = 2, kM = 3 };

struct GroupedMmParams {
  Dtype dtype;
  bool ragged_k;       // false: 2-D x 3-D; true: 2-D x 2-D
  int32_t num_groups;  // E
  int64_t m, n, k;     // a is [m, k]; b is [E, k, n] or [k, n]; out is [m, n] or [E, m, n]

  // Element strides. a(i, kk) = a[i * a_stride_m + kk * a_stride_k], likewise for b and out.
  // The layouts name which stride is 1 (the op layer canonicalises, so kernels may rely on them):
  // kRowMajor: stride along the last dim is 1, ld is the other stride; kColMajor the opposite.
  const void* a;
  int64_t a_stride_m, a_stride_k;
  Layout a_layout;
  const void* b;
  int64_t b_stride_e, b_stride_k, b_stride_n;  // b_stride_e unused when ragged_k
  Layout b_layout;
  void* out;                           // always row-major with unit stride along n
  int64_t out_stride_e, out_stride_m;  // out_stride_e unused when !ragged_k

  const int32_t* offsets;  // [E] cumulative group ends, int32 (device memory for CUDA)
  int32_t* error_flag;     // nullable; CUDA: the op's device error slot (core/errors.h)

  // grouped_mm_packed only (zero for grouped_mm):
  PackedDim packed;
  const int32_t* ends;  // [E] cumulative ends over the packed dimension, int32 (like offsets)
  int64_t width;        // the largest width a group may have (the packed operand's padded size)
  int64_t total;        // the packed dimension's size (ends[E-1] <= total)
};

// One group's GEMM: out_g[gm, gn] = a_g[gm, gk] @ b_g[gk, gn]; element offsets of each
// operand's first element from the base pointers, in 64-bit (rows x hidden can pass 2^31).
struct GroupProblem {
  int64_t gm, gn, gk;
  int64_t a_offset, b_offset, out_offset;
  int64_t begin, end;    // the clamped range of the ragged dimension
  int64_t pbegin, pend;  // packed modes: the clamped range [ends[g-1], ends[g]) (pend - pbegin
                         // may exceed gw only for invalid ends); zero otherwise
};

MIXOPS_INLINE int64_t grouped_mm_total(const GroupedMmParams& p) { return p.ragged_k ? p.k : p.m; }

// Clamped bounds of group g: begin = clamp(offsets[g-1], 0, total), end in [begin, total].
// Invalid offsets set bits in *error (never read past total, never a negative length).
MIXOPS_INLINE void grouped_mm_group_bounds(const int32_t* offsets, int32_t g, int64_t total,
                                           int64_t* begin, int64_t* end, int32_t* error) {
  int64_t prev = g == 0 ? 0 : static_cast<int64_t>(offsets[g - 1]);
  int64_t cur = static_cast<int64_t>(offsets[g]);
  int32_t err = 0;
  if (cur < 0) err |= kOffsetsNegative;
  if (cur < prev) err |= kOffsetsDecreasing;
  if (cur > total) err |= kOffsetsPastEnd;
  auto clamp = [total](int64_t v) { return v < 0 ? int64_t(0) : (v > total ? total : v); };
  prev = clamp(prev);
  cur = clamp(cur);
  if (cur < prev) cur = prev;
  *begin = prev;
  *end = cur;
  *error = err;
}

// Packed range of group g: [ends[g-1], ends[g]) clamped as offsets are (bits shifted to the
// kEnds* ones); *w = its width, clamped to p.width (kWidthPastMax).
MIXOPS_INLINE void grouped_mm_packed_bounds(const GroupedMmParams& p, int32_t g, int64_t* begin,
                                            int64_t* end, int64_t* w, int32_t* error) {
  int32_t err = 0;
  grouped_mm_group_bounds(p.ends, g, p.total, begin, end, &err);
  err <<= kEndsShift;
  *w = *end - *begin;
  if (*w > p.width) {
    err |= kWidthPastMax;
    *w = p.width;
  }
  *error = err;
}

// grouped_mm_packed's group g (the table of csrc/ops.cpp): the ragged range from offsets as in
// grouped_mm, the packed range from ends; only one operand or the output moves along it.
MIXOPS_INLINE GroupProblem grouped_mm_packed_problem(const GroupedMmParams& p, int32_t g,
                                                     int32_t* error) {
  GroupProblem q;
  int32_t err_off = 0, err_ends = 0;
  grouped_mm_group_bounds(p.offsets, g, grouped_mm_total(p), &q.begin, &q.end, &err_off);
  int64_t w;
  grouped_mm_packed_bounds(p, g, &q.pbegin, &q.pend, &w, &err_ends);
  *error = err_off | err_ends;
  const int64_t len = q.end - q.begin;
  if (!p.ragged_k) {  // mn, mk: rows [begin, end) of a and out
    q.gm = len;
    q.a_offset = q.begin * p.a_stride_m;
    q.out_offset = q.begin * p.out_stride_m;
    const bool n_packed = p.packed == PackedDim::kN;
    q.gn = n_packed ? w : p.n;
    q.gk = n_packed ? p.k : w;
    q.b_offset = q.pbegin * (n_packed ? p.b_stride_n : p.b_stride_k);
  } else {  // km, kn: the shared dimension [begin, end) of a and b
    q.gk = len;
    q.a_offset = q.begin * p.a_stride_k;
    q.b_offset = q.begin * p.b_stride_k;
    const bool m_packed = p.packed == PackedDim::kM;
    q.gm = m_packed ? w : p.m;
    q.gn = m_packed ? p.n : w;
    q.out_offset = m_packed ? q.pbegin * p.out_stride_m : q.pbegin;  // out rows / out columns
  }
  return q;
}

MIXOPS_INLINE GroupProblem grouped_mm_group_problem(const GroupedMmParams& p, int32_t g,
                                                    int32_t* error) {
  if (p.packed != PackedDim::kNone) return grouped_mm_packed_problem(p, g, error);
  GroupProblem q;
  q.pbegin = q.pend = 0;
  grouped_mm_group_bounds(p.offsets, g, grouped_mm_total(p), &q.begin, &q.end, error);
  const int64_t len = q.end - q.begin;
  if (p.ragged_k) {
    q.gm = p.m;
    q.gn = p.n;
    q.gk = len;
    q.a_offset = q.begin * p.a_stride_k;
    q.b_offset = q.begin * p.b_stride_k;
    q.out_offset = static_cast<int64_t>(g) * p.out_stride_e;
  } else {
    q.gm = len;
    q.gn = p.n;
    q.gk = p.k;
    q.a_offset = q.begin * p.a_stride_m;
    q.b_offset = static_cast<int64_t>(g) * p.b_stride_e;
    q.out_offset = q.begin * p.out_stride_m;
  }
  return q;
}

// A rectangle of the output (row-major [out_rows, out_cols] view of p.out) that some kernel must
// zero in a packed mode: what a group owns but its GEMM does not write.
struct OutRect {
  int64_t row0, rows, col0, cols;
};

MIXOPS_INLINE int64_t grouped_mm_packed_out_rows(const GroupedMmParams& p) {
  return p.packed == PackedDim::kM ? p.total : p.m;
}
MIXOPS_INLINE int64_t grouped_mm_packed_out_cols(const GroupedMmParams& p) {
  return p.ragged_k && p.packed == PackedDim::kN ? p.total : p.n;
}

// Group g (problem q) owns out rows [begin, end) x all columns (mn, mk), out rows [pbegin, pend)
// (km) or out columns [pbegin, pend) (kn); its GEMM writes the first gn columns / gm rows / gn
// columns of that, or nothing when gk == 0 (an empty sum). The rest is returned: mn's padding
// columns [w, width), a whole block when gk == 0, and with invalid ends what the width clamp cut.
MIXOPS_INLINE OutRect grouped_mm_packed_zero_rect(const GroupedMmParams& p, const GroupProblem& q) {
  const bool empty = q.gk == 0;
  if (!p.ragged_k) {
    const int64_t c0 = empty ? 0 : q.gn;
    return {q.begin, q.end - q.begin, c0, grouped_mm_packed_out_cols(p) - c0};
  }
  if (p.packed == PackedDim::kM) {
    const int64_t r0 = q.pbegin + (empty ? 0 : q.gm);
    return {r0, q.pend - r0, 0, p.n};
  }
  const int64_t c0 = q.pbegin + (empty ? 0 : q.gn);
  return {0, p.m, c0, q.pend - c0};
}

// What no group owns: the rows after the last group's (mn, mk: end = its clamped offsets end;
// km: pend) or the columns after it (kn: pend); E == 0: end = pend = 0, the whole output.
MIXOPS_INLINE OutRect grouped_mm_packed_tail_rect(const GroupedMmParams& p, int64_t end,
                                                  int64_t pend) {
  const int64_t rows = grouped_mm_packed_out_rows(p), cols = grouped_mm_packed_out_cols(p);
  if (!p.ragged_k) return {end, rows - end, 0, cols};
  if (p.packed == PackedDim::kM) return {pend, rows - pend, 0, cols};
  return {0, rows, pend, cols - pend};
}

// Leading dimension of an operand in its canonical layout.
MIXOPS_INLINE int64_t grouped_mm_lda(const GroupedMmParams& p) {
  return p.a_layout == Layout::kRowMajor ? p.a_stride_m : p.a_stride_k;
}
MIXOPS_INLINE int64_t grouped_mm_ldb(const GroupedMmParams& p) {
  return p.b_layout == Layout::kRowMajor ? p.b_stride_k : p.b_stride_n;
}

// Per-group alignment. The CUTLASS kernels load 16-byte vectors (8 bf16/fp16 elements, 4 fp32
// ones): TMA (SM90) and CUTLASS 2's tensor-op iterators (SM80, TF32) both need each operand's first
// element 16-byte aligned. The base pointers and leading dimensions are checked on the host (path.h),
// but a group that starts inside a unit-stride dimension starts at an arbitrary element: A for
// ragged_k with row-major A (a + begin), B for ragged_k with col-major B (b + begin), A for
// !ragged_k with col-major A (a + begin). Offsets live on the device, so this is decided per group
// there, by one predicate the argument builder and the fallback kernel share: the builder gives the
// groups that fail it no CUTLASS tiles, and the fallback kernel computes exactly those.
MIXOPS_INLINE bool grouped_mm_ragged_may_misalign(const GroupedMmParams& p) {
  return p.ragged_k ? (p.a_layout == Layout::kRowMajor || p.b_layout == Layout::kColMajor)
                    : p.a_layout == Layout::kColMajor;
}
// Packed modes: a group also starts anywhere along the packed dimension and has any width there,
// which is unit-stride in out for mn and kn (and in a or b for some layouts): always per group.
MIXOPS_INLINE bool grouped_mm_may_misalign(const GroupedMmParams& p) {
  return p.packed != PackedDim::kNone || grouped_mm_ragged_may_misalign(p);
}

// A packed group's width (its extent along the packed GEMM dimension); 0 for grouped_mm.
MIXOPS_INLINE int64_t grouped_mm_packed_width(const GroupedMmParams& p, const GroupProblem& q) {
  switch (p.packed) {
    case PackedDim::kN: return q.gn;
    case PackedDim::kK: return q.gk;
    case PackedDim::kM: return q.gm;
    default: return 0;
  }
}

// Which groups a CUTLASS path can take:
//   kAny       every group (alignment-1 kernels: fp32 SIMT; the fallback kernel itself);
//   kTma       each operand's first element 16-byte aligned (TMA zero-fills partial tiles itself);
//   kCutlass2  that, and the group's extent along a unit-stride ragged dimension a whole number of
//              vectors: CUTLASS 2's predicated iterators guard whole vectors, so a partial one
//              would read (and multiply) elements of the next group.
enum class GroupAlignRule : int32_t { kAny = 0, kTma = 1, kCutlass2 = 2 };

MIXOPS_INLINE bool grouped_mm_group_aligned(const GroupedMmParams& p, const GroupProblem& q,
                                            GroupAlignRule rule) {
  if (rule == GroupAlignRule::kAny) return true;
  const int64_t mask = 16 / dtype_size(p.dtype) - 1;  // elements per 16 bytes, minus one
  if (((q.a_offset | q.b_offset | q.out_offset) & mask) != 0) return false;
  if (rule == GroupAlignRule::kTma || !grouped_mm_may_misalign(p)) return true;
  // kCutlass2 in a packed mode: also a whole number of vectors along the packed dimension (its
  // epilogue would otherwise write up to a vector of padding past the group's width).
  const int64_t ragged = grouped_mm_ragged_may_misalign(p) ? q.end - q.begin : 0;
  return ((ragged | grouped_mm_packed_width(p, q)) & mask) == 0;
}

}  // namespace mixops
