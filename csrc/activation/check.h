// gated_activation validation shared by the CPU and CUDA op layers (messages name the argument),
// and the [rows, columns] views both backends' kernels read.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>

#include "activation/activation.h"

namespace mixops {

// Parses the activation name ("silu", "gelu", "gelu_tanh", "relu").
GatedAct parse_gated_act(c10::string_view name, const char* op);
// gate_up floating point: [..., 2F] (fused; or interleaved, then up must be absent), or with up the
// gate [..., F] and up of the same shape, dtype and device; returns the activation.
GatedAct gated_activation_check(const at::Tensor& gate_up, c10::string_view act,
                                const std::optional<at::Tensor>& up, bool interleaved);
// As above, and grad [..., F] (gate's shape) with gate_up's dtype and device.
GatedAct gated_activation_backward_check(const at::Tensor& grad, const at::Tensor& gate_up,
                                         c10::string_view act, const std::optional<at::Tensor>& up,
                                         bool interleaved);

// gate_up (and up) as the kernels read them: [rows, columns] with unit column stride (views when
// possible, else contiguous copies) and one row stride for both; when gate's and up's row strides
// differ, both are made contiguous.
struct GatedRows {
  at::Tensor gate;  // fused and interleaved: gate_up [rows, 2f]; split: the gate [rows, f]
  at::Tensor up;    // split: [rows, f], gate's row stride; undefined when fused
  int64_t rows = 0, f = 0;
  int64_t ld = 0;  // elements between rows of gate (and of up)
};
GatedRows gated_rows(const at::Tensor& gate_up, const std::optional<at::Tensor>& up);

}  // namespace mixops
