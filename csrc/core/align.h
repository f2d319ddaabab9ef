// Alignment arithmetic and workspace carving, torch-free and host/device: one copy for every
// family (argument arrays of the grouped GEMMs, permute's rank buffers, ...).
#pragma once

#include <cstddef>
#include <cstdint>

#include "core/macros.h"

namespace mixops {

// Every workspace sub-buffer starts on this boundary (the torch allocator's blocks do too).
constexpr size_t kWorkspaceAlign = 256;

MIXOPS_INLINE constexpr size_t align_up(size_t v, size_t a = kWorkspaceAlign) {
  return (v + a - 1) / a * a;
}

MIXOPS_INLINE bool is_aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// Hands out aligned byte offsets of consecutive sub-buffers: `take(bytes)` returns where the next
// one starts; `total` is the size of the whole workspace. Host arithmetic only.
struct WorkspacePlan {
  size_t total = 0;
  size_t take(size_t bytes) {
    const size_t at = total;
    total = align_up(total + bytes);
    return at;
  }
};

}  // namespace mixops
