// grouped_mm on CUDA: the torch-free launcher declared in launch.h. It picks a kernel
// family from host-known facts only (dtype, layouts, strides, pointer alignment, device),
// sizes the workspace, and enqueues the zero fill and then the GEMM on cfg.stream. It never reads
// device memory and never synchronises, so a launch can be captured in a CUDA graph.
//
// The choice of path is path.h's (CUDA-free, tested on CPU).
// The kernels themselves live in other translation units (one per CUTLASS instantiation) so the
// build parallelises; this file holds no kernels and compiles quickly.
#include <cuda_runtime_api.h>
#include <nvtx3/nvtx3.hpp>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "grouped_mm/launch.h"
#include "grouped_mm/path.h"
#include "grouped_mm/sm80.h"
#if MIXOPS_HAS_SM90
#include "grouped_mm/sm90.h"
#endif

namespace mixops::cuda {

namespace detail {
// Defined in zero.cu and fallback.cu (declared here, their only caller).
void launch_grouped_mm_zero(const GroupedMmParams& p, const LaunchConfig& cfg);
void launch_grouped_mm_fallback(const GroupedMmParams& p, const LaunchConfig& cfg,
                                GroupAlignRule skipped);
}  // namespace detail

namespace {

// Nothing for any GEMM kernel to write (the zero fill covers the whole output).
// (k == 0: every product is an empty sum, in both modes.)
bool gemm_is_empty(const GroupedMmParams& p) {
  return p.num_groups <= 0 || p.m <= 0 || p.n <= 0 || p.k <= 0;
}

void run_sm80_tensorop(const GroupedMmParams& p, void* ws, const LaunchConfig& cfg) {
  const bool bf16 = p.dtype == Dtype::kBFloat16;
  switch (combo_of(p)) {
    case Combo::kRR: return bf16 ? sm80::run_bf16_rr(p, ws, cfg) : sm80::run_fp16_rr(p, ws, cfg);
    case Combo::kRC: return bf16 ? sm80::run_bf16_rc(p, ws, cfg) : sm80::run_fp16_rc(p, ws, cfg);
    case Combo::kCR: return bf16 ? sm80::run_bf16_cr(p, ws, cfg) : sm80::run_fp16_cr(p, ws, cfg);
    case Combo::kOther: break;
  }
  throw std::runtime_error("mixops::grouped_mm: sm80 tensor-op path got an unsupported layout");
}

void run_fp32(const GroupedMmParams& p, void* ws, const LaunchConfig& cfg, bool tf32) {
  switch (combo_of(p)) {
    case Combo::kRR:
      return tf32 ? sm80::run_fp32_tf32_rr(p, ws, cfg) : sm80::run_fp32_simt_rr(p, ws, cfg);
    case Combo::kRC:
      return tf32 ? sm80::run_fp32_tf32_rc(p, ws, cfg) : sm80::run_fp32_simt_rc(p, ws, cfg);
    case Combo::kCR:
      return tf32 ? sm80::run_fp32_tf32_cr(p, ws, cfg) : sm80::run_fp32_simt_cr(p, ws, cfg);
    case Combo::kOther: break;
  }
  throw std::runtime_error("mixops::grouped_mm: fp32 CUTLASS path got an unsupported layout");
}

}  // namespace

GroupedMmPath grouped_mm_select_path(const GroupedMmParams& p, const LaunchConfig& cfg) {
  DeviceFacts facts;
  facts.cc_major = cfg.cc_major;
  facts.cc_minor = cfg.cc_minor;
  facts.allow_tf32 = cfg.allow_tf32;
  facts.sm90_built = MIXOPS_HAS_SM90;
  return select_path(p, facts);
}

size_t grouped_mm_workspace_bytes(const GroupedMmParams& p, const LaunchConfig& cfg) {
  if (gemm_is_empty(p)) return 0;  // only the zero fill runs
  switch (grouped_mm_select_path(p, cfg)) {
    case GroupedMmPath::kSm90TmaWarpSpecialized:
#if MIXOPS_HAS_SM90
      return sm90::workspace_bytes(p, cfg);
#else
      return 0;  // not selectable without MIXOPS_HAS_SM90
#endif
    case GroupedMmPath::kSm80TensorOp:
    case GroupedMmPath::kFp32Simt:
    case GroupedMmPath::kFp32Tf32:
      return sm80::workspace_bytes(p);  // per-group argument arrays, 256-byte-aligned sub-buffers
    case GroupedMmPath::kFallback: return 0;
  }
  return 0;
}

void grouped_mm_launch(const GroupedMmParams& p, void* workspace, const LaunchConfig& cfg) {
  nvtx3::scoped_range range{"mixops::grouped_mm"};
  const GroupedMmPath path = grouped_mm_select_path(p, cfg);

  // 1. Zeros for every output element no group writes (and offset error bits).
  detail::launch_grouped_mm_zero(p, cfg);
  if (gemm_is_empty(p)) return;

  // 2. The GEMM of every group (each path builds its own arguments on the device).
  switch (path) {
    case GroupedMmPath::kSm90TmaWarpSpecialized:
#if MIXOPS_HAS_SM90
      sm90::run(p, workspace, cfg);
      break;
#else
      throw std::runtime_error("mixops::grouped_mm: SM90 path selected but not built");
#endif
    case GroupedMmPath::kSm80TensorOp: run_sm80_tensorop(p, workspace, cfg); break;
    case GroupedMmPath::kFp32Simt: run_fp32(p, workspace, cfg, /*tf32=*/false); break;
    case GroupedMmPath::kFp32Tf32: run_fp32(p, workspace, cfg, /*tf32=*/true); break;
    case GroupedMmPath::kFallback:
      detail::launch_grouped_mm_fallback(p, cfg, GroupAlignRule::kAny);
      break;
  }
  // The CUTLASS 2 vector paths skipped the groups whose start or extent breaks their 16-byte
  // vectors (possible only for these layouts): the fallback kernel computes exactly those.
  if ((path == GroupedMmPath::kSm80TensorOp || path == GroupedMmPath::kFp32Tf32) &&
      grouped_mm_may_misalign(p)) {
    detail::launch_grouped_mm_fallback(p, cfg, GroupAlignRule::kCutlass2);
  }
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) {
    throw std::runtime_error(std::string("mixops::grouped_mm (") + grouped_mm_path_name(path) +
                             "): kernel launch failed: " + cudaGetErrorString(e));
  }
}

}  // namespace mixops::cuda
