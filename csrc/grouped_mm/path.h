// grouped_mm on CUDA: which kernel family runs a call, decided from host-known facts only
// (dtype, layouts, strides, pointer alignment, sizes, the device's compute capability, what was
// built). Host code with no CUDA, torch or CUTLASS include, so tests compile it with a plain C++
// compiler and check every rule (e.g. GPUs below sm_80 always take the fallback kernel: the
// CUTLASS 2 kernels need cp.async and mma.sync, and their PTX is never built below compute_80).
//
// Paths, in order of preference:
//   SM90 (CUTLASS 3 ptr-array, TMA + wgmma)  bf16/fp16 on cc 9.0 exactly (sm_90a code runs only
//                                            there), when built and grouped_mm_sm90_supported;
//   SM80 tensor op (CUTLASS 2 GemmGrouped)   bf16/fp16 on cc >= 8.0 meeting the 8-element rules;
//   fp32 TF32 / fp32 SIMT (CUTLASS 2)        fp32 on cc >= 8.0: TF32 when allow_tf32 and 4-aligned;
//   fallback (mixops's own tiled kernel)     everything else (fp64, odd strides, huge sizes, <
// 8.0).
#pragma once

#include <cstdint>

#include "core/align.h"
#include "grouped_mm/grouped_mm.h"

namespace mixops::cuda {

enum class GroupedMmPath : int {
  kSm90TmaWarpSpecialized = 0,  // bf16/fp16, cc == 9.0, aligned (CUTLASS 3 ptr-array)
  kSm80TensorOp = 1,            // bf16/fp16 elsewhere, aligned (CUTLASS 2 GemmGrouped)
  kFp32Simt = 2,                // fp32 exact (CUTLASS 2 GemmGrouped, SIMT)
  kFp32Tf32 = 3,                // fp32 with allow_tf32 (CUTLASS 2 GemmGrouped, TF32 tensor ops)
  kFallback = 4,                // any dtype/alignment/GPU: mixops's own tiled kernel
};

// What the choice depends on besides the params.
struct DeviceFacts {
  int cc_major = 0, cc_minor = 0;  // compute capability of the current device
  bool allow_tf32 = false;         // torch.backends.cuda.matmul.allow_tf32
  bool sm90_built = false;         // the sm_90a kernels are in this build (MIXOPS_HAS_SM90)
};

enum class Combo { kRR, kRC, kCR, kOther };

inline Combo combo_of(const GroupedMmParams& p) {
  const bool ar = p.a_layout == Layout::kRowMajor, br = p.b_layout == Layout::kRowMajor;
  if (ar && br) return Combo::kRR;
  if (ar && !br) return Combo::kRC;
  if (!ar && br) return Combo::kCR;
  return Combo::kOther;
}

// CUTLASS 2 GemmGrouped problem sizes are int32 GemmCoords, and its scheduler counts the tiles
// of all groups in int32 (bounded here with 128 x 128 tiles, the size of every config we build).
inline bool fits_int32(const GroupedMmParams& p) {
  constexpr int64_t kMax = 0x7fffffff;
  if (p.m > kMax || p.n > kMax || p.k > kMax || p.num_groups < 0) return false;
  if (p.width > kMax || p.total > kMax) return false;  // grouped_mm_packed (0 for grouped_mm)
  const int64_t tm = (p.m + 127) / 128, tn = (p.n + 127) / 128, e = p.num_groups;
  const int64_t tiles_m = p.ragged_k ? tm * e : tm + e;  // <= 2^24 * 2^31: no int64 overflow
  return tiles_m <= kMax && tiles_m * tn <= kMax;
}

// Whether CUTLASS 2's `align`-element vector accesses are valid for every group the argument
// builder gives tiles (offsets are on the device, so this must hold whatever they are):
//  * base pointers aligned to align * element bytes; leading dimensions multiples of align;
//  * across groups, the grouped operand moves by g * stride_e: a multiple of align too;
//  * the predicated iterators guard whole vectors, so every unit-stride extent that does not
//    depend on offsets (A: k if row-major else m; B: n if row-major else k; out: n) must be a
//    multiple of align.
// A ragged dimension of unit stride (ragged_k with row-major A or col-major B; !ragged_k with
// col-major A: grouped_mm_may_misalign) starts groups at arbitrary elements and gives them
// arbitrary extents; that is checked per group on the device (grouped_mm_group_aligned, kCutlass2):
// the builder skips the groups that break it and the fallback kernel computes them.
inline bool cutlass2_aligned(const GroupedMmParams& p, int64_t align) {
  if (align == 1) return true;
  const size_t bytes = static_cast<size_t>(align * dtype_size(p.dtype));
  auto ptr_ok = [bytes](const void* ptr) { return is_aligned(ptr, bytes); };
  auto mul = [align](int64_t v) { return v % align == 0; };
  if (!ptr_ok(p.a) || !ptr_ok(p.b) || !ptr_ok(p.out)) return false;
  if (!mul(grouped_mm_lda(p)) || !mul(grouped_mm_ldb(p)) || !mul(p.out_stride_m)) return false;
  if (p.num_groups > 1 && !mul(p.ragged_k ? p.out_stride_e : p.b_stride_e)) return false;
  const bool a_row = p.a_layout == Layout::kRowMajor, b_row = p.b_layout == Layout::kRowMajor;
  // A's unit-stride extent: k (row-major; ragged when ragged_k) or m (col-major; ragged when not).
  if (a_row ? !p.ragged_k && !mul(p.k) : p.ragged_k && !mul(p.m)) return false;
  // B's: n (row-major, never ragged) or k (col-major; ragged when ragged_k).
  if (b_row ? !mul(p.n) : !p.ragged_k && !mul(p.k)) return false;
  return mul(p.n);
}

// The SM90 kernels' requirements: bf16/fp16, 16-byte-aligned base pointers, leading dimensions
// (and the per-group stride of the grouped operand) multiples of 8 elements, sizes within int32,
// layouts RR, RC or CR.
inline bool grouped_mm_sm90_supported(const GroupedMmParams& p) {
  if (p.dtype != Dtype::kBFloat16 && p.dtype != Dtype::kFloat16) return false;
  if (p.a_layout == Layout::kColMajor && p.b_layout == Layout::kColMajor)
    return false;  // RR, RC, CR only
  if (!is_aligned(p.a, 16) || !is_aligned(p.b, 16) || !is_aligned(p.out, 16)) return false;
  // TMA: non-unit strides multiples of 16 bytes and below 2^40 bytes.
  auto ld_ok = [](int64_t ld) { return ld > 0 && ld % 8 == 0 && ld < (int64_t(1) << 39); };
  if (!ld_ok(grouped_mm_lda(p)) || !ld_ok(grouped_mm_ldb(p)) || !ld_ok(p.out_stride_m))
    return false;
  const int64_t group_stride = p.ragged_k ? p.out_stride_e : p.b_stride_e;  // 0: broadcast, fine
  if (group_stride < 0 || group_stride % 8 != 0) return false;
  // CUTLASS problem shapes are int32 (the scheduler's tile counts are 64-bit).
  const int64_t kMax = 0x7fffffff;
  return p.m <= kMax && p.n <= kMax && p.k <= kMax && p.num_groups >= 0 && p.width <= kMax &&
         p.total <= kMax;
}

inline GroupedMmPath select_path(const GroupedMmParams& p, const DeviceFacts& cfg) {
  // CUTLASS 2 kernels need sm_80+ (cp.async, mma.sync) and a layout combo we instantiated.
  const bool cutlass_ok = cfg.cc_major >= 8 && combo_of(p) != Combo::kOther && fits_int32(p);
  switch (p.dtype) {
    case Dtype::kBFloat16:
    case Dtype::kFloat16:
      if (cfg.sm90_built && cfg.cc_major == 9 && cfg.cc_minor == 0 &&
          grouped_mm_sm90_supported(p)) {
        return GroupedMmPath::kSm90TmaWarpSpecialized;
      }
      if (cutlass_ok && cutlass2_aligned(p, 8)) return GroupedMmPath::kSm80TensorOp;
      return GroupedMmPath::kFallback;
    case Dtype::kFloat32:
      if (!cutlass_ok) return GroupedMmPath::kFallback;
      if (cfg.allow_tf32 && cutlass2_aligned(p, 4)) return GroupedMmPath::kFp32Tf32;
      return GroupedMmPath::kFp32Simt;  // alignment 1: any strides of a supported combo
    default: return GroupedMmPath::kFallback;
  }
}

inline const char* grouped_mm_path_name(GroupedMmPath path) {
  switch (path) {
    case GroupedMmPath::kSm90TmaWarpSpecialized: return "sm90_tma_warp_specialized";
    case GroupedMmPath::kSm80TensorOp: return "sm80_tensorop";
    case GroupedMmPath::kFp32Simt: return "fp32_simt";
    case GroupedMmPath::kFp32Tf32: return "fp32_tf32";
    case GroupedMmPath::kFallback: return "fallback";
  }
  return "unknown";
}

}  // namespace mixops::cuda
