// Compile check: csrc/activation/activation_kernel.cuh under the SIMT harness (see use.h).
#include "activation/activation_kernel.cuh"
#include "use.h"

namespace a = mixops::cuda::activation_kernels;
using mixops::GatedAct;

template <GatedAct kAct>
struct Activation {
  template <class T>
  static void run() {
    simt_compile::use(&a::gated_act_kernel<kAct, T>, &a::gated_act_backward_kernel<kAct, T>);
  }
};

void instantiate_activation() {
  simt_compile::each_dtype<Activation<GatedAct::kSilu>>();
  simt_compile::each_dtype<Activation<GatedAct::kGelu>>();
  simt_compile::each_dtype<Activation<GatedAct::kGeluTanh>>();
  simt_compile::each_dtype<Activation<GatedAct::kRelu>>();
}
