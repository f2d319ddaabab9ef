// SIMT driver: select_topc's real launch code (csrc/routing/topc.cu) on the CPU. The entry point
// fills TopcParams as the op layer (csrc/routing/cuda.cpp) does after select_topc_check and calls
// the real launcher. The outputs start as the caller's poison bytes, so a position the launch
// leaves unwritten differs between the harness runs.
#include "simt_run.h"
// clang-format off: the launch file after the bridge
#include "routing/topc.cu"
// clang-format on

extern "C" {

// dtype: mixops::Dtype of scores [batch, n] (contiguous); mask [batch, n] bool or null.
// Outputs: values [batch, c] scores' dtype, indices [batch, c] int64.
int simt_select_topc(int dtype, int64_t batch, int64_t n, int64_t c, const void* scores,
                     const uint8_t* mask, void* values, int64_t* indices, const SimtRun* run,
                     char* err, int err_len) {
  return simt::run_with(run, err, err_len, [&] {
    mixops::TopcParams p{};
    p.dtype = static_cast<mixops::Dtype>(dtype);
    p.batch = batch, p.n = n, p.c = c;
    p.scores = scores, p.mask = mask, p.values = values, p.indices = indices;
    mixops::cuda::select_topc_launch(p, nullptr);
  });
}

}  // extern "C"
