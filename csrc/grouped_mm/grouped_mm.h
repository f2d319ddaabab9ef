// grouped_mm: the plain parameter struct handed from the op layer to the CPU and CUDA kernels,
// and the per-group problem arithmetic both backends share (MIXOPS_HOST_DEVICE), so CPU tests
// exercise the exact index math the GPU runs. No torch, no CUDA, no CUTLASS here.
//
// Two modes (see csrc/ops.cpp for the op contract):
//   ragged_k == false ("2-D x 3-D"): a [m, k], b [E, k, n], out [m, n]; group g owns rows
//       [offsets[g-1], offsets[g]) of a and out; rows >= offsets[E-1] of out are zero.
//   ragged_k == true  ("2-D x 2-D"): a [m, k], b [k, n], out [E, m, n]; group g owns the shared
//       columns/rows [offsets[g-1], offsets[g]) of a/b; an empty group gives a zero block.
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
};

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
};

// One group's GEMM: out_g[gm, gn] = a_g[gm, gk] @ b_g[gk, gn]; element offsets of each
// operand's first element from the base pointers, in 64-bit (rows x hidden can pass 2^31).
struct GroupProblem {
  int64_t gm, gn, gk;
  int64_t a_offset, b_offset, out_offset;
  int64_t begin, end;  // the clamped range of the ragged dimension
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

MIXOPS_INLINE GroupProblem grouped_mm_group_problem(const GroupedMmParams& p, int32_t g,
                                                    int32_t* error) {
  GroupProblem q;
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
MIXOPS_INLINE bool grouped_mm_may_misalign(const GroupedMmParams& p) {
  return p.ragged_k ? (p.a_layout == Layout::kRowMajor || p.b_layout == Layout::kColMajor)
                    : p.a_layout == Layout::kColMajor;
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
  return ((q.end - q.begin) & mask) == 0;
}

}  // namespace mixops
