// Element loads and stores for the CPU row loops, in the accumulation type (float for
// bf16/fp16/fp32, double for double). Shared by the permute/unpermute and activation kernels.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

// CPU row loops compiled twice, for AVX2 and for the baseline the build targets, picked at load
// time (GCC function multiversioning). The same operations either way (the build has no FMA
// contraction), so the same bits.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MIXOPS_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define MIXOPS_CPU_CLONES
#endif

namespace mixops {

template <class T>
using acc_of = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Element conversions for the row loops. bf16 goes through its bits (a shift each way, round to
// nearest even, NaN kept quiet: what c10::BFloat16 does) so that GCC vectorises the loops.
template <class T>
inline acc_of<T> load(const T* p, int64_t i) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    const uint32_t u = static_cast<uint32_t>(p[i].x) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  } else {
    return static_cast<acc_of<T>>(p[i]);
  }
}

template <class T>
inline void store(T* p, int64_t i, acc_of<T> v) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    uint32_t u;
    std::memcpy(&u, &v, sizeof u);
    const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    p[i].x = v != v ? uint16_t(0x7fc0) : static_cast<uint16_t>(r);
  } else {
    p[i] = static_cast<T>(v);
  }
}

}  // namespace mixops
