// SIMT harness shim of NVTX3: ranges are no-ops on the CPU.
#pragma once

namespace nvtx3 {
struct scoped_range {
  template <class... A>
  explicit scoped_range(A&&...) {}
};
}  // namespace nvtx3
