// Compile check: the grouped_mm kernel headers under the SIMT harness (see use.h): zero fill,
// fallback GEMM (all groups, or only those misaligned for TMA), argument builder.
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
    simt_compile::use(&mc::fallback::grouped_mm_fallback_kernel<T, mc::acc_t<T>, false>,
                      &mc::fallback::grouped_mm_fallback_kernel<T, mc::acc_t<T>, true>,
                      &mc::build_group_args<T, T, T, false, Tag>,
                      &mc::build_group_args<T, T, T, true, Tag>);
  }
};

void instantiate_grouped_mm() {
  simt_compile::each_dtype<Fallback>();
  simt_compile::use(
      &mc::zero_fill::zero_fill_kernel<uint4>, &mc::zero_fill::zero_fill_kernel<uint16_t>,
      &mc::zero_fill::zero_fill_kernel<uint32_t>, &mc::zero_fill::zero_fill_kernel<uint64_t>);
}
