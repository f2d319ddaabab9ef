// SIMT driver: the exchange that reads and clears the device error record (csrc/core/errors.cu),
// run by mixops.check_errors() on every slot and by MIXOPS_DEBUG=1 on one op's slot.
#include "simt_run.h"
// clang-format off: the launch file after the bridge
#include "core/errors.cu"
// clang-format on

extern "C" {

// record [n] int32 (read and zeroed), out [n] int32 (written).
int simt_exchange_error_bits(int32_t* record, int32_t* out, int64_t n, const SimtRun* run,
                             char* err, int err_len) {
  return simt::run_with(run, err, err_len, [&] {
    simt::launched.clear();
    mixops::cuda::exchange_error_bits_launch(record, out, n, nullptr);
  });
}

// The grid of the latest launch: grid[0] = blocks, grid[1] = threads per block (0 when nothing
// was launched).
void simt_exchange_error_bits_grid(int64_t* grid) {
  const bool any = !simt::launched.empty();
  grid[0] = any ? simt::last_grid.x : 0;
  grid[1] = any ? simt::last_block.x : 0;
}

}  // extern "C"
