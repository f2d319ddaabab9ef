// rows_to_slots and slots_to_rows on CUDA: the launches of the kernels in slots_kernel.cuh, behind
// launch.h. slots_to_rows first builds the inverse row map with unpermute_backward's scatter
// (row_slot_launch, unpermute.cu), which also flags duplicated rows and bad values. Everything is
// enqueued on the caller's stream; nothing synchronises the host.
//
// The helpers below have names of their own (not unpermute.cu's dispatch / blocks_for): the SIMT
// driver (tests/simt/drivers/slots.cpp) compiles both files in one translation unit.
#include <cuda_runtime_api.h>
#include <nvtx3/nvtx3.hpp>

#include <algorithm>
#include <cstdint>

#include "core/align.h"
#include "core/cuda_launch.h"
#include "permute/launch.h"
#include "permute/slots_kernel.cuh"

namespace mixops::cuda {
namespace {

namespace sk = slots_kernels;

// Do `bytes`-wide units divide every address, stride and head length the kernels step by?
bool units_fit(const SlotsParams& p, int64_t bytes) {
  const int64_t es = dtype_size(p.dtype);
  return is_aligned(p.rows, bytes) && is_aligned(p.slots, bytes) &&
         (p.head_dim * es) % bytes == 0 && (p.rows_stride * es) % bytes == 0 &&
         (p.slot_stride_t * es) % bytes == 0 && (p.slot_stride_h * es) % bytes == 0 &&
         (p.slot_stride_j * es) % bytes == 0;
}

// Calls f.template operator()<U>() with U the widest unit of 16/8/4/2/1 bytes that fits.
template <typename F>
void with_widest_unit(const SlotsParams& p, const F& f) {
  if (units_fit(p, 16)) {
    f.template operator()<uint4>();
  } else if (units_fit(p, 8)) {
    f.template operator()<uint2>();
  } else if (units_fit(p, 4)) {
    f.template operator()<uint32_t>();
  } else if (units_fit(p, 2)) {
    f.template operator()<uint16_t>();
  } else {
    f.template operator()<uint8_t>();
  }
}

template <typename U>
sk::SlotUnits units_of(const SlotsParams& p) {
  const int64_t es = dtype_size(p.dtype), u = static_cast<int64_t>(sizeof(U));
  return {p.head_dim * es / u, p.rows_stride * es / u, p.slot_stride_t * es / u,
          p.slot_stride_h * es / u, p.slot_stride_j * es / u};
}

// Blocks for `items` warps of work (grid-strided past 2^20 blocks).
unsigned slot_blocks(int64_t items) {
  return static_cast<unsigned>(
      std::clamp<int64_t>((items + sk::kWarps - 1) / sk::kWarps, 1, int64_t{1} << 20));
}

}  // namespace

void rows_to_slots_launch(const SlotsParams& p, cudaStream_t stream) {
  nvtx3::scoped_range range{"mixops::rows_to_slots"};
  const int64_t slots = p.num_tokens * p.k;
  if (slots <= 0) return;  // no slot to write, no row_map value to check
  // Runs even when head_dim == 0: the kernel still checks every row_map value.
  with_widest_unit(p, [&]<typename U>() {
    launch_kernel(&sk::rows_to_slots_kernel<U>, slot_blocks(slots), sk::kWarps * 32, 0, stream, p,
                  units_of<U>(p));
  });
  check_launch("rows_to_slots", "launch");
}

size_t slots_to_rows_workspace_bytes(const SlotsParams& p) {
  return row_slot_workspace_bytes(p.num_rows);
}

void slots_to_rows_launch(const SlotsParams& p, void* workspace, cudaStream_t stream) {
  nvtx3::scoped_range range{"mixops::slots_to_rows"};
  int32_t* row_slot = static_cast<int32_t*>(workspace);
  row_slot_launch(p.row_map, p.num_tokens * p.k, p.num_rows, row_slot, p.error_flag,
                  "slots_to_rows", stream);
  if (p.num_rows <= 0 || p.head_dim <= 0) return;  // rows is empty
  with_widest_unit(p, [&]<typename U>() {
    launch_kernel(&sk::slots_to_rows_kernel<U>, slot_blocks(p.num_rows), sk::kWarps * 32, 0, stream,
                  p, units_of<U>(p), static_cast<const int32_t*>(row_slot));
  });
  check_launch("slots_to_rows", "launch");
}

}  // namespace mixops::cuda
