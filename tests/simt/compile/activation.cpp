// Compile check: csrc/activation/activation_kernel.cuh under the SIMT harness (see use.h).
#include "activation/activation_kernel.cuh"
#include "use.h"

namespace a = mixops::cuda::activation_kernels;
using mixops::GatedAct;

template <GatedAct kAct>
struct Activation {
  template <class T>
  static void run() {
    // Scalar and 16-byte widths (fp64 runs scalar only).
    constexpr int kVec = static_cast<int>(16 / sizeof(T));
    simt_compile::use(&a::gated_act_kernel<kAct, T, 1>, &a::gated_act_backward_kernel<kAct, T, 1>,
                      &a::gated_act_kernel<kAct, T, kVec>,
                      &a::gated_act_backward_kernel<kAct, T, kVec>);
  }
};

void instantiate_activation() {
  simt_compile::each_dtype<Activation<GatedAct::kSilu>>();
  simt_compile::each_dtype<Activation<GatedAct::kGelu>>();
  simt_compile::each_dtype<Activation<GatedAct::kGeluTanh>>();
  simt_compile::each_dtype<Activation<GatedAct::kRelu>>();
}
