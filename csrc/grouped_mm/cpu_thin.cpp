// grouped_mm on CPU for thin groups: decoding, where each expert gets a few rows and the time is
// the chosen experts' weight bytes over memory bandwidth.
//
// BLAS's GEMV reads a bf16 weight at ~10 GB/s per core here (torch.mm of [1, 1024] x a [1024,
// 4096] transposed view: 10.0 GB/s on one thread, 18.4 on two, against 34 GB/s of read
// bandwidth). This kernel streams each group's weight rows once: every output is a dot product
// over a contiguous weight row (HF's [E, n, k] layout), eight rows at a time (eight streams per
// thread) with the next block prefetched, all of the group's rows (up to kThinMaxRows, in blocks of
// four) reusing a block of weight rows while it is in L1/L2, and the rows of all groups split over
// the threads in contiguous chunks. A standalone prototype read a 4096 x 1024 bf16 weight at
// 27.9 GB/s on the 2 cores (1 row) and 25.3 GB/s (4 rows).
//
// Arithmetic: the rows of a are converted to fp32 once; weights are converted in registers (bf16:
// a shift; fp16: vcvtph2ps); lane l of a vector accumulator sums the products k = l (mod lanes)
// with fused multiply-adds, the lanes are added in a fixed order, and the fp32 sum is rounded once
// to the output dtype. So results are deterministic for a given machine, and equal the BLAS path's
// to fp32 accumulation order (the tests' tolerances), not bit for bit.
#include "grouped_mm/cpu_thin.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#define MIXOPS_THIN_X86 1
#include <immintrin.h>
#else
#define MIXOPS_THIN_X86 0
#endif

namespace mixops {
namespace {

enum class Isa { kNone, kAvx2, kAvx512 };
enum Kind { kF32 = 0, kBF16 = 1, kF16 = 2 };

Isa detect_isa() {
#if MIXOPS_THIN_X86
  const char* env = std::getenv("MIXOPS_CPU_THIN");
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  if (env != nullptr && env[0] == '0') return Isa::kNone;
  if (env != nullptr && std::strcmp(env, "avx2") == 0) return avx2 ? Isa::kAvx2 : Isa::kNone;
  return avx512 ? Isa::kAvx512 : avx2 ? Isa::kAvx2 : Isa::kNone;
#else
  return Isa::kNone;
#endif
}

Isa isa() {
  static const Isa v = detect_isa();
  return v;
}

// One work item: W rows [j0, j1) of group g, for the group's rows [r0, r1) of a.
struct Item {
  int32_t g;
  int64_t r0, r1, j0, j1;
};

// What every item needs: the operands as raw pointers.
struct Problem {
  const char* b;    // b's data
  int64_t b_group;  // bytes between experts
  int64_t ldw;      // bytes between weight rows (b.stride(2))
  int64_t esize;    // bytes per element
  const float* a;   // a's rows in fp32, [m, kpad], zero past k
  int64_t kpad;     // k rounded up to 16
  int64_t k;
  char* out;  // [m, n] contiguous, the output dtype
  int64_t n;
  Kind kind;
};

void store(const Problem& p, int64_t r, int64_t j, float v) {
  const int64_t i = r * p.n + j;
  switch (p.kind) {
    case kF32: reinterpret_cast<float*>(p.out)[i] = v; break;
    case kBF16: reinterpret_cast<c10::BFloat16*>(p.out)[i] = c10::BFloat16(v); break;
    case kF16: reinterpret_cast<c10::Half*>(p.out)[i] = c10::Half(v); break;
  }
}

#if MIXOPS_THIN_X86
#define MIXOPS_AVX512 __attribute__((target("avx512f,avx512bw")))
#define MIXOPS_AVX2 __attribute__((target("avx2,fma,f16c")))

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

// res[r * R + i] = sum_k a[r][k] * W[i][k] for R weight rows and M rows of a (AVX-512: 16 lanes).
// The weight rows' tail (k % 16 elements) is loaded from a zero-padded copy; a is padded already.
template <int K, int R, int M>
MIXOPS_AVX512 void block512(const char* w, int64_t ldw, int64_t esize, const float* a, int64_t lda,
                            int64_t k, float* res) {
  __m512 acc[R][M];
  for (int i = 0; i < R; ++i)
    for (int r = 0; r < M; ++r) acc[i][r] = _mm512_setzero_ps();
  const int64_t kv = k / 16 * 16;
  for (int64_t kk = 0; kk < kv; kk += 16) {
    __m512 av[M];
    for (int r = 0; r < M; ++r) av[r] = _mm512_loadu_ps(a + r * lda + kk);
    for (int i = 0; i < R; ++i) {
      _mm_prefetch(w + (i + 2 * R) * ldw + kk * esize, _MM_HINT_T0);  // never faults
      const __m512 wv = load16<K>(w + i * ldw + kk * esize);
      for (int r = 0; r < M; ++r) acc[i][r] = _mm512_fmadd_ps(wv, av[r], acc[i][r]);
    }
  }
  if (kv < k) {
    alignas(64) char buf[64];
    for (int i = 0; i < R; ++i) {
      std::memset(buf, 0, sizeof(buf));
      std::memcpy(buf, w + i * ldw + kv * esize, (k - kv) * esize);
      const __m512 wv = load16<K>(buf);
      for (int r = 0; r < M; ++r) {
        acc[i][r] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(a + r * lda + kv), acc[i][r]);
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int r = 0; r < M; ++r) res[r * R + i] = _mm512_reduce_add_ps(acc[i][r]);
}

// The same with AVX2 (8 lanes, 16 registers: fewer rows at a time).
template <int K, int R, int M>
MIXOPS_AVX2 void block256(const char* w, int64_t ldw, int64_t esize, const float* a, int64_t lda,
                          int64_t k, float* res) {
  __m256 acc[R][M];
  for (int i = 0; i < R; ++i)
    for (int r = 0; r < M; ++r) acc[i][r] = _mm256_setzero_ps();
  const int64_t kv = k / 8 * 8;
  for (int64_t kk = 0; kk < kv; kk += 8) {
    __m256 av[M];
    for (int r = 0; r < M; ++r) av[r] = _mm256_loadu_ps(a + r * lda + kk);
    for (int i = 0; i < R; ++i) {
      _mm_prefetch(w + (i + 4 * R) * ldw + kk * esize, _MM_HINT_T0);
      const __m256 wv = load8<K>(w + i * ldw + kk * esize);
      for (int r = 0; r < M; ++r) acc[i][r] = _mm256_fmadd_ps(wv, av[r], acc[i][r]);
    }
  }
  if (kv < k) {
    alignas(32) char buf[32];
    for (int i = 0; i < R; ++i) {
      std::memset(buf, 0, sizeof(buf));
      std::memcpy(buf, w + i * ldw + kv * esize, (k - kv) * esize);
      const __m256 wv = load8<K>(buf);
      for (int r = 0; r < M; ++r) {
        acc[i][r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(a + r * lda + kv), acc[i][r]);
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int r = 0; r < M; ++r) res[r * R + i] = reduce8(acc[i][r]);
}

// Weight rows [j0, j1) against M rows of a starting at row r: R rows at a time, then one at a time.
template <int K, int M, int R, bool kAvx512>
void rows_block(const Problem& p, const char* wg, int64_t r, int64_t j0, int64_t j1) {
  float res[R * M];
  const float* a = p.a + r * p.kpad;
  int64_t j = j0;
  for (; j + R <= j1; j += R) {
    const char* w = wg + j * p.ldw;
    if constexpr (kAvx512) {
      block512<K, R, M>(w, p.ldw, p.esize, a, p.kpad, p.k, res);
    } else {
      block256<K, R, M>(w, p.ldw, p.esize, a, p.kpad, p.k, res);
    }
    for (int rr = 0; rr < M; ++rr)
      for (int i = 0; i < R; ++i) store(p, r + rr, j + i, res[rr * R + i]);
  }
  for (; j < j1; ++j) {
    if constexpr (kAvx512) {
      block512<K, 1, M>(wg + j * p.ldw, p.ldw, p.esize, a, p.kpad, p.k, res);
    } else {
      block256<K, 1, M>(wg + j * p.ldw, p.ldw, p.esize, a, p.kpad, p.k, res);
    }
    for (int rr = 0; rr < M; ++rr) store(p, r + rr, j, res[rr]);
  }
}

// One item: the group's rows in blocks of up to four, each over the item's weight rows (which stay
// in L2 between the blocks). Registers: AVX-512 has 32 (R*M accumulators + M rows of a + one
// weight), AVX2 16.
template <int K, bool kAvx512>
void run_item(const Problem& p, const Item& it) {
  const char* wg = p.b + it.g * p.b_group;
  constexpr int R2 = kAvx512 ? 8 : 4;  // one or two rows of a
  constexpr int R4 = kAvx512 ? 4 : 2;  // three or four
  for (int64_t r = it.r0; r < it.r1; r += 4) {
    switch (std::min<int64_t>(4, it.r1 - r)) {
      case 1: rows_block<K, 1, R2, kAvx512>(p, wg, r, it.j0, it.j1); break;
      case 2: rows_block<K, 2, R2, kAvx512>(p, wg, r, it.j0, it.j1); break;
      case 3: rows_block<K, 3, R4, kAvx512>(p, wg, r, it.j0, it.j1); break;
      default: rows_block<K, 4, R4, kAvx512>(p, wg, r, it.j0, it.j1); break;
    }
  }
}

template <bool kAvx512>
void run_item_any(const Problem& p, const Item& it) {
  switch (p.kind) {
    case kF32: run_item<kF32, kAvx512>(p, it); break;
    case kBF16: run_item<kBF16, kAvx512>(p, it); break;
    case kF16: run_item<kF16, kAvx512>(p, it); break;
  }
}
#endif  // MIXOPS_THIN_X86

// Weight rows per item: ~256 KiB of weights (a block stays in L2 while the group's rows pass over
// it), a multiple of 8.
int64_t chunk_rows(int64_t k, int64_t esize) {
  const int64_t rows = (int64_t(256) << 10) / std::max<int64_t>(1, k * esize);
  return std::max<int64_t>(8, rows / 8 * 8);
}

}  // namespace

const char* grouped_mm_thin_isa() {
  switch (isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "none";
  }
}

bool grouped_mm_thin(const at::Tensor& a, const at::Tensor& b, const int32_t* offsets,
                     int32_t num_groups, at::Tensor& out) {
#if MIXOPS_THIN_X86
  const Isa which = isa();
  if (which == Isa::kNone || b.dim() != 3 || num_groups == 0) return false;
  Kind kind;
  switch (a.scalar_type()) {
    case at::kFloat: kind = kF32; break;
    case at::kBFloat16: kind = kBF16; break;
    case at::kHalf: kind = kF16; break;
    default: return false;
  }
  const int64_t m = a.size(0), k = a.size(1), n = b.size(2);
  if (k == 0 || n == 0 || (b.stride(1) != 1 && k > 1) || !out.is_contiguous()) return false;
  // Every group thin; bounds as the caller validated them (non-decreasing ends within m).
  int64_t prev = 0;
  for (int32_t g = 0; g < num_groups; ++g) {
    const int64_t end = offsets[g];
    if (end - prev > kThinMaxRows) return false;
    prev = end;
  }

  const int64_t kpad = (k + 15) / 16 * 16;
  at::Tensor a32 = at::empty({m, kpad}, a.options().dtype(at::kFloat));
  a32.narrow(1, 0, k).copy_(a);
  if (kpad > k) a32.narrow(1, k, kpad - k).zero_();

  Problem p;
  p.esize = static_cast<int64_t>(b.element_size());
  p.b = static_cast<const char*>(b.const_data_ptr());
  p.b_group = b.stride(0) * p.esize;
  p.ldw = b.stride(2) * p.esize;
  p.a = a32.const_data_ptr<float>();
  p.kpad = kpad;
  p.k = k;
  p.out = static_cast<char*>(out.data_ptr());
  p.n = n;
  p.kind = kind;

  const int64_t chunk = chunk_rows(k, p.esize);
  std::vector<Item> items;
  prev = 0;
  for (int32_t g = 0; g < num_groups; ++g) {
    const int64_t end = offsets[g];
    if (end > prev) {
      for (int64_t j = 0; j < n; j += chunk)
        items.push_back({g, prev, end, j, std::min(n, j + chunk)});
    }
    prev = end;
  }
  const auto run = which == Isa::kAvx512 ? &run_item_any<true> : &run_item_any<false>;
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) run(p, items[i]);
  });
  return true;
#else
  (void)a, (void)b, (void)offsets, (void)num_groups, (void)out;
  return false;
#endif
}

}  // namespace mixops
