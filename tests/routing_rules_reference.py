"""References of router_topk's variable-count rules (issue 28), written from the authors' code:

  top_p          Huang et al. 2024, ZhenweiAn/Dynamic_MoE@f56bc20, modeling/modeling_moe.py
  cum_threshold  XMoE, ysngki/XMoE@917d944, MoE-Megatron-DeepSpeed/megatron/model/mlp_gating.py
  relu           ReMoE, thu-ml/ReMoE@463c6af, megatron/core/transformer/moe/router.py

The authors keep every expert their rule picks; router_topk keeps at most k (the k best, best
first) and writes id -1, weight 0 in the slots after them. So each selection function here reads
the row's k best scores ``sorted_w`` [T, k] (best first) and returns the kept-slot mask [T, k].

Two ways of feeding the softmax rules:
  kernel_scores  the sorted scores of the kernel's own plain top-k call and prefix sums summed
                 slot by slot in the scores' dtype (not torch.cumsum: its CPU kernel accumulates
                 float32 in double), so the rule sees the kernel's bits: selection is bit-exact.
  authors_path   torch.softmax + torch.sort + torch.cumsum as the authors compute them, for a
                 tolerance-free comparison away from exact boundaries.
"""

import torch

import mixops
from mixops.reference.routing import ranked_ids


def sequential_cumsum(sorted_w):
    """Inclusive prefix sums c_j = fl(c_{j-1} + s_j), j = 0, 1, ... in sorted_w's dtype."""
    c = torch.zeros_like(sorted_w[:, 0])
    out = torch.empty_like(sorted_w)
    for j in range(sorted_w.shape[1]):
        c = c + sorted_w[:, j]
        out[:, j] = c
    return out


def top_p_kept(sorted_w, cum, p):
    """modeling_moe.py L177-183 (top_p_sampling_batched_all_sequence), the `mask` logic:
        mask = cumulative_probs > top_p                        # L177
        threshold_indices = mask.long().argmax(dim=-1)         # L180
        threshold_mask = one_hot(threshold_indices).bool()     # L181
        mask = mask & ~threshold_mask                          # L183 (True: slot dropped)
    The first slot with c_j > p is kept; if there is none, argmax is 0 and every slot is kept."""
    mask = cum > p
    threshold_indices = mask.long().argmax(dim=-1)
    threshold_mask = torch.nn.functional.one_hot(threshold_indices, sorted_w.shape[1]).bool()
    return ~(mask & ~threshold_mask)


def cum_threshold_kept(sorted_w, cum, t):
    """mlp_gating.py L385-387 (main_thresholdGating):
    cum_sorted_gates = torch.cumsum(gates_sorted, dim=-1)          # L385
    chosen_flag = (cum_sorted_gates - gates_sorted) < threshold    # L386
    chosen_flag[:, 0] = True  # at least select one expert         # L387"""
    chosen = (cum - sorted_w) < t
    chosen[:, 0] = True
    return chosen


def relu_kept(sorted_logits):
    """router.py L353-354 (ReLURouter.routing): probs = relu(logits); routing_map = probs > 0."""
    return torch.relu(sorted_logits) > 0


_KEPT = {"top_p": top_p_kept, "cum_threshold": cum_threshold_kept}


def apply_kept(ids, weights, kept):
    """ids -1 and weight 0 where a slot is not kept (the static-shape convention)."""
    ids = torch.where(kept, ids, torch.full_like(ids, -1))
    return ids, torch.where(kept, weights, torch.zeros_like(weights))


def kernel_scores(logits, k, **kw):
    """The kernel's plain top-k call: ids [T, k] and raw sorted softmax scores [T, k]."""
    plain = mixops.ops.router_topk(logits, k, renormalize=False, **kw)
    return plain.ids, plain.weights


def softmax_rule_reference(logits, k, rule, threshold, **kw):
    """(ids [T, k] int32, raw weights [T, k]) of rule "top_p" or "cum_threshold" on the kernel's
    sorted scores, with the kernel's sequential prefix sums. kw: modality options."""
    ids, w = kernel_scores(logits, k, **kw)
    kept = _KEPT[rule](w, sequential_cumsum(w), threshold)
    return apply_kept(ids, w, kept)


def top_p_reference(logits, k, p, **kw):
    return softmax_rule_reference(logits, k, "top_p", p, **kw)


def cum_threshold_reference(logits, k, t, **kw):
    return softmax_rule_reference(logits, k, "cum_threshold", t, **kw)


def eligible_mask(logits, modality=None, num_modalities=1):
    """[T, E] bool: the experts token t may choose (its modality's group, or all)."""
    t, e = logits.shape
    if num_modalities <= 1:
        return torch.ones(t, e, dtype=torch.bool)
    size = e // num_modalities
    return (torch.arange(e) // size)[None, :] == modality.long().cpu()[:, None]


def relu_reference(logits, k, modality=None, num_modalities=1):
    """(ids [T, k] int32, raw weights [T, k] in float32/float64) of score_fn "relu": the experts
    whose logit is > 0, best first (the ranking and the bound k are ours; ReMoE keeps them all)."""
    x = logits.cpu().double() if logits.dtype == torch.float64 else logits.cpu().float()
    allowed = eligible_mask(x, modality, num_modalities)
    ids = ranked_ids(x, allowed, k)
    sorted_x = x.gather(1, ids)
    kept = relu_kept(sorted_x) & allowed.gather(1, ids)
    return apply_kept(ids.int(), torch.relu(sorted_x), kept)


def authors_path(logits, rule, threshold):
    """The authors' own torch code on the full row (no bound): the kept count [T] and the
    decision margin [T, E] (how far each slot's compared sum is from the threshold).
    top_p: modeling_moe.py L216 softmax, L173 sort, L176 cumsum, L177-183 mask.
    cum_threshold: mlp_gating.py L368 softmax (fp32), L383 topk(sorted), L385-387 chosen_flag.
    Runs in float32 (float64 for float64 logits), as the kernel does (XMoE's fp32 gate)."""
    x = logits.double() if logits.dtype == torch.float64 else logits.float()
    probs = torch.softmax(x, dim=-1)
    sorted_w, sorted_ids = torch.sort(probs, dim=-1, descending=True, stable=True)
    cum = torch.cumsum(sorted_w, dim=-1)
    if rule == "top_p":
        kept = top_p_kept(sorted_w, cum, threshold)
        # slot j + 1's decision compares c_j with p
        margin = torch.nn.functional.pad((cum - threshold).abs()[:, :-1], (1, 0), value=1.0)
    else:
        kept = cum_threshold_kept(sorted_w, cum, threshold)
        margin = (cum - sorted_w - threshold).abs()
        margin[:, 0] = 1.0
    return kept, sorted_ids, sorted_w, margin


def differentiable_forward(
    logits,
    ids,
    score_fn="softmax",
    renormalize=True,
    scaling=1.0,
    modality=None,
    num_modalities=1,
    token_mask=None,
):
    """(weights [T, k], score_sum [E], lse [T]) as functions of logits (float64 autograd), the
    selection fixed to ``ids`` (-1: no expert). Weights: softmax over the token's eligible
    experts, or relu, gathered at ids, renormalised over the kept slots if asked, times scaling.
    score_sum sums the softmax (relu) over unmasked tokens; lse is over the eligible experts."""
    allowed = eligible_mask(logits, modality, num_modalities).to(logits.device)
    x = logits.masked_fill(~allowed, float("-inf"))
    if score_fn == "relu":
        scores = torch.relu(logits).masked_fill(~allowed, 0.0)
    else:
        scores = torch.softmax(x, dim=-1)
    kept = ids >= 0
    w = scores.gather(1, ids.long().clamp_min(0)) * kept
    if renormalize:
        den = w.sum(dim=-1, keepdim=True)
        w = torch.where(kept, w / torch.where(den == 0, torch.ones_like(den), den), 0.0)
    w = w * scaling
    rows = scores if token_mask is None else scores * token_mask[:, None].to(scores)
    return w, rows.sum(dim=0), torch.logsumexp(x, dim=-1)
