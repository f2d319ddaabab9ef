// gated_activation on CUDA: the torch-free boundary between the op layer (cuda.cpp:
// validation, allocation, stream) and the kernels (activation.cu, activation_kernel.cuh). Params
// and math:
// activation.h. Everything is enqueued on `stream`; no host sync.
#pragma once

#include <cuda_runtime_api.h>

#include "activation/activation.h"

namespace mixops::cuda {

// out[r, c] = act(gate[r, c]) * up[r, c]; gate = gate_up, up = p.up or gate_up + f (fused); with
// p.interleaved gate[r, c] = gate_up[r, 2c] and up[r, c] = gate_up[r, 2c + 1].
void gated_activation_launch(const GatedActParams& p, cudaStream_t stream);
// grad_gate_up[r, c] = grad_out * up * act'(gate); grad_gate_up[r, f + c] = grad_out * act(gate)
// (fused and split forms); with p.interleaved at [r, 2c] and [r, 2c + 1].
void gated_activation_backward_launch(const GatedActParams& p, cudaStream_t stream);

}  // namespace mixops::cuda
