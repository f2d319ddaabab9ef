// permute on CUDA: the workspace plan and the launches of the kernels in permute_kernel.cuh
// (histogram, chunk scan, expert scan, rank, gather; a CUB radix sort for priority capacity),
// behind
// launch.h. Everything is enqueued on the caller's stream; nothing synchronises the host.
#include <cub/device/device_radix_sort.cuh>
#include <cuda_runtime_api.h>
#include <nvtx3/nvtx3.hpp>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "core/align.h"
#include "core/cuda_launch.h"
#include "permute/launch.h"
#include "permute/permute_kernel.cuh"

namespace mixops::cuda {
namespace {

// This file launches its kernels.
using namespace permute_kernels;  // NOLINT(google-build-using-namespace)

// Byte offsets into the workspace (each 256-aligned); all sizes depend only on the shapes.
struct Plan {
  int32_t slots = 0, chunks = 0;
  bool rank_pass = false, sort = false;  // capacity can drop slots; by priority (CUB sort)
  int sort_end_bit = 32;
  size_t expert = 0, hist = 0, totals = 0, row_token = 0;
  size_t keys[2] = {0, 0}, vals[2] = {0, 0}, temp = 0, temp_bytes = 0;
  size_t total = 0;
};

Plan make_plan(const PermuteParams& p) {
  const int64_t slots = p.num_tokens * p.k;
  if (p.num_tokens < 0 || p.k < 0 || p.num_experts < 1 || slots >= INT32_MAX || p.num_rows < 0 ||
      p.num_rows > INT32_MAX || p.hidden < 0) {
    fail("permute",
         "unsupported shape (need num_experts >= 1 and num_tokens * k, num_rows < 2^31)");
  }
  Plan w;
  w.slots = static_cast<int32_t>(slots);
  w.chunks = static_cast<int32_t>(permute::num_chunks(slots));
  w.rank_pass = p.capacity >= 0 && p.capacity < slots;  // capacity >= slots drops nothing
  w.sort = w.rank_pass && p.priority != nullptr;
  WorkspacePlan ws;
  auto take = [&ws](size_t bytes) { return ws.take(bytes); };
  const size_t s4 = static_cast<size_t>(slots) * 4;
  w.expert = take(s4);
  w.hist = take(static_cast<size_t>(w.chunks) * static_cast<size_t>(p.num_experts) * 4);
  w.totals = take(static_cast<size_t>(p.num_experts) * 4);
  w.row_token = take(static_cast<size_t>(p.num_rows) * 4);
  if (w.sort) {
    int bits = 0;
    while ((int64_t{1} << bits) < p.k) ++bits;  // j in [0, k) needs bits bits
    w.sort_end_bit = 32 + bits;
    for (int i = 0; i < 2; ++i) w.keys[i] = take(2 * s4);
    for (int i = 0; i < 2; ++i) w.vals[i] = take(s4);
    cub::DoubleBuffer<uint64_t> kb(nullptr, nullptr);
    cub::DoubleBuffer<int32_t> vb(nullptr, nullptr);
    check_cuda(
        cub::DeviceRadixSort::SortPairs(nullptr, w.temp_bytes, kb, vb, w.slots, 0, w.sort_end_bit),
        "permute", "radix sort size query");
    w.temp = take(w.temp_bytes);
  }
  w.total = ws.total;
  return w;
}

// One rank or layout pass over the sequence kSeq (see rank_kernel).
template <Seq kSeq, bool kLayout>
void run_pass(const PermuteParams& p, const Plan& w, const SeqView& v, char* ws,
              cudaStream_t stream) {
  const int32_t E = p.num_experts;
  int32_t* hist = reinterpret_cast<int32_t*>(ws + w.hist);
  int32_t* totals = reinterpret_cast<int32_t*>(ws + w.totals);
  int32_t* row_token = reinterpret_cast<int32_t*>(ws + w.row_token);
  if (E <= kHistSharedMaxE) {
    launch_kernel(&hist_kernel<kSeq, true>, w.chunks, kHistThreads, E * sizeof(int32_t), stream, v,
                  E, hist);
  } else {
    check_cuda(cudaMemsetAsync(hist, 0, static_cast<size_t>(w.chunks) * E * 4, stream), "permute",
               "histogram memset");
    launch_kernel(&hist_kernel<kSeq, false>, w.chunks, kHistThreads, 0, stream, v, E, hist);
  }
  check_launch("permute", "histogram launch");
  launch_kernel(&colscan_kernel, (E + 31) / 32, kScanThreads, 0, stream, hist, w.chunks, E,
                kLayout ? totals : nullptr, kLayout ? nullptr : p.dropped, p.capacity);
  check_launch("permute", "chunk scan launch");
  if constexpr (kLayout) {
    launch_kernel(&expert_scan_kernel, 1, kScanThreads, 0, stream, totals, E, p.offsets);
    check_launch("permute", "expert scan launch");
  }
  const unsigned blocks = static_cast<unsigned>((w.chunks + kRankWarps - 1) / kRankWarps);
  if (E <= kRankSharedMaxE) {
    launch_kernel(&rank_kernel<kSeq, true, kLayout>, blocks, kRankWarps * 32, kRankWarps * E * 4,
                  stream, v, E, w.chunks, hist, totals, p.capacity, p.row_map, row_token,
                  p.num_rows);
  } else {
    launch_kernel(&rank_kernel<kSeq, false, kLayout>, blocks, kRankWarps * 32, 0, stream, v, E,
                  w.chunks, hist, totals, p.capacity, p.row_map, row_token, p.num_rows);
  }
  check_launch("permute", "rank launch");
}

// Enqueues the row gather with V-wide units (V divides every row start and length).
template <typename V>
void launch_gather(const PermuteParams& p, const int32_t* row_token, cudaStream_t stream) {
  const int64_t es = dtype_size(p.dtype);
  const int64_t row_v = p.hidden * es / static_cast<int64_t>(sizeof(V));
  const int64_t x_stride_v = p.x_stride * es / static_cast<int64_t>(sizeof(V));
  const int64_t blocks =
      std::min<int64_t>((p.num_rows + kGatherWarps - 1) / kGatherWarps, int64_t{1} << 16);
  launch_kernel(&gather_kernel<V>, static_cast<unsigned>(blocks), kGatherWarps * 32, 0, stream,
                static_cast<const V*>(p.x), x_stride_v, static_cast<V*>(p.x_sorted), row_v,
                row_token, p.offsets, p.num_experts, p.num_rows, p.num_tokens);
  check_launch("permute", "gather launch");
}

void gather(const PermuteParams& p, const int32_t* row_token, cudaStream_t stream) {
  const int64_t es = dtype_size(p.dtype);
  const auto fits = [&](int64_t v) {
    return is_aligned(p.x, v) && is_aligned(p.x_sorted, v) && (p.x_stride * es) % v == 0 &&
           (p.hidden * es) % v == 0;
  };
  if (fits(16)) {
    launch_gather<uint4>(p, row_token, stream);
  } else if (fits(8)) {
    launch_gather<uint2>(p, row_token, stream);
  } else if (fits(4)) {
    launch_gather<uint32_t>(p, row_token, stream);
  } else if (fits(2)) {
    launch_gather<uint16_t>(p, row_token, stream);
  } else {
    launch_gather<uint8_t>(p, row_token, stream);
  }
}

}  // namespace

size_t permute_workspace_bytes(const PermuteParams& p) { return make_plan(p).total; }

void permute_launch(const PermuteParams& p, void* workspace, cudaStream_t stream) {
  nvtx3::scoped_range range{"mixops::permute"};
  const Plan w = make_plan(p);
  char* ws = static_cast<char*>(workspace);
  const int32_t E = p.num_experts;
  const size_t e_bytes = static_cast<size_t>(E) * 4;
  if (!w.rank_pass) check_cuda(cudaMemsetAsync(p.dropped, 0, e_bytes, stream), "permute", "memset");
  if (w.slots == 0) {  // no slots: no rows used; x_sorted (normally empty) all zero
    check_cuda(cudaMemsetAsync(p.offsets, 0, e_bytes, stream), "permute", "memset");
    const size_t out_bytes = static_cast<size_t>(p.num_rows) * p.hidden * dtype_size(p.dtype);
    if (out_bytes > 0) {
      check_cuda(cudaMemsetAsync(p.x_sorted, 0, out_bytes, stream), "permute", "memset");
    }
    return;
  }

  SeqView v{reinterpret_cast<int32_t*>(ws + w.expert), nullptr, static_cast<int32_t>(p.num_tokens),
            p.k, w.slots};
  uint64_t* keys = w.sort ? reinterpret_cast<uint64_t*>(ws + w.keys[0]) : nullptr;
  int32_t* vals = w.sort ? reinterpret_cast<int32_t*>(ws + w.vals[0]) : nullptr;
  const int prep_blocks = static_cast<int>(
      std::min<int64_t>((w.slots + kPrepThreads - 1) / kPrepThreads, int64_t{1} << 16));
  launch_kernel(&prep_kernel, prep_blocks, kPrepThreads, 0, stream, p, w.slots, v.expert, keys,
                vals);
  check_launch("permute", "prep launch");

  if (w.sort) {  // priority order: stable sort by (j, priority key), then rank in that order
    cub::DoubleBuffer<uint64_t> kb(keys, reinterpret_cast<uint64_t*>(ws + w.keys[1]));
    cub::DoubleBuffer<int32_t> vb(vals, reinterpret_cast<int32_t*>(ws + w.vals[1]));
    size_t temp_bytes = w.temp_bytes;
    check_cuda(cub::DeviceRadixSort::SortPairs(ws + w.temp, temp_bytes, kb, vb, w.slots, 0,
                                               w.sort_end_bit, stream),
               "permute", "radix sort");
    v.sorted = vb.Current();
    run_pass<Seq::kSorted, false>(p, w, v, ws, stream);
  } else if (w.rank_pass) {  // token order inside each choice rank
    run_pass<Seq::kChoiceMajor, false>(p, w, v, ws, stream);
  }
  run_pass<Seq::kSlot, true>(p, w, v, ws, stream);
  if (p.num_rows > 0 && p.hidden > 0) {
    gather(p, reinterpret_cast<const int32_t*>(ws + w.row_token), stream);
  }
}

}  // namespace mixops::cuda
