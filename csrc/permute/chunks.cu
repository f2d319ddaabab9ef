// reorder_chunks on CUDA: the launches of chunks_kernel.cuh behind launch.h. One block takes the
// counts' prefix sums in both orders into the workspace (src_off, dst_off: A * B + 1 int32 each;
// bad counts clamped and flagged), then one warp per row of y copies its row of x. Everything is
// enqueued on the caller's stream; nothing synchronises the host, and the counts stay on the
// device.
//
// The helpers below have names of their own: the SIMT driver (tests/simt/drivers/chunks.cpp)
// compiles this file as its translation unit and reads the offsets through chunk_workspace.
#include <cuda_runtime_api.h>
#include <nvtx3/nvtx3.hpp>

#include <algorithm>
#include <cstdint>

#include "core/align.h"
#include "core/cuda_launch.h"
#include "permute/chunks_kernel.cuh"
#include "permute/launch.h"

namespace mixops::cuda {
namespace {

namespace ck = chunks_kernels;

// The workspace's two offset arrays, A * B + 1 entries each.
struct ChunkWorkspace {
  int32_t* src_off;
  int32_t* dst_off;
};

WorkspacePlan chunk_plan(int64_t chunks, size_t* src_at, size_t* dst_at) {
  WorkspacePlan plan;
  const size_t bytes = static_cast<size_t>(chunks + 1) * sizeof(int32_t);
  *src_at = plan.take(bytes);
  *dst_at = plan.take(bytes);
  return plan;
}

ChunkWorkspace chunk_workspace(void* workspace, int64_t chunks) {
  size_t src_at = 0, dst_at = 0;
  chunk_plan(chunks, &src_at, &dst_at);
  auto* base = static_cast<uint8_t*>(workspace);
  return {reinterpret_cast<int32_t*>(base + src_at), reinterpret_cast<int32_t*>(base + dst_at)};
}

// Do `bytes`-wide units divide x's and y's addresses, x's row stride and the row length?
bool chunk_units_fit(const ReorderChunksParams& p, int64_t bytes) {
  const int64_t es = dtype_size(p.dtype);
  return is_aligned(p.x, bytes) && is_aligned(p.y, bytes) && (p.hidden * es) % bytes == 0 &&
         (p.x_stride * es) % bytes == 0;
}

template <typename U>
void launch_reorder_rows(const ReorderChunksParams& p, const ChunkWorkspace& w,
                         cudaStream_t stream) {
  const int64_t es = dtype_size(p.dtype), u = static_cast<int64_t>(sizeof(U));
  const ck::ChunkRowUnits s{p.hidden * es / u, p.x_stride * es / u};
  const auto blocks = static_cast<unsigned>(
      std::clamp<int64_t>((p.num_rows + ck::kWarps - 1) / ck::kWarps, 1, int64_t{1} << 20));
  launch_kernel(&ck::reorder_rows_kernel<U>, blocks, ck::kWarps * 32, 0, stream, p,
                static_cast<const int32_t*>(w.src_off), static_cast<const int32_t*>(w.dst_off), s);
}

}  // namespace

size_t reorder_chunks_workspace_bytes(int64_t num_chunks) {
  size_t src_at = 0, dst_at = 0;
  return chunk_plan(num_chunks, &src_at, &dst_at).total;
}

void reorder_chunks_launch(const ReorderChunksParams& p, void* workspace, cudaStream_t stream) {
  nvtx3::scoped_range range{"mixops::reorder_chunks"};
  const int64_t chunks = p.num_a * p.num_b;
  const ChunkWorkspace w = chunk_workspace(workspace, chunks);
  // always: the counts are checked (flagged) even when there is nothing to copy
  launch_kernel(&ck::chunk_offsets_kernel, 1, ck::kScanThreads, 0, stream, p.counts, p.num_a,
                p.num_b, p.num_rows, w.src_off, w.dst_off, p.error_flag);
  check_launch("reorder_chunks", "offsets launch");
  if (p.num_rows <= 0 || p.hidden <= 0) return;
  if (chunk_units_fit(p, 16)) {
    launch_reorder_rows<uint4>(p, w, stream);
  } else if (chunk_units_fit(p, 8)) {
    launch_reorder_rows<uint2>(p, w, stream);
  } else if (chunk_units_fit(p, 4)) {
    launch_reorder_rows<uint32_t>(p, w, stream);
  } else if (chunk_units_fit(p, 2)) {
    launch_reorder_rows<uint16_t>(p, w, stream);
  } else {
    launch_reorder_rows<uint8_t>(p, w, stream);
  }
  check_launch("reorder_chunks", "copy launch");
}

}  // namespace mixops::cuda
