"""A plain-PyTorch Mixture-of-Experts layer for the MoE tests, written from the definitions (not
from mixops.ops or mixops.nn): router logits, scores, biased and group-limited selection, weights,
a per-expert masked loop of dense MLPs, zero-computation experts (identity / null), shared experts,
capacity drops in GShard/Switch priority, and the load-balancing / z losses; and expert-choice
routing (``expert_choice_forward``). Differentiable: the tests take its autograd gradients.

The configuration is the keyword arguments given to ``mixops.nn.MoE`` (a dict; ``full_config``
fills in the documented defaults). Parameters are a dict ``name -> tensor`` keyed like the module's
``named_parameters()`` (``gate.weight``, ``experts.gate_up_proj`` [E, 2F, H] gate rows first or
``experts.up_proj`` [E, F, H], ``experts.down_proj`` [E, H, F], ``shared_experts.*.weight``,
``shared_expert_gate.weight``).

Selection is discrete, so the caller passes the logits the layer under test chooses from
(``selection_logits``: computed in that layer's dtype) and the reference ranks them in float64;
its values (weights, outputs, losses) are computed in the dtype asked for, so the same call gives
both the float64 reference and PyTorch's own low-precision result.
"""

import math
from fractions import Fraction
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

DEFAULTS = dict(
    activation="swiglu",
    score_fn="softmax",
    topk_then_score=False,
    renormalize=True,
    renorm_eps=0.0,
    scaling=1.0,
    selection_bias=False,
    num_groups=1,
    groups_kept=1,
    group_score="top2_sum",
    router_fp32=False,
    shared_ffn_size=0,
    shared_expert_gate=False,
    capacity_factor=None,
    aux_loss_coef=0.0,
    z_loss_coef=0.0,
    zero_experts=None,
)

GATED_ACTS = {
    "swiglu": F.silu,
    "geglu": lambda g: F.gelu(g),
    "geglu_tanh": lambda g: F.gelu(g, approximate="tanh"),
    "reglu": F.relu,
}
PLAIN_ACTS = {
    "gelu": lambda h: F.gelu(h),
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def full_config(**cfg):
    """The MoE keyword arguments with every option present (hidden_size, ffn_size, num_experts,
    top_k must be given)."""
    out = dict(DEFAULTS)
    out.update(cfg)
    return out


def zero_kinds(cfg):
    """The zero-computation experts' kinds, in id order after the computing experts: None -> (),
    an int Z -> Z identity experts, else the given sequence of "identity" / "null"."""
    z = cfg.get("zero_experts")
    if z is None:
        return ()
    return ("identity",) * z if isinstance(z, int) else tuple(z)


def num_choices(cfg):
    """What the router chooses among: the computing experts (``num_experts``, as MoE takes it)
    plus the zero experts. Capacity, load counts and losses count all of them."""
    return cfg["num_experts"] + len(zero_kinds(cfg))


def mlp(x, w_gate, w_up, w_down, activation):
    """One dense expert: ``down(act(x @ gate.T) * (x @ up.T))`` or ``down(act(x @ up.T))``."""
    if activation in GATED_ACTS:
        return (GATED_ACTS[activation](x @ w_gate.T) * (x @ w_up.T)) @ w_down.T
    return PLAIN_ACTS[activation](x @ w_up.T) @ w_down.T


def router_logits(gate_weight, x2, router_fp32):
    """``x2 @ W.T`` in float32 when router_fp32 (unless the data is float64), else in x2's dtype."""
    if router_fp32 and x2.dtype != torch.float64:
        return x2.float() @ gate_weight.float().T
    return x2 @ gate_weight.to(x2.dtype).T


def _stable_desc(keys):
    """Column indices sorted by key, best first, ties to the lower index."""
    return torch.sort(keys, dim=-1, descending=True, stable=True).indices


def select_experts(sel_logits, cfg, bias=None):
    """The experts each token chooses, [T, k] int64, best first (the choice rank), in float64.

    The key is the score (softmax over E, sigmoid) or, with topk_then_score, the logit; the bias is
    added to the key. With num_groups > 1 each contiguous group of E/G experts is scored by the sum
    of its two best keys (top2_sum) or its best key (max); only the experts of the groups_kept best
    groups can be chosen."""
    cfg = full_config(**cfg)
    logits = sel_logits.detach().double()
    T, E = logits.shape
    k = cfg["top_k"]
    if cfg["topk_then_score"]:
        key = logits
    elif cfg["score_fn"] == "softmax":
        key = torch.softmax(logits, dim=-1)
    elif cfg["score_fn"] == "sigmoid":
        key = torch.sigmoid(logits)
    else:
        key = logits
    if bias is not None:
        key = key + bias.detach().double().cpu()
    G = cfg["num_groups"]
    if G > 1:
        per = E // G
        grouped = key.reshape(T, G, per)
        best = torch.sort(grouped, dim=-1, descending=True).values
        gscore = best[..., :2].sum(-1) if cfg["group_score"] == "top2_sum" else best[..., 0]
        kept = _stable_desc(gscore)[:, : cfg["groups_kept"]]
        group_ok = torch.zeros(T, G, dtype=torch.bool).scatter(1, kept, True)
        allowed = group_ok.repeat_interleave(per, dim=1)
        key = key.masked_fill(~allowed, -math.inf)
    return _stable_desc(key)[:, :k]


def expert_weights(logits, ids, cfg):
    """The weight of each chosen expert [T, k] in logits' dtype: the chosen scores, or (with
    topk_then_score) the score function applied to the chosen logits only; then w / (sum + eps)
    when renormalize; then * scaling."""
    if cfg["topk_then_score"]:
        chosen = logits.gather(1, ids)
        if cfg["score_fn"] == "softmax":
            w = torch.softmax(chosen, dim=-1)
        elif cfg["score_fn"] == "sigmoid":
            w = torch.sigmoid(chosen)
        else:
            w = chosen
    else:
        if cfg["score_fn"] == "softmax":
            scores = torch.softmax(logits, dim=-1)
        elif cfg["score_fn"] == "sigmoid":
            scores = torch.sigmoid(logits)
        else:
            scores = logits
        w = scores.gather(1, ids)
    if cfg["renormalize"]:
        w = w / (w.sum(-1, keepdim=True) + cfg["renorm_eps"])
    return w * cfg["scaling"]


def capacity_of(cfg, num_tokens):
    """ceil(capacity_factor * T * k / E), exactly (None when dropless); E counts every choice of
    the router, zero experts included."""
    cf = cfg["capacity_factor"]
    if cf is None:
        return None
    return math.ceil(Fraction(cf) * num_tokens * cfg["top_k"] / num_choices(cfg))


def capacity_keep(ids, num_experts, capacity):
    """[T, k] bool: which (token, choice) slots an expert keeps. Slots are ranked choice-major
    (every token's first choice in token order, then every second choice, ...); each expert keeps
    its first ``capacity``."""
    T, k = ids.shape
    if capacity is None:
        return torch.ones(T, k, dtype=torch.bool)
    keep = torch.ones(T, k, dtype=torch.bool)
    taken = [0] * num_experts
    for j in range(k):
        for t in range(T):
            e = int(ids[t, j])
            keep[t, j] = taken[e] < capacity
            taken[e] += 1
    return keep


def aux_losses(logits, ids, cfg, token_mask=None):
    """(load-balancing loss, z-loss), unweighted, in logits' dtype.

    balance = E * sum_e f_e * P_e with f_e = (chosen (token, expert e) pairs) / T_valid and P_e the
    mean over valid tokens of the token's probability of e: the softmax over all E, or for sigmoid
    routers the sigmoids normalised to sum 1 per token. z = mean over valid tokens of
    logsumexp(logits)^2. T_valid = max(number of valid tokens, 1)."""
    T, E = logits.shape
    valid = torch.ones(T, dtype=torch.bool) if token_mask is None else token_mask.reshape(-1).cpu()
    n = max(int(valid.sum()), 1)
    counts = torch.bincount(ids[valid].reshape(-1), minlength=E).to(logits.dtype)
    if cfg["score_fn"] == "sigmoid":
        s = torch.sigmoid(logits)
        prob = s / s.sum(-1, keepdim=True)
    else:
        prob = torch.softmax(logits, dim=-1)
    P = (prob * valid[:, None].to(logits.dtype)).sum(0) / n
    balance = E * ((counts / n) * P).sum()
    z = (torch.logsumexp(logits, dim=-1).square() * valid.to(logits.dtype)).sum() / n
    return balance, z


class RefOut(NamedTuple):
    y: torch.Tensor  # the output, x's shape, in the compute dtype
    ids: torch.Tensor  # [T, k] int64 chosen experts, best first
    keep: torch.Tensor  # [T, k] bool, False where a capacity drop happened
    weights: torch.Tensor  # [T, k] routing weights (score dtype)
    logits: torch.Tensor  # [T, E] logits used for the weights and the losses
    aux_loss: Optional[torch.Tensor]  # coef-weighted sum as the layer defines it, or None


def lora_mlp(x, w1, w2, activation, ffn_size, lora, e):
    """One expert with low-rank adapters, from the LoRA definition: each adapted projection
    ``W x`` becomes ``W x + scale * B_e (A_e x)``; ``lora``: ``{"gate_up": (A [E, r, in], B [E,
    out, r], scale), "down": ...}`` (either may be missing; ``gate_up`` adapts ``w1``, which is
    ``gate_up_proj`` (gate rows first) or ``up_proj``)."""
    h = x @ w1.T
    if "gate_up" in lora:
        A, B, s = lora["gate_up"]
        h = h + s * ((x @ A[e].T) @ B[e].T)
    if activation in GATED_ACTS:
        a = GATED_ACTS[activation](h[:, :ffn_size]) * h[:, ffn_size:]
    else:
        a = PLAIN_ACTS[activation](h)
    o = a @ w2.T
    if "down" in lora:
        A, B, s = lora["down"]
        o = o + s * ((a @ A[e].T) @ B[e].T)
    return o


def moe_forward(params, x, cfg, dtype, sel_logits, bias=None, token_mask=None, lora=None):
    """The MoE layer's output for ``x`` [..., H] with the parameters ``params`` computed in
    ``dtype`` (float64 for the reference, the layer's dtype for PyTorch's own low-precision
    result). Routing math (scores, weights, losses) runs in float64 for float64 and float32
    otherwise, the expert matmuls in ``dtype``, the weighted sum over experts in float32/64.

    Zero experts (``zero_experts``): ids ``num_experts ..`` are chosen like the others; an identity
    expert returns its input times the weight, a null expert nothing; they take no capacity slot
    (never dropped) but count in the capacity's E, the load counts and the losses.

    sel_logits: [T, E + Z] the logits the layer under test chooses from (see module docstring).
    lora: the experts' low-rank adapters (``lora_mlp``), computed in ``dtype``."""
    cfg = full_config(**cfg)
    H, E = cfg["hidden_size"], cfg["num_experts"]
    kinds = zero_kinds(cfg)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    P = {n: p.to(dtype) for n, p in params.items()}
    x2 = x.reshape(-1, H).to(dtype)
    T = x2.shape[0]

    logits = router_logits(P["gate.weight"], x2, cfg["router_fp32"]).to(acc)
    ids = select_experts(sel_logits, cfg, bias)
    w = expert_weights(logits, ids, cfg)
    keep = capacity_keep(ids, num_choices(cfg), capacity_of(cfg, T)) | (ids >= E)

    F_ = cfg["ffn_size"]
    gated = cfg["activation"] in GATED_ACTS
    y = torch.zeros(T, H, dtype=acc)
    for e in range(E):
        tok, j = ((ids == e) & keep).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        if lora:
            w1 = P["experts.gate_up_proj" if gated else "experts.up_proj"][e]
            lw = {k: (A.to(dtype), B.to(dtype), sc) for k, (A, B, sc) in lora.items()}
            o = lora_mlp(x2[tok], w1, P["experts.down_proj"][e], cfg["activation"], F_, lw, e)
        elif gated:
            w1 = P["experts.gate_up_proj"][e]
            o = mlp(x2[tok], w1[:F_], w1[F_:], P["experts.down_proj"][e], cfg["activation"])
        else:
            o = mlp(
                x2[tok], None, P["experts.up_proj"][e], P["experts.down_proj"][e], cfg["activation"]
            )
        y = y.index_add(0, tok, o.to(acc) * w[tok, j, None])
    for z, kind in enumerate(kinds):  # identity: x times the weight; null: nothing
        tok, j = (ids == E + z).nonzero(as_tuple=True)
        if kind == "identity" and tok.numel():
            y = y.index_add(0, tok, x2[tok].to(acc) * w[tok, j, None])
    y = y.to(dtype)

    if cfg["shared_ffn_size"]:
        y = y + shared_forward(P, x2, cfg)

    aux = None
    if cfg["aux_loss_coef"] or cfg["z_loss_coef"]:
        balance, z = aux_losses(logits, ids, cfg, token_mask)
        aux = cfg["aux_loss_coef"] * balance + cfg["z_loss_coef"] * z
    return RefOut(y.reshape(x.shape), ids, keep, w, logits, aux)


def shared_forward(params, x2, cfg):
    """The shared experts' output on ``x2`` [T, H] (gated per token with shared_expert_gate)."""
    cfg = full_config(**cfg)
    s = mlp(
        x2,
        params.get("shared_experts.gate_proj.weight"),
        params["shared_experts.up_proj.weight"],
        params["shared_experts.down_proj.weight"],
        cfg["activation"],
    )
    if cfg["shared_expert_gate"]:
        s = torch.sigmoid(x2 @ params["shared_expert_gate.weight"].T) * s
    return s


def expert_choice_forward(x, gate_weight, w1, w2, cf, token_mask=None):
    """Expert-choice routing from the paper's equations (Zhou et al. 2022), SwiGLU experts:
    S = softmax(X Wg) [T, E]; each expert e takes the C = min(T, ceil(cf * T / E)) tokens with the
    largest S[:, e] (padding tokens of ``token_mask`` never; fewer when fewer are eligible) and adds
    S[t, e] * FFN_e(x_t) to each one's output. x [T, H]; w1 [E, 2F, H] gate rows first; w2
    [E, H, F]. Returns (output [T, H], C, chosen [E, T] bool)."""
    T, E = x.shape[0], gate_weight.shape[0]
    C = min(T, math.ceil(Fraction(cf) * T / E))
    s = torch.softmax(x @ gate_weight.T, dim=-1)  # [T, E]
    out = torch.zeros_like(x)
    chosen = torch.zeros(E, T, dtype=torch.bool)
    for e in range(E):
        col = s[:, e] if token_mask is None else s[:, e].masked_fill(~token_mask, float("-inf"))
        top = torch.topk(col, C).indices
        top = top[col[top] > float("-inf")]  # fewer eligible tokens than C
        chosen[e, top] = True
        gg, up = (x[top] @ w1[e].T).chunk(2, dim=-1)
        ffn = (F.silu(gg) * up) @ w2[e].T
        out = out.index_add(0, top, s[top, e, None] * ffn)
    return out, C, chosen


def leaf_params(module, dtype, round_to=None):
    """The module's parameters as fresh CPU leaves needing grad, in ``dtype`` (first rounded to
    ``round_to``, e.g. bf16, when given)."""
    out = {}
    for name, p in module.named_parameters():
        t = p.detach().cpu()
        if round_to is not None:
            t = t.to(round_to)
        out[name] = t.to(dtype).requires_grad_()
    return out
