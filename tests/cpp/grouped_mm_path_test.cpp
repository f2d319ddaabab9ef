// Which grouped_mm kernel family runs (csrc/grouped_mm/path.h), checked on the host with a plain
// C++ compiler: tests/test_source_layout.py compiles and runs this. Prints one line per failure
// and exits non-zero if any.
#include <cstdio>
#include <cstdlib>
#include <initializer_list>

#include "grouped_mm/path.h"

using mixops::Dtype;
using mixops::GroupedMmParams;
using mixops::Layout;
using mixops::cuda::DeviceFacts;
using mixops::cuda::grouped_mm_path_name;
using mixops::cuda::GroupedMmPath;
using mixops::cuda::select_path;

namespace {

int failures = 0;

void expect(GroupedMmPath got, GroupedMmPath want, const char* what) {
  if (got != want) {
    std::printf("FAIL %s: got %s, want %s\n", what, grouped_mm_path_name(got),
                grouped_mm_path_name(want));
    ++failures;
  }
}

alignas(256) char storage[3][256];

// An aligned row-major x row-major 2-D x 3-D problem: a [m, k], b [E, k, n], out [m, n].
GroupedMmParams aligned(Dtype d) {
  GroupedMmParams p{};
  p.dtype = d;
  p.ragged_k = false;
  p.num_groups = 8;
  p.m = 4096, p.n = 1024, p.k = 512;
  p.a = storage[0], p.a_stride_m = p.k, p.a_stride_k = 1, p.a_layout = Layout::kRowMajor;
  p.b = storage[1], p.b_stride_e = p.k * p.n, p.b_stride_k = p.n, p.b_stride_n = 1;
  p.b_layout = Layout::kRowMajor;
  p.out = storage[2], p.out_stride_e = 0, p.out_stride_m = p.n;
  return p;
}

DeviceFacts gpu(int major, int minor, bool sm90_built = true, bool tf32 = false) {
  DeviceFacts f;
  f.cc_major = major, f.cc_minor = minor, f.sm90_built = sm90_built, f.allow_tf32 = tf32;
  return f;
}

// grouped_mm_packed's modes (grouped_mm.h, PackedDim), aligned and row-major x row-major: ragged
// size 4096, fixed dimension 512, width 1024 (the padded operand's), total 8192 (the packed one's).
//   mn: a [m, k], b [k, total], out [m, width]     mk: a [m, width], b [total, n], out [m, n]
//   km: a [width, r], b [r, n], out [total, n]     kn: a [m, r], b [r, width], out [m, total]
enum class Mode { kMn, kMk, kKm, kKn };
constexpr Mode kModes[] = {Mode::kMn, Mode::kMk, Mode::kKm, Mode::kKn};
const char* const kModeNames[] = {"mn", "mk", "km", "kn"};

GroupedMmParams packed(Dtype d, Mode mode, int64_t width = 1024, int64_t total = 8192) {
  GroupedMmParams p = aligned(d);
  const int64_t ragged = 4096, fixed = 512;
  p.b_stride_e = 0;
  p.width = width, p.total = total;
  switch (mode) {
    case Mode::kMn:
      p.packed = mixops::PackedDim::kN, p.m = ragged, p.k = fixed, p.n = width;
      p.b_stride_k = total, p.out_stride_m = width;
      break;
    case Mode::kMk:
      p.packed = mixops::PackedDim::kK, p.m = ragged, p.k = width, p.n = fixed;
      p.b_stride_k = fixed, p.out_stride_m = fixed;
      break;
    case Mode::kKm:
      p.ragged_k = true, p.packed = mixops::PackedDim::kM, p.m = width, p.k = ragged, p.n = fixed;
      p.b_stride_k = fixed, p.out_stride_m = fixed;
      break;
    case Mode::kKn:
      p.ragged_k = true, p.packed = mixops::PackedDim::kN, p.m = fixed, p.k = ragged, p.n = width;
      p.b_stride_k = width, p.out_stride_m = total;
      break;
  }
  p.a_stride_m = p.k;  // row-major a [m, k]
  return p;
}

}  // namespace

int main() {
  using P = GroupedMmPath;
  for (Dtype d : {Dtype::kBFloat16, Dtype::kFloat16}) {
    const GroupedMmParams p = aligned(d);
    expect(select_path(p, gpu(9, 0)), P::kSm90TmaWarpSpecialized, "H100, sm_90a built");
    expect(select_path(p, gpu(9, 0, false)), P::kSm80TensorOp, "H100, no sm_90a in the build");
    expect(select_path(p, gpu(8, 0)), P::kSm80TensorOp, "A100");
    expect(select_path(p, gpu(8, 9)), P::kSm80TensorOp, "L40 (8.9)");
    expect(select_path(p, gpu(10, 0)), P::kSm80TensorOp, "sm_100: no wgmma kernels there");
    expect(select_path(p, gpu(7, 5)), P::kFallback, "T4 (7.5): no CUTLASS 2 kernels below 8.0");
    GroupedMmParams odd = p;
    odd.k = 500, odd.a_stride_m = 500, odd.b_stride_e = 500 * p.n;  // k not a multiple of 8
    expect(select_path(odd, gpu(9, 0)), P::kFallback, "misaligned k on H100");
    expect(select_path(odd, gpu(8, 0)), P::kFallback, "misaligned k on A100");
    GroupedMmParams shifted = p;
    shifted.a = storage[0] + 2;  // base pointer off 16 bytes
    expect(select_path(shifted, gpu(9, 0)), P::kFallback, "misaligned base pointer");
    // Layouts whose groups may start misaligned (grouped_mm_may_misalign): the vector paths take
    // the call and skip those groups on the device; only the offsets-independent rules decide.
    GroupedMmParams col_a = p;  // 2-D x 3-D, A column-major with ld 4096 over m = 4095 rows
    col_a.m = 4095, col_a.a_stride_m = 1, col_a.a_stride_k = 4096;
    col_a.a_layout = Layout::kColMajor;
    expect(select_path(col_a, gpu(8, 0)), P::kSm80TensorOp, "A col-major, ragged m, A100");
    expect(select_path(col_a, gpu(9, 0)), P::kSm90TmaWarpSpecialized, "A col-major, H100");
    col_a.a_stride_k = 4095;  // a leading dimension off the vectors: no vector path
    expect(select_path(col_a, gpu(8, 0)), P::kFallback, "A col-major, ld 4095");
    GroupedMmParams rk = p;  // 2-D x 2-D: a [m, k] row-major, b [k, n], out [E, m, n]; k ragged
    rk.ragged_k = true, rk.m = 512, rk.k = 4093, rk.a_stride_m = 4096;
    rk.b_stride_e = 0, rk.out_stride_e = rk.m * rk.n;
    expect(select_path(rk, gpu(8, 0)), P::kSm80TensorOp, "ragged k of 4093 in row-major A");
    rk.n = 1020, rk.b_stride_k = 1020, rk.out_stride_m = 1020, rk.out_stride_e = rk.m * 1020;
    expect(select_path(rk, gpu(8, 0)), P::kFallback, "ragged k, n not whole vectors");
  }
  const GroupedMmParams f32 = aligned(Dtype::kFloat32);
  expect(select_path(f32, gpu(8, 0)), P::kFp32Simt, "fp32 exact");
  expect(select_path(f32, gpu(9, 0, true, true)), P::kFp32Tf32, "fp32 with allow_tf32");
  expect(select_path(f32, gpu(7, 5, false, true)), P::kFallback, "fp32 on 7.5");
  GroupedMmParams f32_col = f32;  // A column-major, ld 4100 (4-element vectors): TF32 takes it
  f32_col.m = 4099, f32_col.a_stride_m = 1, f32_col.a_stride_k = 4100;
  f32_col.a_layout = Layout::kColMajor;
  expect(select_path(f32_col, gpu(8, 0, false, true)), P::kFp32Tf32, "fp32 A col-major, TF32");
  expect(select_path(aligned(Dtype::kFloat64), gpu(9, 0)), P::kFallback, "fp64");
  GroupedMmParams huge = f32;
  huge.m = int64_t{1} << 32;  // past CUTLASS's int32 problem sizes
  expect(select_path(huge, gpu(8, 0)), P::kFallback, "m >= 2^31");
  // grouped_mm_packed: the same rules on each mode's operands. Widths and packed starts vary
  // per group (checked on the device: the vector paths skip the groups that break them), so only
  // the extents and leading dimensions every group shares decide here.
  char what[128];
  auto name = [&what](const char* text, int mode) {
    std::snprintf(what, sizeof what, "packed %s: %s", kModeNames[mode], text);
    return what;
  };
  for (int i = 0; i < 4; ++i) {
    const Mode mode = kModes[i];
    for (Dtype d : {Dtype::kBFloat16, Dtype::kFloat16}) {
      const GroupedMmParams p = packed(d, mode);
      expect(select_path(p, gpu(9, 0)), P::kSm90TmaWarpSpecialized, name("aligned, H100", i));
      expect(select_path(p, gpu(9, 0, false)), P::kSm80TensorOp, name("no sm_90a built", i));
      expect(select_path(p, gpu(8, 0)), P::kSm80TensorOp, name("aligned, A100", i));
      expect(select_path(p, gpu(7, 5)), P::kFallback, name("T4 (7.5)", i));
      // width 1020: a leading dimension or out's unit-stride extent except in km, where the width
      // is a strided extent of a and out only (its groups' widths are checked per group).
      const GroupedMmParams odd_w = packed(d, mode, 1020);
      const bool odd_w_vector = mode == Mode::kKm;
      expect(select_path(odd_w, gpu(9, 0)),
             odd_w_vector ? P::kSm90TmaWarpSpecialized : P::kFallback, name("width 1020, H100", i));
      expect(select_path(odd_w, gpu(8, 0)), odd_w_vector ? P::kSm80TensorOp : P::kFallback,
             name("width 1020, A100", i));
      // total 8191: b's leading dimension (mn) or out's (kn); a row count elsewhere.
      const GroupedMmParams odd_t = packed(d, mode, 1024, 8191);
      const bool odd_t_vector = mode == Mode::kMk || mode == Mode::kKm;
      expect(select_path(odd_t, gpu(9, 0)),
             odd_t_vector ? P::kSm90TmaWarpSpecialized : P::kFallback, name("total 8191, H100", i));
      expect(select_path(odd_t, gpu(8, 0)), odd_t_vector ? P::kSm80TensorOp : P::kFallback,
             name("total 8191, A100", i));
      GroupedMmParams huge = p;  // packed size past int32 (nothing else changed)
      huge.total = int64_t{1} << 31;
      expect(select_path(huge, gpu(9, 0)), P::kFallback, name("total 2^31, H100", i));
      expect(select_path(huge, gpu(8, 0)), P::kFallback, name("total 2^31, A100", i));
      huge = p;
      huge.width = int64_t{1} << 31;
      expect(select_path(huge, gpu(8, 0)), P::kFallback, name("width 2^31, A100", i));
      GroupedMmParams shifted = p;
      shifted.b = storage[1] + 2;
      expect(select_path(shifted, gpu(9, 0)), P::kFallback, name("b off 16 bytes", i));
    }
    const GroupedMmParams f32 = packed(Dtype::kFloat32, mode);
    expect(select_path(f32, gpu(8, 0)), P::kFp32Simt, name("fp32 exact", i));
    expect(select_path(f32, gpu(9, 0, true, true)), P::kFp32Tf32, name("fp32 TF32", i));
    // Odd width and total: TF32's 4-element vectors only where they are strided (km), else
    // SIMT (alignment 1 takes any sizes).
    expect(select_path(packed(Dtype::kFloat32, mode, 1021, 8191), gpu(8, 0, false, true)),
           mode == Mode::kKm ? P::kFp32Tf32 : P::kFp32Simt, name("fp32 odd sizes, allow_tf32", i));
    expect(select_path(packed(Dtype::kFloat64, mode), gpu(9, 0)), P::kFallback, name("fp64", i));
  }
  if (failures == 0) std::printf("OK\n");
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
