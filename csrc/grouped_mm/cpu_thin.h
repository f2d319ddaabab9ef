// grouped_mm on CPU for thin groups (decoding: a few rows per expert), where the time is the
// experts' weight bytes over memory bandwidth. See cpu_thin.cpp.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace mixops {

// Whether BLAS has a native GEMM for this dtype on this CPU (bf16: AVX512-BF16 or AMX; fp16:
// AVX512-FP16 or AMX-FP16); without one grouped_mm computes low precision in fp32 (cpu.cpp).
bool grouped_mm_native_gemm(at::ScalarType t);

// The most rows a group may have to take the thin kernel, for this dtype on this CPU: 4, but 2 for
// bf16/fp16 where BLAS has a native GEMM for them and the kernel no dot-product instruction.
int64_t grouped_mm_thin_max_rows(at::ScalarType dtype);

// For each group of 1 to grouped_mm_thin_max_rows rows (2-D x 3-D mode): out[rows of g] = a[rows
// of g] @ b[g], with explicit SIMD loops that stream the expert's weight rows once, split over the
// threads (decoding: the time is the weights' bytes over memory bandwidth), when the call
// qualifies: b [E, k, n] is a transposed view of [E, n, k] rows (HF transformers' layout: each
// output is a dot product over a contiguous weight row), float32/bfloat16/float16, and the CPU has
// AVX2+FMA+F16C or AVX-512 (MIXOPS_CPU_THIN=0 turns it off; =avx512 or =avx2 forces that kernel,
// without bf16 dot products, for tests). done[g] = 1 for each group it wrote (the caller runs the others);
// returns how many. Rows past offsets[-1] are the caller's; offsets are validated.
int64_t grouped_mm_thin(const at::Tensor& a, const at::Tensor& b, const int32_t* offsets,
                        int32_t num_groups, at::Tensor& out, std::vector<char>& done);

// "avx512_bf16" (bf16 by vdpbf16ps dot products, other dtypes as "avx512"), "avx512", "avx2" or
// "none": the kernel the thin path uses on this machine (tests, benchmarks).
const char* grouped_mm_thin_isa();

}  // namespace mixops
