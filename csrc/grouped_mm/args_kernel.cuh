// grouped_mm: the device-side argument builder of the CUTLASS grouped GEMMs (SM80 GemmGrouped and
// SM90 ptr-array). Offsets live in device memory and must not be read by the host (no sync,
// CUDA-graph capturable), so each group's problem size, operand pointers and leading dimensions
// are written here, one thread per group, right before the GEMM on the same stream.
//
// Templated on the element types (plus a Tag that gives every CUTLASS instantiation its own
// kernel symbol), not on CUTLASS types: the arrays are plain int32 triples and int64 leading
// dimensions, which the CUTLASS side reinterprets (cutlass::gemm::GemmCoord and
// cute::Shape<int, int, int> are three int32 (m, n, k); the CuTe strides of the SM90 kernels hold
// exactly one int64; sm80.cuh and sm90.cuh static_assert both). Device code only: no launch
// syntax, no torch, no CUTLASS.
#pragma once

#include <cstdint>

#include "grouped_mm/grouped_mm.h"

namespace mixops::cuda {

// The per-group arrays, each [num_groups] (shapes: [num_groups][3]).
template <typename EA, typename EB, typename ED>
struct GroupArgs {
  int32_t* shapes;  // (m, n, k) of each group; m = 0 gives the group no tiles
  EA** ptr_a;
  EB** ptr_b;
  ED** ptr_d;
  int64_t* ld_a;
  int64_t* ld_b;
  int64_t* ld_d;
};

constexpr int kBuildArgsThreads = 128;

// One thread per group: clamp the group's bounds (the arithmetic the CPU kernel shares), report
// bad offsets, write the group's arguments. Empty groups (m, n or k zero) get m = 0: the zero-fill
// kernel owns their output (CUTLASS would store an unzeroed accumulator when k = 0). So do the
// groups that break the path's alignment rule (grouped_mm_group_aligned); the fallback kernel,
// launched after the GEMM with the same rule, computes those. Leading dimensions come from the full operands, not the group shape: a
// ragged-k operand is a slice of a wider matrix.
template <typename EA, typename EB, typename ED, GroupAlignRule kRule, typename Tag>
__global__ void __launch_bounds__(kBuildArgsThreads)
    build_group_args(GroupedMmParams p, GroupArgs<EA, EB, ED> out) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= p.num_groups) return;
  int32_t err = 0;
  const GroupProblem q = grouped_mm_group_problem(p, static_cast<int32_t>(g), &err);
  if (err != 0 && p.error_flag != nullptr) atomicOr(p.error_flag, err);
  const bool skip = q.gm == 0 || q.gn == 0 || q.gk == 0 || !grouped_mm_group_aligned(p, q, kRule);
  out.shapes[3 * g + 0] = skip ? 0 : static_cast<int32_t>(q.gm);
  out.shapes[3 * g + 1] = static_cast<int32_t>(q.gn);
  out.shapes[3 * g + 2] = static_cast<int32_t>(q.gk);
  // 64-bit element offsets on typed pointers (rows x hidden can pass 2^31 elements).
  out.ptr_a[g] = const_cast<EA*>(static_cast<const EA*>(p.a)) + q.a_offset;
  out.ptr_b[g] = const_cast<EB*>(static_cast<const EB*>(p.b)) + q.b_offset;
  out.ptr_d[g] = static_cast<ED*>(p.out) + q.out_offset;
  out.ld_a[g] = grouped_mm_lda(p);
  out.ld_b[g] = grouped_mm_ldb(p);
  out.ld_d[g] = p.out_stride_m;
}

}  // namespace mixops::cuda
