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
// Arithmetic: bf16 on CPUs with AVX512-BF16 takes vdpbf16ps dot products (cpu_thin_rows.h: no
// conversions, half the loads; 424-500 vs 565-622 us for the two experts above at one row).
// Otherwise the rows of a are converted to fp32 once, weights in registers (bf16: a shift; fp16:
// vcvtph2ps), and each lane of each chain of vector accumulators sums a fixed residue class of k
// with fused multiply-adds. Chains and lanes are added in a fixed order and the fp32 sum is rounded
// once to the output dtype. So results are deterministic for a given machine, and equal the BLAS
// path's to fp32 accumulation order (the tests' tolerances), not bit for bit.
#include "grouped_mm/cpu_thin.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "grouped_mm/cpu_thin_rows.h"

namespace mixops {
namespace {

using thin::kBF16;
using thin::kF16;
using thin::kF32;
using thin::Kind;

enum class Isa { kNone, kAvx2, kAvx512, kAvx512Bf16 };

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
// s0, s0 + 1, ... of the copy of a).
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
// M rows of a (rows r.. of out, rows s.. of the copy of a) against weight row j, by one of the
// kernels of cpu_thin_rows.h: fused multiply-adds on fp32 (AVX-512 or AVX2) or bf16 dot products.
template <int K, bool kAvx512>
struct FmaDots {
  template <int M>
  static void run(const Problem& p, const char* w, int64_t r, int64_t s, int64_t j) {
    float res[M];
    const float* a = p.a + s * p.kpad;
    if constexpr (kAvx512) {
      thin::row512<K, M>(w, p.esize, a, p.kpad, p.k, res);
    } else {
      thin::row256<K, M>(w, p.esize, a, p.kpad, p.k, res);
    }
    for (int rr = 0; rr < M; ++rr) store(p, r + rr, j, res[rr]);
  }
};

struct Bf16Dots {
  template <int M>
  static void run(const Problem& p, const char* w, int64_t r, int64_t s, int64_t j) {
    float res[M];
    thin::row512dp<M>(w, p.a16 + s * p.kpad, p.kpad, p.k, res);
    for (int rr = 0; rr < M; ++rr) store(p, r + rr, j, res[rr]);
  }
};

// One item: each weight row in turn, against the group's rows in blocks of up to four (the row
// stays in L1 between the blocks).
template <class Dots>
void run_item(const Problem& p, const Item& it) {
  const char* wg = p.b + it.g * p.b_group;
  for (int64_t j = it.j0; j < it.j1; ++j) {
    const char* w = wg + j * p.ldw;
    for (int64_t r = it.r0; r < it.r1; r += 4) {
      const int64_t s = it.s0 + (r - it.r0);
      switch (std::min<int64_t>(4, it.r1 - r)) {
        case 1: Dots::template run<1>(p, w, r, s, j); break;
        case 2: Dots::template run<2>(p, w, r, s, j); break;
        case 3: Dots::template run<3>(p, w, r, s, j); break;
        default: Dots::template run<4>(p, w, r, s, j); break;
      }
    }
  }
}

// The item runner for this call's kernel and dtype.
using ItemFn = void (*)(const Problem&, const Item&);

template <bool kAvx512>
ItemFn fma_runner(Kind kind) {
  switch (kind) {
    case kBF16: return &run_item<FmaDots<kBF16, kAvx512>>;
    case kF16: return &run_item<FmaDots<kF16, kAvx512>>;
    default: return &run_item<FmaDots<kF32, kAvx512>>;
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

  // Their rows of a, one after another, zero-padded to whole vectors: in fp32, or in bf16 (padded
  // to 32) for the dot-product kernel.
  const bool dp = kind == kBF16 && which == Isa::kAvx512Bf16;
  const int64_t kpad = dp ? (k + 31) / 32 * 32 : (k + 15) / 16 * 16;
  at::Tensor arows = at::empty({rows, kpad}, a.options().dtype(dp ? at::kBFloat16 : at::kFloat));
  if (kpad > k) arows.narrow(1, k, kpad - k).zero_();
  const int64_t chunk = chunk_rows(k, static_cast<int64_t>(b.element_size()));
  std::vector<Item> items;
  int64_t s = 0;
  prev = 0;
  for (int32_t g = 0; g < num_groups; ++g) {
    const int64_t begin = prev, end = offsets[g];
    prev = end;
    if (!done[g]) continue;
    arows.narrow(0, s, end - begin).narrow(1, 0, k).copy_(a.narrow(0, begin, end - begin));
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
  p.a = dp ? nullptr : arows.const_data_ptr<float>();
  p.a16 = dp ? static_cast<const uint16_t*>(arows.const_data_ptr()) : nullptr;
  p.kpad = kpad;
  p.k = k;
  p.out = static_cast<char*>(out.data_ptr());
  p.n = n;
  p.kind = kind;
  const ItemFn run = dp                    ? &run_item<Bf16Dots>
                     : which == Isa::kAvx2 ? fma_runner<false>(kind)
                                           : fma_runner<true>(kind);
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
