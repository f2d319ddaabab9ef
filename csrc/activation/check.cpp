#include "activation/check.h"

#include <c10/util/Exception.h>

namespace mixops {

GatedAct parse_gated_act(c10::string_view name, const char* op) {
  if (name == "silu") return GatedAct::kSilu;
  if (name == "gelu") return GatedAct::kGelu;
  if (name == "gelu_tanh") return GatedAct::kGeluTanh;
  if (name == "relu") return GatedAct::kRelu;
  TORCH_CHECK(false, op, ": activation must be one of 'silu', 'gelu', 'gelu_tanh', 'relu', got '",
              std::string(name), "'");
}

namespace {

GatedAct check_gate_up(const at::Tensor& gate_up, c10::string_view act, const char* op) {
  const GatedAct a = parse_gated_act(act, op);
  TORCH_CHECK(gate_up.dim() >= 1, op, ": gate_up must have at least 1 dimension, got a scalar");
  TORCH_CHECK(gate_up.size(-1) % 2 == 0, op,
              ": gate_up's last dimension must be even ([..., 2*F]:"
              " gate then up), got ",
              gate_up.sizes());
  const auto t = gate_up.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble, op,
              ": gate_up must be float32, bfloat16, float16 or float64, got ", t);
  return a;
}

}  // namespace

GatedAct gated_activation_check(const at::Tensor& gate_up, c10::string_view act) {
  return check_gate_up(gate_up, act, "gated_activation");
}

GatedAct gated_activation_backward_check(const at::Tensor& grad, const at::Tensor& gate_up,
                                         c10::string_view act) {
  const char* op = "gated_activation_backward";
  const GatedAct a = check_gate_up(gate_up, act, op);
  auto expect = gate_up.sizes().vec();
  expect.back() /= 2;
  TORCH_CHECK(grad.sizes() == at::IntArrayRef(expect), op, ": grad must have shape ",
              at::IntArrayRef(expect), " (gate_up's with the last dimension halved), got ",
              grad.sizes());
  TORCH_CHECK(grad.scalar_type() == gate_up.scalar_type(), op, ": grad must have gate_up's dtype (",
              gate_up.scalar_type(), "), got ", grad.scalar_type());
  TORCH_CHECK(grad.device() == gate_up.device(), op, ": grad must be on gate_up's device (",
              gate_up.device(), "), got ", grad.device());
  return a;
}

at::Tensor gated_rows(const at::Tensor& gate_up) {
  at::Tensor r = gate_up.dim() == 2 ? gate_up : gate_up.reshape({-1, gate_up.size(-1)});
  return r.stride(1) == 1 || r.size(1) <= 1 ? r : r.contiguous();
}

}  // namespace mixops
