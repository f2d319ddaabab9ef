// grouped_mm on CPU for thin groups: decoding, where each expert gets a few rows and the time is
// the chosen experts' weight bytes over memory bandwidth.
//
// BLAS's GEMV reads a bf16 weight at ~10 GB/s per core here (torch.mm of [1, 1024] x a [1024,
// 4096] transposed view: 10.0 GB/s on one thread, 18.4 on two, against 34 GB/s of read
// bandwidth). This kernel streams each group's weight rows once: every output is a dot product
// over a contiguous weight row (HF's [E, n, k] layout), the rows one after another (a single
// sequential stream per thread), all of the group's rows (up to 4, in one block) reusing a weight
// row while it is in L1, and the rows of all thin groups split over the threads in contiguous
// chunks. Standalone prototypes read 4096 x 1024 bf16 weights (an expert per thread) at
// 29-32 GB/s on the 2 cores this way, against 24-25.5 GB/s eight rows at a time with software
// prefetch (the first version) and 32.6-34 GB/s for torch.sum's plain read.
//
// Arithmetic: the rows of a are converted to fp32 once; weights are converted in registers (bf16:
// a shift; fp16: vcvtph2ps); each lane of each of the chains of vector accumulators sums a fixed
// residue class of k with fused multiply-adds, chains and lanes are added in a fixed order, and
// the fp32 sum is rounded once to the output dtype. So results are deterministic for a given machine, and equal the BLAS path's
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

enum class Isa { kNone, kAvx2, kAvx512, kAvx512Bf16 };
enum Kind { kF32 = 0, kBF16 = 1, kF16 = 2 };

Isa detect_isa() {
#if MIXOPS_THIN_X86
  const char* env = std::getenv("MIXOPS_CPU_THIN");
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  if (env != nullptr && env[0] == '0') return Isa::kNone;
  if (env != nullptr && std::strcmp(env, "avx2") == 0) return avx2 ? Isa::kAvx2 : Isa::kNone;
  if (env != nullptr && std::strcmp(env, "avx512") == 0) return avx512 ? Isa::kAvx512 : Isa::kNone;
  if (avx512 && __builtin_cpu_supports("avx512bf16")) return Isa::kAvx512Bf16;
  return avx512 ? Isa::kAvx512 : avx2 ? Isa::kAvx2 : Isa::kNone;
#else
  return Isa::kNone;
#endif
}

Isa isa() {
  static const Isa v = detect_isa();
  return v;
}

// One work item: W rows [j0, j1) of group g, for the group's rows [r0, r1) of a and out (rows
// s0, s0 + 1, ... of the fp32 copy of a).
struct Item {
  int32_t g;
  int64_t r0, r1, s0, j0, j1;
};

// What every item needs: the operands as raw pointers.
struct Problem {
  const char* b;    // b's data
  int64_t b_group;  // bytes between experts
  int64_t ldw;      // bytes between weight rows (b.stride(2))
  int64_t esize;    // bytes per element
  const float* a;   // the thin groups' rows of a in fp32, [rows, kpad], zero past k
  const uint16_t*
      a16;       // bf16 x bf16 dot products: the rows of a in bf16, [rows, kpad], zero past k
  int64_t kpad;  // k rounded up to 16 (32 for a16)
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

template <int M>
void row_dots_dp(const Problem& p, const char* w, int64_t r, int64_t s, int64_t j) {
  float res[M];
  row512dp<M>(w, p.a16 + s * p.kpad, p.kpad, p.k, res);
  for (int rr = 0; rr < M; ++rr) store(p, r + rr, j, res[rr]);
}

void run_item_dp(const Problem& p, const Item& it) {
  const char* wg = p.b + it.g * p.b_group;
  for (int64_t j = it.j0; j < it.j1; ++j) {
    const char* w = wg + j * p.ldw;
    for (int64_t r = it.r0; r < it.r1; r += 4) {
      const int64_t s = it.s0 + (r - it.r0);
      switch (std::min<int64_t>(4, it.r1 - r)) {
        case 1: row_dots_dp<1>(p, w, r, s, j); break;
        case 2: row_dots_dp<2>(p, w, r, s, j); break;
        case 3: row_dots_dp<3>(p, w, r, s, j); break;
        default: row_dots_dp<4>(p, w, r, s, j); break;
      }
    }
  }
}

// M rows of a (from row r of out, row s of the fp32 copy) against one weight row j.
template <int K, int M, bool kAvx512>
void row_dots(const Problem& p, const char* w, int64_t r, int64_t s, int64_t j) {
  float res[M];
  const float* a = p.a + s * p.kpad;
  if constexpr (kAvx512) {
    row512<K, M>(w, p.esize, a, p.kpad, p.k, res);
  } else {
    row256<K, M>(w, p.esize, a, p.kpad, p.k, res);
  }
  for (int rr = 0; rr < M; ++rr) store(p, r + rr, j, res[rr]);
}

// One item: each weight row in turn, against the group's rows in blocks of up to four (the row
// stays in L1 between the blocks).
template <int K, bool kAvx512>
void run_item(const Problem& p, const Item& it) {
  const char* wg = p.b + it.g * p.b_group;
  for (int64_t j = it.j0; j < it.j1; ++j) {
    const char* w = wg + j * p.ldw;
    for (int64_t r = it.r0; r < it.r1; r += 4) {
      switch (std::min<int64_t>(4, it.r1 - r)) {
        case 1: row_dots<K, 1, kAvx512>(p, w, r, it.s0 + (r - it.r0), j); break;
        case 2: row_dots<K, 2, kAvx512>(p, w, r, it.s0 + (r - it.r0), j); break;
        case 3: row_dots<K, 3, kAvx512>(p, w, r, it.s0 + (r - it.r0), j); break;
        default: row_dots<K, 4, kAvx512>(p, w, r, it.s0 + (r - it.r0), j); break;
      }
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

// Weight rows per item: ~256 KiB of weights (a multiple of 8 rows): items small enough to balance
// the threads, large enough to keep each thread's stream long.
int64_t chunk_rows(int64_t k, int64_t esize) {
  const int64_t rows = (int64_t(256) << 10) / std::max<int64_t>(1, k * esize);
  return std::max<int64_t>(8, rows / 8 * 8);
}

}  // namespace

const char* grouped_mm_thin_isa() {
  switch (isa()) {
    case Isa::kAvx512Bf16: return "avx512_bf16";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "none";
  }
}

int64_t grouped_mm_thin_max_rows(at::ScalarType dtype) {
  // BLAS's native low-precision GEMM (AVX512-BF16) overtakes this kernel's fp32 FMAs from 4 rows
  // on; fp32 BLAS (and our fp32 path for bf16/fp16 without native GEMM) only from more than 4.
  // Measured on 2 cores, two experts' [4096 x 1024] and [1024 x 2048] weights, us per call (thin
  // vs BLAS): bf16 2 rows 934 vs 999 and 341 vs 447, 4 rows 968 vs 1049 and 696 vs 457, 8 rows
  // 1915 vs 1174; fp32 2 rows 1318 vs 2546, 4 rows 1794 vs 2695 and 965 vs 1037.
  if (dtype == at::kBFloat16 && isa() == Isa::kAvx512Bf16) return 4;  // (the dot-product kernel)
  return dtype != at::kFloat && grouped_mm_native_gemm(dtype) ? 2 : 4;
}

int64_t grouped_mm_thin(const at::Tensor& a, const at::Tensor& b, const int32_t* offsets,
                        int32_t num_groups, at::Tensor& out, std::vector<char>& done) {
  done.assign(num_groups, 0);
#if MIXOPS_THIN_X86
  const Isa which = isa();
  if (which == Isa::kNone || b.dim() != 3 || num_groups == 0) return 0;
  Kind kind;
  switch (a.scalar_type()) {
    case at::kFloat: kind = kF32; break;
    case at::kBFloat16: kind = kBF16; break;
    case at::kHalf: kind = kF16; break;
    default: return 0;
  }
  const int64_t k = a.size(1), n = b.size(2);
  if (k == 0 || n == 0 || (b.stride(1) != 1 && k > 1) || !out.is_contiguous()) return 0;
  // The thin groups (bounds as the caller validated them: non-decreasing ends within m).
  const int64_t max_rows = grouped_mm_thin_max_rows(a.scalar_type());
  int64_t rows = 0, count = 0, prev = 0;
  for (int32_t g = 0; g < num_groups; ++g) {
    const int64_t len = offsets[g] - prev;
    prev = offsets[g];
    if (len >= 1 && len <= max_rows) {
      done[g] = 1;
      rows += len;
      ++count;
    }
  }
  if (count == 0) return 0;

  // Their rows of a in fp32, one after another, zero-padded to whole vectors.
  // (bf16 with the dot-product kernel: in bf16, padded to 32)
  const bool dp = kind == kBF16 && which == Isa::kAvx512Bf16;
  const int64_t kpad = dp ? (k + 31) / 32 * 32 : (k + 15) / 16 * 16;
  at::Tensor a32 = at::empty({rows, kpad}, a.options().dtype(dp ? at::kBFloat16 : at::kFloat));
  if (kpad > k) a32.narrow(1, k, kpad - k).zero_();
  const int64_t chunk = chunk_rows(k, static_cast<int64_t>(b.element_size()));
  std::vector<Item> items;
  int64_t s = 0;
  prev = 0;
  for (int32_t g = 0; g < num_groups; ++g) {
    const int64_t begin = prev, end = offsets[g];
    prev = end;
    if (!done[g]) continue;
    a32.narrow(0, s, end - begin).narrow(1, 0, k).copy_(a.narrow(0, begin, end - begin));
    for (int64_t j = 0; j < n; j += chunk) {
      items.push_back({g, begin, end, s, j, std::min(n, j + chunk)});
    }
    s += end - begin;
  }

  Problem p;
  p.esize = static_cast<int64_t>(b.element_size());
  p.b = static_cast<const char*>(b.const_data_ptr());
  p.b_group = b.stride(0) * p.esize;
  p.ldw = b.stride(2) * p.esize;
  p.a = dp ? nullptr : a32.const_data_ptr<float>();
  p.a16 = dp ? static_cast<const uint16_t*>(a32.const_data_ptr()) : nullptr;
  p.kpad = kpad;
  p.k = k;
  p.out = static_cast<char*>(out.data_ptr());
  p.n = n;
  p.kind = kind;
  const auto run = dp                    ? &run_item_dp
                   : which == Isa::kAvx2 ? &run_item_any<false>
                                         : &run_item_any<true>;
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) run(p, items[i]);
  });
  return count;
#else
  (void)a, (void)b, (void)offsets, (void)out;
  return 0;
#endif
}

}  // namespace mixops
