// grouped_mm on CUDA: the torch-free launcher declared in grouped_mm_launch.h. It picks a kernel
// family from host-known facts only (dtype, layouts, strides, pointer alignment, device),
// sizes the workspace, and enqueues the zero fill and then the GEMM on cfg.stream. It never reads
// device memory and never synchronises, so a launch can be captured in a CUDA graph.
//
// Paths, in order of preference:
//   SM90 (CUTLASS 3 ptr-array, TMA + wgmma)  bf16/fp16 on cc 9.0 exactly, when sm90::supported;
//   SM80 tensor op (CUTLASS 2 GemmGrouped)  bf16/fp16 meeting the 8-element vector rules below;
//   fp32 TF32 / fp32 SIMT (CUTLASS 2)        fp32: TF32 when allow_tf32 and 4-element aligned;
//   fallback (mixops's own tiled kernel)     everything else (fp64, odd strides, huge sizes).
// The kernels themselves live in other translation units (one per CUTLASS instantiation) so the
// build parallelises; this file holds no kernels and compiles quickly.
#include <cuda_runtime_api.h>
#include <nvtx3/nvtx3.hpp>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "grouped_mm_launch.h"
#include "grouped_mm_sm80.h"
#if MIXOPS_HAS_SM90
#include "grouped_mm_sm90.h"
#endif

namespace mixops::cuda {

namespace detail {
// Defined in grouped_mm_zero.cu and grouped_mm_fallback.cu (declared here, their only caller).
void launch_grouped_mm_zero(const GroupedMmParams& p, const LaunchConfig& cfg);
void launch_grouped_mm_fallback(const GroupedMmParams& p, const LaunchConfig& cfg);
}  // namespace detail

namespace {

enum class Combo { kRR, kRC, kCR, kOther };

Combo combo_of(const GroupedMmParams& p) {
  const bool ar = p.a_layout == Layout::kRowMajor, br = p.b_layout == Layout::kRowMajor;
  if (ar && br) return Combo::kRR;
  if (ar && !br) return Combo::kRC;
  if (!ar && br) return Combo::kCR;
  return Combo::kOther;
}

// CUTLASS 2 GemmGrouped problem sizes are int32 GemmCoords, and its scheduler counts the tiles
// of all groups in int32 (bounded here with 128 x 128 tiles, the size of every config we build).
bool fits_int32(const GroupedMmParams& p) {
  constexpr int64_t kMax = 0x7fffffff;
  if (p.m > kMax || p.n > kMax || p.k > kMax || p.num_groups < 0) return false;
  const int64_t tm = (p.m + 127) / 128, tn = (p.n + 127) / 128, e = p.num_groups;
  const int64_t tiles_m = p.ragged_k ? tm * e : tm + e;  // <= 2^24 * 2^31: no int64 overflow
  return tiles_m <= kMax && tiles_m * tn <= kMax;
}

// Whether CUTLASS 2's `align`-element vector accesses are valid for EVERY possible offsets value
// (offsets are on the device, so this must hold whatever they are):
//  * base pointers aligned to align * element bytes; leading dimensions multiples of align;
//  * a group's first element moves along the ragged dimension by begin * stride (and by
//    g * stride_e across groups), so those strides must be multiples of align too. This rules out
//    a unit-stride ragged dimension (ragged_k with row-major A or col-major B; !ragged_k with
//    col-major A): their groups start at arbitrary elements;
//  * the predicated iterators guard whole vectors, so every unit-stride extent (A: k if row-major
//    else m; B: n if row-major else k; out: n) must be a multiple of align.
bool cutlass2_aligned(const GroupedMmParams& p, int64_t align) {
  if (align == 1) return true;
  const int64_t bytes = align * static_cast<int64_t>(dtype_size(p.dtype));
  auto ptr_ok = [bytes](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; };
  auto mul = [align](int64_t v) { return v % align == 0; };
  if (!ptr_ok(p.a) || !ptr_ok(p.b) || !ptr_ok(p.out)) return false;
  if (!mul(grouped_mm_lda(p)) || !mul(grouped_mm_ldb(p)) || !mul(p.out_stride_m)) return false;
  if (p.ragged_k) {
    if (!mul(p.a_stride_k) || !mul(p.b_stride_k)) return false;
    if (p.num_groups > 1 && !mul(p.out_stride_e)) return false;
  } else {
    if (!mul(p.a_stride_m)) return false;
    if (p.num_groups > 1 && !mul(p.b_stride_e)) return false;
  }
  const int64_t a_unit = p.a_layout == Layout::kRowMajor ? p.k : p.m;
  const int64_t b_unit = p.b_layout == Layout::kRowMajor ? p.n : p.k;
  return mul(a_unit) && mul(b_unit) && mul(p.n);
}

// Nothing for any GEMM kernel to write (the zero fill covers the whole output).
bool gemm_is_empty(const GroupedMmParams& p) {
  return p.num_groups <= 0 || p.m <= 0 || p.n <= 0 || (!p.ragged_k && p.k <= 0);
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
  // CUTLASS 2 kernels need sm_80+ (cp.async, mma.sync) and a layout combo we instantiated.
  const bool cutlass_ok = cfg.cc_major >= 8 && combo_of(p) != Combo::kOther && fits_int32(p);
  switch (p.dtype) {
    case Dtype::kBFloat16:
    case Dtype::kFloat16:
#if MIXOPS_HAS_SM90
      if (cfg.cc_major == 9 && cfg.cc_minor == 0 && sm90::supported(p)) {
        return GroupedMmPath::kSm90TmaWarpSpecialized;
      }
#endif
      if (cutlass_ok && cutlass2_aligned(p, 8)) return GroupedMmPath::kSm80TensorOp;
      return GroupedMmPath::kFallback;
    case Dtype::kFloat32:
      if (!cutlass_ok) return GroupedMmPath::kFallback;
      if (cfg.allow_tf32 && cutlass2_aligned(p, 4)) return GroupedMmPath::kFp32Tf32;
      return GroupedMmPath::kFp32Simt;  // alignment 1: any strides of a supported combo
    default:
      return GroupedMmPath::kFallback;
  }
}

const char* grouped_mm_path_name(GroupedMmPath path) {
  switch (path) {
    case GroupedMmPath::kSm90TmaWarpSpecialized: return "sm90_tma_warp_specialized";
    case GroupedMmPath::kSm80TensorOp: return "sm80_tensorop";
    case GroupedMmPath::kFp32Simt: return "fp32_simt";
    case GroupedMmPath::kFp32Tf32: return "fp32_tf32";
    case GroupedMmPath::kFallback: return "fallback";
  }
  return "unknown";
}

size_t grouped_mm_workspace_bytes(const GroupedMmParams& p, const LaunchConfig& cfg) {
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
    case GroupedMmPath::kFallback:
      return 0;
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
    case GroupedMmPath::kSm80TensorOp:
      run_sm80_tensorop(p, workspace, cfg);
      break;
    case GroupedMmPath::kFp32Simt:
      run_fp32(p, workspace, cfg, /*tf32=*/false);
      break;
    case GroupedMmPath::kFp32Tf32:
      run_fp32(p, workspace, cfg, /*tf32=*/true);
      break;
    case GroupedMmPath::kFallback:
      detail::launch_grouped_mm_fallback(p, cfg);
      break;
  }
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) {
    throw std::runtime_error(std::string("mixops::grouped_mm (") + grouped_mm_path_name(path) +
                             "): kernel launch failed: " + cudaGetErrorString(e));
  }
}

}  // namespace mixops::cuda
