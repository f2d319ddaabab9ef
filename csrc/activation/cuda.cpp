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

GatedActParams params_for(const GatedRows& g, GatedAct a, bool interleaved) {
  GatedActParams p{};
  p.dtype = to_mixops_dtype(g.gate.scalar_type());
  p.act = a;
  p.rows = g.rows;
  p.f = g.f;
  p.gate_up = g.gate.data_ptr();
  p.up = g.up.defined() ? g.up.data_ptr() : nullptr;
  p.gate_up_stride = g.ld;
  p.interleaved = interleaved;
  return p;
}

// gate_up [..., 2F] (fused or interleaved) or the gate [..., F] with up [..., F] -> out [..., F].
at::Tensor gated_activation_cuda(const at::Tensor& gate_up_in, c10::string_view act_name,
                                 const std::optional<at::Tensor>& up_in, bool interleaved) {
  const GatedAct a = gated_activation_check(gate_up_in, act_name, up_in, interleaved);
  const c10::cuda::CUDAGuard guard(gate_up_in.device());
  const GatedRows g = gated_rows(gate_up_in, up_in);
  auto out_shape = gate_up_in.sizes().vec();
  out_shape.back() = g.f;
  at::Tensor out = at::empty(out_shape, gate_up_in.options());
  GatedActParams p = params_for(g, a, interleaved);
  p.out = out.data_ptr();
  cuda::launch_checked("gated_activation",
                       [&] { cuda::gated_activation_launch(p, cuda::stream_of(g.gate)); });
  return out;
}

// grad [..., F] -> d gate_up [..., 2F]: d gate in [..., :F], d up in [..., F:] (fused and split
// forms), or interleaved (the interleaved form).
at::Tensor gated_activation_backward_cuda(const at::Tensor& grad_in, const at::Tensor& gate_up_in,
                                          c10::string_view act_name,
                                          const std::optional<at::Tensor>& up_in,
                                          bool interleaved) {
  const GatedAct a =
      gated_activation_backward_check(grad_in, gate_up_in, act_name, up_in, interleaved);
  const c10::cuda::CUDAGuard guard(gate_up_in.device());
  const GatedRows g = gated_rows(gate_up_in, up_in);
  const at::Tensor grad = grad_in.contiguous();
  auto dh_shape = grad_in.sizes().vec();
  dh_shape.back() = 2 * g.f;
  at::Tensor dh = at::empty(dh_shape, gate_up_in.options());
  GatedActParams p = params_for(g, a, interleaved);
  p.grad_out = grad.data_ptr();
  p.grad_gate_up = dh.data_ptr();
  cuda::launch_checked("gated_activation_backward",
                       [&] { cuda::gated_activation_backward_launch(p, cuda::stream_of(g.gate)); });
  return dh;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixops, CUDA, m) {
  m.impl("gated_activation", &gated_activation_cuda);
  m.impl("gated_activation_backward", &gated_activation_backward_cuda);
}

}  // namespace mixops
