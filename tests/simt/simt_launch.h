// SIMT harness: launching kernels, and the shared memory a kernel sees.
//
//   simt::launch(kernel, grid, block, dynamic_smem_bytes, args...)          // like kernel<<<...>>>
//   simt::launch(options, kernel, grid, block, dynamic_smem_bytes, args...)
//   simt::launch_checked({{ptr, bytes, "name"}, ...}, kernel, grid, block, smem, args...)
//
// launch() checks CUDA's launch limits (at most 1024 threads per block, block and grid
// dimensions, dynamic shared memory within the opt-in of the chosen arch: sm_80 163 KB, sm_90
// 227 KB; static within 48 KB), then runs the blocks one after another, in the schedule's order,
// each with its threads as fibers (simt_block.h). The arguments are converted to the kernel's
// parameter types once, and every thread gets its own copy, as on the GPU.
//
// Shared memory is per block and poisoned: at every block start the dynamic buffer is filled
// with Options::poison, and each static variable (MIXOPS_STATIC_SMEM) gets fresh poisoned
// storage at its block's first use. Each has its own heap allocation of exactly its size, so an
// AddressSanitizer build reports accesses past either.
//
// launch_checked() runs the same launch under several (schedule, poison) pairs, restoring the
// listed buffers before each run, and requires bit-identical buffers afterwards. A race on shared
// or global memory, a missing barrier, or a read of shared memory no thread wrote makes some run
// differ; the Error names the run, the buffer and the first differing byte. List every buffer the
// kernel writes (and any it reads and writes): they are restored between runs.
#pragma once

#include <cstdint>
#include <cstring>
#include <new>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "simt_block.h"

namespace simt {

enum class Arch { kSm80, kSm90 };

// The opt-in maximum of dynamic shared memory per block (cudaFuncAttributeMaxDynamic...).
inline size_t max_dynamic_smem(Arch a) { return a == Arch::kSm80 ? 166912 : 232448; }
inline constexpr size_t kMaxStaticSmem = 48 * 1024;

struct Options {
  Schedule schedule = Schedule::kForward;  // order of threads at every round, and of blocks
  uint64_t seed = 1;                       // of the shuffled schedule
  uint8_t poison = 0xA5;                   // every byte of shared memory at block start
  Arch arch = Arch::kSm90;                 // for the shared-memory limits
#ifdef SIMT_ASAN
  size_t stack_bytes = 256 * 1024;  // per thread; ASan frames are larger
#else
  size_t stack_bytes = 64 * 1024;
#endif
  uint64_t max_rounds = uint64_t(1) << 26;  // per block: a longer block is reported as stuck
  // Only the blocks whose linear index (x fastest, then y, z) is in [block_begin, block_end) run;
  // gridDim still reports the whole grid. For the index arithmetic of launches too large to run
  // whole on the CPU: one block of a grid that covers 2^31 elements.
  uint64_t block_begin = 0;
  uint64_t block_end = UINT64_MAX;
};

// One run of launch_checked.
struct Run {
  Schedule schedule;
  uint64_t seed;
  uint8_t poison;
};
inline std::vector<Run> default_runs() {
  return {{Schedule::kForward, 1, 0xA5},
          {Schedule::kReversed, 1, 0x5A},
          {Schedule::kShuffled, 1, 0xFF},
          {Schedule::kShuffled, 2, 0x3C}};
}

// A buffer launch_checked restores before each run and compares after it.
struct Region {
  void* ptr;
  size_t bytes;
  std::string name;
};

namespace detail {

template <class T>
using type_t = T;

inline void check_launch(const Options& o, dim3 grid, dim3 block, size_t smem) {
  auto s = [](dim3 d) {
    return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) +
           ")";
  };
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64)
    throw Error("launch: block " + s(block) + " (" + std::to_string(threads) +
                " threads): at most 1024 threads, (1024, 1024, 64) per dimension");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 ||
      grid.z > 65535)
    throw Error("launch: grid " + s(grid) + " outside [1, 2^31-1] x [1, 65535] x [1, 65535]");
  if (smem > max_dynamic_smem(o.arch))
    throw Error("launch: " + std::to_string(smem) + " bytes of dynamic shared memory exceed the " +
                (o.arch == Arch::kSm80 ? "sm_80" : "sm_90") + " opt-in limit of " +
                std::to_string(max_dynamic_smem(o.arch)) + " bytes");
}

// Runs every block of a launch whose per-thread body is body(ctx).
inline void run_grid(const Options& o, dim3 grid, dim3 block, size_t smem, void (*body)(void*),
                     void* ctx) {
  check_launch(o, grid, block, smem);
  Machine& m = machine();
  if (m.running) throw Error("launch: kernels cannot launch kernels");
  m.running = true;
  struct Done {  // leaves the machine ready for the next launch, thrown or not
    Machine& m;
    ~Done() {
      for (void* p : m.static_allocs) ::operator delete(p, std::align_val_t(64));
      m.static_allocs.clear();
      ::operator delete(m.dynamic_smem, std::align_val_t(64));
      m.dynamic_smem = nullptr;
      m.current = nullptr;
      m.running = false;
    }
  } done{m};
  m.fault.clear();
  m.body = body;
  m.body_ctx = ctx;
  m.schedule = o.schedule;
  m.rng.seed(o.seed);
  m.max_rounds = o.max_rounds;
  m.poison = o.poison;
  m.dynamic_bytes = smem;
  m.dynamic_smem = static_cast<unsigned char*>(::operator new(smem, std::align_val_t(64)));
  m.nthreads = static_cast<int>(block.x * block.y * block.z);
  m.threads.resize(m.nthreads);
  m.stacks.reserve(m.nthreads, o.stack_bytes);
  for (int i = 0; i < m.nthreads; ++i) {
    Thread& t = m.threads[i];
    t.linear = i;
    t.lane = i % 32;
    t.warp = i / 32;
    t.tid = uint3{i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
  }
  blockDim = block;
  gridDim = grid;
  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  std::vector<uint64_t> order(nblocks);
  for (uint64_t b = 0; b < nblocks; ++b) order[b] = b;
  if (o.schedule == Schedule::kReversed) {
    std::reverse(order.begin(), order.end());
  } else if (o.schedule == Schedule::kShuffled) {
    for (uint64_t i = nblocks; i > 1; --i) std::swap(order[i - 1], order[m.rng() % i]);
  }
  for (uint64_t b : order) {
    if (b < o.block_begin || b >= o.block_end) continue;
    const uint3 bidx{static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                     static_cast<unsigned>(b / (uint64_t(grid.x) * grid.y))};
    run_block(m, bidx);
    if (m.static_bytes > kMaxStaticSmem || m.static_bytes + smem > max_dynamic_smem(o.arch))
      throw Error("launch: " + std::to_string(m.static_bytes) + " bytes of static and " +
                  std::to_string(smem) + " of dynamic shared memory exceed the limits");
  }
}

// The calling thread's view of the dynamic shared memory (MIXOPS_DYNAMIC_SMEM).
template <class T>
T* dynamic_smem() {
  self("dynamic shared memory");
  return reinterpret_cast<T*>(machine().dynamic_smem);
}

// One static shared variable (MIXOPS_STATIC_SMEM): the running block's storage for it, fresh
// and poisoned at the block's first use.
struct SmemSlot {
  uint64_t serial = 0;
  void* ptr = nullptr;

  template <class T>
  T& get() {
    static_assert(std::is_trivially_default_constructible_v<T>,
                  "shared memory holds trivially constructible types only");
    Machine& m = machine();
    self("static shared memory");
    if (serial != m.block_serial) {
      ptr = ::operator new(sizeof(T), std::align_val_t(64));
      std::memset(ptr, m.poison, sizeof(T));
      m.static_allocs.push_back(ptr);
      m.static_bytes += sizeof(T);
      serial = m.block_serial;
    }
    return *std::launder(reinterpret_cast<T*>(ptr));
  }
};

}  // namespace detail

template <class... P, class... A>
void launch(const Options& o, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem,
            A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "launch: wrong number of kernel arguments");
  static_assert((!std::is_reference_v<P> && ...), "kernel parameters are passed by value");
  struct Ctx {
    void (*kernel)(P...);
    std::tuple<std::remove_cv_t<P>...> params;
  } ctx{kernel, std::tuple<std::remove_cv_t<P>...>(std::forward<A>(args)...)};
  auto body = [](void* c) {
    auto* x = static_cast<Ctx*>(c);
    std::apply(x->kernel, x->params);  // each thread its own copy of the parameters
  };
  detail::run_grid(o, grid, block, smem, body, &ctx);
}

template <class... P, class... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, A&&... args) {
  launch(Options{}, kernel, grid, block, smem, std::forward<A>(args)...);
}

template <class... P, class... A>
void launch_checked(Options base, const std::vector<Run>& runs, const std::vector<Region>& out,
                    void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, A&&... args) {
  auto name = [](const Run& r) {
    char b[64];
    std::snprintf(b, sizeof b, "%s schedule (seed %llu, poison 0x%02x)", schedule_name(r.schedule),
                  static_cast<unsigned long long>(r.seed), r.poison);
    return std::string(b);
  };
  std::vector<std::vector<unsigned char>> initial, first;
  for (const Region& r : out) {
    const auto* p = static_cast<const unsigned char*>(r.ptr);
    initial.emplace_back(p, p + r.bytes);
  }
  for (size_t i = 0; i < runs.size(); ++i) {
    for (size_t j = 0; j < out.size(); ++j)
      std::memcpy(out[j].ptr, initial[j].data(), out[j].bytes);
    Options o = base;
    o.schedule = runs[i].schedule;
    o.seed = runs[i].seed;
    o.poison = runs[i].poison;
    try {
      launch(o, kernel, grid, block, smem, args...);
    } catch (const Error& e) {
      throw Error(name(runs[i]) + ": " + e.what());
    }
    for (size_t j = 0; j < out.size(); ++j) {
      const auto* p = static_cast<const unsigned char*>(out[j].ptr);
      if (i == 0) {
        first.emplace_back(p, p + out[j].bytes);
        continue;
      }
      for (size_t b = 0; b < out[j].bytes; ++b) {
        if (p[b] == first[j][b]) continue;
        char v[64];
        std::snprintf(v, sizeof v, " (0x%02x vs 0x%02x)", p[b], first[j][b]);
        throw Error(name(runs[i]) + " wrote different bits than the " + name(runs[0]) + " to '" +
                    out[j].name + "' at byte " + std::to_string(b) + v +
                    ": a race, a missing barrier, or a read of shared memory no thread wrote");
      }
    }
  }
}

template <class... P, class... A>
void launch_checked(const std::vector<Region>& out, void (*kernel)(P...), dim3 grid, dim3 block,
                    size_t smem, A&&... args) {
  launch_checked(Options{}, default_runs(), out, kernel, grid, block, smem,
                 std::forward<A>(args)...);
}

}  // namespace simt
