// Output allocation for the CPU kernels that write large, fresh tensors (grouped_mm, permute's x_sorted,
// unpermute's y and unpermute_backward's rows).
//
// torch's CPU allocator hands out fresh mmap'd memory for large tensors on every call, so writing
// it first costs a page fault per 4 KiB page. Measured on the 2-core CI machine: empty + fill of
// 128 MiB fp32 takes 77 ms with 4 KiB pages and 14 ms when advised to transparent huge pages
// (median of 15) -- the fault cost dominated permute (121 ms for 32768 x 1024 fp32 rows).
// madvise(MADV_HUGEPAGE) before the first touch is a hint: where THP is off it does nothing.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace mixops {

// at::empty, with the 2 MiB-aligned interior of tensors of >= 4 MiB advised to huge pages.
inline at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const size_t bytes = t.nbytes();
  if (t.device().is_cpu() && bytes >= (size_t(4) << 20)) {
    const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t hi = (begin + bytes) & ~(kHuge - 1);
    if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
  }
#endif
  return t;
}

}  // namespace mixops
