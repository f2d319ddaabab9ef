// grouped_mm, CUTLASS 2 family (GemmGrouped, device-only schedule): the plain host entry points
// the dispatcher calls, one per (dtype, kernel kind, layout combo). Each is defined in its own
// translation unit (gemm_{bf16,fp16}_{rr,rc,cr}_sm80.cu, gemm_fp32_{simt,tf32}_*_sm80.cu)
// so the heavy CUTLASS instantiations compile in parallel. Torch-free and CUTLASS-free on purpose:
// the dispatcher includes only this.
//
// Layout names: rr = A row-major, B row-major; rc = A row, B col; cr = A col, B row.
// Every entry point needs workspace_bytes(params) bytes of 256-byte-aligned device workspace,
// which holds the per-group argument arrays built on the device from params.offsets.
#pragma once

#include <cstddef>
#include <cstdint>

#include "core/align.h"
#include "grouped_mm/grouped_mm.h"
#include "grouped_mm/launch.h"

namespace mixops::cuda::sm80 {

// Byte offsets of the per-group arrays inside the workspace (each sub-buffer 256-byte aligned):
// problem sizes (3 x int32 each, cutlass::gemm::GemmCoord), pointers to A, B and D (C aliases D,
// beta = 0), and int64 leading dimensions of A, B and D (ldc aliases ldd).
struct ArgsLayout {
  size_t problems, ptr_a, ptr_b, ptr_d, lda, ldb, ldd, bytes;
};

inline ArgsLayout args_layout(int64_t num_groups) {
  const size_t e = num_groups > 0 ? static_cast<size_t>(num_groups) : 0;
  WorkspacePlan w;
  ArgsLayout l;
  l.problems = w.take(e * 3 * sizeof(int32_t));
  l.ptr_a = w.take(e * sizeof(void*));
  l.ptr_b = w.take(e * sizeof(void*));
  l.ptr_d = w.take(e * sizeof(void*));
  l.lda = w.take(e * sizeof(int64_t));
  l.ldb = w.take(e * sizeof(int64_t));
  l.ldd = w.take(e * sizeof(int64_t));
  l.bytes = w.total;
  return l;
}

// Workspace of every entry point below (the device-only schedule needs no CUTLASS workspace;
// the .cuh static_asserts that).
inline size_t workspace_bytes(const GroupedMmParams& p) { return args_layout(p.num_groups).bytes; }

// bf16 / fp16 tensor ops (sm_80 SASS + compute_80 PTX): alignment 8 elements.
void run_bf16_rr(const GroupedMmParams& p, void* workspace, const LaunchConfig& cfg);
void run_bf16_rc(const GroupedMmParams& p, void* workspace, const LaunchConfig& cfg);
void run_bf16_cr(const GroupedMmParams& p, void* workspace, const LaunchConfig& cfg);
void run_fp16_rr(const GroupedMmParams& p, void* workspace, const LaunchConfig& cfg);
void run_fp16_rc(const GroupedMmParams& p, void* workspace, const LaunchConfig& cfg);
void run_fp16_cr(const GroupedMmParams& p, void* workspace, const LaunchConfig& cfg);

// fp32 exact, SIMT FFMA: alignment 1.
void run_fp32_simt_rr(const GroupedMmParams& p, void* workspace, const LaunchConfig& cfg);
void run_fp32_simt_rc(const GroupedMmParams& p, void* workspace, const LaunchConfig& cfg);
void run_fp32_simt_cr(const GroupedMmParams& p, void* workspace, const LaunchConfig& cfg);

// fp32 inputs through TF32 tensor ops (only when allow_tf32): alignment 4 elements.
void run_fp32_tf32_rr(const GroupedMmParams& p, void* workspace, const LaunchConfig& cfg);
void run_fp32_tf32_rc(const GroupedMmParams& p, void* workspace, const LaunchConfig& cfg);
void run_fp32_tf32_cr(const GroupedMmParams& p, void* workspace, const LaunchConfig& cfg);

}  // namespace mixops::cuda::sm80
