// Compile check: the grouped_mm kernel headers under the SIMT harness (see use.h): zero fill,
// fallback GEMM (all groups, or only those breaking a CUTLASS path's alignment rule), argument
// builder under each rule.
#include <cstdint>

#include "grouped_mm/args_kernel.cuh"
#include "grouped_mm/fallback_kernel.cuh"
#include "grouped_mm/zero_kernel.cuh"
#include "use.h"

namespace mc = mixops::cuda;

struct Tag {};

struct Fallback {
  template <class T>
  static void run() {
    using R = mixops::GroupAlignRule;
    simt_compile::use(&mc::fallback::grouped_mm_fallback_kernel<T, mc::acc_t<T>, R::kAny>,
                      &mc::fallback::grouped_mm_fallback_kernel<T, mc::acc_t<T>, R::kTma>,
                      &mc::fallback::grouped_mm_fallback_kernel<T, mc::acc_t<T>, R::kCutlass2>,
                      &mc::build_group_args<T, T, T, R::kAny, Tag>,
                      &mc::build_group_args<T, T, T, R::kTma, Tag>,
                      &mc::build_group_args<T, T, T, R::kCutlass2, Tag>);
  }
};

void instantiate_grouped_mm() {
  simt_compile::each_dtype<Fallback>();
  simt_compile::use(
      &mc::zero_fill::zero_fill_kernel<uint4>, &mc::zero_fill::zero_fill_kernel<uint16_t>,
      &mc::zero_fill::zero_fill_kernel<uint32_t>, &mc::zero_fill::zero_fill_kernel<uint64_t>,
      &mc::zero_fill::zero_fill_packed_kernel<uint16_t>,
      &mc::zero_fill::zero_fill_packed_kernel<uint32_t>,
      &mc::zero_fill::zero_fill_packed_kernel<uint64_t>);
}
