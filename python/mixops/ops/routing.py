"""router_topk: fused expert scoring, top-k selection, weight finishing and routing statistics;
select_topc: top-C selection per row (Mixture-of-Depths, expert choice) under the same order."""

import math
from typing import NamedTuple, Optional

import torch

from ._check import FLOATS, INT32_MAX, check

__all__ = ["router_topk", "RouterOutput", "select_topc", "TopcOutput"]

_SCORE_FNS = ("softmax", "sigmoid", "none")
_GROUP_SCORES = ("top2_sum", "max")


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
        )
    )


# Validation: csrc/routing/check.cpp line by line, with its messages (see _check.py). Each fake
# runs its op's validator, so meta and FakeTensor calls raise what the CPU and CUDA ops raise.


def _check_logits(logits, op):
    check(
        logits.dim() == 2,
        op,
        ": logits must be 2-D [num_tokens, num_experts], got shape ",
        logits.shape,
    )
    check(
        logits.dtype in FLOATS,
        op,
        ": logits must be float32, bfloat16 or float16 (or float64, for gradcheck), got ",
        logits.dtype,
    )
    check(
        logits.shape[1] >= 1,
        op,
        ": logits must have num_experts >= 1 columns, got shape ",
        logits.shape,
    )
    check(
        logits.shape[1] <= INT32_MAX,
        op,
        ": logits must have num_experts <= 2^31 - 1 columns (int32 expert ids), got shape ",
        logits.shape,
    )


def _check_token_args(logits, modality, num_modalities, token_mask, op):
    t, e = logits.shape
    check(num_modalities >= 1, op, ": num_modalities must be >= 1, got ", num_modalities)
    check(
        e % num_modalities == 0,
        op,
        ": num_modalities (",
        num_modalities,
        ") must divide num_experts (",
        e,
        ")",
    )
    check(
        (modality is not None) == (num_modalities > 1),
        op,
        ": modality [num_tokens] must be given exactly when num_modalities > 1 (num_modalities = ",
        num_modalities,
        ", modality ",
        "given" if modality is not None else "missing",
        ")",
    )
    if modality is not None:
        check(
            modality.dtype in (torch.int32, torch.int64),
            op,
            ": modality must be int32 or int64, got ",
            modality.dtype,
        )
        check(
            modality.dim() == 1 and modality.shape[0] == t,
            op,
            ": modality must have shape [num_tokens] = [",
            t,
            "], got ",
            modality.shape,
        )
        check(
            modality.device == logits.device,
            op,
            ": modality must be on the same device as logits (",
            logits.device,
            "), got ",
            modality.device,
        )
    if token_mask is not None:
        check(
            token_mask.dtype == torch.bool, op, ": token_mask must be bool, got ", token_mask.dtype
        )
        check(
            token_mask.dim() == 1 and token_mask.shape[0] == t,
            op,
            ": token_mask must have shape [num_tokens] = [",
            t,
            "], got ",
            token_mask.shape,
        )
        check(
            token_mask.device == logits.device,
            op,
            ": token_mask must be on the same device as logits (",
            logits.device,
            "), got ",
            token_mask.device,
        )


def _check_options(logits, k, score_fn, renorm_eps, scaling, num_modalities, op, k_name):
    """common_options: score_fn, renorm_eps, scaling, k (k_name: "k" or "k = ids.size(1)")."""
    check(
        score_fn in _SCORE_FNS,
        op,
        ": score_fn must be 'softmax', 'sigmoid' or 'none', got '",
        score_fn,
        "'",
    )
    renorm_eps, scaling = float(renorm_eps), float(scaling)  # the schema's double
    check(
        math.isfinite(renorm_eps) and renorm_eps >= 0,
        op,
        ": renorm_eps must be a finite number >= 0, got ",
        renorm_eps,
    )
    check(math.isfinite(scaling), op, ": scaling must be finite, got ", scaling)
    eligible = logits.shape[1] // num_modalities
    check(
        k >= 1 and k <= eligible,
        op,
        ": ",
        k_name,
        " must be in [1, ",
        eligible,
        "] (",
        "experts per modality" if num_modalities > 1 else "num_experts",
        "), got ",
        k_name,
        " = ",
        k,
    )


def _router_topk_check(
    logits,
    k,
    score_fn,
    renorm_eps,
    scaling,
    bias,
    num_groups,
    groups_kept,
    group_score,
    modality,
    num_modalities,
    token_mask,
):
    op = "router_topk"
    _check_logits(logits, op)
    _check_token_args(logits, modality, num_modalities, token_mask, op)
    _check_options(logits, k, score_fn, renorm_eps, scaling, num_modalities, op, "k")
    e = logits.shape[1]
    if bias is not None:
        check(
            bias.dim() == 1 and bias.shape[0] == e,
            "router_topk: bias must have shape [num_experts] = [",
            e,
            "], got ",
            bias.shape,
        )
        check(
            bias.dtype.is_floating_point,
            "router_topk: bias must be a floating point tensor, got ",
            bias.dtype,
        )
        check(
            bias.device == logits.device,
            "router_topk: bias must be on the same device as logits (",
            logits.device,
            "), got ",
            bias.device,
        )
    check(num_groups >= 1, "router_topk: num_groups must be >= 1, got ", num_groups)
    check(
        e % num_groups == 0,
        "router_topk: num_groups (",
        num_groups,
        ") must divide num_experts (",
        e,
        ")",
    )
    check(
        num_groups == 1 or num_modalities == 1,
        "router_topk: group-limited selection (num_groups = ",
        num_groups,
        ") cannot be combined with modality groups (num_modalities = ",
        num_modalities,
        ")",
    )
    check(
        groups_kept >= 1 and groups_kept <= num_groups,
        "router_topk: groups_kept must be in [1, num_groups = ",
        num_groups,
        "], got ",
        groups_kept,
    )
    check(
        group_score in _GROUP_SCORES,
        "router_topk: group_score must be 'top2_sum' or 'max', got '",
        group_score,
        "'",
    )
    if num_groups > 1:
        eligible = groups_kept * (e // num_groups)
        check(
            k <= eligible,
            "router_topk: k (",
            k,
            ") must be <= groups_kept * experts per group = ",
            groups_kept,
            " * ",
            e // num_groups,
            " = ",
            eligible,
        )


def _router_topk_backward_check(
    grad_weights,
    grad_score_sum,
    grad_lse,
    logits,
    ids,
    score_fn,
    renorm_eps,
    scaling,
    modality,
    num_modalities,
    token_mask,
):
    op = "router_topk_backward"
    _check_logits(logits, op)
    _check_token_args(logits, modality, num_modalities, token_mask, op)
    t, e = logits.shape
    check(
        ids.dim() == 2 and ids.shape[0] == t and ids.dtype == torch.int32,
        "router_topk_backward: ids must be int32 [num_tokens = ",
        t,
        ", k], got ",
        ids.dtype,
        " ",
        ids.shape,
    )
    check(
        ids.device == logits.device,
        "router_topk_backward: ids must be on the same device as logits (",
        logits.device,
        "), got ",
        ids.device,
    )
    _check_options(
        logits, ids.shape[1], score_fn, renorm_eps, scaling, num_modalities, op, "k = ids.size(1)"
    )
    acc = _acc_dtype(logits)
    for g, name, shape in (
        (grad_weights, "grad_weights", [t, ids.shape[1]]),
        (grad_score_sum, "grad_score_sum", [e]),
        (grad_lse, "grad_lse", [t]),
    ):
        if g is None:
            continue
        check(
            list(g.shape) == shape,
            "router_topk_backward: ",
            name,
            " must have shape ",
            shape,
            ", got ",
            g.shape,
        )
        check(g.dtype == acc, "router_topk_backward: ", name, " must be ", acc, ", got ", g.dtype)
        check(
            g.device == logits.device,
            "router_topk_backward: ",
            name,
            " must be on the same device as logits (",
            logits.device,
            "), got ",
            g.device,
        )


def _acc_dtype(logits):
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


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
):
    _router_topk_check(
        logits,
        k,
        score_fn,
        renorm_eps,
        scaling,
        bias,
        num_groups,
        groups_kept,
        group_score,
        modality,
        num_modalities,
        token_mask,
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


def _select_topc_check(scores, c, mask):
    """select_topc_check in csrc/routing/check.cpp, message for message."""
    check(scores.dim() == 2, "select_topc: scores must be 2-D [batch, n], got shape ", scores.shape)
    check(
        scores.dtype in FLOATS,
        "select_topc: scores must be float32, bfloat16, float16 or float64, got ",
        scores.dtype,
    )
    b, n = scores.shape
    check(
        n <= INT32_MAX,
        "select_topc: scores must have n <= 2^31 - 1 columns (int32 positions in the kernels), "
        "got shape ",
        scores.shape,
    )
    check(c >= 0 and c <= n, "select_topc: c must be in [0, n = ", n, "], got c = ", c)
    if mask is not None:
        check(mask.dtype == torch.bool, "select_topc: mask must be bool, got ", mask.dtype)
        check(
            mask.dim() == 2 and mask.shape[0] == b and mask.shape[1] == n,
            "select_topc: mask must have the shape of scores [batch, n] = [",
            b,
            ", ",
            n,
            "], got ",
            mask.shape,
        )
        check(
            mask.device == scores.device,
            "select_topc: mask must be on the same device as scores (",
            scores.device,
            "), got ",
            mask.device,
        )


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
