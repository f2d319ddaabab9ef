"""Reference router_topk in plain PyTorch, straight from the definitions in
mixops.ops.router_topk's docstring (same arguments, same outputs). Differentiable: tests take
its autograd gradients as the reference."""

import torch


def ranked_ids(keys: torch.Tensor, allowed: torch.Tensor, k: int) -> torch.Tensor:
    """The k best columns of each row: higher key first, NaN after every number, columns not
    allowed last, ties to the lower column index (stable sorts)."""
    cols = keys.shape[-1]
    order = torch.arange(cols, device=keys.device).expand_as(keys)
    clean = torch.where(torch.isnan(keys), torch.full_like(keys, -torch.inf), keys)
    idx = torch.sort(clean, dim=-1, descending=True, stable=True).indices
    order = order.gather(-1, idx)
    # class 0: a number, 1: NaN, 2: not allowed; a stable sort by class keeps the key order
    cls = torch.isnan(keys).long() + 2 * (~allowed).long()
    idx = torch.sort(cls.gather(-1, order), dim=-1, stable=True).indices
    return order.gather(-1, idx)[..., :k]


def router_topk(
    logits,
    k,
    *,
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
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(acc)
    num_tokens, num_experts = x.shape
    expert = torch.arange(num_experts, device=x.device)
    if num_modalities > 1:
        size = num_experts // num_modalities
        eligible = (expert // size)[None, :] == modality.long()[:, None]
    else:
        eligible = torch.ones_like(x, dtype=torch.bool)
    x_elig = x.masked_fill(~eligible, -torch.inf)
    softmax = torch.softmax(x_elig, dim=-1)
    if score_fn == "softmax":
        scores = softmax
    elif score_fn == "sigmoid":
        scores = torch.sigmoid(x)
    else:
        scores = x
    keys = x if topk_then_score else scores
    if bias is not None:
        keys = keys + bias.to(acc)
    allowed = eligible
    if num_groups > 1:
        gs = num_experts // num_groups
        grouped = keys.view(num_tokens, num_groups, gs)
        if group_score == "top2_sum" and gs >= 2:
            gscore = grouped.topk(2, dim=-1).values.sum(-1)
        else:
            gscore = grouped.max(dim=-1).values
        kept = ranked_ids(gscore, torch.ones_like(gscore, dtype=torch.bool), groups_kept)
        group_ok = torch.zeros_like(gscore, dtype=torch.bool).scatter(-1, kept, True)
        allowed = allowed & group_ok.repeat_interleave(gs, dim=-1)
    ids = ranked_ids(keys.detach(), allowed, k)
    if topk_then_score:
        chosen = x.gather(-1, ids)
        if score_fn == "softmax":
            weights = torch.softmax(chosen, dim=-1)
        elif score_fn == "sigmoid":
            weights = torch.sigmoid(chosen)
        else:
            weights = chosen
    else:
        weights = scores.gather(-1, ids)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + renorm_eps)
    weights = weights * scaling
    mask = (
        torch.ones(num_tokens, dtype=torch.bool, device=x.device)
        if token_mask is None
        else token_mask
    )
    counts = torch.zeros(num_experts, dtype=torch.int64, device=x.device)
    counts.index_add_(0, ids[mask].flatten(), torch.ones_like(ids[mask].flatten()))
    if score_fn == "sigmoid":
        sig = torch.sigmoid(x) * eligible
        prob = sig / sig.sum(-1, keepdim=True)
    else:
        prob = softmax
    score_sum = (prob * mask[:, None]).sum(0)
    lse = torch.logsumexp(x_elig, dim=-1)
    return weights, ids.to(torch.int32), counts.to(torch.int32), score_sum, lse
