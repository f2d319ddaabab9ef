// SIMT harness: the collectives kernels call. __syncthreads (and _count/_and/_or) meets the whole
// block; __syncwarp, shuffles, votes, __match_*_sync and __reduce_*_sync meet exactly the lanes
// of their mask, at the same call site (a defaulted std::source_location argument). Each records
// its operands in the calling thread and switches to the scheduler (simt_block.h), which
// computes every participant's result once all have arrived. Lane arithmetic of the shuffles is
// PTX's (shfl.sync: segment mask from `width`, clamp, out-of-segment lanes read their own value);
// reading a lane outside the mask, naming an exited lane, or omitting the calling lane from the
// mask are faults, as are lanes of one warp that meet at different call sites.
#pragma once

#include <cstring>
#include <source_location>
#include <string>
#include <type_traits>

#include "simt_block.h"

#define SIMT_HERE const std::source_location& simt_loc = std::source_location::current()

namespace simt::detail {

enum class ShflMode { kIdx, kUp, kDown, kXor };

// CUDA's overloads take int for the narrow integers (and bool).
template <class T>
using shfl_t = std::conditional_t<std::is_integral_v<T> && (sizeof(T) < 4), int, T>;

template <class T>
T shfl(ShflMode mode, const char* api, unsigned mask, T var, int b, int width,
       const std::source_location& loc) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 16, "shuffle of a large type");
  Thread& t = self(api);
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    fault(t, "%s: width %d is not a power of two in [1, 32]", api, width);
  // PTX shfl.sync: c = ((32 - width) << 8) | (up ? 0 : 31).
  const int lane = t.lane, seg = 32 - width, clamp = mode == ShflMode::kUp ? 0 : 31;
  const int max_lane = (lane & seg) | (clamp & ~seg), min_lane = lane & seg, bv = b & 31;
  int j = lane;
  bool ok = true;
  switch (mode) {
    case ShflMode::kUp:
      j = lane - bv;
      ok = j >= max_lane;
      break;
    case ShflMode::kDown:
      j = lane + bv;
      ok = j <= max_lane;
      break;
    case ShflMode::kXor:
      j = lane ^ bv;
      ok = j <= max_lane;
      break;
    case ShflMode::kIdx:
      j = min_lane | (bv & ~seg);
      ok = j <= max_lane;
      break;
  }
  t.src = ok ? j : lane;
  std::memcpy(t.in, &var, sizeof(T));
  t.bytes = sizeof(T);
  arrive_and_wait(t, Op::kShfl, api, loc, mask);
  T r;
  std::memcpy(&r, t.out, sizeof(T));
  return r;
}

inline unsigned vote(const char* api, unsigned mask, int pred, const std::source_location& loc) {
  Thread& t = self(api);
  t.pred = pred != 0;
  arrive_and_wait(t, Op::kBallot, api, loc, mask);
  return t.result;
}

template <class T>
unsigned match(Op op, const char* api, unsigned mask, T v, int* pred,
               const std::source_location& loc) {
  static_assert(std::is_arithmetic_v<T> && (sizeof(T) == 4 || sizeof(T) == 8),
                "__match_*_sync takes a 32- or 64-bit value");
  Thread& t = self(api);
  std::memset(t.in, 0, sizeof t.in);
  std::memcpy(t.in, &v, sizeof(T));
  t.bytes = sizeof(T);
  arrive_and_wait(t, op, api, loc, mask);
  if (pred != nullptr) *pred = t.pred;
  return t.result;
}

template <class T>
T reduce(Reduce kind, const char* api, unsigned mask, T v, const std::source_location& loc) {
  Thread& t = self(api);
  std::memcpy(t.in, &v, 4);
  t.reduce = kind;
  arrive_and_wait(t, Op::kReduce, api, loc, mask);
  return static_cast<T>(t.result);
}

inline unsigned block_barrier(const char* api, int pred, const std::source_location& loc) {
  Thread& t = self(api);
  t.pred = pred != 0;
  arrive_and_wait(t, Op::kSyncThreads, api, loc, 0);
  return t.result;
}

}  // namespace simt::detail

// ---- barriers ---------------------------------------------------------------------------------

inline void __syncthreads(SIMT_HERE) { simt::detail::block_barrier("__syncthreads", 0, simt_loc); }
inline int __syncthreads_count(int pred, SIMT_HERE) {
  return static_cast<int>(simt::detail::block_barrier("__syncthreads_count", pred, simt_loc));
}
inline int __syncthreads_or(int pred, SIMT_HERE) {
  return simt::detail::block_barrier("__syncthreads_or", pred, simt_loc) != 0;
}
inline int __syncthreads_and(int pred, SIMT_HERE) {
  const unsigned yes = simt::detail::block_barrier("__syncthreads_and", pred, simt_loc);
  return static_cast<int>(yes) == simt::detail::self("__syncthreads_and").src;
}
inline void __syncwarp(unsigned mask = 0xffffffffu, SIMT_HERE) {
  simt::detail::Thread& t = simt::detail::self("__syncwarp");
  simt::detail::arrive_and_wait(t, simt::detail::Op::kSyncWarp, "__syncwarp", simt_loc, mask);
}

// ---- shuffles ---------------------------------------------------------------------------------

template <class T>
inline simt::detail::shfl_t<T> __shfl_sync(unsigned mask, T var, int srcLane, int width = 32,
                                           SIMT_HERE) {
  return simt::detail::shfl<simt::detail::shfl_t<T>>(simt::detail::ShflMode::kIdx, "__shfl_sync",
                                                     mask, var, srcLane, width, simt_loc);
}
template <class T>
inline simt::detail::shfl_t<T> __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32,
                                              SIMT_HERE) {
  return simt::detail::shfl<simt::detail::shfl_t<T>>(simt::detail::ShflMode::kUp, "__shfl_up_sync",
                                                     mask, var, static_cast<int>(delta), width,
                                                     simt_loc);
}
template <class T>
inline simt::detail::shfl_t<T> __shfl_down_sync(unsigned mask, T var, unsigned delta,
                                                int width = 32, SIMT_HERE) {
  return simt::detail::shfl<simt::detail::shfl_t<T>>(simt::detail::ShflMode::kDown,
                                                     "__shfl_down_sync", mask, var,
                                                     static_cast<int>(delta), width, simt_loc);
}
template <class T>
inline simt::detail::shfl_t<T> __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = 32,
                                               SIMT_HERE) {
  return simt::detail::shfl<simt::detail::shfl_t<T>>(
      simt::detail::ShflMode::kXor, "__shfl_xor_sync", mask, var, laneMask, width, simt_loc);
}

// ---- votes, matches, reductions ---------------------------------------------------------------

inline unsigned __ballot_sync(unsigned mask, int pred, SIMT_HERE) {
  return simt::detail::vote("__ballot_sync", mask, pred, simt_loc);
}
inline int __any_sync(unsigned mask, int pred, SIMT_HERE) {
  return simt::detail::vote("__any_sync", mask, pred, simt_loc) != 0;
}
inline int __all_sync(unsigned mask, int pred, SIMT_HERE) {
  return simt::detail::vote("__all_sync", mask, pred, simt_loc) == mask;
}
inline int __uni_sync(unsigned mask, int pred, SIMT_HERE) {
  const unsigned v = simt::detail::vote("__uni_sync", mask, pred, simt_loc);
  return v == 0 || v == mask;
}
template <class T>
inline unsigned __match_any_sync(unsigned mask, T value, SIMT_HERE) {
  return simt::detail::match(simt::detail::Op::kMatchAny, "__match_any_sync", mask, value, nullptr,
                             simt_loc);
}
template <class T>
inline unsigned __match_all_sync(unsigned mask, T value, int* pred, SIMT_HERE) {
  return simt::detail::match(simt::detail::Op::kMatchAll, "__match_all_sync", mask, value, pred,
                             simt_loc);
}

#define SIMT_REDUCE(name, T, kind)                                                         \
  inline T name(unsigned mask, T value, SIMT_HERE) {                                       \
    return simt::detail::reduce(simt::detail::Reduce::kind, #name, mask, value, simt_loc); \
  }
SIMT_REDUCE(__reduce_add_sync, unsigned, kAddU)
SIMT_REDUCE(__reduce_min_sync, unsigned, kMinU)
SIMT_REDUCE(__reduce_max_sync, unsigned, kMaxU)
SIMT_REDUCE(__reduce_add_sync, int, kAddI)
SIMT_REDUCE(__reduce_min_sync, int, kMinI)
SIMT_REDUCE(__reduce_max_sync, int, kMaxI)
SIMT_REDUCE(__reduce_and_sync, unsigned, kAnd)
SIMT_REDUCE(__reduce_or_sync, unsigned, kOr)
SIMT_REDUCE(__reduce_xor_sync, unsigned, kXor)
#undef SIMT_REDUCE

// The lanes of the caller's warp that have not exited. (The model does not track convergence:
// a diverged warp's lanes are all reported.)
inline unsigned __activemask() {
  simt::detail::Thread& t = simt::detail::self("__activemask");
  const simt::detail::Machine& m = simt::detail::machine();
  unsigned mask = 0;
  for (int l = 0; l < 32; ++l)
    if (!simt::detail::lane_gone(m, t.warp * 32, l)) mask |= 1u << l;
  return mask;
}

// A scheduling point that waits for nothing: the thread stays runnable (spin-wait loops).
inline void __nanosleep(unsigned) {
  simt::detail::Thread& t = simt::detail::self("__nanosleep");
  simt::detail::machine().host.yield(t.fiber);
}
