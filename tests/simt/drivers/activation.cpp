// SIMT driver: gated_activation's real launch code (csrc/activation/activation.cu) on the CPU.
#include "simt_run.h"
// clang-format off: the launch file after the bridge
#include "activation/activation.cu"
// clang-format on

namespace {

namespace ak = mixops::cuda::activation_kernels;

// The vector width N of the kernel the latest call launched (gated_act_kernel<.., N> or its
// backward), 0 when it launched none: tells a test whether a case took the 16-byte path.
template <bool kBackward>
int width_ran(const mixops::GatedActParams& p) {
  int width = 0;
  mixops::cuda::with_types(p, "simt_width", [&](auto act, auto tag) {
    using T = typename decltype(tag)::type;
    constexpr mixops::GatedAct kAct = decltype(act)::value;
    constexpr int kVec = static_cast<int>(16 / sizeof(T));
    auto ran = [&]<int N>() {
      if (p.interleaved) {
        if constexpr (kBackward) return simt::ran(&ak::gated_act_backward_kernel<kAct, T, N, true>);
        return simt::ran(&ak::gated_act_kernel<kAct, T, N, true>);
      }
      if constexpr (kBackward) return simt::ran(&ak::gated_act_backward_kernel<kAct, T, N, false>);
      return simt::ran(&ak::gated_act_kernel<kAct, T, N, false>);
    };
    width = ran.template operator()<1>() ? 1 : ran.template operator()<kVec>() ? kVec : 0;
  });
  return width;
}

}  // namespace

extern "C" {

// dtype: mixops::Dtype; act: mixops::GatedAct. Fused (up null): gate_up [rows, 2f]; interleaved
// (up null, interleaved 1): gate_up [rows, 2f], gate at even columns, up at odd ones; split:
// gate_up the gate [rows, f] and up [rows, f]; both row stride gate_up_stride. out [rows, f]
// contiguous; width (may be null): the vector width that ran.
int simt_gated_activation(int dtype, int act, int64_t rows, int64_t f, const void* gate_up,
                          const void* up, int64_t gate_up_stride, int interleaved, void* out,
                          int* width, const SimtRun* run, char* err, int err_len) {
  return simt::run_with(run, err, err_len, [&] {
    mixops::GatedActParams p;
    p.dtype = static_cast<mixops::Dtype>(dtype);
    p.act = static_cast<mixops::GatedAct>(act);
    p.rows = rows, p.f = f, p.gate_up = gate_up, p.up = up, p.gate_up_stride = gate_up_stride;
    p.interleaved = interleaved != 0;
    p.out = out;
    simt::launched.clear();
    mixops::cuda::gated_activation_launch(p, nullptr);
    if (width != nullptr) *width = width_ran<false>(p);
  });
}

// grad_out [rows, f] contiguous -> grad_gate_up [rows, 2f] contiguous (d gate, then d up; or
// interleaved like gate_up), gate and up as in the forward.
int simt_gated_activation_backward(int dtype, int act, int64_t rows, int64_t f,
                                   const void* grad_out, const void* gate_up, const void* up,
                                   int64_t gate_up_stride, int interleaved, void* grad_gate_up,
                                   int* width, const SimtRun* run, char* err, int err_len) {
  return simt::run_with(run, err, err_len, [&] {
    mixops::GatedActParams p;
    p.dtype = static_cast<mixops::Dtype>(dtype);
    p.act = static_cast<mixops::GatedAct>(act);
    p.rows = rows, p.f = f, p.gate_up = gate_up, p.up = up, p.gate_up_stride = gate_up_stride;
    p.interleaved = interleaved != 0;
    p.grad_out = grad_out, p.grad_gate_up = grad_gate_up;
    simt::launched.clear();
    mixops::cuda::gated_activation_backward_launch(p, nullptr);
    if (width != nullptr) *width = width_ran<true>(p);
  });
}

}  // extern "C"
