"""Validation of router_topk's variable-count rules (``rule``, ``threshold``, score_fn "relu"):
check_rule in csrc/routing/check.cpp line by line, with its messages (see _check.py)."""

import math

from ._check import check

_RULES = ("topk", "top_p", "cum_threshold")


def _check_rule(score_fn, topk_then_score, bias, num_groups, rule, threshold):
    """check_rule: the rule, its threshold, and the options it cannot be combined with."""
    check(
        rule in _RULES,
        "router_topk: rule must be 'topk', 'top_p' or 'cum_threshold', got '",
        rule,
        "'",
    )
    threshold = float(threshold)  # the schema's double
    if score_fn == "relu":
        check(
            rule == "topk",
            "router_topk: score_fn 'relu' chooses the experts whose logit is > 0 (ReMoE; at most "
            "k); it takes no rule, got rule '",
            rule,
            "'",
        )
    if rule != "topk":
        check(
            score_fn == "softmax",
            "router_topk: rule '",
            rule,
            "' compares cumulative softmax probabilities; score_fn must be 'softmax', got ",
            f"'{score_fn}'",
        )
        check(
            math.isfinite(threshold),
            "router_topk: threshold (the p of rule '",
            rule,
            "') must be finite, got ",
            threshold,
        )
    else:
        check(
            threshold == 0.0,
            "router_topk: threshold is the p of rules 'top_p' and 'cum_threshold'; it must be 0 "
            "with rule '",
            rule,
            "', got ",
            threshold,
        )
    if rule == "topk" and score_fn != "relu":
        return
    name = "score_fn 'relu'" if score_fn == "relu" else "a top-p rule"
    check(
        not topk_then_score,
        "router_topk: ",
        name,
        " cannot be combined with topk_then_score=True (the rule reads the scores of the whole "
        "row)",
    )
    check(bias is None, "router_topk: ", name, " cannot be combined with a selection bias")
    check(
        num_groups == 1,
        "router_topk: ",
        name,
        " cannot be combined with group-limited selection (num_groups = ",
        num_groups,
        ")",
    )
