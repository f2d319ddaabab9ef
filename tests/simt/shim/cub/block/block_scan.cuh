// SIMT harness shim of cub::BlockScan: the same results as CUB for associative operators (integer
// sums: what our kernels scan), computed plainly. Every thread stores its input, a barrier, thread
// 0 scans, a barrier, every thread reads its result. Results sit one slot to the right of the
// inputs (thread t's at t + 1), so a caller that reuses TempStorage without the __syncthreads CUB
// demands races exactly as with CUB: a faster thread's next input overwrites a slower thread's
// result, which launch_checked's schedules expose. A block whose size is not the template's is a
// fault, as CUB's results are undefined then.
#pragma once

#include <vector>

namespace cub {

enum BlockScanAlgorithm { BLOCK_SCAN_RAKING, BLOCK_SCAN_RAKING_MEMOIZE, BLOCK_SCAN_WARP_SCANS };

struct Sum {
  template <class T>
  T operator()(const T& a, const T& b) const {
    return a + b;
  }
};

template <typename T, int BLOCK_DIM_X, BlockScanAlgorithm ALGORITHM = BLOCK_SCAN_RAKING,
          int BLOCK_DIM_Y = 1, int BLOCK_DIM_Z = 1, int LEGACY_PTX_ARCH = 0>
class BlockScan {
  static constexpr int kThreads = BLOCK_DIM_X * BLOCK_DIM_Y * BLOCK_DIM_Z;

 public:
  struct TempStorage {
    T slot[kThreads +
           1];  // inputs at [t], results at [(t + 1) % kThreads], aggregate at [kThreads]
  };

  explicit BlockScan(TempStorage& temp) : temp_(temp) {
    if (blockDim.x * blockDim.y * blockDim.z != static_cast<unsigned>(kThreads) ||
        blockDim.x != static_cast<unsigned>(BLOCK_DIM_X) ||
        blockDim.y != static_cast<unsigned>(BLOCK_DIM_Y)) {
      simt::detail::fault(simt::detail::self("cub::BlockScan"),
                          "cub::BlockScan for %d threads used in a block of another shape",
                          kThreads);
    }
    tid_ = threadIdx.x + threadIdx.y * BLOCK_DIM_X + threadIdx.z * BLOCK_DIM_X * BLOCK_DIM_Y;
  }

  void ExclusiveSum(T input, T& output) { Scan(input, output, nullptr, false, T(), Sum()); }
  void ExclusiveSum(T input, T& output, T& block_aggregate) {
    Scan(input, output, &block_aggregate, false, T(), Sum());
  }
  void InclusiveSum(T input, T& output) { Scan(input, output, nullptr, true, T(), Sum()); }
  void InclusiveSum(T input, T& output, T& block_aggregate) {
    Scan(input, output, &block_aggregate, true, T(), Sum());
  }
  template <class Op>
  void ExclusiveScan(T input, T& output, T initial_value, Op op) {
    Scan(input, output, nullptr, false, initial_value, op);
  }
  template <class Op>
  void ExclusiveScan(T input, T& output, T initial_value, Op op, T& block_aggregate) {
    Scan(input, output, &block_aggregate, false, initial_value, op);
  }
  template <class Op>
  void InclusiveScan(T input, T& output, Op op) {
    Scan(input, output, nullptr, true, T(), op);
  }
  template <class Op>
  void InclusiveScan(T input, T& output, Op op, T& block_aggregate) {
    Scan(input, output, &block_aggregate, true, T(), op);
  }

 private:
  template <class Op>
  void Scan(T input, T& output, T* aggregate, bool inclusive, T init, Op op) {
    temp_.slot[tid_] = input;
    __syncthreads();
    if (tid_ == 0) {
      std::vector<T> result(kThreads);
      T acc = init, total = T();
      for (int i = 0; i < kThreads; ++i) {
        const T x = temp_.slot[i];
        total = i == 0 ? x : op(total, x);  // the aggregate: the inputs only
        if (inclusive) acc = i == 0 ? x : op(acc, x);
        result[i] = acc;
        if (!inclusive) acc = op(acc, x);
      }
      for (int i = 0; i < kThreads; ++i) temp_.slot[(i + 1) % kThreads] = result[i];
      temp_.slot[kThreads] = total;
    }
    __syncthreads();
    output = temp_.slot[(tid_ + 1) % kThreads];
    if (aggregate != nullptr) *aggregate = temp_.slot[kThreads];
  }

  TempStorage& temp_;
  int tid_;
};

}  // namespace cub
