// grouped_mm, SM90 (Hopper, sm_90a) path: host declarations only, torch-free and CUTLASS-free, so
// the launcher can include it cheaply. The CUTLASS 3 ptr-array grouped GEMM template lives in
// grouped_mm_sm90.cuh and is instantiated once per (dtype, A layout, B layout) in six small
// grouped_mm_<dtype>_<ab>_sm90.cu files (parallel build); supported/workspace_bytes/run, which
// dispatch over the six, live in grouped_mm_sm90_dispatch_sm90.cu. All of them are built only for
// sm_90a, and only when MIXOPS_HAS_SM90 is 1.
#pragma once

#include <cstddef>

#include "grouped_mm_launch.h"
#include "mixops/grouped_mm_params.h"

namespace mixops::cuda::sm90 {

// bf16/fp16, 16-byte-aligned base pointers, leading dimensions (and the per-group stride of the
// grouped operand) multiples of 8 elements, sizes within int32, layouts RR, RC or CR.
bool supported(const GroupedMmParams& p);

// Device bytes run() needs in `workspace` (per-group argument arrays + CUTLASS's own workspace).
size_t workspace_bytes(const GroupedMmParams& p, const LaunchConfig& cfg);

// Enqueues on cfg.stream: the device-side argument builder, the CUTLASS grouped GEMM and, for the
// layouts where a group's start can break TMA's 16-byte alignment, a rescue kernel (see below).
// Throws std::runtime_error when !supported(p) or CUTLASS rejects the arguments.
void run(const GroupedMmParams& p, void* workspace, const LaunchConfig& cfg);

// TMA needs every group's first element 16-byte aligned. The base pointers are (supported()), but
// a group that starts inside a unit-stride dimension starts at an arbitrary element: A for
// ragged_k with row-major A (a + begin), B for ragged_k with col-major B (b + begin), A for
// !ragged_k with col-major A (a + begin). Offsets live on the device, so this is decided per group
// there: misaligned groups get no CUTLASS tiles and are computed by a plain CUDA-core kernel.
MIXOPS_INLINE bool may_misalign(const GroupedMmParams& p) {
  return p.ragged_k ? (p.a_layout == Layout::kRowMajor || p.b_layout == Layout::kColMajor)
                    : p.a_layout == Layout::kColMajor;
}
MIXOPS_INLINE bool group_tma_aligned(const GroupProblem& q) {  // 2-byte elements: 8 per 16 B
  return ((q.a_offset | q.b_offset | q.out_offset) & 7) == 0;
}

namespace detail {
// One CUTLASS instantiation; defined in grouped_mm_sm90.cuh, explicitly instantiated in the six
// grouped_mm_<dtype>_<ab>_sm90.cu files.
template <Dtype kDtype, Layout kLayoutA, Layout kLayoutB>
struct GroupedGemm {
  static size_t workspace_bytes(const GroupedMmParams& p, const LaunchConfig& cfg);
  // Argument builder + GEMM; misaligned groups are skipped here (run() launches the rescue).
  static void run(const GroupedMmParams& p, void* workspace, const LaunchConfig& cfg);
};
}  // namespace detail

}  // namespace mixops::cuda::sm90
