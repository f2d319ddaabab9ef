// SIMT driver: reorder_chunks' real launch code (csrc/permute/chunks.cu) on the CPU, with the
// params csrc/permute/cuda.cpp fills. The bridge records the kernels a call ran (the offsets
// kernel, the copy's unit width); the workspace's offset arrays are handed back too, so the tests
// can hold the clamping rule of bad counts to its definition.
#include <cstdint>
#include <cstring>

#include "simt_run.h"

// clang-format off
#include "permute/chunks.cu"
// clang-format on

namespace {

namespace ck = mixops::cuda::chunks_kernels;

// Bytes per unit of the reorder_rows_kernel that ran since the last clear (0: none).
int chunk_unit_ran() {
  return simt::ran(&ck::reorder_rows_kernel<uint4>)      ? 16
         : simt::ran(&ck::reorder_rows_kernel<uint2>)    ? 8
         : simt::ran(&ck::reorder_rows_kernel<uint32_t>) ? 4
         : simt::ran(&ck::reorder_rows_kernel<uint16_t>) ? 2
         : simt::ran(&ck::reorder_rows_kernel<uint8_t>)  ? 1
                                                         : 0;
}

}  // namespace

extern "C" {

// y [N, H] contiguous (written) from x [N, H] (row stride x_stride) and counts [A, B]
// (contiguous), as reorder_chunks_cuda. The workspace is the real
// reorder_chunks_workspace_bytes(A * B), filled with the run's poison byte. src_off, dst_off
// [A * B + 1] (or null): the workspace's offsets after the call. paths[2] (or null): the offsets
// kernel ran, the copy's unit in bytes (0: none ran).
int simt_reorder_chunks(int dtype, int64_t num_rows, int64_t hidden, int64_t num_a, int64_t num_b,
                        const void* x, int64_t x_stride, const int32_t* counts, void* y,
                        int32_t* src_off, int32_t* dst_off, int32_t* error_flag, int32_t* paths,
                        const SimtRun* run, char* err, int err_len) {
  return simt::run_with(run, err, err_len, [&] {
    mixops::ReorderChunksParams p{};
    p.dtype = static_cast<mixops::Dtype>(dtype);
    p.num_rows = num_rows;
    p.hidden = hidden;
    p.num_a = num_a;
    p.num_b = num_b;
    p.counts = counts;
    p.x = x;
    p.x_stride = x_stride;
    p.y = y;
    p.error_flag = error_flag;
    const int64_t chunks = num_a * num_b;
    const simt::Workspace ws(mixops::cuda::reorder_chunks_workspace_bytes(chunks), run->poison);
    simt::launched.clear();
    mixops::cuda::reorder_chunks_launch(p, ws.get(), nullptr);
    if (paths != nullptr) {
      paths[0] = simt::ran(&ck::chunk_offsets_kernel);
      paths[1] = chunk_unit_ran();
    }
    const mixops::cuda::ChunkWorkspace w = mixops::cuda::chunk_workspace(ws.get(), chunks);
    const size_t bytes = static_cast<size_t>(chunks + 1) * sizeof(int32_t);
    if (src_off != nullptr) std::memcpy(src_off, w.src_off, bytes);
    if (dst_off != nullptr) std::memcpy(dst_off, w.dst_off, bytes);
  });
}

}  // extern "C"
