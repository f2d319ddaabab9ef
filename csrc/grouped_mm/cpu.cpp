// grouped_mm on CPU: one BLAS call per group (at::mm_out straight into the output slice), scheduled
// by size (measured on 2 cores, K=1024 N=512, GFLOPS of one mm_out with BLAS's 2 threads vs 1):
//   m=8: 57 vs 51, m=32: 117 vs 79, m=64: 147 vs 87, m=128: 163 vs 92, m=256: 176 vs 93.
// And two independent single-threaded GEMM streams scale only 1.76-1.84x on these machines, while
// BLAS's own threads share packed panels (a loop of 64 mm_out calls for E=64, M=16384 ran at the
// dense floor's speed; one group per thread ran 10% slower). So:
//   * big groups (every GEMM dimension >= 64 and >= 32 MFLOP) run one after another, each with
//     BLAS's threads;
//   * the small rest run in one parallel region, a group per thread at a time, taken longest first
//     from a shared counter (greedy list scheduling), each BLAS call single threaded.
// Re-measured in the MoE layer, E=64 groups of 256 rows, K=1024, N=512 (268 MFLOP
// each), two runs: a group per thread took 103-119 ms forward, 108 ms for the input gradient and
// 112-120 ms for the weight gradient, against 129-130, 119-124 and 119-127 ms with BLAS's threads
// per group (the dense floor: 110, 119, 99). So groups below 1 GFLOP count as small too when there
// are enough of them (4 per thread) to balance; coarse groups (E=8: 4.3 GFLOP) stay big.
// bf16/fp16 on CPUs without native low-precision GEMM instructions (no AVX512-BF16/AMX or
// AVX512-FP16; torch's bf16 matmul there runs at ~1 GFLOPS on 2 cores) run in fp32 on operands
// upcast group by group (sgemm ~85 GFLOPS per core): bf16 x bf16 products are exact in fp32, so
// this is the same fp32-accumulated result, rounded once to the output dtype. Per group, not once
// for the whole operands: the small fp32 copies stay in cache and reuse freed memory (upcasting
// whole operands made the E=64 benchmark 1.95x the floor instead of 1.11x).
// Group bounds come from the shared header (grouped_mm_group_bounds), the code the CUDA argument
// builders run.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/cpu/Utils.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <iterator>
#include <vector>

#include "core/cpu_alloc.h"
#include "grouped_mm/check.h"
#include "grouped_mm/cpu_thin.h"
#include "grouped_mm/grouped_mm.h"

namespace mixops {

static bool cpu_has(const char* feature) {
  const auto caps = at::cpu::get_cpu_capabilities();
  const auto it = caps.find(feature);
  return it != caps.end() && it->second.isBool() && it->second.toBool();
}

// Whether BLAS has a native kernel for this dtype on this CPU (else we compute in fp32).
bool grouped_mm_native_gemm(at::ScalarType t) {
  static const bool bf16 = cpu_has("avx512_bf16") || cpu_has("amx_bf16");
  static const bool fp16 = cpu_has("avx512_fp16") || cpu_has("amx_fp16");
  if (t == at::kBFloat16) return bf16;
  if (t == at::kHalf) return fp16;
  return true;
}

namespace {

constexpr int64_t kBigMinDim = 64;       // every GEMM dimension at least this, and
constexpr double kBigMinFlops = 32e6;    // at least this many FLOPs: BLAS's threads pay off,
constexpr double kHugeFlops = 1e9;       // unless below this and there are
constexpr int64_t kMediumPerThread = 4;  // at least this many such groups per thread

struct GroupWork {
  int32_t g;
  int64_t begin, end;  // the group's range along the ragged dimension
  double flops;
  bool big;
  int64_t pbegin = 0, w = 0;  // grouped_mm_packed: the group's packed range start and width
};

// Columns of rhs upcast at a time on the fp32 path: bounds the fp32 temporaries (a whole 1024 x
// 4096 expert weight is 16 MiB in fp32, more than the bf16 MoE layer's whole peak-memory margin)
// while keeping GEMMs wide enough for BLAS.
constexpr int64_t kUpcastColumns = 1024;

// dst = lhs @ rhs, through fp32 when the dtype has no native GEMM here.
void mm_into(at::Tensor& dst, const at::Tensor& lhs, const at::Tensor& rhs) {
  if (grouped_mm_native_gemm(dst.scalar_type())) {
    at::mm_out(dst, lhs, rhs);
    return;
  }
  const at::Tensor l32 = lhs.to(at::kFloat);
  const int64_t n = rhs.size(1);
  for (int64_t c0 = 0; c0 < n; c0 += kUpcastColumns) {
    const int64_t nc = std::min(kUpcastColumns, n - c0);
    dst.narrow(1, c0, nc).copy_(at::mm(l32, rhs.narrow(1, c0, nc).to(at::kFloat)));
  }
}

void run_piece(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, bool ragged_k,
               const GroupWork& w) {
  const int64_t len = w.end - w.begin;
  if (ragged_k) {
    at::Tensor dst = out.select(0, w.g);
    if (len == 0) {
      dst.zero_();  // an empty group's block is zero, never garbage
      return;
    }
    mm_into(dst, a.narrow(1, w.begin, len), b.narrow(0, w.begin, len));
  } else {
    if (len == 0) return;
    at::Tensor dst = out.narrow(0, w.begin, len);
    mm_into(dst, a.narrow(0, w.begin, len), b.select(0, w.g));
  }
}

// Runs every group of work: big ones one after another (BLAS threads inside each), the small
// rest a group per thread, longest first.
template <typename Run>
void run_groups(std::vector<GroupWork>& work, const Run& run) {
  const int nthreads = std::max(1, at::get_num_threads());
  const int64_t medium = std::count_if(
      work.begin(), work.end(), [](const GroupWork& w) { return w.big && w.flops < kHugeFlops; });
  if (medium >= kMediumPerThread * nthreads) {
    for (GroupWork& w : work) w.big = w.big && w.flops >= kHugeFlops;
  }
  // Big groups: one after another, BLAS threads inside each.
  for (const GroupWork& w : work) {
    if (w.big || nthreads == 1) run(w);
  }
  if (nthreads == 1) return;
  std::vector<GroupWork> small;
  std::copy_if(work.begin(), work.end(), std::back_inserter(small),
               [](const GroupWork& w) { return !w.big; });
  if (small.empty()) return;
  if (small.size() == 1) {
    run(small[0]);
    return;
  }
  // Small groups: longest first from a shared counter, one single-threaded BLAS call each.
  std::sort(small.begin(), small.end(),
            [](const GroupWork& x, const GroupWork& y) { return x.flops > y.flops; });
  std::atomic<int64_t> next{0};
  const int64_t count = static_cast<int64_t>(small.size());
  // OpenMP workers do not inherit the caller's thread-local state (grad mode, dispatch key
  // exclusions): without this, mm_out in a worker sees autograd and refuses out= on tensors
  // that require grad.
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, nthreads, 1, [&](int64_t t0, int64_t t1) {
    const at::ThreadLocalStateGuard state_guard(caller_state);
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t i = next.fetch_add(1); i < count; i = next.fetch_add(1)) {
        run(small[i]);
      }
    }
  });
}

// out (allocated, a's dtype) = grouped a @ b; offsets already validated on the host.
void grouped_mm_into(const at::Tensor& a, const at::Tensor& b, const int32_t* offsets,
                     int32_t num_groups, bool ragged_k, at::Tensor& out) {
  const int64_t m = a.size(0);
  const int64_t n = out.size(-1);
  const int64_t total = ragged_k ? a.size(1) : a.size(0);

  std::vector<GroupWork> work;
  int64_t last_end = 0;
  for (int32_t g = 0; g < num_groups; ++g) {
    int64_t begin, end;
    int32_t err;
    grouped_mm_group_bounds(offsets, g, total, &begin, &end, &err);
    last_end = end;
    const int64_t gm = ragged_k ? m : end - begin;
    const int64_t gk = ragged_k ? end - begin : a.size(1);
    const double flops = 2.0 * double(gm) * double(gk) * double(n);
    const bool big =
        gm >= kBigMinDim && gk >= kBigMinDim && n >= kBigMinDim && flops >= kBigMinFlops;
    if (gm == 0 || n == 0 || (gk == 0 && !ragged_k)) continue;  // nothing to write (or tail zero)
    work.push_back({g, begin, end, flops, big});
  }
  if (!ragged_k && last_end < m) out.narrow(0, last_end, m - last_end).zero_();
  if (out.numel() == 0) return;
  if (!ragged_k && a.size(1) == 0) {  // k == 0: every product is an empty sum
    out.zero_();
    return;
  }
  // Groups of a few rows (decoding): stream their weights instead of a BLAS call per group.
  if (!ragged_k) {
    std::vector<char> thin;
    if (grouped_mm_thin(a, b, offsets, num_groups, out, thin) > 0) {
      work.erase(std::remove_if(work.begin(), work.end(),
                                [&](const GroupWork& w) { return thin[w.g] != 0; }),
                 work.end());
    }
  }
  run_groups(work, [&](const GroupWork& w) { run_piece(a, b, out, ragged_k, w); });
}

at::Tensor grouped_mm_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets) {
  const std::vector<int64_t> out_shape = grouped_mm_check(a, b, offsets);
  const bool ragged_k = b.dim() == 2;
  const int64_t total = ragged_k ? a.size(1) : a.size(0);
  grouped_mm_check_offsets_values(offsets, total, ragged_k ? "a.size(1)" : "a.size(0)");
  const at::Tensor off = offsets.contiguous();
  const int32_t num_groups = static_cast<int32_t>(off.numel());

  at::Tensor out = empty_large(out_shape, a.options());  // huge pages: see cpu_alloc.h
  grouped_mm_into(a, b, off.data_ptr<int32_t>(), num_groups, ragged_k, out);
  return out;
}

// grouped_mm_packed: group g's GEMM on views of a, b and out (the table of csrc/ops.cpp).
void run_packed_piece(const at::Tensor& a, const at::Tensor& b, at::Tensor& out,
                      const GroupedMmParams& p, const GroupWork& w) {
  const int64_t len = w.end - w.begin;
  at::Tensor dst;
  if (!p.ragged_k && p.packed == PackedDim::kN) {  // mn
    dst = out.narrow(0, w.begin, len).narrow(1, 0, w.w);
    mm_into(dst, a.narrow(0, w.begin, len), b.narrow(1, w.pbegin, w.w));
  } else if (!p.ragged_k) {  // mk
    dst = out.narrow(0, w.begin, len);
    mm_into(dst, a.narrow(0, w.begin, len).narrow(1, 0, w.w), b.narrow(0, w.pbegin, w.w));
  } else if (p.packed == PackedDim::kM) {  // km
    dst = out.narrow(0, w.pbegin, w.w);
    mm_into(dst, a.narrow(0, 0, w.w).narrow(1, w.begin, len), b.narrow(0, w.begin, len));
  } else {  // kn
    dst = out.narrow(1, w.pbegin, w.w);
    mm_into(dst, a.narrow(1, w.begin, len), b.narrow(0, w.begin, len).narrow(1, 0, w.w));
  }
}

void zero_rect(at::Tensor& out, const OutRect& r) {
  if (r.rows > 0 && r.cols > 0) out.narrow(0, r.row0, r.rows).narrow(1, r.col0, r.cols).zero_();
}

at::Tensor grouped_mm_packed_cpu(const at::Tensor& a, const at::Tensor& b,
                                 const at::Tensor& offsets, const at::Tensor& ends,
                                 c10::string_view mode, int64_t width, int64_t total) {
  const PackedModeShape ms = grouped_mm_packed_check(a, b, offsets, ends, mode, width, total);
  grouped_mm_check_offsets_values(offsets, ms.ragged_k ? a.size(1) : a.size(0),
                                  ms.ragged_k ? "a.size(1)" : "a.size(0)", "grouped_mm_packed");
  grouped_mm_packed_check_ends_values(ends, total, width);
  const at::Tensor off = offsets.contiguous();
  const at::Tensor en = ends.contiguous();

  // The shared per-group problem (grouped_mm.h) on sizes only: views replace the pointers.
  GroupedMmParams p{};
  p.ragged_k = ms.ragged_k;
  p.packed = ms.packed;
  p.num_groups = static_cast<int32_t>(off.numel());
  p.m = ms.packed == PackedDim::kM ? width : a.size(0);
  p.k = ms.packed == PackedDim::kK ? width : a.size(1);
  p.n = ms.packed == PackedDim::kN ? width : b.size(1);
  p.offsets = off.data_ptr<int32_t>();
  p.ends = en.data_ptr<int32_t>();
  p.width = width;
  p.total = total;

  at::Tensor out = empty_large(ms.out_shape, a.options());  // huge pages: see cpu_alloc.h
  std::vector<GroupWork> work;
  int64_t last_end = 0, last_pend = 0;
  for (int32_t g = 0; g < p.num_groups; ++g) {
    int32_t err;
    const GroupProblem q = grouped_mm_group_problem(p, g, &err);
    last_end = q.end;
    last_pend = q.pend;
    zero_rect(out, grouped_mm_packed_zero_rect(p, q));  // padding and empty sums: zeros
    if (q.gm == 0 || q.gn == 0 || q.gk == 0) continue;
    const double flops = 2.0 * double(q.gm) * double(q.gk) * double(q.gn);
    const bool big =
        q.gm >= kBigMinDim && q.gk >= kBigMinDim && q.gn >= kBigMinDim && flops >= kBigMinFlops;
    const int64_t w = p.packed == PackedDim::kN ? q.gn : p.packed == PackedDim::kK ? q.gk : q.gm;
    work.push_back({g, q.begin, q.end, flops, big, q.pbegin, w});
  }
  zero_rect(out, grouped_mm_packed_tail_rect(p, last_end, last_pend));
  run_groups(work, [&](const GroupWork& w) { run_packed_piece(a, b, out, p, w); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixops, CPU, m) {
  m.impl("grouped_mm", &grouped_mm_cpu);
  m.impl("grouped_mm_packed", &grouped_mm_packed_cpu);
}

}  // namespace mixops
