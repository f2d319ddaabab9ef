// grouped_mm on CPU for thin groups (decoding: a few rows per expert), where the time is the
// experts' weight bytes over memory bandwidth. See cpu_thin.cpp.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace mixops {

// Groups of at most this many rows take the thin kernel (when every group qualifies).
constexpr int64_t kThinMaxRows = 16;

// out[rows of g] = a[rows of g] @ b[g] (2-D x 3-D mode) with explicit SIMD loops that stream each
// expert's weight rows once, split over the threads, when the call qualifies: b [E, k, n] is a
// transposed view of [E, n, k] rows (HF transformers' layout: each output is a dot product over a
// contiguous weight row), float32/bfloat16/float16, every group at most kThinMaxRows rows, and
// the CPU has AVX2+FMA+F16C or AVX-512 (MIXOPS_CPU_THIN=0 turns it off; =avx2 forces the AVX2
// kernel on an AVX-512 CPU, for tests). Returns false, having written nothing, otherwise. Rows
// past offsets[-1] are the caller's (it zeroes them); offsets are validated.
bool grouped_mm_thin(const at::Tensor& a, const at::Tensor& b, const int32_t* offsets,
                     int32_t num_groups, at::Tensor& out);

// "avx512", "avx2" or "none": the kernel the thin path uses on this machine (tests, benchmarks).
const char* grouped_mm_thin_isa();

}  // namespace mixops
