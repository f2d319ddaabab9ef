// SIMT harness shim of cub::DoubleBuffer (cub/util_type.cuh): two buffers and a selector naming
// the one that holds the current data.
#pragma once

namespace cub {

template <typename T>
struct DoubleBuffer {
  T* d_buffers[2] = {nullptr, nullptr};
  int selector = 0;

  DoubleBuffer() = default;
  DoubleBuffer(T* d_current, T* d_alternate) : d_buffers{d_current, d_alternate} {}
  T* Current() { return d_buffers[selector]; }
  T* Alternate() { return d_buffers[selector ^ 1]; }
};

}  // namespace cub
