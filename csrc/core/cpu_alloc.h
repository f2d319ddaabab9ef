// Output allocation for the CPU kernels that write large, fresh tensors (grouped_mm, permute's
// x_sorted, unpermute's y and its backward rows, gated_activation).
//
// torch's CPU allocator hands out fresh mmap'd memory for large tensors on every call, so writing
// it first costs a page fault per 4 KiB page. Measured on the 2-core CI machine: empty + fill of
// 128 MiB fp32 takes 77 ms with 4 KiB pages and 14 ms when advised to transparent huge pages
// (median of 15) -- the fault cost dominated permute (121 ms for 32768 x 1024 fp32 rows). Even
// advised, a fresh 32 MiB output cost 17 ms to first write against 1.9 ms for memory already
// mapped, and that was a quarter of the MoE layer's forward overhead over its dense floor.
//
// So blocks of >= 4 MiB come from a small cache: a freed block is kept (its pages stay mapped) and
// handed to the next output of the same rounded size. When a request misses, the whole cache is
// released first, so the process never holds more memory than it would without the cache (the
// cached blocks were live tensors a moment before; a miss frees them before mapping anything
// new). Training loops repeat the same shapes every step, so after the first step every large
// output is a hit. MIXOPS_CPU_CACHE=0 turns the cache off.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace mixops {

namespace detail {

constexpr size_t kLargeBytes = size_t(4) << 20;  // smaller outputs use at::empty
constexpr size_t kHugePage = size_t(2) << 20;

class LargeBlockCache {
 public:
  static LargeBlockCache& get() {
    static LargeBlockCache* cache =
        new LargeBlockCache();  // never destroyed: deleters may run late
    return *cache;
  }

  bool enabled() const { return enabled_; }

  // A block of `bytes` (a multiple of 2 MiB), 2 MiB aligned, advised to huge pages.
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.find(bytes);
      if (it != free_.end() && !it->second.empty()) {
        void* p = it->second.back();
        it->second.pop_back();
        return p;
      }
      release_all_locked();
    }
    void* p = nullptr;
    if (posix_memalign(&p, kHugePage, bytes) != 0) return nullptr;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, bytes, MADV_HUGEPAGE);  // a hint: where THP is off it does nothing
#endif
    return p;
  }

  void give_back(void* p, size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    free_[bytes].push_back(p);
  }

 private:
  LargeBlockCache() {
    const char* env = std::getenv("MIXOPS_CPU_CACHE");
    enabled_ = !(env && env[0] == '0');
  }

  void release_all_locked() {
    for (auto& [bytes, blocks] : free_) {
      for (void* p : blocks) std::free(p);
      blocks.clear();
    }
  }

  std::mutex mu_;
  std::map<size_t, std::vector<void*>> free_;
  bool enabled_ = true;
};

struct CachedBlock {
  void* ptr;
  size_t bytes;
};

inline void return_block(void* ctx) {
  auto* b = static_cast<CachedBlock*>(ctx);
  LargeBlockCache::get().give_back(b->ptr, b->bytes);
  delete b;
}

}  // namespace detail

// at::empty for CPU outputs; tensors of >= 4 MiB come from the block cache above (contiguous,
// 2 MiB aligned, huge-page advised). A size whose byte count overflows goes to at::empty, which
// raises a clear error (a wrapped product would hand out a small block for a huge shape).
inline at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t bytes_i = static_cast<int64_t>(options.dtype().itemsize());
  bool overflow = false;
  for (int64_t s : sizes) overflow |= s < 0 || __builtin_mul_overflow(bytes_i, s, &bytes_i);
  const size_t bytes = static_cast<size_t>(bytes_i);
  auto& cache = detail::LargeBlockCache::get();
  if (overflow || !options.device().is_cpu() || bytes < detail::kLargeBytes || !cache.enabled()) {
    return at::empty(sizes, options);
  }
  const size_t rounded = (bytes + detail::kHugePage - 1) / detail::kHugePage * detail::kHugePage;
  void* p = cache.take(rounded);
  if (p == nullptr) return at::empty(sizes, options);
  auto* ctx = new detail::CachedBlock{p, rounded};
  return at::for_blob(p, sizes).context(ctx, &detail::return_block).options(options).make_tensor();
}

}  // namespace mixops
