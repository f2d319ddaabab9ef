// grouped_mm's params as the grouped_mm drivers receive them from pytest: a flat C struct with
// fixed-size fields (tests/test_simt_grouped_mm.py's SimtGroupedMm mirrors it and checks its size
// through simt_grouped_mm_params_size), filled there the way csrc/grouped_mm/cuda.cpp fills
// GroupedMmParams (layout canonicalisation, strides, error_flag). to_params() copies it field by
// field. Include after simt_run.h and a grouped_mm launch or kernel file.
#pragma once

#include <cstddef>
#include <cstdint>

#include "grouped_mm/grouped_mm.h"

struct SimtGroupedMm {
  int32_t dtype;     // mixops::Dtype
  int32_t ragged_k;  // 0: 2-D x 3-D, 1: 2-D x 2-D
  int32_t num_groups;
  int32_t a_layout, b_layout;  // mixops::Layout
  int32_t pad;
  int64_t m, n, k;
  const void* a;
  int64_t a_stride_m, a_stride_k;
  const void* b;
  int64_t b_stride_e, b_stride_k, b_stride_n;
  void* out;
  int64_t out_stride_e, out_stride_m;
  const int32_t* offsets;
  int32_t* error_flag;  // nullable
};

inline mixops::GroupedMmParams to_params(const SimtGroupedMm& s) {
  mixops::GroupedMmParams p{};
  p.dtype = static_cast<mixops::Dtype>(s.dtype);
  p.ragged_k = s.ragged_k != 0;
  p.num_groups = s.num_groups;
  p.m = s.m, p.n = s.n, p.k = s.k;
  p.a = s.a, p.a_stride_m = s.a_stride_m, p.a_stride_k = s.a_stride_k;
  p.a_layout = static_cast<mixops::Layout>(s.a_layout);
  p.b = s.b, p.b_stride_e = s.b_stride_e, p.b_stride_k = s.b_stride_k, p.b_stride_n = s.b_stride_n;
  p.b_layout = static_cast<mixops::Layout>(s.b_layout);
  p.out = s.out, p.out_stride_e = s.out_stride_e, p.out_stride_m = s.out_stride_m;
  p.offsets = s.offsets;
  p.error_flag = s.error_flag;
  return p;
}

// The LaunchConfig of a device of compute capability run->arch with num_sms multiprocessors.
inline mixops::cuda::LaunchConfig launch_config(const SimtRun* run, int num_sms) {
  mixops::cuda::LaunchConfig cfg;
  cfg.cc_major = run->arch / 10;
  cfg.cc_minor = run->arch % 10;
  cfg.num_sms = num_sms;
  return cfg;
}

extern "C" size_t simt_grouped_mm_params_size() { return sizeof(SimtGroupedMm); }
