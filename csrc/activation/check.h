// gated_activation validation shared by the CPU and CUDA op layers (messages name the argument).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include "activation/activation.h"

namespace mixops {

// Parses the activation name ("silu", "gelu", "gelu_tanh", "relu").
GatedAct parse_gated_act(c10::string_view name, const char* op);
// gate_up [..., 2F] floating point; returns the activation.
GatedAct gated_activation_check(const at::Tensor& gate_up, c10::string_view act);
// grad [..., F] matching gate_up's leading dims, dtype and device.
GatedAct gated_activation_backward_check(const at::Tensor& grad, const at::Tensor& gate_up,
                                         c10::string_view act);

// gate_up viewed as [rows, 2F] with contiguous columns (a view when possible), as both backends'
// kernels read it.
at::Tensor gated_rows(const at::Tensor& gate_up);

}  // namespace mixops
