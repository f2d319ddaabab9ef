"""router_topk: fused expert scoring, top-k selection, weight finishing and routing statistics."""
from typing import NamedTuple, Optional

import torch

__all__ = ["router_topk", "RouterOutput"]

_SCORE_FNS = ("softmax", "sigmoid", "none")
_GROUP_SCORES = ("top2_sum", "max")


class RouterOutput(NamedTuple):
    weights: torch.Tensor    # [num_tokens, topk] float32 (float64 for float64 logits)
    ids: torch.Tensor        # [num_tokens, topk] int32, best first
    counts: torch.Tensor     # [num_experts] int32, chosen (token, expert) pairs per expert
    score_sum: torch.Tensor  # [num_experts], sum over tokens of the balancing-loss probability
    lse: torch.Tensor        # [num_tokens], logsumexp of each row's (eligible) logits


def router_topk(logits: torch.Tensor, k: int, *, score_fn: str = "softmax",
                topk_then_score: bool = False, renormalize: bool = True,
                renorm_eps: float = 0.0, scaling: float = 1.0,
                bias: Optional[torch.Tensor] = None, num_groups: int = 1, groups_kept: int = 1,
                group_score: str = "top2_sum", modality: Optional[torch.Tensor] = None,
                num_modalities: int = 1,
                token_mask: Optional[torch.Tensor] = None) -> RouterOutput:
    """Score experts, pick the top k per token, finish the weights, and count.

    ::

        logits     [num_tokens, num_experts]  float32, bfloat16, float16 (float64 for gradcheck);
                                              the math runs in float32 (float64) whatever the dtype
        bias       [num_experts] or None      added to the scores for *choosing* only, never to
                                              the weights (auxiliary-loss-free balancing)
        modality   [num_tokens] int or None   with num_modalities = G > 1: experts split into G
                                              equal contiguous groups; token t chooses only in
                                              group modality[t] (and is scored over it alone)
        token_mask [num_tokens] bool or None  counts/score_sum include only tokens where True
        -> RouterOutput(weights [T, k] f32, ids [T, k] i32, counts [E] i32, score_sum [E] f32,
                        lse [T] f32)

    Per token: scores are ``softmax`` over the (eligible) experts, ``sigmoid`` of each logit, or
    the raw logits (``"none"``). ``topk_then_score=False`` ranks the scores (+ bias) and the
    weights are the chosen scores; ``True`` ranks the logits (+ bias) and scores only the chosen k
    (softmax over the k). With ``num_groups > 1`` the experts form equal contiguous groups, each
    scored by the sum of its two best (biased) scores (``group_score="top2_sum"``) or its best
    (``"max"``), and only the ``groups_kept`` best groups' experts can be chosen. Then, if
    ``renormalize``, ``w /= w.sum() + renorm_eps``; finally ``w *= scaling``.

    Ties: the lower expert id wins; a NaN score ranks below every number. NaN or +inf logits, or a
    row of -inf logits, make that row's softmax (weights, score_sum contributions, lse) NaN as in
    ``torch.softmax``; ids stay valid, distinct experts.

    Selection is identical on CPU and CUDA: it ranks the logits where the score function keeps
    their order, and otherwise scores computed by shared code without fused multiply-adds.

    ``score_sum[e]`` sums over (unmasked) tokens the probability of e used by the load-balancing
    loss: the softmax over the row (score_fn softmax or none), or the sigmoid scores divided by
    their row sum (sigmoid). ``lse`` feeds the router z-loss.

    Autograd: the gradient of logits from those of weights, score_sum and lse (one op,
    ``router_topk_backward``); ids, counts and the bias get none.
    """
    return RouterOutput(*torch.ops.mixops.router_topk.default(
        logits, k, score_fn, topk_then_score, renormalize, renorm_eps, scaling, bias, num_groups,
        groups_kept, group_score, modality, num_modalities, token_mask))


def _check_common(logits, k, score_fn, num_modalities, modality, token_mask, op="router_topk"):
    # The same checks and messages as csrc/router_check.cpp (a call mixing meta and real tensors
    # dispatches to the fake, not to the C++ kernels).
    torch._check(logits.dim() == 2, lambda: f"{op}: logits must be 2-D [num_tokens, num_experts]")
    torch._check(logits.dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64),
                 lambda: f"{op}: logits must be float32, bfloat16 or float16, got {logits.dtype}")
    num_tokens, num_experts = logits.shape
    torch._check(num_experts >= 1, lambda: f"{op}: logits must have num_experts >= 1 columns")
    torch._check(score_fn in _SCORE_FNS, lambda: f"router_topk: score_fn must be 'softmax', "
                 f"'sigmoid' or 'none', got '{score_fn}'")
    torch._check(num_modalities >= 1 and num_experts % num_modalities == 0,
                 lambda: f"router_topk: num_modalities ({num_modalities}) must divide "
                 f"num_experts ({num_experts})")
    torch._check((modality is not None) == (num_modalities > 1),
                 lambda: "router_topk: modality [num_tokens] must be given exactly when "
                 "num_modalities > 1")
    eligible = num_experts // num_modalities
    torch._check(1 <= k <= eligible, lambda: f"router_topk: k must be in [1, {eligible}], got k = {k}")
    for name, t, dtypes in (("modality", modality, (torch.int32, torch.int64)),
                            ("token_mask", token_mask, (torch.bool,))):
        if t is None:
            continue
        torch._check(t.dtype in dtypes, lambda: f"router_topk: {name} has the wrong dtype {t.dtype}")
        torch._check(t.dim() == 1 and t.shape[0] == num_tokens,
                     lambda: f"router_topk: {name} must have shape [num_tokens] = [{num_tokens}]")
        torch._check(t.device == logits.device,
                     lambda: f"router_topk: {name} must be on the same device as logits")
    return num_tokens, num_experts


def _acc_dtype(logits):
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


@torch.library.register_fake("mixops::router_topk")
def _router_topk_fake(logits, k, score_fn="softmax", topk_then_score=False, renormalize=True,
                      renorm_eps=0.0, scaling=1.0, bias=None, num_groups=1, groups_kept=1,
                      group_score="top2_sum", modality=None, num_modalities=1, token_mask=None):
    num_tokens, num_experts = _check_common(logits, k, score_fn, num_modalities, modality,
                                            token_mask)
    if bias is not None:
        torch._check(bias.dim() == 1 and bias.shape[0] == num_experts,
                     lambda: f"router_topk: bias must have shape [num_experts] = [{num_experts}]")
        torch._check(bias.device == logits.device,
                     lambda: "router_topk: bias must be on the same device as logits")
    torch._check(num_groups >= 1 and num_experts % num_groups == 0,
                 lambda: f"router_topk: num_groups ({num_groups}) must divide num_experts "
                 f"({num_experts})")
    torch._check(num_groups == 1 or num_modalities == 1,
                 lambda: "router_topk: group-limited selection cannot be combined with modality "
                 "groups")
    torch._check(1 <= groups_kept <= num_groups,
                 lambda: f"router_topk: groups_kept must be in [1, num_groups = {num_groups}]")
    torch._check(group_score in _GROUP_SCORES,
                 lambda: f"router_topk: group_score must be 'top2_sum' or 'max', got '{group_score}'")
    if num_groups > 1:
        torch._check(k <= groups_kept * (num_experts // num_groups),
                     lambda: "router_topk: k must be <= groups_kept * experts per group")
    acc = _acc_dtype(logits)
    return (logits.new_empty(num_tokens, k, dtype=acc),
            logits.new_empty(num_tokens, k, dtype=torch.int32),
            logits.new_empty(num_experts, dtype=torch.int32),
            logits.new_empty(num_experts, dtype=acc),
            logits.new_empty(num_tokens, dtype=acc))


@torch.library.register_fake("mixops::router_topk_backward")
def _router_topk_backward_fake(grad_weights, grad_score_sum, grad_lse, logits, ids, score_fn,
                               topk_then_score, renormalize, renorm_eps, scaling, modality,
                               num_modalities, token_mask):
    _check_common(logits, ids.shape[1], score_fn, num_modalities, modality, token_mask,
                  op="router_topk_backward")
    torch._check(ids.dim() == 2 and ids.shape[0] == logits.shape[0] and ids.dtype == torch.int32,
                 lambda: "router_topk_backward: ids must be int32 [num_tokens, k]")
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    (logits, k, score_fn, topk_then_score, renormalize, renorm_eps, scaling, bias, num_groups,
     groups_kept, group_score, modality, num_modalities, token_mask) = inputs
    ctx.set_materialize_grads(False)  # unused outputs give None, not zeros
    ctx.save_for_backward(logits, output[1], modality, token_mask)
    ctx.options = (score_fn, topk_then_score, renormalize, renorm_eps, scaling)
    ctx.num_modalities = num_modalities


def _backward(ctx, grad_weights, _grad_ids, _grad_counts, grad_score_sum, grad_lse):
    grads = [None] * len(ctx.needs_input_grad)
    if not ctx.needs_input_grad[0]:
        return tuple(grads)
    logits, ids, modality, token_mask = ctx.saved_tensors
    if grad_weights is None and grad_score_sum is None and grad_lse is None:
        grads[0] = torch.zeros_like(logits)
        return tuple(grads)
    score_fn, topk_then_score, renormalize, renorm_eps, scaling = ctx.options
    grads[0] = torch.ops.mixops.router_topk_backward.default(
        grad_weights, grad_score_sum, grad_lse, logits, ids, score_fn, topk_then_score,
        renormalize, renorm_eps, scaling, modality, ctx.num_modalities, token_mask)
    return tuple(grads)


torch.library.register_autograd("mixops::router_topk", _backward, setup_context=_setup_context)
