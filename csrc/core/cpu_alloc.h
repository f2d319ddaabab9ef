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
// handed to the next output of the same rounded size. Training loops repeat the same shapes every
// step, so after the first step every large output is a hit. On a miss:
//  * after a hit (a steady loop meeting one extra live tensor, e.g. the previous step's output)
//    the cached blocks stay. An earlier policy released the whole cache on every miss; then such
//    a lone miss per step emptied it for the rest of the step, and the MoA layer's backward paid
//    ~20 ms of page faults per 32 MiB gradient (27 ms for an unpermute_backward that takes 6.7 ms
//    on mapped memory);
//  * after another miss (a cold step, or shapes that changed) the cache is released before
//    mapping, so a first step peaks no higher than without the cache.
// Idle blocks are also bounded: past MIXOPS_CPU_CACHE_MB (default 1/8 of physical memory) the ones
// freed longest ago are released. MIXOPS_CPU_CACHE=0 turns the cache off.
#pragma once

#include <ATen/ATen.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <utility>

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

  // A block of `bytes` (a multiple of 2 MiB), 2 MiB aligned, advised to huge pages: the idle
  // block of that size freed last, or a new one.
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto it = idle_.rbegin(); it != idle_.rend(); ++it) {
        if (it->first != bytes) continue;
        void* p = it->second;
        idle_.erase(std::next(it).base());
        idle_bytes_ -= bytes;
        ++hits_since_miss_;
        return p;
      }
      // Two misses in a row: the shapes are not repeating (yet), so the idle blocks are likely
      // dead weight; release them before mapping, so a cold step peaks no higher than without
      // the cache. A lone miss among hits (a steady loop with one extra live tensor) keeps them.
      if (hits_since_miss_ == 0) release_all_locked();
      hits_since_miss_ = 0;
    }
    void* p = nullptr;
    if (posix_memalign(&p, kHugePage, bytes) != 0) return nullptr;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, bytes, MADV_HUGEPAGE);  // a hint: where THP is off it does nothing
#endif
    return p;
  }

  // Keeps a freed block; past the limit, releases the blocks freed longest ago.
  void give_back(void* p, size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    idle_.emplace_back(bytes, p);
    idle_bytes_ += bytes;
    while (idle_bytes_ > limit_ && !idle_.empty()) {
      std::free(idle_.front().second);
      idle_bytes_ -= idle_.front().first;
      idle_.pop_front();
    }
  }

 private:
  LargeBlockCache() {
    const char* env = std::getenv("MIXOPS_CPU_CACHE");
    enabled_ = !(env && env[0] == '0');
    const char* mb = std::getenv("MIXOPS_CPU_CACHE_MB");
    if (mb != nullptr && mb[0] != '\0') {
      limit_ = static_cast<size_t>(std::strtoull(mb, nullptr, 10)) << 20;
    } else {
      const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
      limit_ = pages > 0 && page > 0 ? static_cast<size_t>(pages) * page / 8 : size_t(1) << 30;
    }
  }

  void release_all_locked() {
    for (auto& [bytes, block] : idle_) std::free(block);
    idle_.clear();
    idle_bytes_ = 0;
  }

  std::mutex mu_;
  std::deque<std::pair<size_t, void*>> idle_;  // (bytes, block), oldest first
  size_t idle_bytes_ = 0;
  int64_t hits_since_miss_ = 0;
  size_t limit_ = 0;
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
