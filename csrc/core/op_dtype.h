// The kernels' dtype tag (mixops::Dtype, torch-free) for a torch scalar type; shared by every CUDA
// op layer. The ops validate dtypes with their own messages first, so the error here is a guard.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include "core/dtype.h"

namespace mixops {

inline Dtype to_mixops_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return Dtype::kFloat32;
    case at::kBFloat16: return Dtype::kBFloat16;
    case at::kHalf: return Dtype::kFloat16;
    case at::kDouble: return Dtype::kFloat64;
    default: TORCH_CHECK(false, "mixops: unsupported dtype ", t);
  }
}

}  // namespace mixops
