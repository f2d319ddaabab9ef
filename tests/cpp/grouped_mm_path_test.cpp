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
  }
  const GroupedMmParams f32 = aligned(Dtype::kFloat32);
  expect(select_path(f32, gpu(8, 0)), P::kFp32Simt, "fp32 exact");
  expect(select_path(f32, gpu(9, 0, true, true)), P::kFp32Tf32, "fp32 with allow_tf32");
  expect(select_path(f32, gpu(7, 5, false, true)), P::kFallback, "fp32 on 7.5");
  expect(select_path(aligned(Dtype::kFloat64), gpu(9, 0)), P::kFallback, "fp64");
  GroupedMmParams huge = f32;
  huge.m = int64_t{1} << 32;  // past CUTLASS's int32 problem sizes
  expect(select_path(huge, gpu(8, 0)), P::kFallback, "m >= 2^31");
  if (failures == 0) std::printf("OK\n");
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
