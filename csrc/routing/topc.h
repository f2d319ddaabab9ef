// select_topc (Mixture-of-Depths / expert-choice top-C selection): the params struct handed to the
// CPU and CUDA kernels and the order key the CUDA kernel ranks by. No torch here.
//
// One row b of scores [B, N] (mask [B, N] bool, True = eligible; no mask: all eligible):
//   chosen   the c best eligible entries under routing::better's strict total order (higher
//            score first, ties to the lower index, NaN last); ineligible entries never
//   output   indices[b, 0..take) the chosen positions in ASCENDING index order (causal order
//            survives), values[b, j] = scores[b, indices[b, j]] (the same bits)
//   short    a row with e < c eligible entries takes all e (take = min(c, e)); its positions
//            take..c-1 hold index -1 and value -inf (permute's "-1: none" convention)
// The CPU kernel ranks with routing::better itself; the CUDA kernel radix-selects on order_key
// and breaks ties by index, which is the same order (see order_key).
#pragma once

#include <cstdint>

#include "core/dtype.h"
#include "core/macros.h"

namespace mixops {

// Tensors of one select_topc call, as raw pointers (all contiguous).
struct TopcParams {
  Dtype dtype;          // of scores and values: fp32, bf16, fp16 or fp64
  int64_t batch;        // B
  int64_t n;            // N <= 2^31 - 1 (checked by the op layer)
  int64_t c;            // 0 <= c <= N
  const void* scores;   // [B, N]
  const uint8_t* mask;  // [B, N] bool, nullable: every entry eligible
  void* values;         // [B, c] scores' dtype
  int64_t* indices;     // [B, c] ascending chosen positions, then -1
};

namespace topc {

// An unsigned key whose order is routing::better's order of the scores alone: a higher key is a
// better score, equal keys are better's ties (-0 == +0; every NaN is the lowest key, 0, below
// -inf). Ties are then broken by the lower index, as better does.
MIXOPS_INLINE uint32_t order_key(float x) {
  if (x != x) return 0u;
  if (x == 0.0f) x = 0.0f;  // -0 == +0
  uint32_t b;
#if defined(__CUDA_ARCH__)
  b = __float_as_uint(x);
#else
  __builtin_memcpy(&b, &x, sizeof b);
#endif
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);  // -inf -> 0x007fffff > 0
}

MIXOPS_INLINE uint64_t order_key(double x) {
  if (x != x) return 0u;
  if (x == 0.0) x = 0.0;
  uint64_t b;
#if defined(__CUDA_ARCH__)
  b = static_cast<uint64_t>(__double_as_longlong(x));
#else
  __builtin_memcpy(&b, &x, sizeof b);
#endif
  constexpr uint64_t kSign = 0x8000000000000000ull;
  return (b & kSign) ? ~b : (b | kSign);
}

}  // namespace topc
}  // namespace mixops
