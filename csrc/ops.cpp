// Every mixops schema, one line of doc each. Backends register kernels in csrc/cpu/*.cpp and
// csrc/cuda/*.cpp; fakes (meta) and autograd live in python/mixops/ops/<family>.py, which the
// set_python_module call before each family's schemas names (torch checks the fake's module).
#include <torch/library.h>

TORCH_LIBRARY(mixops, m) {
  m.set_python_module("mixops.ops.grouped_mm");
  // Grouped matrix product. a [m, k] rows grouped by expert x b [E, k, n] -> [m, n] (rows past
  // offsets[-1] are zero), or a [m, r] x b [r, n] grouped along r -> [E, m, n] (empty group: zero
  // block). offsets: int32 [E] cumulative group ends.
  m.def("grouped_mm(Tensor a, Tensor b, Tensor offsets) -> Tensor");
}
