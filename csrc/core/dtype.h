// The kernels' element-type tags: torch-free, shared by every op family's params struct. The op
// layers map torch dtypes to these (core/op_dtype.h); CUDA launchers switch on them once
// (core/cuda_launch.h, dispatch_dtype).
#pragma once

#include <cstdint>

#include "core/macros.h"

namespace mixops {

enum class Dtype : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3 };
// Which stride of a 2-D operand is 1: kRowMajor, the last; kColMajor, the first.
enum class Layout : int32_t { kRowMajor = 0, kColMajor = 1 };

MIXOPS_INLINE int64_t dtype_size(Dtype d) {
  return d == Dtype::kFloat64 ? 8 : d == Dtype::kFloat32 ? 4 : 2;
}

}  // namespace mixops
