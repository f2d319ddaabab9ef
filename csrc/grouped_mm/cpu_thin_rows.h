// The SIMD row kernels of grouped_mm's thin-group CPU path (cpu_thin.cpp): M rows of a against one
// contiguous weight row, as AVX-512 or AVX2 fused multiply-adds on fp32 (weights converted in
// registers) or AVX512-BF16 dot products. Each function carries its own target attribute, so this
// compiles without -mavx flags; cpu_thin.cpp calls one only after checking the CPU has it.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#define MIXOPS_THIN_X86 1
#include <immintrin.h>
#else
#define MIXOPS_THIN_X86 0
#endif

namespace mixops {
namespace thin {

// The element type of the weights (and of a and the output).
enum Kind { kF32 = 0, kBF16 = 1, kF16 = 2 };

#if MIXOPS_THIN_X86
#define MIXOPS_AVX512 __attribute__((target("avx512f,avx512bw")))
#define MIXOPS_AVX2 __attribute__((target("avx2,fma,f16c")))
#define MIXOPS_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))

template <int K>
MIXOPS_AVX512 inline __m512 load16(const char* p) {
  if constexpr (K == kF32) {
    return _mm512_loadu_ps(reinterpret_cast<const float*>(p));
  } else {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    if constexpr (K == kBF16) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
    } else {
      return _mm512_cvtph_ps(v);
    }
  }
}

template <int K>
MIXOPS_AVX2 inline __m256 load8(const char* p) {
  if constexpr (K == kF32) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
  } else {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if constexpr (K == kBF16) {
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
    } else {
      return _mm256_cvtph_ps(v);
    }
  }
}

MIXOPS_AVX2 inline float reduce8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// res[r] = sum_k a[r][k] * w[k] for one weight row and M rows of a (AVX-512: 16 lanes, C chains
// of fused multiply-adds per row of a so their latency overlaps). The weight row is read once, in
// order: one sequential stream per thread, which the hardware prefetcher follows (eight rows at a
// time, software-prefetched, was 5-10% slower for rows of 1024 in an in-process A/B: 625-630 vs
// 594-601 us for two experts' 4096 x 1024 bf16 at 1 row, 1005-1043 vs 934-937 at 2 rows). Whole vectors past the last
// group of C go to chain 0; the row's tail (k % 16 elements) is loaded from a zero-padded copy
// (a is padded already).
template <int K, int M>
MIXOPS_AVX512 void row512(const char* w, int64_t esize, const float* a, int64_t lda, int64_t k,
                          float* res) {
  constexpr int C = 4;
  __m512 acc[M][C];
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  const int64_t kc = k / (16 * C) * (16 * C), kv = k / 16 * 16;
  for (int64_t kk = 0; kk < kc; kk += 16 * C) {
    for (int c = 0; c < C; ++c) {
      const __m512 wv = load16<K>(w + (kk + 16 * c) * esize);
      for (int r = 0; r < M; ++r) {
        acc[r][c] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(a + r * lda + kk + 16 * c), acc[r][c]);
      }
    }
  }
  for (int64_t kk = kc; kk < kv; kk += 16) {
    const __m512 wv = load16<K>(w + kk * esize);
    for (int r = 0; r < M; ++r) {
      acc[r][0] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(a + r * lda + kk), acc[r][0]);
    }
  }
  if (kv < k) {
    alignas(64) char buf[64] = {};
    std::memcpy(buf, w + kv * esize, (k - kv) * esize);
    const __m512 wv = load16<K>(buf);
    for (int r = 0; r < M; ++r) {
      acc[r][0] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(a + r * lda + kv), acc[r][0]);
    }
  }
  for (int r = 0; r < M; ++r) {
    const __m512 s =
        _mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]), _mm512_add_ps(acc[r][2], acc[r][3]));
    res[r] = _mm512_reduce_add_ps(s);
  }
}

// The same with AVX2 (8 lanes; 16 registers: two chains).
template <int K, int M>
MIXOPS_AVX2 void row256(const char* w, int64_t esize, const float* a, int64_t lda, int64_t k,
                        float* res) {
  constexpr int C = 2;
  __m256 acc[M][C];
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  const int64_t kc = k / (8 * C) * (8 * C), kv = k / 8 * 8;
  for (int64_t kk = 0; kk < kc; kk += 8 * C) {
    for (int c = 0; c < C; ++c) {
      const __m256 wv = load8<K>(w + (kk + 8 * c) * esize);
      for (int r = 0; r < M; ++r) {
        acc[r][c] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(a + r * lda + kk + 8 * c), acc[r][c]);
      }
    }
  }
  for (int64_t kk = kc; kk < kv; kk += 8) {
    const __m256 wv = load8<K>(w + kk * esize);
    for (int r = 0; r < M; ++r) {
      acc[r][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(a + r * lda + kk), acc[r][0]);
    }
  }
  if (kv < k) {
    alignas(32) char buf[32] = {};
    std::memcpy(buf, w + kv * esize, (k - kv) * esize);
    const __m256 wv = load8<K>(buf);
    for (int r = 0; r < M; ++r) {
      acc[r][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(a + r * lda + kv), acc[r][0]);
    }
  }
  for (int r = 0; r < M; ++r) res[r] = reduce8(_mm256_add_ps(acc[r][0], acc[r][1]));
}

// bf16 weights and rows on CPUs with AVX512-BF16: vdpbf16ps multiplies 32 bf16 pairs (exact in
// fp32) and adds them into 16 fp32 lanes, with no conversion and half the loads of the fp32 kernel;
// it is what the native bf16 GEMM (oneDNN) runs, with its rounding (two products added per lane
// and step) and its treatment of bf16 denormals as zero. Two chains per row of a.
template <int M>
MIXOPS_AVX512BF16 void row512dp(const char* w, const uint16_t* a, int64_t lda, int64_t k,
                                float* res) {
  constexpr int C = 2;
  __m512 acc[M][C];
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  const int64_t kc = k / (32 * C) * (32 * C), kv = k / 32 * 32;
  for (int64_t kk = 0; kk < kc; kk += 32 * C) {
    for (int c = 0; c < C; ++c) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + (kk + 32 * c) * 2);
      for (int r = 0; r < M; ++r) {
        const __m512bh av = (__m512bh)_mm512_loadu_si512(a + r * lda + kk + 32 * c);
        acc[r][c] = _mm512_dpbf16_ps(acc[r][c], wv, av);
      }
    }
  }
  for (int64_t kk = kc; kk < kv; kk += 32) {
    const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + kk * 2);
    for (int r = 0; r < M; ++r) {
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], wv, (__m512bh)_mm512_loadu_si512(a + r * lda + kk));
    }
  }
  if (kv < k) {
    alignas(64) char buf[64] = {};
    std::memcpy(buf, w + kv * 2, (k - kv) * 2);
    const __m512bh wv = (__m512bh)_mm512_load_si512(buf);
    for (int r = 0; r < M; ++r) {
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], wv, (__m512bh)_mm512_loadu_si512(a + r * lda + kv));
    }
  }
  for (int r = 0; r < M; ++r) res[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
}
#endif  // MIXOPS_THIN_X86

}  // namespace thin
}  // namespace mixops
