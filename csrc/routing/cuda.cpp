// router_topk and its backward, and select_topc, on CUDA, the op layer: validation (shared with CPU), outputs and
// scratch through the torch allocator, current stream and device guard, then the torch-free
// launchers (router.cu). Modality values are not read on the host: kernels clamp them and
// set an error flag that MIXOPS_DEBUG=1 checks after the launch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "core/op_dtype.h"
#include "core/op_launch.h"
#include "core/op_scratch.h"
#include "routing/check.h"
#include "routing/launch.h"

namespace mixops {
namespace {

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> router_topk_cuda(
    const at::Tensor& logits_in, int64_t k, c10::string_view score_fn, bool topk_then_score,
    bool renormalize, double renorm_eps, double scaling, const std::optional<at::Tensor>& bias,
    int64_t num_groups, int64_t groups_kept, c10::string_view group_score,
    const std::optional<at::Tensor>& modality, int64_t num_modalities,
    const std::optional<at::Tensor>& token_mask, c10::string_view rule, double threshold) {
  const RouterOptions o = router_check(
      logits_in, k, score_fn, topk_then_score, renormalize, renorm_eps, scaling, bias, num_groups,
      groups_kept, group_score, modality, num_modalities, token_mask, rule, threshold);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const int64_t t = logits.size(0), e = o.num_experts;
  const auto acc = router_acc_dtype(logits);
  const auto fopt = logits.options().dtype(acc);
  at::Tensor weights = at::empty({t, k}, fopt);
  at::Tensor ids = at::empty({t, k}, logits.options().dtype(at::kInt));
  at::Tensor counts = at::empty({e}, logits.options().dtype(at::kInt));
  at::Tensor score_sum = at::empty({e}, fopt);
  at::Tensor lse = at::empty({t}, fopt);
  const at::Tensor b = bias ? bias->to(acc).contiguous() : at::Tensor();
  const at::Tensor mod = modality ? modality->contiguous() : at::Tensor();
  const at::Tensor mask = token_mask ? token_mask->contiguous() : at::Tensor();

  RouterParams p{};
  p.opt = o;
  p.dtype = to_mixops_dtype(logits.scalar_type());
  p.num_tokens = t;
  p.logits = logits.data_ptr();
  p.logits_stride = logits.stride(0);
  p.bias = ptr_or_null(b);
  p.modality = ptr_or_null(mod);
  p.modality_int64 = mod.defined() && mod.scalar_type() == at::kLong;
  p.token_mask = static_cast<const uint8_t*>(ptr_or_null(mask));
  p.weights = weights.data_ptr();
  p.ids = ids.data_ptr<int32_t>();
  p.counts = counts.data_ptr<int32_t>();
  p.score_sum = score_sum.data_ptr();
  p.lse = lse.data_ptr();
  const cudaStream_t stream = cuda::stream_of(logits);
  const cuda::OpScratch scratch(logits.options(), cuda::router_topk_workspace_bytes(p), stream,
                                ErrorSlot::kRouterTopk, {num_modalities, 0});
  p.error_flag = scratch.flag();
  cuda::launch_checked("router_topk",
                       [&] { cuda::router_topk_launch(p, scratch.workspace(), stream); });
  scratch.check();
  return {weights, ids, counts, score_sum, lse};
}

at::Tensor router_topk_backward_cuda(
    const std::optional<at::Tensor>& grad_weights, const std::optional<at::Tensor>& grad_score_sum,
    const std::optional<at::Tensor>& grad_lse, const at::Tensor& logits_in,
    const at::Tensor& ids_in, c10::string_view score_fn, bool topk_then_score, bool renormalize,
    double renorm_eps, double scaling, const std::optional<at::Tensor>& modality,
    int64_t num_modalities, const std::optional<at::Tensor>& token_mask) {
  const RouterOptions o = router_backward_check(
      grad_weights, grad_score_sum, grad_lse, logits_in, ids_in, score_fn, topk_then_score,
      renormalize, renorm_eps, scaling, modality, num_modalities, token_mask);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const at::Tensor ids = ids_in.contiguous();
  at::Tensor grad = at::empty(logits.sizes(), logits.options());
  auto c = [](const std::optional<at::Tensor>& x) { return x ? x->contiguous() : at::Tensor(); };
  const at::Tensor gw = c(grad_weights), gss = c(grad_score_sum), glse = c(grad_lse);
  const at::Tensor mod = c(modality), mask = c(token_mask);

  RouterBackwardParams p{};
  p.opt = o;
  p.dtype = to_mixops_dtype(logits.scalar_type());
  p.num_tokens = logits.size(0);
  p.logits = logits.data_ptr();
  p.logits_stride = logits.stride(0);
  p.modality = ptr_or_null(mod);
  p.modality_int64 = mod.defined() && mod.scalar_type() == at::kLong;
  p.token_mask = static_cast<const uint8_t*>(ptr_or_null(mask));
  p.ids = ids.data_ptr<int32_t>();
  p.grad_weights = ptr_or_null(gw);
  p.grad_score_sum = ptr_or_null(gss);
  p.grad_lse = ptr_or_null(glse);
  p.grad_logits = grad.data_ptr();
  const cudaStream_t stream = cuda::stream_of(logits);
  const cuda::OpScratch scratch(logits.options(), cuda::router_topk_backward_workspace_bytes(p),
                                stream, ErrorSlot::kRouterTopkBackward, {num_modalities, 0});
  p.error_flag = scratch.flag();
  cuda::launch_checked("router_topk_backward",
                       [&] { cuda::router_topk_backward_launch(p, scratch.workspace(), stream); });
  scratch.check();
  return grad;
}

// No scratch and no error flag: select_topc reads no values that could be invalid.
std::tuple<at::Tensor, at::Tensor> select_topc_cuda(const at::Tensor& scores_in, int64_t c,
                                                    const std::optional<at::Tensor>& mask_in) {
  select_topc_check(scores_in, c, mask_in);
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const at::Tensor scores = scores_in.contiguous();
  const at::Tensor mask = mask_in ? mask_in->contiguous() : at::Tensor();
  const int64_t b = scores.size(0);
  at::Tensor values = at::empty({b, c}, scores.options());
  at::Tensor indices = at::empty({b, c}, scores.options().dtype(at::kLong));

  TopcParams p{};
  p.dtype = to_mixops_dtype(scores.scalar_type());
  p.batch = b;
  p.n = scores.size(1);
  p.c = c;
  p.scores = scores.data_ptr();
  p.mask = static_cast<const uint8_t*>(ptr_or_null(mask));
  p.values = values.data_ptr();
  p.indices = indices.data_ptr<int64_t>();
  const cudaStream_t stream = cuda::stream_of(scores);
  cuda::launch_checked("select_topc", [&] { cuda::select_topc_launch(p, stream); });
  return {values, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(mixops, CUDA, m) {
  m.impl("router_topk", &router_topk_cuda);
  m.impl("router_topk_backward", &router_topk_backward_cuda);
  m.impl("select_topc", &select_topc_cuda);
}

}  // namespace mixops
