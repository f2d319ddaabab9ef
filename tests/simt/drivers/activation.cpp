// SIMT driver: gated_activation's real launch code (csrc/activation/activation.cu) on the CPU.
#include "simt_run.h"
// clang-format off: the launch file after the bridge
#include "activation/activation.cu"
// clang-format on

extern "C" {

// dtype: mixops::Dtype; act: mixops::GatedAct. gate_up [rows, 2f] (row stride gate_up_stride).
int simt_gated_activation(int dtype, int act, int64_t rows, int64_t f, const void* gate_up,
                          int64_t gate_up_stride, void* out, const SimtRun* run, char* err,
                          int err_len) {
  return simt::run_with(run, err, err_len, [&] {
    mixops::GatedActParams p;
    p.dtype = static_cast<mixops::Dtype>(dtype);
    p.act = static_cast<mixops::GatedAct>(act);
    p.rows = rows, p.f = f, p.gate_up = gate_up, p.gate_up_stride = gate_up_stride, p.out = out;
    mixops::cuda::gated_activation_launch(p, nullptr);
  });
}

// grad_out [rows, f] contiguous -> grad_gate_up [rows, 2f] contiguous.
int simt_gated_activation_backward(int dtype, int act, int64_t rows, int64_t f,
                                   const void* grad_out, const void* gate_up,
                                   int64_t gate_up_stride, void* grad_gate_up, const SimtRun* run,
                                   char* err, int err_len) {
  return simt::run_with(run, err, err_len, [&] {
    mixops::GatedActParams p;
    p.dtype = static_cast<mixops::Dtype>(dtype);
    p.act = static_cast<mixops::GatedAct>(act);
    p.rows = rows, p.f = f, p.gate_up = gate_up, p.gate_up_stride = gate_up_stride;
    p.grad_out = grad_out, p.grad_gate_up = grad_gate_up;
    mixops::cuda::gated_activation_backward_launch(p, nullptr);
  });
}

}  // extern "C"
