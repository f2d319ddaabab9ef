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
// step, so after the first step every large output is a hit. A miss maps a new block and releases
// only the idle blocks that are stale: idle while more than MIXOPS_CPU_CACHE_STALE (default 4096)
// blocks were taken since they were freed -- sizes the program no longer asks for (shapes that
// changed). Two earlier policies thrashed:
//  * releasing the whole cache on every miss: a lone miss per step (a tensor outliving its step)
//    emptied it for the rest of the step; the MoA layer's backward paid ~20 ms of page faults per
//    32 MiB gradient (27 ms for an unpermute_backward that takes 6.7 ms on mapped memory);
//  * releasing it on two misses in a row: the cold first step released, in its backward, the
//    blocks the second step needed, whose misses in a row released them again, forever. The MoE
//    layer's fwd+bwd (2048 tokens, hidden 1024, ffn 2048, E 8, k 2, fp32) missed 10 of its 12
//    large outputs in every step and took 870-1350 ms instead of a steady 870.
// The reuse distance of a steady loop is under one step's takes (~12 per MoE layer's fwd+bwd:
// 4096 covers a step of ~300 such layers). Idle blocks are also bounded: past MIXOPS_CPU_CACHE_MB (default 1/8 of physical
// memory) the ones freed longest ago are released. MIXOPS_CPU_CACHE=0 turns the cache off.
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
      ++takes_;
      for (auto it = idle_.rbegin(); it != idle_.rend(); ++it) {
        if (it->bytes != bytes) continue;
        void* p = it->block;
        idle_.erase(std::next(it).base());
        idle_bytes_ -= bytes;
        return p;
      }
      // A miss: release the stale blocks (idle_ is ordered by the time they were freed).
      while (!idle_.empty() && takes_ - idle_.front().freed_at > stale_takes_) {
        release_front_locked();
      }
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
    idle_.push_back({bytes, p, takes_});
    idle_bytes_ += bytes;
    while (idle_bytes_ > limit_ && !idle_.empty()) release_front_locked();
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
    const char* stale = std::getenv("MIXOPS_CPU_CACHE_STALE");
    if (stale != nullptr && stale[0] != '\0') stale_takes_ = std::strtoull(stale, nullptr, 10);
  }

  struct Idle {
    size_t bytes;
    void* block;
    uint64_t freed_at;  // takes_ when it was freed
  };

  void release_front_locked() {
    std::free(idle_.front().block);
    idle_bytes_ -= idle_.front().bytes;
    idle_.pop_front();
  }

  std::mutex mu_;
  std::deque<Idle> idle_;  // freed longest ago first
  size_t idle_bytes_ = 0;
  uint64_t takes_ = 0;  // blocks asked for so far (hits and misses)
  uint64_t stale_takes_ = 4096;
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
