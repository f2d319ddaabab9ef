// permute, unpermute, their backward ops and the MoA slot layout ops on CUDA, the op layer:
// validation (shared with CPU), outputs and scratch through the torch allocator, current stream
// and device guard, then the torch-free launchers (permute.cu, unpermute.cu, slots.cu, rows.cu,
// chunks.cu). ids, row_map, index and counts values are not read on the host: kernels treat bad
// values as "none" (counts: clamped) and set an error flag that MIXOPS_DEBUG=1 checks after the
// launch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "core/op_dtype.h"
#include "core/op_launch.h"
#include "core/op_scratch.h"
#include "permute/check.h"
#include "permute/launch.h"

namespace mixops {
namespace {

using cuda::launch_checked;
using cuda::stream_of;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> permute_cuda(
    const at::Tensor& x_in, const at::Tensor& ids_in, int64_t num_experts,
    std::optional<int64_t> capacity, const std::optional<at::Tensor>& priority) {
  const int64_t num_rows = permute_check(x_in, ids_in, num_experts, capacity, priority);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const at::Tensor ids = ids_in.contiguous();
  const at::Tensor pr = priority ? priority->to(at::kFloat).contiguous() : at::Tensor();
  const int64_t t = x.size(0), k = ids.size(1);
  const auto iopt = x.options().dtype(at::kInt);
  at::Tensor x_sorted = at::empty({num_rows, x.size(1)}, x.options());
  at::Tensor offsets = at::empty({num_experts}, iopt);
  at::Tensor row_map = at::empty({t, k}, iopt);
  at::Tensor dropped = at::empty({num_experts}, iopt);

  PermuteParams p{};
  p.dtype = to_mixops_dtype(x.scalar_type());
  p.num_tokens = t;
  p.k = static_cast<int32_t>(k);
  p.num_experts = static_cast<int32_t>(num_experts);
  p.hidden = x.size(1);
  p.capacity = capacity ? *capacity : -1;
  p.num_rows = num_rows;
  p.x = x.data_ptr();
  p.x_stride = x.stride(0);
  p.ids = ids.data_ptr();
  p.ids_int64 = ids.scalar_type() == at::kLong;
  p.priority = pr.defined() ? pr.data_ptr<float>() : nullptr;
  p.x_sorted = x_sorted.data_ptr();
  p.offsets = offsets.data_ptr<int32_t>();
  p.row_map = row_map.data_ptr<int32_t>();
  p.dropped = dropped.data_ptr<int32_t>();
  const cudaStream_t stream = stream_of(x);
  const cuda::OpScratch scratch(x.options(), cuda::permute_workspace_bytes(p), stream,
                                ErrorSlot::kPermute, {num_experts, num_rows});
  p.error_flag = scratch.flag();
  launch_checked("permute", [&] { cuda::permute_launch(p, scratch.workspace(), stream); });
  scratch.check();
  return {x_sorted, offsets, row_map, dropped};
}

at::Tensor unpermute_cuda(const at::Tensor& y_sorted_in, const at::Tensor& row_map_in,
                          const std::optional<at::Tensor>& weights_in) {
  unpermute_check(y_sorted_in, row_map_in, weights_in);
  const c10::cuda::CUDAGuard guard(y_sorted_in.device());
  const at::Tensor y_sorted = y_sorted_in.stride(1) == 1 ? y_sorted_in : y_sorted_in.contiguous();
  const at::Tensor row_map = row_map_in.contiguous();
  const at::Tensor w = weights_in ? weights_in->contiguous() : at::Tensor();
  at::Tensor y = at::empty({row_map.size(0), y_sorted.size(1)}, y_sorted.options());

  UnpermuteParams p{};
  p.dtype = to_mixops_dtype(y_sorted.scalar_type());
  p.weights_dtype = w.defined() ? to_mixops_dtype(w.scalar_type()) : Dtype::kFloat32;
  p.num_tokens = row_map.size(0);
  p.k = static_cast<int32_t>(row_map.size(1));
  p.hidden = y_sorted.size(1);
  p.num_rows = y_sorted.size(0);
  p.y_sorted = y_sorted.data_ptr();
  p.y_sorted_stride = y_sorted.stride(0);
  p.row_map = row_map.data_ptr<int32_t>();
  p.weights = w.defined() ? w.data_ptr() : nullptr;
  p.y = y.data_ptr();
  const cudaStream_t stream = stream_of(y);
  const cuda::OpScratch scratch(y.options(), 0, stream, ErrorSlot::kUnpermute, {0, p.num_rows});
  p.error_flag = scratch.flag();
  launch_checked("unpermute", [&] { cuda::unpermute_launch(p, stream); });
  scratch.check();
  return y;
}

UnpermuteBackwardParams backward_params(const at::Tensor& grad_y, const at::Tensor& row_map,
                                        const at::Tensor& w, int64_t num_rows) {
  UnpermuteBackwardParams p{};
  p.dtype = to_mixops_dtype(grad_y.scalar_type());
  p.weights_dtype = w.defined() ? to_mixops_dtype(w.scalar_type()) : Dtype::kFloat32;
  p.num_tokens = row_map.size(0);
  p.hidden = grad_y.size(1);
  p.num_rows = num_rows;
  p.k = static_cast<int32_t>(row_map.size(1));
  p.grad_y = grad_y.data_ptr();
  p.row_map = row_map.data_ptr<int32_t>();
  p.weights = w.defined() ? w.data_ptr() : nullptr;
  return p;
}

at::Tensor unpermute_backward_cuda(const at::Tensor& grad_y_in, const at::Tensor& row_map_in,
                                   const std::optional<at::Tensor>& weights_in, int64_t num_rows) {
  unpermute_backward_check(grad_y_in, row_map_in, weights_in, num_rows);
  const c10::cuda::CUDAGuard guard(grad_y_in.device());
  const at::Tensor grad_y = grad_y_in.contiguous();
  const at::Tensor row_map = row_map_in.contiguous();
  const at::Tensor w = weights_in ? weights_in->contiguous() : at::Tensor();
  at::Tensor out = at::empty({num_rows, grad_y.size(1)}, grad_y.options());
  UnpermuteBackwardParams p = backward_params(grad_y, row_map, w, num_rows);
  p.grad_y_sorted = out.data_ptr();
  const cudaStream_t stream = stream_of(out);
  const cuda::OpScratch scratch(out.options(), cuda::unpermute_backward_workspace_bytes(p), stream,
                                ErrorSlot::kUnpermuteBackward, {0, num_rows});
  p.error_flag = scratch.flag();
  launch_checked("unpermute_backward",
                 [&] { cuda::unpermute_backward_launch(p, scratch.workspace(), stream); });
  scratch.check();
  return out;
}

at::Tensor unpermute_weights_backward_cuda(const at::Tensor& grad_y_in,
                                           const at::Tensor& y_sorted_in,
                                           const at::Tensor& row_map_in,
                                           const at::Tensor& weights) {
  unpermute_weights_backward_check(grad_y_in, y_sorted_in, row_map_in, weights);
  const c10::cuda::CUDAGuard guard(grad_y_in.device());
  const at::Tensor grad_y = grad_y_in.contiguous();
  const at::Tensor y_sorted = y_sorted_in.stride(1) == 1 ? y_sorted_in : y_sorted_in.contiguous();
  const at::Tensor row_map = row_map_in.contiguous();
  at::Tensor gw = at::empty(row_map.sizes(), weights.options());
  UnpermuteBackwardParams p = backward_params(grad_y, row_map, weights, y_sorted.size(0));
  p.weights = nullptr;  // not read: only its dtype matters
  p.y_sorted = y_sorted.data_ptr();
  p.y_sorted_stride = y_sorted.stride(0);
  p.grad_weights = gw.data_ptr();
  const cudaStream_t stream = stream_of(gw);
  const cuda::OpScratch scratch(gw.options(), 0, stream, ErrorSlot::kUnpermuteWeightsBackward,
                                {0, p.num_rows});
  p.error_flag = scratch.flag();
  launch_checked("unpermute_weights_backward",
                 [&] { cuda::unpermute_weights_backward_launch(p, stream); });
  scratch.check();
  return gw;
}

SlotsParams slots_params(const at::Tensor& rows, const at::Tensor& slots, const at::Tensor& row_map,
                         int64_t num_rows) {
  SlotsParams p{};
  p.dtype = to_mixops_dtype(slots.scalar_type());
  p.num_tokens = slots.size(0);
  p.k = static_cast<int32_t>(slots.size(2));
  p.num_heads = slots.size(1);
  p.head_dim = slots.size(3);
  p.num_rows = num_rows;
  p.rows = rows.data_ptr();
  p.rows_stride = rows.stride(0);
  p.slots = slots.data_ptr();
  p.slot_stride_t = slots.stride(0);
  p.slot_stride_h = slots.stride(1);
  p.slot_stride_j = slots.stride(2);
  p.row_map = row_map.data_ptr<int32_t>();
  return p;
}

at::Tensor rows_to_slots_cuda(const at::Tensor& rows_in, const at::Tensor& row_map_in,
                              int64_t num_heads) {
  rows_to_slots_check(rows_in, row_map_in, num_heads);
  const c10::cuda::CUDAGuard guard(rows_in.device());
  const at::Tensor rows = rows_in.stride(1) == 1 ? rows_in : rows_in.contiguous();
  const at::Tensor row_map = row_map_in.contiguous();
  at::Tensor slots = at::empty(
      {row_map.size(0), num_heads, row_map.size(1), rows.size(1) / num_heads}, rows.options());
  SlotsParams p = slots_params(rows, slots, row_map, rows.size(0));
  const cudaStream_t stream = stream_of(slots);
  const cuda::OpScratch scratch(slots.options(), 0, stream, ErrorSlot::kRowsToSlots,
                                {0, p.num_rows});
  p.error_flag = scratch.flag();
  launch_checked("rows_to_slots", [&] { cuda::rows_to_slots_launch(p, stream); });
  scratch.check();
  return slots;
}

at::Tensor slots_to_rows_cuda(const at::Tensor& slots_in, const at::Tensor& row_map_in,
                              int64_t num_rows) {
  slots_to_rows_check(slots_in, row_map_in, num_rows);
  const c10::cuda::CUDAGuard guard(slots_in.device());
  const at::Tensor slots = slots_in.stride(3) == 1 ? slots_in : slots_in.contiguous();
  const at::Tensor row_map = row_map_in.contiguous();
  at::Tensor rows = at::empty({num_rows, slots.size(1) * slots.size(3)}, slots.options());
  SlotsParams p = slots_params(rows, slots, row_map, num_rows);
  const cudaStream_t stream = stream_of(rows);
  const cuda::OpScratch scratch(rows.options(), cuda::slots_to_rows_workspace_bytes(p), stream,
                                ErrorSlot::kSlotsToRows, {0, num_rows});
  p.error_flag = scratch.flag();
  launch_checked("slots_to_rows",
                 [&] { cuda::slots_to_rows_launch(p, scratch.workspace(), stream); });
  scratch.check();
  return rows;
}

SelectRowsParams select_params(const at::Tensor& dst, const at::Tensor& a, const at::Tensor& b,
                               int64_t a_rows) {
  SelectRowsParams p{};
  p.dtype = to_mixops_dtype(dst.scalar_type());
  p.dst_rows = dst.size(0);
  p.a_rows = a_rows;
  p.hidden = dst.size(1);
  p.a = a.defined() ? a.data_ptr() : nullptr;
  p.a_stride = a.defined() ? a.stride(0) : 0;
  p.b = b.defined() ? b.data_ptr() : nullptr;
  p.b_stride = b.defined() ? b.stride(0) : 0;
  p.dst = dst.data_ptr();
  return p;
}

at::Tensor rows_view(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

at::Tensor scatter_rows_cuda(const at::Tensor& base_in, const at::Tensor& rows_in,
                             const at::Tensor& index_in) {
  scatter_rows_check(base_in, rows_in, index_in);
  const c10::cuda::CUDAGuard guard(base_in.device());
  const at::Tensor base = rows_view(base_in), rows = rows_view(rows_in);
  const at::Tensor index = index_in.contiguous();
  const int64_t t = base.size(0), n = index.size(0);
  at::Tensor out = at::empty({t, base.size(1)}, base.options());
  SelectRowsParams p = select_params(out, rows, base, n);
  const cudaStream_t stream = stream_of(out);
  const cuda::OpScratch scratch(out.options(), cuda::scatter_rows_workspace_bytes(t), stream,
                                ErrorSlot::kScatterRows, {0, t});
  p.error_flag = scratch.flag();
  launch_checked("scatter_rows", [&] {
    cuda::scatter_rows_launch(p, index.data_ptr<int32_t>(), n, scratch.workspace(),
                              "mixops::scatter_rows", stream);
  });
  scratch.check();
  return out;
}

std::tuple<at::Tensor, at::Tensor> scatter_rows_backward_cuda(const at::Tensor& grad_in,
                                                              const at::Tensor& index_in) {
  scatter_rows_backward_check(grad_in, index_in);
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = rows_view(grad_in), index = index_in.contiguous();
  const int64_t t = grad.size(0), n = index.size(0);
  at::Tensor grad_base = at::empty({t, grad.size(1)}, grad.options());
  at::Tensor grad_rows = at::empty({n, grad.size(1)}, grad.options());
  // grad_base: zeros on written rows (a null), grad elsewhere; grad_rows[i] = grad[index[i]].
  SelectRowsParams pb = select_params(grad_base, at::Tensor(), grad, n);
  SelectRowsParams pr = select_params(grad_rows, grad, at::Tensor(), t);
  pr.map = index.data_ptr<int32_t>();
  const cudaStream_t stream = stream_of(grad);
  const cuda::OpScratch scratch(grad.options(), cuda::scatter_rows_workspace_bytes(t), stream,
                                ErrorSlot::kScatterRowsBackward, {0, t});
  pb.error_flag = pr.error_flag = scratch.flag();
  launch_checked("scatter_rows_backward", [&] {
    cuda::scatter_rows_launch(pb, index.data_ptr<int32_t>(), n, scratch.workspace(),
                              "mixops::scatter_rows_backward", stream);
    cuda::select_rows_launch(pr, stream);
  });
  scratch.check();
  return {grad_base, grad_rows};
}

at::Tensor reorder_chunks_cuda(const at::Tensor& x_in, const at::Tensor& counts_in) {
  reorder_chunks_check(x_in, counts_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = rows_view(x_in), counts = counts_in.contiguous();
  const int64_t n = x.size(0);
  at::Tensor y = at::empty({n, x.size(1)}, x.options());
  ReorderChunksParams p{};
  p.dtype = to_mixops_dtype(x.scalar_type());
  p.num_rows = n;
  p.hidden = x.size(1);
  p.num_a = counts.size(0);
  p.num_b = counts.size(1);
  p.counts = counts.data_ptr<int32_t>();
  p.x = x.data_ptr();
  p.x_stride = x.stride(0);
  p.y = y.data_ptr();
  const cudaStream_t stream = stream_of(y);
  const cuda::OpScratch scratch(y.options(), cuda::reorder_chunks_workspace_bytes(counts.numel()),
                                stream, ErrorSlot::kReorderChunks, {0, n});
  p.error_flag = scratch.flag();
  launch_checked("reorder_chunks",
                 [&] { cuda::reorder_chunks_launch(p, scratch.workspace(), stream); });
  scratch.check();
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixops, CUDA, m) {
  m.impl("permute", &permute_cuda);
  m.impl("unpermute", &unpermute_cuda);
  m.impl("unpermute_backward", &unpermute_backward_cuda);
  m.impl("unpermute_weights_backward", &unpermute_weights_backward_cuda);
  m.impl("rows_to_slots", &rows_to_slots_cuda);
  m.impl("slots_to_rows", &slots_to_rows_cuda);
  m.impl("scatter_rows", &scatter_rows_cuda);
  m.impl("scatter_rows_backward", &scatter_rows_backward_cuda);
  m.impl("reorder_chunks", &reorder_chunks_cuda);
}

}  // namespace mixops
