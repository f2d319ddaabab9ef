// scatter_rows and scatter_rows_backward on the CPU (MoD's write-back; format: permute.h). The
// output is written once, in row order, through the inverse map row -> i: each row is a copy of
// rows[i] or of base (a gather; the copy of base is the same pass). Outputs come from the block
// cache (cpu_alloc.h): a fresh 32 MiB fp32 tensor costs ~11 ms of page faults on the 2-core CI
// machine against 1.6 ms for mapped memory, which was most of MoD's forward overhead (MoD
// benchmark, batch 4 x 2048 x 1024). Byte copies: no dtype switch (zero is all-zero bytes).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <vector>

#include "core/cpu_alloc.h"
#include "permute/check.h"

namespace mixops {
namespace {

int64_t row_grain(int64_t row_bytes) {
  return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(row_bytes, 1));
}

// dst[r] = a[map[r]] for 0 <= map[r] (a null: zeros), else b[r] (b null: zeros); rows of
// row_bytes, dst contiguous. r >= mapped: no map entry (b[r]).
void select_rows(uint8_t* dst, int64_t dst_rows, int64_t row_bytes, const int32_t* map,
                 int64_t mapped, const uint8_t* a, int64_t a_ld, const uint8_t* b, int64_t b_ld) {
  if (row_bytes == 0) return;
  at::parallel_for(0, dst_rows, row_grain(row_bytes), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      uint8_t* out = dst + r * row_bytes;
      const int64_t i = r < mapped ? map[r] : -1;
      const uint8_t* src = i >= 0 ? (a != nullptr ? a + i * a_ld : nullptr)
                                  : (b != nullptr ? b + r * b_ld : nullptr);
      if (src == nullptr) {
        std::memset(out, 0, row_bytes);
      } else {
        std::memcpy(out, src, row_bytes);
      }
    }
  });
}

at::Tensor rows_view(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

at::Tensor scatter_rows_cpu(const at::Tensor& base_in, const at::Tensor& rows_in,
                            const at::Tensor& index_in) {
  scatter_rows_check(base_in, rows_in, index_in);
  const at::Tensor base = rows_view(base_in), rows = rows_view(rows_in);
  const at::Tensor index = index_in.contiguous();
  const int64_t t = base.size(0), es = base.element_size(), row_bytes = base.size(1) * es;
  at::Tensor out = empty_large({t, base.size(1)}, base.options());
  // row -> i (rows past slot_of.size() have none); raises on bad or repeated values
  const std::vector<int32_t> slot_of = scatter_index_inverse(index, t, "scatter_rows");
  select_rows(static_cast<uint8_t*>(out.data_ptr()), t, row_bytes, slot_of.data(),
              static_cast<int64_t>(slot_of.size()), static_cast<const uint8_t*>(rows.data_ptr()),
              rows.stride(0) * es, static_cast<const uint8_t*>(base.data_ptr()),
              base.stride(0) * es);
  return out;
}

std::tuple<at::Tensor, at::Tensor> scatter_rows_backward_cpu(const at::Tensor& grad_in,
                                                             const at::Tensor& index_in) {
  scatter_rows_backward_check(grad_in, index_in);
  const at::Tensor grad = rows_view(grad_in), index = index_in.contiguous();
  const int64_t t = grad.size(0), n = index.size(0), es = grad.element_size();
  const int64_t row_bytes = grad.size(1) * es, ld = grad.stride(0) * es;
  const std::vector<int32_t> slot_of = scatter_index_inverse(index, t, "scatter_rows_backward");
  at::Tensor grad_base = empty_large({t, grad.size(1)}, grad.options());
  at::Tensor grad_rows = empty_large({n, grad.size(1)}, grad.options());
  const uint8_t* g = static_cast<const uint8_t*>(grad.data_ptr());
  // Written rows get zeros (a null), the others grad; then grad_rows[i] = grad[index[i]].
  select_rows(static_cast<uint8_t*>(grad_base.data_ptr()), t, row_bytes, slot_of.data(),
              static_cast<int64_t>(slot_of.size()), nullptr, 0, g, ld);
  select_rows(static_cast<uint8_t*>(grad_rows.data_ptr()), n, row_bytes, index.data_ptr<int32_t>(),
              n, g, ld, nullptr, 0);
  return {grad_base, grad_rows};
}

}  // namespace

TORCH_LIBRARY_IMPL(mixops, CPU, m) {
  m.impl("scatter_rows", &scatter_rows_cpu);
  m.impl("scatter_rows_backward", &scatter_rows_backward_cpu);
}

}  // namespace mixops
