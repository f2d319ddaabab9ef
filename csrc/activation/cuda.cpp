// gated_activation on CUDA, the op layer: validation (shared with CPU), outputs through the torch
// allocator, current stream and device guard, then the torch-free launchers
// (activation.cu).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "activation/check.h"
#include "activation/launch.h"
#include "core/op_dtype.h"
#include "core/op_launch.h"

namespace mixops {
namespace {

GatedActParams params_for(const at::Tensor& h, GatedAct a) {
  GatedActParams p{};
  p.dtype = to_mixops_dtype(h.scalar_type());
  p.act = a;
  p.rows = h.size(0);
  p.f = h.size(1) / 2;
  p.gate_up = h.data_ptr();
  p.gate_up_stride = h.stride(0);
  return p;
}

at::Tensor gated_activation_cuda(const at::Tensor& gate_up_in, c10::string_view act_name) {
  const GatedAct a = gated_activation_check(gate_up_in, act_name);
  const c10::cuda::CUDAGuard guard(gate_up_in.device());
  const at::Tensor h = gated_rows(gate_up_in);
  auto out_shape = gate_up_in.sizes().vec();
  out_shape.back() /= 2;
  at::Tensor out = at::empty(out_shape, gate_up_in.options());
  GatedActParams p = params_for(h, a);
  p.out = out.data_ptr();
  cuda::launch_checked("gated_activation",
                       [&] { cuda::gated_activation_launch(p, cuda::stream_of(h)); });
  return out;
}

at::Tensor gated_activation_backward_cuda(const at::Tensor& grad_in, const at::Tensor& gate_up_in,
                                          c10::string_view act_name) {
  const GatedAct a = gated_activation_backward_check(grad_in, gate_up_in, act_name);
  const c10::cuda::CUDAGuard guard(gate_up_in.device());
  const at::Tensor h = gated_rows(gate_up_in);
  const at::Tensor grad = grad_in.contiguous();
  at::Tensor dh = at::empty(gate_up_in.sizes(), gate_up_in.options());
  GatedActParams p = params_for(h, a);
  p.grad_out = grad.data_ptr();
  p.grad_gate_up = dh.data_ptr();
  cuda::launch_checked("gated_activation_backward",
                       [&] { cuda::gated_activation_backward_launch(p, cuda::stream_of(h)); });
  return dh;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixops, CUDA, m) {
  m.impl("gated_activation", &gated_activation_cuda);
  m.impl("gated_activation_backward", &gated_activation_backward_cuda);
}

}  // namespace mixops
