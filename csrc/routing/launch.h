// router_topk on CUDA: the torch-free boundary between the op layer (cuda.cpp: validation,
// allocation through the torch allocator, stream) and the kernels (router.cu + router_kernel.cuh).
//
// Contract for callers:
//  * params are validated except for values in device memory (modality): kernels clamp those and
//    OR RouterError bits into params.error_flag (the op's device error slot, core/errors.h).
//  * workspace points to router_topk_workspace_bytes(...) bytes of device memory, 256-byte
//    aligned (per-block partial statistics, reduced in a fixed order: results do not depend on
//    scheduling).
//  * everything is enqueued on `stream`; nothing synchronises the host (CUDA-graph capturable).
//  * ids must equal what the CPU kernel picks for the same logits: every selection decision goes
//    through the routing:: and det:: functions of routing.h, and row sums use
//    det::canonical_sum's order (lane-strided partials, then the xor butterfly).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "routing/routing.h"
#include "routing/topc.h"

namespace mixops::cuda {

size_t router_topk_workspace_bytes(const RouterParams& p);
// Fills weights, ids, lse (every row), counts and score_sum (over unmasked rows). T may be 0.
void router_topk_launch(const RouterParams& p, void* workspace, cudaStream_t stream);

size_t router_topk_backward_workspace_bytes(const RouterBackwardParams& p);
// Fills grad_logits [T, E] (every element, zeros where no gradient flows). workspace: the bytes
// above (the blocks' scratch when it does not fit in shared memory; usually none).
void router_topk_backward_launch(const RouterBackwardParams& p, void* workspace,
                                 cudaStream_t stream);

// select_topc: fills values and indices [B, c] (topc.h). No workspace, no value checks (nothing
// in device memory can be invalid), so no error flag.
void select_topc_launch(const TopcParams& p, cudaStream_t stream);

}  // namespace mixops::cuda
