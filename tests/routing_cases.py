"""Inputs for the routing tests: logits without ties (so the reference's torch.topk and our tie
rule cannot disagree), in any dtype, and the option grid."""

import itertools

import torch

# (score_fn, topk_then_score, renormalize, with_bias, groups, with_modality, scaling)
# groups: None, "top2_sum" or "max" (num_groups 4, groups_kept 2)
OPTION_GRID = [
    dict(score_fn=s, topk_then_score=o, renormalize=r, bias=b, groups=g, modality=m, scaling=c)
    for s, o, r, b, g, m, c in itertools.product(
        ["softmax", "sigmoid", "none"],
        [False, True],
        [False, True],
        [False, True],
        [None, "top2_sum", "max"],
        [False, True],
        [1.0, 2.5],
    )
    if not (g and m)  # group-limited selection and modality groups exclude each other
]


def distinct_logits(num_tokens, num_experts, dtype=torch.float32, device="cpu", scale=1 / 16):
    """Each row a random permutation of distinct values (j - E/2) * scale, exact in bf16 for
    E <= 256, plus a tiny per-row offset in fp32 so rows differ."""
    rows = (
        torch.stack([torch.randperm(num_experts) for _ in range(num_tokens)])
        if num_tokens
        else torch.zeros(0, num_experts, dtype=torch.long)
    )
    x = (rows.double() - num_experts / 2) * scale
    return x.to(dtype).to(device)


def router_kwargs(case, num_experts, num_tokens, device="cpu"):
    """Turn an OPTION_GRID entry into router_topk keyword arguments (and k)."""
    kw = dict(
        score_fn=case["score_fn"],
        topk_then_score=case["topk_then_score"],
        renormalize=case["renormalize"],
        scaling=case["scaling"],
    )
    if case["bias"]:
        kw["bias"] = (torch.rand(num_experts, generator=torch.Generator().manual_seed(1)) - 0.5).to(
            device
        )
    if case["groups"]:
        kw.update(num_groups=4, groups_kept=2, group_score=case["groups"])
    if case["modality"]:
        kw.update(
            num_modalities=2,
            modality=torch.randint(
                0, 2, (num_tokens,), generator=torch.Generator().manual_seed(2)
            ).to(device),
        )
    return kw
