// reorder_chunks on the CPU (expert parallelism's regrouping; format: permute.h). The prefix sums
// of counts in both orders are taken on the host in int64 (the values are checked on the way:
// a negative count or a sum past N raises, naming it); then y is written once, in row order, in
// parallel over ranges of output rows: a range finds the chunk of its first row by binary search
// over the (b, a) offsets and walks the chunks from there, one memcpy per piece of a chunk when
// x's rows are back to back (else one per row); rows past S = sum(counts) are zeroed. The output
// comes from the block cache (cpu_alloc.h), as scatter_rows'. Byte copies: no dtype switch.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "core/cpu_alloc.h"
#include "permute/check.h"

namespace mixops {
namespace {

int64_t chunk_row_grain(int64_t row_bytes) {
  return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(row_bytes, 1));
}

at::Tensor reorder_chunks_cpu(const at::Tensor& x_in, const at::Tensor& counts) {
  reorder_chunks_check(x_in, counts);
  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const int64_t n = x.size(0), es = x.element_size(), row_bytes = x.size(1) * es;
  const int64_t num_a = counts.size(0), num_b = counts.size(1), chunks = num_a * num_b;
  // chunk (a, b) = i is rows src[i] .. src[i + 1] - 1 of x; raises on bad values
  const std::vector<int64_t> src = reorder_chunks_source_offsets(counts, n);
  // the j-th chunk in (b, a) order is rows dst[j] .. dst[j + 1] - 1 of y
  std::vector<int64_t> dst(static_cast<size_t>(chunks) + 1);
  int64_t total = 0;
  for (int64_t j = 0; j < chunks; ++j) {
    const int64_t i = permute::chunk_of_transposed(j, num_a, num_b);
    dst[j] = total;
    total += src[i + 1] - src[i];
  }
  dst[chunks] = total;  // = S <= n
  at::Tensor y = empty_large({n, x.size(1)}, x.options());
  if (row_bytes == 0 || n == 0) return y;
  const uint8_t* xp = static_cast<const uint8_t*>(x.data_ptr());
  uint8_t* yp = static_cast<uint8_t*>(y.data_ptr());
  const int64_t ld = x.stride(0) * es;
  const bool packed = ld == row_bytes;  // x's rows back to back: a chunk is one block of bytes
  at::parallel_for(0, n, chunk_row_grain(row_bytes), [&](int64_t r0, int64_t r1) {
    int64_t r = r0;
    const int64_t copied_end = std::min(r1, total);
    if (r < copied_end) {
      for (int64_t j = permute::chunk_holding(dst.data(), chunks, r); r < copied_end; ++j) {
        const int64_t end = std::min(copied_end, dst[j + 1]);  // empty chunks: end == r
        const uint8_t* s =
            xp + (src[permute::chunk_of_transposed(j, num_a, num_b)] + r - dst[j]) * ld;
        uint8_t* d = yp + r * row_bytes;
        if (packed) {
          std::memcpy(d, s, (end - r) * row_bytes);
        } else {
          for (int64_t k = 0; k < end - r; ++k)
            std::memcpy(d + k * row_bytes, s + k * ld, row_bytes);
        }
        r = end;
      }
    }
    if (r < r1) std::memset(yp + r * row_bytes, 0, (r1 - r) * row_bytes);  // rows past S
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixops, CPU, m) { m.impl("reorder_chunks", &reorder_chunks_cpu); }

}  // namespace mixops
