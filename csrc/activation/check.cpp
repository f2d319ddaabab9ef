#include "activation/check.h"

#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>

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

GatedAct check_gate_up(const at::Tensor& gate_up, c10::string_view act,
                       const std::optional<at::Tensor>& up, bool interleaved, const char* op) {
  const GatedAct a = parse_gated_act(act, op);
  TORCH_CHECK(gate_up.dim() >= 1, op, ": gate_up must have at least 1 dimension, got a scalar");
  TORCH_CHECK(!(interleaved && up.has_value()), op,
              ": interleaved=True reads gate and up from one gate_up [..., 2*F] (g_0, u_0, g_1, "
              "u_1, ...); up must be None");
  if (interleaved) {
    TORCH_CHECK(gate_up.size(-1) % 2 == 0, op,
                ": gate_up's last dimension must be even ([..., 2*F]: gate and up interleaved), "
                "got ",
                gate_up.sizes());
  } else if (!up.has_value()) {
    TORCH_CHECK(gate_up.size(-1) % 2 == 0, op,
                ": gate_up's last dimension must be even ([..., 2*F]:"
                " gate then up), got ",
                gate_up.sizes());
  }
  const auto t = gate_up.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble, op,
              ": gate_up must be float32, bfloat16, float16 or float64, got ", t);
  if (up.has_value()) {  // the split form: gate_up is the gate [..., F]
    TORCH_CHECK(up->sizes() == gate_up.sizes(), op, ": up must have gate_up's shape ",
                gate_up.sizes(), " (gate_up is the gate when up is given), got ", up->sizes());
    TORCH_CHECK(up->scalar_type() == t, op, ": up must have gate_up's dtype (", t, "), got ",
                up->scalar_type());
    TORCH_CHECK(up->device() == gate_up.device(), op, ": up must be on gate_up's device (",
                gate_up.device(), "), got ", up->device());
  }
  return a;
}

// t [..., n] as [rows, n] with unit column stride.
at::Tensor rows_of(const at::Tensor& t) {
  if (t.dim() != 2) {
    // Leading sizes multiplied out (reshape({-1, 0}) refuses a tensor with no elements).
    const int64_t rows = c10::multiply_integers(t.sizes().begin(), t.sizes().end() - 1);
    return rows_of(t.reshape({rows, t.size(-1)}));
  }
  return t.stride(1) == 1 || t.size(1) <= 1 ? t : t.contiguous();
}

}  // namespace

GatedAct gated_activation_check(const at::Tensor& gate_up, c10::string_view act,
                                const std::optional<at::Tensor>& up, bool interleaved) {
  return check_gate_up(gate_up, act, up, interleaved, "gated_activation");
}

GatedAct gated_activation_backward_check(const at::Tensor& grad, const at::Tensor& gate_up,
                                         c10::string_view act, const std::optional<at::Tensor>& up,
                                         bool interleaved) {
  const char* op = "gated_activation_backward";
  const GatedAct a = check_gate_up(gate_up, act, up, interleaved, op);
  auto expect = gate_up.sizes().vec();
  if (!up.has_value()) expect.back() /= 2;
  TORCH_CHECK(grad.sizes() == at::IntArrayRef(expect), op, ": grad must have shape ",
              at::IntArrayRef(expect),
              up.has_value() ? " (gate_up's, the gate's, as up is given), got "
                             : " (gate_up's with the last dimension halved), got ",
              grad.sizes());
  TORCH_CHECK(grad.scalar_type() == gate_up.scalar_type(), op, ": grad must have gate_up's dtype (",
              gate_up.scalar_type(), "), got ", grad.scalar_type());
  TORCH_CHECK(grad.device() == gate_up.device(), op, ": grad must be on gate_up's device (",
              gate_up.device(), "), got ", grad.device());
  return a;
}

GatedRows gated_rows(const at::Tensor& gate_up, const std::optional<at::Tensor>& up) {
  GatedRows g;
  g.gate = rows_of(gate_up);
  g.rows = g.gate.size(0);
  if (up.has_value()) {
    g.up = rows_of(*up);
    g.f = g.gate.size(1);
    // One row stride for both (the kernels take one): contiguous copies of those not contiguous.
    if (g.rows > 1 && g.gate.stride(0) != g.up.stride(0)) {
      g.gate = g.gate.contiguous();
      g.up = g.up.contiguous();
    }
  } else {
    g.f = g.gate.size(1) / 2;
  }
  g.ld = g.gate.stride(0);
  return g;
}

}  // namespace mixops
