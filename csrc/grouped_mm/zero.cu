// grouped_mm: launches the zero-fill kernel (zero_kernel.cuh) before every GEMM path. Offsets are
// read on the device only; the grid is sized from host-known values and the kernel grid-strides.
// Its own file: it is small, dtype-agnostic (it stores raw bytes) and all-arch.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>

#include "core/align.h"
#include "core/cuda_launch.h"
#include "grouped_mm/launch.h"
#include "grouped_mm/zero_kernel.cuh"

namespace mixops::cuda::detail {
namespace {

using zero_fill::kThreads;
using zero_fill::zero_fill_kernel;

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
  launch_kernel(&zero_fill_kernel<V>, dim3(gx, gy, 1), kThreads, 0, cfg.stream, p, row_v,
                stride_m_v, stride_e_v);
}

// grouped_mm_packed: one element per store (rectangles start at any column); a few x-blocks per
// rectangle, grid.y over the E + 1 rectangles (the kernel grid-strides past 65535).
template <typename V>
void launch_packed(const GroupedMmParams& p, const LaunchConfig& cfg) {
  const int64_t numel = grouped_mm_packed_out_rows(p) * grouped_mm_packed_out_cols(p);
  const unsigned gx =
      static_cast<unsigned>(std::clamp<int64_t>((numel + kThreads - 1) / kThreads, 1, 32));
  const unsigned gy = static_cast<unsigned>(std::clamp<int64_t>(p.num_groups + 1, 1, 65535));
  launch_kernel(&zero_fill::zero_fill_packed_kernel<V>, dim3(gx, gy, 1), kThreads, 0, cfg.stream,
                p);
}

}  // namespace

// Enqueues the zero fill (and offset error reporting) for params on cfg.stream.
void launch_grouped_mm_zero(const GroupedMmParams& p, const LaunchConfig& cfg) {
  if (p.packed != PackedDim::kNone) {
    const size_t es = dtype_size(p.dtype);
    if (es == 2) {
      launch_packed<uint16_t>(p, cfg);
    } else if (es == 4) {
      launch_packed<uint32_t>(p, cfg);
    } else {
      launch_packed<uint64_t>(p, cfg);
    }
    check_launch("grouped_mm_packed", "zero-fill launch");
    return;
  }
  if (p.num_groups <= 0 && p.ragged_k) return;  // out is [0, m, n]: nothing to write or check
  const size_t es = dtype_size(p.dtype);
  const bool vec16 = is_aligned(p.out, 16) && (p.n * static_cast<int64_t>(es)) % 16 == 0 &&
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
  check_launch("grouped_mm", "zero-fill launch");
}

}  // namespace mixops::cuda::detail
