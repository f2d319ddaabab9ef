// grouped_mm on CPU: one BLAS call per group (at::mm_out into the output slice, so fp32, bf16 and
// fp16 all accumulate in fp32 through MKL/oneDNN), scheduled so skewed groups keep every core busy:
//   * a group costing at least one thread's fair share runs alone with BLAS's own threading;
//   * the other groups are spread over the threads longest-first (LPT), each BLAS call single
//     threaded inside the parallel region, which beats one multithreaded call per small group
//     (fork/join per call; measured with python -m mixops.bench).
// bf16/fp16 on CPUs without native low-precision GEMM instructions (no AVX512-BF16/AMX/AVX512-FP16:
// torch's own bf16 matmul there runs at ~1 GFLOPS on 2 cores) upcast each group's operands to fp32
// and use sgemm (~150 GFLOPS): bf16 x bf16 products are exact in fp32, so this is the same
// fp32-accumulated result, then rounded once to the output dtype.
// Group bounds come from the shared header (grouped_mm_group_bounds), the same code the CUDA
// argument builders run.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/Utils.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "grouped_mm_check.h"
#include "mixops/grouped_mm_params.h"

namespace mixops {
namespace {

struct GroupWork {
  int32_t g;
  int64_t begin, end;
  double cost;
};

bool cpu_has(const char* feature) {
  const auto caps = at::cpu::get_cpu_capabilities();
  const auto it = caps.find(feature);
  return it != caps.end() && it->second.isBool() && it->second.toBool();
}

// Whether BLAS has a native kernel for this dtype on this CPU (else we upcast to fp32).
bool native_gemm(at::ScalarType t) {
  static const bool bf16 = cpu_has("avx512_bf16") || cpu_has("amx_bf16");
  static const bool fp16 = cpu_has("avx512_fp16") || cpu_has("amx_fp16");
  if (t == at::kBFloat16) return bf16;
  if (t == at::kHalf) return fp16;
  return true;
}

// dst = lhs @ rhs, through fp32 when the dtype has no native GEMM here.
void mm_into(at::Tensor& dst, const at::Tensor& lhs, const at::Tensor& rhs) {
  if (native_gemm(dst.scalar_type())) {
    at::mm_out(dst, lhs, rhs);
  } else {
    dst.copy_(at::mm(lhs.to(at::kFloat), rhs.to(at::kFloat)));
  }
}

void run_group(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, bool ragged_k,
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

at::Tensor grouped_mm_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets) {
  const std::vector<int64_t> out_shape = grouped_mm_check(a, b, offsets);
  const bool ragged_k = b.dim() == 2;
  const int64_t total = ragged_k ? a.size(1) : a.size(0);
  grouped_mm_check_offsets_values(offsets, total, ragged_k ? "a.size(1)" : "a.size(0)");

  at::Tensor out = at::empty(out_shape, a.options());
  const at::Tensor off = offsets.contiguous();
  const int32_t* off_ptr = off.data_ptr<int32_t>();
  const int32_t num_groups = static_cast<int32_t>(off.numel());
  const int64_t m = a.size(0);
  const int64_t n = ragged_k ? b.size(1) : b.size(2);

  std::vector<GroupWork> work;
  work.reserve(num_groups);
  double total_cost = 0;
  int64_t last_end = 0;
  for (int32_t g = 0; g < num_groups; ++g) {
    int64_t begin, end;
    int32_t err;
    grouped_mm_group_bounds(off_ptr, g, total, &begin, &end, &err);
    last_end = end;
    const double rows = ragged_k ? double(m) : double(end - begin);
    const double depth = ragged_k ? double(end - begin) : double(a.size(1));
    work.push_back({g, begin, end, rows * depth * double(n)});
    total_cost += work.back().cost;
  }
  if (!ragged_k && last_end < m) out.narrow(0, last_end, m - last_end).zero_();
  if (out.numel() == 0) return out;
  if (!ragged_k && a.size(1) == 0) {  // k == 0: every product is an empty sum
    out.zero_();
    return out;
  }

  const int nthreads = std::max(1, at::get_num_threads());
  const double fair_share = total_cost / nthreads;
  std::vector<GroupWork> small;
  for (const GroupWork& w : work) {
    if (nthreads > 1 && w.cost >= fair_share && w.cost > 0) {
      run_group(a, b, out, ragged_k, w);  // big: BLAS threads over the whole machine
    } else {
      small.push_back(w);
    }
  }
  if (small.empty()) return out;
  if (nthreads == 1 || small.size() == 1) {
    for (const GroupWork& w : small) run_group(a, b, out, ragged_k, w);
    return out;
  }
  // Longest-processing-time-first assignment of the small groups to threads.
  std::sort(small.begin(), small.end(),
            [](const GroupWork& x, const GroupWork& y) { return x.cost > y.cost; });
  std::vector<std::vector<int32_t>> bucket(nthreads);
  std::vector<double> load(nthreads, 0.0);
  for (int32_t i = 0; i < static_cast<int32_t>(small.size()); ++i) {
    const int t = static_cast<int>(std::min_element(load.begin(), load.end()) - load.begin());
    bucket[t].push_back(i);
    load[t] += small[i].cost + 1.0;  // +1: empty groups still cost a call
  }
  at::parallel_for(0, nthreads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int32_t i : bucket[t]) run_group(a, b, out, ragged_k, small[i]);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixops, CPU, m) {
  m.impl("grouped_mm", &grouped_mm_cpu);
}

}  // namespace mixops
