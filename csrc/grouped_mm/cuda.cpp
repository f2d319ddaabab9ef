// grouped_mm on CUDA, the op layer: validation (shared with CPU), layout canonicalisation, output
// and workspace allocation through the torch caching allocator, current stream and device guard,
// then the torch-free launcher (launch.cu). The values of offsets are never read on
// the host: the kernels clamp them and set an error flag, which MIXOPS_DEBUG=1 checks (with a
// sync) after the launch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <cstdlib>
#include <mutex>

#include "core/op_dtype.h"
#include "core/op_scratch.h"
#include "grouped_mm/check.h"
#include "grouped_mm/launch.h"

namespace mixops {
namespace {

using cuda::OpScratch;

struct DeviceProps {
  int cc_major = 0, cc_minor = 0, num_sms = 0;
};

const DeviceProps& device_props(int device) {
  static std::array<DeviceProps, 64> cache{};
  static std::array<std::once_flag, 64> once;
  TORCH_CHECK(device >= 0 && device < 64, "grouped_mm: device index out of range: ", device);
  std::call_once(once[device], [device] {
    DeviceProps& p = cache[device];
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&p.cc_major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&p.cc_minor, cudaDevAttrComputeCapabilityMinor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&p.num_sms, cudaDevAttrMultiProcessorCount, device));
  });
  return cache[device];
}

// Layout of a 2-D operand view for the kernels: row-major if its last stride is 1 (and the other
// stride is a valid leading dimension), column-major if the first stride is 1; otherwise nullopt.
std::optional<Layout> layout_of(int64_t rows, int64_t cols, int64_t s_row, int64_t s_col) {
  if (s_col == 1 && (s_row >= cols || rows <= 1)) return Layout::kRowMajor;
  if (s_row == 1 && (s_col >= rows || cols <= 1)) return Layout::kColMajor;
  return std::nullopt;
}

// Run the filled params on a's device and current stream: the error record's slot and context
// for this op, the path named in any launch error, the MIXOPS_DEBUG=1 check.
void launch(GroupedMmParams& p, const at::Tensor& a, const char* op, ErrorSlot slot,
            const ErrorContext& ctx) {
  const DeviceProps& props = device_props(a.get_device());
  cuda::LaunchConfig cfg;
  cfg.cc_major = props.cc_major;
  cfg.cc_minor = props.cc_minor;
  cfg.num_sms = props.num_sms;
  cfg.allow_tf32 = at::globalContext().allowTF32CuBLAS();
  cfg.stream = c10::cuda::getCurrentCUDAStream(a.get_device()).stream();
  const OpScratch scratch(a.options(), cuda::grouped_mm_workspace_bytes(p, cfg), cfg.stream, slot,
                          ctx);
  p.error_flag = scratch.flag();
  try {
    cuda::grouped_mm_launch(p, scratch.workspace(), cfg);
  } catch (const std::exception& e) {
    TORCH_CHECK(false, op, " (CUDA, ",
                cuda::grouped_mm_path_name(cuda::grouped_mm_select_path(p, cfg)), "): ", e.what());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  scratch.check();  // MIXOPS_DEBUG=1: the CPU path's error
}

at::Tensor grouped_mm_cuda(const at::Tensor& a_in, const at::Tensor& b_in,
                           const at::Tensor& offsets) {
  const std::vector<int64_t> out_shape = grouped_mm_check(a_in, b_in, offsets);
  const c10::cuda::CUDAGuard guard(a_in.device());
  const bool ragged_k = b_in.dim() == 2;
  at::Tensor out = at::empty(out_shape, a_in.options());
  const int64_t m = a_in.size(0), k = a_in.size(1);
  const int64_t n = b_in.size(-1);
  if (offsets.size(0) == 0) {  // no groups: no offsets to check, every product an empty sum
    out.zero_();
    return out;
  }
  // Empty outputs and k == 0 still go through the launcher: its zero-fill kernel checks the
  // offsets on the device (the CPU rejects bad ones whatever the sizes) and writes the zeros.

  // Canonical layouts the kernels take: (A row | A col) x (B row | B col), except (col, col).
  at::Tensor a = a_in;
  std::optional<Layout> la = layout_of(m, k, a.stride(0), a.stride(1));
  if (!la) {
    a = a.contiguous();
    la = Layout::kRowMajor;
  }
  at::Tensor b = b_in;
  const int64_t bs_k = b.stride(-2), bs_n = b.stride(-1);
  std::optional<Layout> lb = layout_of(k, n, bs_k, bs_n);
  if (!lb || (*la == Layout::kColMajor && *lb == Layout::kColMajor)) {
    b = b.contiguous();
    lb = Layout::kRowMajor;
  }
  // A single-row/column view may report either layout; make the strides match the one chosen.
  auto fix = [](Layout l, int64_t rows, int64_t cols, int64_t& s_row, int64_t& s_col) {
    if (l == Layout::kRowMajor) {
      s_col = 1;
      s_row = std::max<int64_t>(s_row, std::max<int64_t>(cols, 1));
    } else {
      s_row = 1;
      s_col = std::max<int64_t>(s_col, std::max<int64_t>(rows, 1));
    }
  };

  GroupedMmParams p{};
  p.dtype = to_mixops_dtype(a.scalar_type());
  p.ragged_k = ragged_k;
  p.num_groups = static_cast<int32_t>(offsets.size(0));
  p.m = m;
  p.n = n;
  p.k = k;
  p.a = a.data_ptr();
  p.a_stride_m = a.stride(0);
  p.a_stride_k = a.stride(1);
  p.a_layout = *la;
  fix(*la, m, k, p.a_stride_m, p.a_stride_k);
  p.b = b.data_ptr();
  p.b_stride_e = ragged_k ? 0 : b.stride(0);
  p.b_stride_k = b.stride(-2);
  p.b_stride_n = b.stride(-1);
  p.b_layout = *lb;
  fix(*lb, k, n, p.b_stride_k, p.b_stride_n);
  p.out = out.data_ptr();
  p.out_stride_e = ragged_k ? out.stride(0) : 0;
  p.out_stride_m = out.stride(-2);
  const at::Tensor off = offsets.is_contiguous() ? offsets : offsets.contiguous();
  p.offsets = off.data_ptr<int32_t>();

  launch(p, a, "grouped_mm", ErrorSlot::kGroupedMm,
         {ragged_k ? k : m, 0, ragged_k ? "a.size(1)" : "a.size(0)"});
  return out;
}

// A 2-D operand of grouped_mm_packed in a layout the kernels take (its own if row- or
// column-major and allowed, else a row-major copy), with strides that match the layout chosen.
at::Tensor canonical(const at::Tensor& t, bool row_only, Layout* layout, int64_t* s0, int64_t* s1) {
  const int64_t rows = t.size(0), cols = t.size(1);
  std::optional<Layout> l = layout_of(rows, cols, t.stride(0), t.stride(1));
  at::Tensor c = t;
  if (!l || (row_only && *l != Layout::kRowMajor)) {
    c = t.contiguous();
    l = Layout::kRowMajor;
  }
  *layout = *l;
  *s0 = c.stride(0);
  *s1 = c.stride(1);
  if (*l == Layout::kRowMajor) {
    *s1 = 1;
    *s0 = std::max<int64_t>(*s0, std::max<int64_t>(cols, 1));
  } else {
    *s0 = 1;
    *s1 = std::max<int64_t>(*s1, std::max<int64_t>(rows, 1));
  }
  return c;
}

// grouped_mm_packed: the same launcher on params with packed != kNone (grouped_mm.h maps the four
// modes); ends, like offsets, are read on the device only.
at::Tensor grouped_mm_packed_cuda(const at::Tensor& a_in, const at::Tensor& b_in,
                                  const at::Tensor& offsets, const at::Tensor& ends,
                                  c10::string_view mode, int64_t width, int64_t total) {
  const PackedModeShape ms = grouped_mm_packed_check(a_in, b_in, offsets, ends, mode, width, total);
  const c10::cuda::CUDAGuard guard(a_in.device());
  at::Tensor out = at::empty(ms.out_shape, a_in.options());
  if (offsets.size(0) == 0) {  // no groups: no values to check, nothing but zeros
    out.zero_();
    return out;
  }
  GroupedMmParams p{};
  // Canonical combos: (A row | A col) x (B row | B col), except (col, col).
  const at::Tensor a = canonical(a_in, false, &p.a_layout, &p.a_stride_m, &p.a_stride_k);
  const at::Tensor b =
      canonical(b_in, p.a_layout == Layout::kColMajor, &p.b_layout, &p.b_stride_k, &p.b_stride_n);
  p.dtype = to_mixops_dtype(a.scalar_type());
  p.ragged_k = ms.ragged_k;
  p.packed = ms.packed;
  p.num_groups = static_cast<int32_t>(offsets.size(0));
  p.m = ms.packed == PackedDim::kM ? width : a.size(0);
  p.k = ms.packed == PackedDim::kK ? width : a.size(1);
  p.n = ms.packed == PackedDim::kN ? width : b.size(1);
  p.a = a.data_ptr();
  p.b = b.data_ptr();
  p.out = out.data_ptr();
  p.out_stride_m = std::max<int64_t>(out.stride(0), std::max<int64_t>(out.size(1), 1));
  const at::Tensor off = offsets.is_contiguous() ? offsets : offsets.contiguous();
  const at::Tensor en = ends.is_contiguous() ? ends : ends.contiguous();
  p.offsets = off.data_ptr<int32_t>();
  p.ends = en.data_ptr<int32_t>();
  p.width = width;
  p.total = total;

  const int64_t ragged = ms.ragged_k ? a.size(1) : a.size(0);
  launch(p, a, "grouped_mm_packed", ErrorSlot::kGroupedMmPacked,
         {ragged, total, ms.ragged_k ? "a.size(1)" : "a.size(0)"});
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixops, CUDA, m) {
  m.impl("grouped_mm", &grouped_mm_cuda);
  m.impl("grouped_mm_packed", &grouped_mm_packed_cuda);
}

}  // namespace mixops
