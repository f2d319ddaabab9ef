// SIMT driver: router_topk's real launch code (csrc/routing/router.cu) on the CPU. The entry points
// fill RouterParams / RouterBackwardParams as the op layer (csrc/routing/cuda.cpp) does after its
// validation (router_check / router_backward_check), size the workspace with
// router_topk_workspace_bytes and call the real launchers.
//
// Like the op layer's at::empty outputs and torch-allocated workspace, the outputs and the
// workspace start as garbage here: each run fills them with its poison byte, so an element the
// launch leaves unwritten (or a workspace byte read before it is written) differs between the
// harness runs. The error flag is the caller's int32 (the op's zeroed device error slot).
#include <cstdlib>
#include <cstring>
#include <memory>

#include "simt_run.h"
// clang-format off: the launch file after the bridge
#include "routing/router.cu"
// clang-format on

namespace {

// The options router_check / router_backward_check build (the values were validated by the
// caller). score_fn: mixops::ScoreFn; group_score: mixops::GroupScore; rule: mixops::Rule (the
// forward's; kPositive with score_fn relu, as router_check sets it).
mixops::RouterOptions options(int32_t num_experts, int32_t k, int score_fn, int topk_then_score,
                              int renormalize, double renorm_eps, double scaling,
                              int32_t num_modalities) {
  mixops::RouterOptions o;
  o.num_experts = num_experts;
  o.k = k;
  o.score_fn = static_cast<mixops::ScoreFn>(score_fn);
  o.topk_then_score = topk_then_score != 0;
  o.renormalize = renormalize != 0;
  o.renorm_eps = renorm_eps;
  o.scaling = scaling;
  o.num_modalities = num_modalities;
  return o;
}

}  // namespace

extern "C" {

// router_topk forward. dtype: mixops::Dtype of logits [T, E] (row stride logits_stride); bias [E]
// acc_t or null; modality [T] int32 / int64 (modality_int64) or null; token_mask [T] bool or null.
// Outputs: weights [T, k] acc_t, ids [T, k] int32, counts [E] int32, score_sum [E] acc_t,
// lse [T] acc_t; error_flag: one int32 (RouterError bits are OR-ed in).
int simt_router_topk(int dtype, int64_t num_tokens, int32_t num_experts, int32_t k, int score_fn,
                     int topk_then_score, int renormalize, double renorm_eps, double scaling,
                     int32_t num_groups, int32_t groups_kept, int group_score,
                     int32_t num_modalities, int rule, double threshold, const void* logits,
                     int64_t logits_stride, const void* bias, const void* modality,
                     int modality_int64, const uint8_t* token_mask, void* weights, int32_t* ids,
                     int32_t* counts, void* score_sum, void* lse, int32_t* error_flag,
                     const SimtRun* run, char* err, int err_len) {
  return simt::run_with(run, err, err_len, [&] {
    mixops::RouterParams p{};
    p.opt = options(num_experts, k, score_fn, topk_then_score, renormalize, renorm_eps, scaling,
                    num_modalities);
    p.opt.has_bias = bias != nullptr;
    p.opt.num_groups = num_groups;
    p.opt.groups_kept = num_groups == 1 ? 1 : groups_kept;
    p.opt.group_score = static_cast<mixops::GroupScore>(group_score);
    p.opt.rule = static_cast<mixops::Rule>(rule);
    p.opt.threshold = threshold;
    p.dtype = static_cast<mixops::Dtype>(dtype);
    p.num_tokens = num_tokens;
    p.logits = logits;
    p.logits_stride = logits_stride;
    p.bias = bias;
    p.modality = modality;
    p.modality_int64 = modality != nullptr && modality_int64 != 0;
    p.token_mask = token_mask;
    p.weights = weights;
    p.ids = ids;
    p.counts = counts;
    p.score_sum = score_sum;
    p.lse = lse;
    p.error_flag = error_flag;

    const size_t a = p.dtype == mixops::Dtype::kFloat64 ? 8 : 4;
    simt::poison(weights, num_tokens * k * a, run->poison);
    simt::poison(ids, num_tokens * k * 4, run->poison);
    simt::poison(counts, static_cast<size_t>(num_experts) * 4, run->poison);
    simt::poison(score_sum, num_experts * a, run->poison);
    simt::poison(lse, num_tokens * a, run->poison);

    const simt::Workspace ws(mixops::cuda::router_topk_workspace_bytes(p), run->poison);
    mixops::cuda::router_topk_launch(p, ws.get(), nullptr);
  });
}

// router_topk_backward. ids [T, k] int32; grad_weights [T, k], grad_score_sum [E], grad_lse [T]
// acc_t, each nullable; grad_logits [T, E] contiguous, logits' dtype. Group-limited selection and
// the bias do not reach the backward (the op has neither argument).
int simt_router_topk_backward(int dtype, int64_t num_tokens, int32_t num_experts, int32_t k,
                              int score_fn, int topk_then_score, int renormalize, double renorm_eps,
                              double scaling, int32_t num_modalities, const void* logits,
                              int64_t logits_stride, const void* modality, int modality_int64,
                              const uint8_t* token_mask, const int32_t* ids,
                              const void* grad_weights, const void* grad_score_sum,
                              const void* grad_lse, void* grad_logits, int32_t* error_flag,
                              const SimtRun* run, char* err, int err_len) {
  return simt::run_with(run, err, err_len, [&] {
    mixops::RouterBackwardParams p{};
    p.opt = options(num_experts, k, score_fn, topk_then_score, renormalize, renorm_eps, scaling,
                    num_modalities);
    p.dtype = static_cast<mixops::Dtype>(dtype);
    p.num_tokens = num_tokens;
    p.logits = logits;
    p.logits_stride = logits_stride;
    p.modality = modality;
    p.modality_int64 = modality != nullptr && modality_int64 != 0;
    p.token_mask = token_mask;
    p.ids = ids;
    p.grad_weights = grad_weights;
    p.grad_score_sum = grad_score_sum;
    p.grad_lse = grad_lse;
    p.grad_logits = grad_logits;
    p.error_flag = error_flag;
    simt::poison(grad_logits, num_tokens * num_experts * mixops::dtype_size(p.dtype), run->poison);
    const simt::Workspace ws(mixops::cuda::router_topk_backward_workspace_bytes(p), run->poison);
    mixops::cuda::router_topk_backward_launch(p, ws.get(), nullptr);
  });
}

// The forward / backward launch plans (router_kernel.cuh's fwd_plan / bwd_plan) for the given
// shape and shared-memory opt-in, so tests can check which path a case takes:
// out = {vpt, warps, smem, num_blocks, global_stride}.
void simt_router_plans(int dtype, int64_t num_tokens, int32_t num_experts, int32_t k,
                       int32_t num_groups, int32_t num_modalities, int64_t max_smem, int64_t* fwd,
                       int64_t* bwd) {
  namespace r = mixops::cuda::router;
  mixops::RouterParams p{};
  p.opt = options(num_experts, k, 1, 0, 1, 0.0, 1.0, num_modalities);
  p.opt.num_groups = num_groups;
  p.dtype = static_cast<mixops::Dtype>(dtype);
  p.num_tokens = num_tokens;
  const r::Plan f = r::fwd_plan(p, max_smem);
  mixops::RouterBackwardParams q{};
  q.opt = p.opt;
  q.opt.num_groups = 1;
  q.dtype = p.dtype;
  q.num_tokens = num_tokens;
  const r::Plan b = r::bwd_plan(q, max_smem);
  const r::Plan* plans[2] = {&f, &b};
  int64_t* outs[2] = {fwd, bwd};
  for (int i = 0; i < 2; ++i) {
    outs[i][0] = plans[i]->vpt;
    outs[i][1] = plans[i]->warps;
    outs[i][2] = plans[i]->smem;
    outs[i][3] = plans[i]->num_blocks;
    outs[i][4] = plans[i]->global_stride;
  }
}

}  // extern "C"
