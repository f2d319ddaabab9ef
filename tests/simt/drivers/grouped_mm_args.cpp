// SIMT driver: the CUTLASS paths' device-side argument builder (csrc/grouped_mm/args_kernel.cuh,
// build_group_args). Its launches live in CUTLASS code (sm80.cuh, sm90.cuh) that cannot compile
// here, so this launches it the way they do (ceil(E / kBuildArgsThreads) blocks of
// kBuildArgsThreads) under simt::launch_checked, which runs it under the four harness runs itself.
// Instantiated as the launchers do (GroupAlignRule): kAny (fp32 SIMT) for fp32; kCutlass2 (SM80
// tensor ops, TF32) for bf16, fp16 and fp32; kTma (SM90) for bf16 and fp16. On grouped_mm's params
// and on grouped_mm_packed's (simt_build_group_args_packed).
#include "simt_run.h"
// clang-format off: the kernel header after the bridge
#include "grouped_mm/args_kernel.cuh"
#include "grouped_mm/launch.h"
// clang-format on
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>
#include <vector>

#include "drivers/grouped_mm_packed_params.h"

namespace {

using mixops::GroupAlignRule;

template <class E, GroupAlignRule kRule>
void build(const mixops::GroupedMmParams& p, int32_t* shapes, void** ptr_a, void** ptr_b,
           void** ptr_d, int64_t* ld_a, int64_t* ld_b, int64_t* ld_d) {
  using mixops::cuda::GroupArgs;
  using mixops::cuda::kBuildArgsThreads;
  const GroupArgs<E, E, E> args{shapes,
                                reinterpret_cast<E**>(ptr_a),
                                reinterpret_cast<E**>(ptr_b),
                                reinterpret_cast<E**>(ptr_d),
                                ld_a,
                                ld_b,
                                ld_d};
  const size_t e = static_cast<size_t>(p.num_groups);
  std::vector<simt::Region> written = {
      {shapes, 3 * e * sizeof(int32_t), "shapes"}, {ptr_a, e * sizeof(void*), "ptr_a"},
      {ptr_b, e * sizeof(void*), "ptr_b"},         {ptr_d, e * sizeof(void*), "ptr_d"},
      {ld_a, e * sizeof(int64_t), "ld_a"},         {ld_b, e * sizeof(int64_t), "ld_b"},
      {ld_d, e * sizeof(int64_t), "ld_d"}};
  if (p.error_flag != nullptr) written.push_back({p.error_flag, sizeof(int32_t), "error_flag"});
  const unsigned blocks =
      static_cast<unsigned>((p.num_groups + kBuildArgsThreads - 1) / kBuildArgsThreads);
  simt::launch_checked(simt::launch_options, simt::default_runs(), written,
                       &mixops::cuda::build_group_args<E, E, E, kRule, E>, blocks,
                       kBuildArgsThreads, 0, p, args);
}

// The builder instantiation the launcher of `rule` uses for p's dtype (a run_with body).
void build_for_rule(const mixops::GroupedMmParams& p, int rule, int32_t* shapes, void** ptr_a,
                    void** ptr_b, void** ptr_d, int64_t* ld_a, int64_t* ld_b, int64_t* ld_d) {
  if (p.num_groups <= 0) return;  // as the launchers: no groups, no launch
  using mixops::Dtype;
  auto go = [&]<class E, GroupAlignRule kRule>() {
    build<E, kRule>(p, shapes, ptr_a, ptr_b, ptr_d, ld_a, ld_b, ld_d);
  };
  const auto r = static_cast<GroupAlignRule>(rule);
  if (p.dtype == Dtype::kFloat32 && r == GroupAlignRule::kAny) {
    return go.template operator()<float, GroupAlignRule::kAny>();  // sm80.cuh, SIMT
  }
  if (p.dtype == Dtype::kFloat32 && r == GroupAlignRule::kCutlass2) {
    return go.template operator()<float, GroupAlignRule::kCutlass2>();  // sm80.cuh, TF32
  }
  if (p.dtype == Dtype::kBFloat16 || p.dtype == Dtype::kFloat16) {
    const bool bf16 = p.dtype == Dtype::kBFloat16;
    if (r == GroupAlignRule::kCutlass2) {  // sm80.cuh, tensor ops
      return bf16 ? go.template operator()<__nv_bfloat16, GroupAlignRule::kCutlass2>()
                  : go.template operator()<__half, GroupAlignRule::kCutlass2>();
    }
    if (r == GroupAlignRule::kTma) {  // sm90.cuh
      return bf16 ? go.template operator()<__nv_bfloat16, GroupAlignRule::kTma>()
                  : go.template operator()<__half, GroupAlignRule::kTma>();
    }
  }
  throw std::runtime_error("no CUTLASS path launches the argument builder for this dtype/rule");
}

}  // namespace

extern "C" {

// rule: a GroupAlignRule, as the launcher of that path instantiates it. Arrays [E] ([E][3] shapes).
int simt_build_group_args(const SimtGroupedMm* s, int rule, int32_t* shapes, void** ptr_a,
                          void** ptr_b, void** ptr_d, int64_t* ld_a, int64_t* ld_b, int64_t* ld_d,
                          const SimtRun* run, char* err, int err_len) {
  return simt::run_with(run, err, err_len, [&] {
    build_for_rule(to_params(*s), rule, shapes, ptr_a, ptr_b, ptr_d, ld_a, ld_b, ld_d);
  });
}

// The same on grouped_mm_packed's params (the builder is shared: the mode is a runtime field).
int simt_build_group_args_packed(const SimtGroupedMmPacked* s, int rule, int32_t* shapes,
                                 void** ptr_a, void** ptr_b, void** ptr_d, int64_t* ld_a,
                                 int64_t* ld_b, int64_t* ld_d, const SimtRun* run, char* err,
                                 int err_len) {
  return simt::run_with(run, err, err_len, [&] {
    build_for_rule(to_packed_params(*s), rule, shapes, ptr_a, ptr_b, ptr_d, ld_a, ld_b, ld_d);
  });
}

}  // extern "C"
