// grouped_mm_packed's params as its drivers receive them from pytest: grouped_mm's flat struct
// (grouped_mm_params.h) followed by the packed fields (tests/test_simt_grouped_mm_packed.py's
// SimtGroupedMmPacked mirrors it and checks its size through
// simt_grouped_mm_packed_params_size), filled there as csrc/grouped_mm/cuda.cpp's
// grouped_mm_packed_cuda fills GroupedMmParams. Include after simt_run.h and a launch file.
#pragma once

#include <cstddef>
#include <cstdint>

#include "drivers/grouped_mm_params.h"

struct SimtGroupedMmPacked {
  SimtGroupedMm base;
  int32_t packed;  // mixops::PackedDim
  int32_t pad;
  const int32_t* ends;
  int64_t width, total;
};

inline mixops::GroupedMmParams to_packed_params(const SimtGroupedMmPacked& s) {
  mixops::GroupedMmParams p = to_params(s.base);
  p.packed = static_cast<mixops::PackedDim>(s.packed);
  p.ends = s.ends;
  p.width = s.width;
  p.total = s.total;
  return p;
}

extern "C" size_t simt_grouped_mm_packed_params_size() { return sizeof(SimtGroupedMmPacked); }
