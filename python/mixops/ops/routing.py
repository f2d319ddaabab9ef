"""router_topk: fused expert scoring, top-k selection, weight finishing and routing statistics;
select_topc: top-C selection per row (Mixture-of-Depths, expert choice) under the same order."""

from typing import NamedTuple, Optional

import torch

from .routing_checks import (
    _acc_dtype,
    _router_topk_backward_check,
    _router_topk_check,
    _select_topc_check,
)

__all__ = ["router_topk", "RouterOutput", "select_topc", "TopcOutput"]


class RouterOutput(NamedTuple):
    weights: torch.Tensor  # [num_tokens, topk] float32 (float64 for float64 logits)
    ids: torch.Tensor  # [num_tokens, topk] int32, best first
    counts: torch.Tensor  # [num_experts] int32, chosen (token, expert) pairs per expert
    score_sum: torch.Tensor  # [num_experts], sum over tokens of the balancing-loss probability
    lse: torch.Tensor  # [num_tokens], logsumexp of each row's (eligible) logits


def router_topk(
    logits: torch.Tensor,
    k: int,
    *,
    score_fn: str = "softmax",
    topk_then_score: bool = False,
    renormalize: bool = True,
    renorm_eps: float = 0.0,
    scaling: float = 1.0,
    bias: Optional[torch.Tensor] = None,
    num_groups: int = 1,
    groups_kept: int = 1,
    group_score: str = "top2_sum",
    modality: Optional[torch.Tensor] = None,
    num_modalities: int = 1,
    token_mask: Optional[torch.Tensor] = None,
    rule: str = "topk",
    threshold: float = 0.0,
) -> RouterOutput:
    """Score experts, pick the top k per token, finish the weights, and count.

    ::

        logits     [num_tokens, num_experts]  float32, bfloat16, float16 (float64 for gradcheck);
                                              the math runs in float32 (float64) whatever the dtype
        bias       [num_experts] or None      added to the scores for *choosing* only, never to
                                              the weights (auxiliary-loss-free balancing)
        modality   [num_tokens] int or None   with num_modalities = G > 1: experts split into G
                                              equal contiguous groups; token t chooses only in
                                              group modality[t] (and is scored over it alone)
        token_mask [num_tokens] bool or None  True = a real token: counts and score_sum (so the
                                              aux loss) include only those; every token is still
                                              routed (weights, ids and lse as without the mask)
        -> RouterOutput(weights [T, k] f32, ids [T, k] i32, counts [E] i32, score_sum [E] f32,
                        lse [T] f32)

    Per token: scores are ``softmax`` over the (eligible) experts, ``sigmoid`` of each logit, or
    the raw logits (``"none"``). ``topk_then_score=False`` ranks the scores (+ bias) and the
    weights are the chosen scores; ``True`` ranks the logits (+ bias) and scores only the chosen k
    (softmax over the k). With ``num_groups > 1`` the experts form equal contiguous groups, each
    scored by the sum of its two best (biased) scores (``group_score="top2_sum"``) or its best
    (``"max"``), and only the ``groups_kept`` best groups' experts can be chosen. Then, if
    ``renormalize``, ``w /= w.sum() + renorm_eps``; finally ``w *= scaling``.

    A variable number of experts per token (static shapes: ``k`` is the bound, the slots after a
    token's kept ones get id -1 and weight 0, no GEMM rows): ``rule="top_p"`` (Huang et al. 2024,
    ZhenweiAn/Dynamic_MoE) keeps the shortest prefix of the k best softmax scores whose sum exceeds
    ``threshold`` (slot j is kept if j == 0 or the sum of slots 0..j-1 is <= p);
    ``rule="cum_threshold"`` (XMoE, ysngki/XMoE) the shortest prefix whose sum reaches it (slot j
    if j == 0 or ``(c_j - s_j) < p``, c_j the inclusive sum); ``score_fn="relu"`` (ReMoE,
    thu-ml/ReMoE) weights ``relu(logit)`` and keeps the experts whose logit is > 0 (possibly
    none; ``score_sum`` then sums ``relu(logit)``, ReMoE's L1 mass). Sums run in slot order in
    float32 (float64). The authors use no renormalisation: pass ``renormalize=False`` to match
    them (True renormalises over the kept slots). These rules take softmax scores (relu: its own),
    no bias, no groups and not ``topk_then_score``. A token that would take more than k keeps
    the k best. A row whose softmax is NaN keeps one expert under both top-p rules (as XMoE's code;
    Huang's keeps all E there).

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
    return RouterOutput(
        *torch.ops.mixops.router_topk.default(
            logits,
            k,
            score_fn,
            topk_then_score,
            renormalize,
            renorm_eps,
            scaling,
            bias,
            num_groups,
            groups_kept,
            group_score,
            modality,
            num_modalities,
            token_mask,
            rule,
            threshold,
        )
    )


# Validation: routing_checks.py (csrc/routing/check.cpp line by line). Each fake runs its op's
# validator, so meta and FakeTensor calls raise what the CPU and CUDA ops raise.


@torch.library.register_fake("mixops::router_topk")
def _router_topk_fake(
    logits,
    k,
    score_fn="softmax",
    topk_then_score=False,
    renormalize=True,
    renorm_eps=0.0,
    scaling=1.0,
    bias=None,
    num_groups=1,
    groups_kept=1,
    group_score="top2_sum",
    modality=None,
    num_modalities=1,
    token_mask=None,
    rule="topk",
    threshold=0.0,
):
    _router_topk_check(
        logits,
        k,
        score_fn,
        topk_then_score,
        renorm_eps,
        scaling,
        bias,
        num_groups,
        groups_kept,
        group_score,
        modality,
        num_modalities,
        token_mask,
        rule,
        threshold,
    )
    num_tokens, num_experts = logits.shape
    acc = _acc_dtype(logits)
    return (
        logits.new_empty(num_tokens, k, dtype=acc),
        logits.new_empty(num_tokens, k, dtype=torch.int32),
        logits.new_empty(num_experts, dtype=torch.int32),
        logits.new_empty(num_experts, dtype=acc),
        logits.new_empty(num_tokens, dtype=acc),
    )


@torch.library.register_fake("mixops::router_topk_backward")
def _router_topk_backward_fake(
    grad_weights,
    grad_score_sum,
    grad_lse,
    logits,
    ids,
    score_fn,
    topk_then_score,
    renormalize,
    renorm_eps,
    scaling,
    modality,
    num_modalities,
    token_mask,
):
    _router_topk_backward_check(
        grad_weights,
        grad_score_sum,
        grad_lse,
        logits,
        ids,
        score_fn,
        topk_then_score,
        renorm_eps,
        scaling,
        modality,
        num_modalities,
        token_mask,
    )
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    (
        logits,
        k,
        score_fn,
        topk_then_score,
        renormalize,
        renorm_eps,
        scaling,
        bias,
        num_groups,
        groups_kept,
        group_score,
        modality,
        num_modalities,
        token_mask,
        _rule,
        _threshold,
    ) = inputs
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
        grad_weights,
        grad_score_sum,
        grad_lse,
        logits,
        ids,
        score_fn,
        topk_then_score,
        renormalize,
        renorm_eps,
        scaling,
        modality,
        ctx.num_modalities,
        token_mask,
    )
    return tuple(grads)


torch.library.register_autograd("mixops::router_topk", _backward, setup_context=_setup_context)


# ---- select_topc -----------------------------------------------------------------------------


class TopcOutput(NamedTuple):
    values: torch.Tensor  # [batch, c] scores' dtype: scores[b, indices[b, j]], -inf where -1
    indices: torch.Tensor  # [batch, c] int64, ascending positions, then -1


def select_topc(scores: torch.Tensor, c: int, mask: Optional[torch.Tensor] = None) -> TopcOutput:
    """The c best entries of each row, in ascending position order (Mixture-of-Depths token
    selection; expert-choice routing with one row per expert).

    ::

        scores [batch, n]  float32, bfloat16, float16 (float64 for gradcheck)
        c      int         0 <= c <= n, static (output shapes never depend on the data)
        mask   [batch, n] bool or None   True = eligible; None: every entry eligible
        -> TopcOutput(values [batch, c] scores' dtype, indices [batch, c] int64)

    Order: router_topk's strict total order (csrc/routing/routing.h ``better``): a higher score
    first, ties to the lower position, NaN below every number (-inf included); -0 ties +0.
    Ineligible entries are never chosen. The chosen positions are returned in ASCENDING order
    (causal order survives the gather), ``values[b, j] = scores[b, indices[b, j]]`` bit for bit.

    Rows with fewer than c eligible entries (e < c): every eligible entry is chosen, in ascending
    order, in positions 0..e-1; positions e..c-1 hold index -1 and value -inf (the "-1: none"
    convention of ``permute``; -inf weighs nothing after sigmoid or softmax). Gather with
    ``indices.clamp_min(0)`` and mask by ``indices >= 0``.

    Autograd: ``d scores`` is zero except ``d scores[b, indices[b, j]] = d values[b, j]``
    (padding positions give none); indices get no gradient.

    CPU: std::nth_element per row, rows in parallel. CUDA: one block per row, radix select on the
    scores' order keys (any n < 2^31, fixed shared memory, no host sync).
    """
    return TopcOutput(*torch.ops.mixops.select_topc.default(scores, c, mask))


@torch.library.register_fake("mixops::select_topc")
def _select_topc_fake(scores, c, mask=None):
    _select_topc_check(scores, c, mask)
    b = scores.shape[0]
    return scores.new_empty(b, c), scores.new_empty(b, c, dtype=torch.int64)


def _topc_setup_context(ctx, inputs, output):
    scores, _c, _mask = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1])
    ctx.scores_shape = scores.shape


def _topc_backward(ctx, grad_values, _grad_indices):
    if not ctx.needs_input_grad[0] or grad_values is None:
        return None, None, None
    (indices,) = ctx.saved_tensors
    none = indices < 0  # padding of rows with fewer than c eligible entries: no gradient
    grad = grad_values.new_zeros(ctx.scores_shape)
    grad = grad.scatter_add(1, indices.clamp_min(0), grad_values.masked_fill(none, 0))
    return grad, None, None


torch.library.register_autograd(
    "mixops::select_topc", _topc_backward, setup_context=_topc_setup_context
)
