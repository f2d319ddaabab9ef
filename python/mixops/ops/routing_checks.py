"""Argument validation of the routing ops (router_topk, router_topk_backward, select_topc):
csrc/routing/check.cpp line by line, with its messages (see _check.py). Each fake in routing.py
runs its op's validator, so meta and FakeTensor calls raise what the CPU and CUDA ops raise."""

import math

import torch

from ._check import FLOATS, INT32_MAX, check
from .routing_rule_checks import _check_rule

_SCORE_FNS = ("softmax", "sigmoid", "none", "relu")
_GROUP_SCORES = ("top2_sum", "max")


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


def _check_options(
    logits, k, score_fn, topk_then_score, renorm_eps, scaling, num_modalities, op, k_name
):
    """common_options: score_fn, renorm_eps, scaling, k (k_name: "k" or "k = ids.size(1)")."""
    check(
        score_fn in _SCORE_FNS,
        op,
        ": score_fn must be 'softmax', 'sigmoid', 'none' or 'relu', got '",
        score_fn,
        "'",
    )
    check(
        not (score_fn == "relu" and topk_then_score),
        op,
        ": score_fn 'relu' cannot be combined with topk_then_score=True (the kept experts are "
        "those whose logit is > 0)",
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
    rule="topk",
    threshold=0.0,
):
    op = "router_topk"
    _check_logits(logits, op)
    _check_token_args(logits, modality, num_modalities, token_mask, op)
    _check_options(
        logits, k, score_fn, topk_then_score, renorm_eps, scaling, num_modalities, op, "k"
    )
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
    _check_rule(score_fn, topk_then_score, bias, num_groups, rule, threshold)


def _router_topk_backward_check(
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
        logits,
        ids.shape[1],
        score_fn,
        topk_then_score,
        renorm_eps,
        scaling,
        num_modalities,
        op,
        "k = ids.size(1)",
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
