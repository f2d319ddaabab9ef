// grouped_mm, CUTLASS 2 family (GemmGrouped, device-only schedule): the plain host entry points
// the dispatcher calls, one per (dtype, kernel kind, layout combo). Each is defined in its own
// translation unit (grouped_mm_{bf16,fp16}_{rr,rc,cr}_sm80.cu, grouped_mm_fp32_{simt,tf32}_*.cu)
// so the heavy CUTLASS instantiations compile in parallel. Torch-free and CUTLASS-free on purpose:
// the dispatcher includes only this.
//
// Layout names: rr = A row-major, B row-major; rc = A row, B col; cr = A col, B row.
// Every entry point needs sm80_workspace_bytes(params) bytes of 256-byte-aligned device workspace,
// which holds the per-group argument arrays built on the device from params.offsets.
#pragma once

#include <cstddef>
#include <cstdint>

#include "grouped_mm_launch.h"
#include "mixops/grouped_mm_params.h"

namespace mixops::cuda::sm80 {

// Byte offsets of the per-group arrays inside the workspace (each sub-buffer 256-byte aligned):
// problem sizes (3 x int32 each, cutlass::gemm::GemmCoord), pointers to A, B and D (C aliases D,
// beta = 0), and int64 leading dimensions of A, B and D (ldc aliases ldd).
struct ArgsLayout {
  size_t problems, ptr_a, ptr_b, ptr_d, lda, ldb, ldd, bytes;
};

inline size_t align256(size_t x) { return (x + 255) & ~size_t(255); }

inline ArgsLayout args_layout(int64_t num_groups) {
  const size_t e = num_groups > 0 ? static_cast<size_t>(num_groups) : 0;
  ArgsLayout l;
  size_t at = 0;
  l.problems = at; at += align256(e * 3 * sizeof(int32_t));
  l.ptr_a = at;    at += align256(e * sizeof(void*));
  l.ptr_b = at;    at += align256(e * sizeof(void*));
  l.ptr_d = at;    at += align256(e * sizeof(void*));
  l.lda = at;      at += align256(e * sizeof(int64_t));
  l.ldb = at;      at += align256(e * sizeof(int64_t));
  l.ldd = at;      at += align256(e * sizeof(int64_t));
  l.bytes = at;
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

// fp32 exact, SIMT FFMA (every arch): alignment 1.
void run_fp32_simt_rr(const GroupedMmParams& p, void* workspace, const LaunchConfig& cfg);
void run_fp32_simt_rc(const GroupedMmParams& p, void* workspace, const LaunchConfig& cfg);
void run_fp32_simt_cr(const GroupedMmParams& p, void* workspace, const LaunchConfig& cfg);

// fp32 inputs through TF32 tensor ops (every arch; only when allow_tf32): alignment 4 elements.
void run_fp32_tf32_rr(const GroupedMmParams& p, void* workspace, const LaunchConfig& cfg);
void run_fp32_tf32_rc(const GroupedMmParams& p, void* workspace, const LaunchConfig& cfg);
void run_fp32_tf32_cr(const GroupedMmParams& p, void* workspace, const LaunchConfig& cfg);

}  // namespace mixops::cuda::sm80
