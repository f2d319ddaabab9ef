// grouped_mm: the zero-fill kernel, enqueued before every GEMM path. It writes zeros to exactly
// what no group writes (so the GEMM kernels never have to, and empty groups get no tiles):
//   !ragged_k: rows [end of group E-1, m) of out (all rows when k == 0 or E == 0);
//   ragged_k : the whole [m, n] block of every group whose clamped length is 0.
// It also ORs offset-error bits for every group into params.error_flag, so every path (including
// the SM90 one) reports bad offsets even when its own kernels do not.
// Offsets are read on the device only; the grid is sized from host-known values and the kernel
// grid-strides. Its own file: it is small, dtype-agnostic (it stores raw bytes) and all-arch.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "grouped_mm_launch.h"
#include "mixops/grouped_mm_params.h"

namespace mixops::cuda::detail {
namespace {

constexpr int kThreads = 256;

// V is the store unit: uint4 (16 bytes) when rows, strides and base are 16-byte aligned, else
// an integer as wide as one element. Sizes below are in units of V.
template <typename V>
__global__ void __launch_bounds__(kThreads)
    zero_fill_kernel(GroupedMmParams p, int64_t row_v, int64_t stride_m_v, int64_t stride_e_v) {
  const int64_t total = grouped_mm_total(p);
  V* out = static_cast<V*>(p.out);
  const V zero{};

  // Error bits: one block scans all groups (E is small; the atomics only fire on bad offsets).
  if (blockIdx.x == 0 && blockIdx.y == 0 && p.error_flag != nullptr) {
    for (int32_t g = threadIdx.x; g < p.num_groups; g += blockDim.x) {
      int64_t b, e;
      int32_t err = 0;
      grouped_mm_group_bounds(p.offsets, g, total, &b, &e, &err);
      if (err != 0) atomicOr(p.error_flag, err);
    }
  }

  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * blockDim.x;

  if (!p.ragged_k) {
    // First row no group writes: the clamped end of the last group, or 0 when no GEMM runs
    // (k == 0 or E == 0). Clamping makes each group start at or before the previous group's
    // end, so groups 0..E-1 cover [0, end of E-1) without gaps even for invalid offsets; rows
    // zeroed here that a group also covers are overwritten by the GEMM, which runs after.
    int64_t first = 0;
    if (p.num_groups > 0 && p.k > 0) {
      int64_t b;
      int32_t err;
      grouped_mm_group_bounds(p.offsets, p.num_groups - 1, total, &b, &first, &err);
    }
    const int64_t count = (p.m - first) * row_v;
    for (int64_t i = tid; i < count; i += nthreads) {
      const int64_t r = first + i / row_v, c = i % row_v;
      out[r * stride_m_v + c] = zero;
    }
    return;
  }

  // ragged_k: grid.y strides over groups, grid.x over the [m, n] block of an empty group.
  const int64_t count = p.m * row_v;
  for (int64_t g = blockIdx.y; g < p.num_groups; g += gridDim.y) {
    int64_t b, e;
    int32_t err;
    grouped_mm_group_bounds(p.offsets, static_cast<int32_t>(g), total, &b, &e, &err);
    if (e != b) continue;  // a non-empty group's GEMM writes its whole block
    V* blk = out + g * stride_e_v;
    for (int64_t i = tid; i < count; i += nthreads) {
      const int64_t r = i / row_v, c = i % row_v;
      blk[r * stride_m_v + c] = zero;
    }
  }
}

template <typename V>
void launch(const GroupedMmParams& p, const LaunchConfig& cfg, size_t es) {
  const int64_t per = static_cast<int64_t>(sizeof(V) / es);  // elements per store
  const int64_t row_v = p.n / per;
  const int64_t stride_m_v = p.out_stride_m / per;
  const int64_t stride_e_v = p.ragged_k ? p.out_stride_e / per : 0;
  // Host-known bound on the work of one group / the whole tail: m rows of row_v stores.
  const int64_t work = std::max<int64_t>(1, p.m * row_v);
  const int sms = std::max(cfg.num_sms, 1);
  // ragged_k: few x-blocks per group (most groups are non-empty and exit at once).
  const int64_t max_x = p.ragged_k ? 32 : static_cast<int64_t>(sms) * 8;
  const unsigned gx =
      static_cast<unsigned>(std::min<int64_t>((work + kThreads - 1) / kThreads, max_x));
  const unsigned gy =
      p.ragged_k ? static_cast<unsigned>(std::clamp<int64_t>(p.num_groups, 1, 65535)) : 1u;
  zero_fill_kernel<V><<<dim3(gx, gy, 1), kThreads, 0, cfg.stream>>>(p, row_v, stride_m_v,
                                                                     stride_e_v);
}

}  // namespace

// Enqueues the zero fill (and offset error reporting) for params on cfg.stream.
void launch_grouped_mm_zero(const GroupedMmParams& p, const LaunchConfig& cfg) {
  if (p.num_groups <= 0 && p.ragged_k) return;  // out is [0, m, n]: nothing to write or check
  const size_t es = dtype_size(p.dtype);
  const bool vec16 = (reinterpret_cast<uintptr_t>(p.out) % 16 == 0) &&
                     (p.n * static_cast<int64_t>(es)) % 16 == 0 &&
                     (p.out_stride_m * static_cast<int64_t>(es)) % 16 == 0 &&
                     (!p.ragged_k || (p.out_stride_e * static_cast<int64_t>(es)) % 16 == 0);
  if (vec16) {
    launch<uint4>(p, cfg, es);
  } else if (es == 2) {
    launch<uint16_t>(p, cfg, es);
  } else if (es == 4) {
    launch<uint32_t>(p, cfg, es);
  } else {
    launch<uint64_t>(p, cfg, es);
  }
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) {
    throw std::runtime_error(std::string("mixops::grouped_mm: zero-fill launch failed: ") +
                             cudaGetErrorString(e));
  }
}

}  // namespace mixops::cuda::detail
