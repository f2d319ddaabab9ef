// grouped_mm, SM90 (Hopper, sm_90a) path: host declarations only, torch-free and CUTLASS-free, so
// the launcher can include it cheaply. The CUTLASS 3 ptr-array grouped GEMM template lives in
// sm90.cuh and is instantiated once per (dtype, A layout, B layout) in six small
// gemm_<dtype>_<ab>_sm90.cu files (parallel build); supported/workspace_bytes/run, which
// dispatch over the six, live in dispatch_sm90.cu. All of them are built only for
// sm_90a, and only when MIXOPS_HAS_SM90 is 1.
#pragma once

#include <cstddef>

#include "grouped_mm/grouped_mm.h"
#include "grouped_mm/launch.h"

namespace mixops::cuda::sm90 {

// bf16/fp16, 16-byte-aligned base pointers, leading dimensions (and the per-group stride of the
// grouped operand) multiples of 8 elements, sizes within int32, layouts RR, RC or CR.
bool supported(const GroupedMmParams& p);

// Device bytes run() needs in `workspace` (per-group argument arrays + CUTLASS's own workspace).
size_t workspace_bytes(const GroupedMmParams& p, const LaunchConfig& cfg);

// Enqueues on cfg.stream: the device-side argument builder, the CUTLASS grouped GEMM and, for the
// layouts where a group's start can break TMA's 16-byte alignment (grouped_mm_may_misalign in
// grouped_mm.h), the tiled fallback kernel for exactly those groups (fallback.cu).
// Throws std::runtime_error when !supported(p) or CUTLASS rejects the arguments.
void run(const GroupedMmParams& p, void* workspace, const LaunchConfig& cfg);

namespace detail {
// One CUTLASS instantiation; defined in sm90.cuh, explicitly instantiated in the six
// gemm_<dtype>_<ab>_sm90.cu files.
template <Dtype kDtype, Layout kLayoutA, Layout kLayoutB>
struct GroupedGemm {
  static size_t workspace_bytes(const GroupedMmParams& p, const LaunchConfig& cfg);
  // Argument builder + GEMM; misaligned groups are skipped here (run() computes them).
  static void run(const GroupedMmParams& p, void* workspace, const LaunchConfig& cfg);
};
}  // namespace detail

}  // namespace mixops::cuda::sm90
