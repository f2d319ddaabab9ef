// Compile check: csrc/activation/activation_kernel.cuh under the SIMT harness (see use.h).
#include "activation/activation_kernel.cuh"
#include "use.h"

namespace a = mixops::cuda::activation_kernels;
using mixops::GatedAct;

template <GatedAct kAct>
struct Activation {
  template <class T>
  static void run() {
    // fp64 runs scalar only.
    constexpr int kVec = static_cast<int>(16 / sizeof(T));
    // Scalar and 16-byte widths, fused/split (false) and interleaved (true) forms.
    simt_compile::use(
        &a::gated_act_kernel<kAct, T, 1, false>, &a::gated_act_backward_kernel<kAct, T, 1, false>,
        &a::gated_act_kernel<kAct, T, kVec, false>,
        &a::gated_act_backward_kernel<kAct, T, kVec, false>, &a::gated_act_kernel<kAct, T, 1, true>,
        &a::gated_act_backward_kernel<kAct, T, 1, true>, &a::gated_act_kernel<kAct, T, kVec, true>,
        &a::gated_act_backward_kernel<kAct, T, kVec, true>);
  }
};

void instantiate_activation() {
  simt_compile::each_dtype<Activation<GatedAct::kSilu>>();
  simt_compile::each_dtype<Activation<GatedAct::kGelu>>();
  simt_compile::each_dtype<Activation<GatedAct::kGeluTanh>>();
  simt_compile::each_dtype<Activation<GatedAct::kRelu>>();
}
