// grouped_mm SM90 path, the dispatcher: supported(), workspace_bytes() and run() over the six
// CUTLASS instantiations (grouped_mm_<dtype>_<ab>_sm90.cu), plus the small CUDA-core rescue
// kernel for groups whose start breaks TMA's 16-byte alignment. Kept apart from the instantiations
// so it compiles fast and without CUTLASS; named *_sm90.cu so it is built for sm_90a only, like them.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "grouped_mm_sm90.h"

namespace mixops::cuda::sm90 {
namespace {

using detail::GroupedGemm;
constexpr Layout kRow = Layout::kRowMajor;
constexpr Layout kCol = Layout::kColMajor;

__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <class T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }

// Computes, on CUDA cores with fp32 accumulation, exactly the groups the argument builder gave no
// CUTLASS tiles for because their start is misaligned (same predicate: group_tma_aligned). Only
// launched for layouts where that can happen (may_misalign). Correct but slow (one output element
// per thread, operands from L1/L2): a safety net for offsets that are not multiples of 8, not a
// fast path. Every block walks all groups; aligned ones cost two offset loads.
template <class T>
__global__ void __launch_bounds__(256) rescue_misaligned_groups(GroupedMmParams p) {
  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);
  T* out = static_cast<T*>(p.out);
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int32_t g = 0; g < p.num_groups; ++g) {
    int32_t err = 0;  // already reported by the argument builder
    const GroupProblem q = grouped_mm_group_problem(p, g, &err);
    if (q.gm == 0 || q.gn == 0 || q.gk == 0 || group_tma_aligned(q)) continue;
    const int64_t total = q.gm * q.gn;
    for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
         idx += step) {
      const int64_t i = idx / q.gn, j = idx - i * q.gn;  // j fastest: coalesced B/out rows
      const T* ar = a + q.a_offset + i * p.a_stride_m;
      const T* bc = b + q.b_offset + j * p.b_stride_n;
      float acc = 0.f;
      for (int64_t kk = 0; kk < q.gk; ++kk) {
        acc = fmaf(to_float(ar[kk * p.a_stride_k]), to_float(bc[kk * p.b_stride_k]), acc);
      }
      out[q.out_offset + i * p.out_stride_m + j] = from_float<T>(acc);
    }
  }
}

template <class T>
void launch_rescue(const GroupedMmParams& p, const LaunchConfig& cfg) {
  const int blocks = (cfg.num_sms > 0 ? cfg.num_sms : 132) * 4;
  rescue_misaligned_groups<T><<<blocks, 256, 0, cfg.stream>>>(p);
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) {
    throw std::runtime_error(std::string("grouped_mm sm90: rescue kernel launch failed: ") +
                             cudaGetErrorString(e));
  }
}

// Calls f.template operator()<GroupedGemm<...>>() for p's dtype and layouts (supported() holds).
template <class F>
auto dispatch(const GroupedMmParams& p, F&& f) {
  const bool bf16 = p.dtype == Dtype::kBFloat16;
  if (p.a_layout == kRow && p.b_layout == kRow) {
    return bf16 ? f.template operator()<GroupedGemm<Dtype::kBFloat16, kRow, kRow>>()
                : f.template operator()<GroupedGemm<Dtype::kFloat16, kRow, kRow>>();
  }
  if (p.a_layout == kRow) {
    return bf16 ? f.template operator()<GroupedGemm<Dtype::kBFloat16, kRow, kCol>>()
                : f.template operator()<GroupedGemm<Dtype::kFloat16, kRow, kCol>>();
  }
  return bf16 ? f.template operator()<GroupedGemm<Dtype::kBFloat16, kCol, kRow>>()
              : f.template operator()<GroupedGemm<Dtype::kFloat16, kCol, kRow>>();
}

}  // namespace

bool supported(const GroupedMmParams& p) {
  if (p.dtype != Dtype::kBFloat16 && p.dtype != Dtype::kFloat16) return false;
  if (p.a_layout == kCol && p.b_layout == kCol) return false;  // RR, RC, CR only
  auto aligned16 = [](const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; };
  if (!aligned16(p.a) || !aligned16(p.b) || !aligned16(p.out)) return false;
  // TMA: non-unit strides multiples of 16 bytes and below 2^40 bytes.
  auto ld_ok = [](int64_t ld) { return ld > 0 && ld % 8 == 0 && ld < (int64_t(1) << 39); };
  if (!ld_ok(grouped_mm_lda(p)) || !ld_ok(grouped_mm_ldb(p)) || !ld_ok(p.out_stride_m)) return false;
  const int64_t group_stride = p.ragged_k ? p.out_stride_e : p.b_stride_e;  // 0: broadcast, fine
  if (group_stride < 0 || group_stride % 8 != 0) return false;
  // CUTLASS problem shapes are int32 (the scheduler's tile counts are 64-bit).
  const int64_t kMax = INT32_MAX;
  return p.m <= kMax && p.n <= kMax && p.k <= kMax && p.num_groups >= 0;
}

size_t workspace_bytes(const GroupedMmParams& p, const LaunchConfig& cfg) {
  if (!supported(p) || p.num_groups <= 0) return 0;
  return dispatch(p, [&]<class G>() { return G::workspace_bytes(p, cfg); });
}

void run(const GroupedMmParams& p, void* workspace, const LaunchConfig& cfg) {
  if (!supported(p)) {
    throw std::runtime_error("grouped_mm sm90: parameters not supported (dtype, layout or alignment)");
  }
  if (p.num_groups <= 0) return;
  if (workspace == nullptr || (reinterpret_cast<uintptr_t>(workspace) & 255) != 0) {
    throw std::runtime_error("grouped_mm sm90: workspace must be non-null and 256-byte aligned");
  }
  dispatch(p, [&]<class G>() { G::run(p, workspace, cfg); });
  if (may_misalign(p)) {
    if (p.dtype == Dtype::kBFloat16) {
      launch_rescue<__nv_bfloat16>(p, cfg);
    } else {
      launch_rescue<__half>(p, cfg);
    }
  }
}

}  // namespace mixops::cuda::sm90
