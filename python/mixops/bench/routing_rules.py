"""The variable-count routing rules (``python -m mixops.bench routing``, second part; issue 28).

1. The router alone: ``router_topk`` with rule top_p (p 0.4, Huang et al.'s default), cum_threshold
   (t 0.9, XMoE's) and score_fn relu (ReMoE), bound k, against the same rule as its authors'
   PyTorch code computes it (softmax, sort, cumsum, masks; relu and a mask) and against plain
   top-k with the same bound. E = 8 and 64, 4096 tokens. Target: >= 2x faster than the PyTorch
   versions at E = 64.
2. The MoE layer: a rule whose threshold is set so tokens take k/2 experts on average, against
   top-k with bound k, forward+backward. Target: <= 0.7x the top-k layer's time.
"""

import torch
import torch.nn.functional as F

from .timing import interleaved_median_ms, where

RULES = {"top_p": 0.4, "cum_threshold": 0.9, "relu": None}
ROUTER_GRID = ((4096, 8, 4), (4096, 64, 8))  # (tokens, E, bound k)
QUICK_GRID = ((256, 8, 4), (256, 64, 8))
LAYER = dict(tokens=2048, hidden=1024, ffn=1024, experts=8, k=4)
QUICK_LAYER = dict(tokens=128, hidden=64, ffn=64, experts=8, k=4)


def huang_top_p(logits, p):
    """ZhenweiAn/Dynamic_MoE modeling/modeling_moe.py L157-186 on the softmax (L216)."""
    probs = torch.softmax(logits.float(), dim=-1)
    sorted_probs, sorted_indices = torch.sort(probs, descending=True)
    cumulative_probs = torch.cumsum(sorted_probs, dim=-1)
    mask = cumulative_probs > p
    threshold_indices = mask.long().argmax(dim=-1)
    threshold_mask = F.one_hot(threshold_indices, num_classes=sorted_indices.size(-1)).bool()
    mask = mask & ~threshold_mask
    return torch.where(mask, 0.0, sorted_probs), torch.where(mask, -1, sorted_indices)


def xmoe_threshold(logits, t):
    """ysngki/XMoE megatron/model/mlp_gating.py L365-447: the chosen gates [T, E]."""
    gates = F.softmax(logits.float(), dim=1)
    gates_sorted, gates_indices = torch.topk(gates, dim=-1, k=gates.shape[1], sorted=True)
    cum_sorted_gates = torch.cumsum(gates_sorted, dim=-1)
    chosen_flag = (cum_sorted_gates - gates_sorted) < t
    chosen_flag[:, 0] = True
    mask = torch.zeros_like(gates).scatter(1, gates_indices, chosen_flag.to(gates.dtype))
    return gates * mask, mask


def remoe_relu(logits):
    """thu-ml/ReMoE router.py L353-354."""
    probs = torch.relu(logits)
    return probs, probs > 0


TORCH_RULES = {
    "top_p": lambda x, p: huang_top_p(x, p),
    "cum_threshold": lambda x, p: xmoe_threshold(x, p),
    "relu": lambda x, p: remoe_relu(x),
}


def _rule_kwargs(rule, p):
    if rule == "relu":
        return dict(score_fn="relu", renormalize=False)
    return dict(rule=rule, threshold=p, renormalize=False)


def _router_rows(args, dtype):
    from mixops.ops import router_topk

    rows = []
    for T, E, k in QUICK_GRID if args.quick else ROUTER_GRID:
        logits = torch.randn(T, E, generator=torch.Generator().manual_seed(E)).to(dtype)
        logits = logits.to(args.device)
        for rule, p in RULES.items():
            kw = _rule_kwargs(rule, p)
            fns = {
                "mixops": lambda kw=kw, k=k, x=logits: router_topk(x, k, **kw),
                "torch": lambda rule=rule, p=p, x=logits: TORCH_RULES[rule](x, p),
                "top-k": lambda k=k, x=logits: router_topk(x, k, renormalize=False),
            }
            ours = (router_topk(logits, k, **kw).ids >= 0).sum(-1)
            if dtype == torch.float32:  # the same number of experts per token as theirs, first
                chosen = TORCH_RULES[rule](logits, p)[1]
                theirs = (chosen >= 0 if rule == "top_p" else chosen > 0).sum(-1).clamp(max=k)
                same = (ours == theirs).float().mean().item()
                assert same > 0.999, f"{rule}: {same:.4f} of the rows agree with the authors' code"
            t = interleaved_median_ms(fns, args.device, args.reps)
            kept = ours.float().mean().item()
            rows.append((dtype, T, E, k, rule, kept, t))
    return rows


def _layer_threshold(moe, x, rule, target):
    """The threshold at which the layer's tokens keep ``target`` experts on average (bisection on
    the router's own logits; relu: a shift of the router's logits, given as the gate's bias)."""
    from mixops.ops import router_topk

    logits = moe.gate(x).float()
    lo, hi = (0.0, 1.0) if rule != "relu" else (-10.0, 10.0)
    for _ in range(40):
        mid = (lo + hi) / 2
        if rule == "relu":
            kept = (logits - mid > 0).sum(-1).clamp(max=moe.top_k).float().mean().item()
            lo, hi = (mid, hi) if kept > target else (lo, mid)
        else:
            r = router_topk(logits, moe.top_k, rule=rule, threshold=mid, renormalize=False)
            kept = (r.ids >= 0).sum(-1).float().mean().item()
            lo, hi = (lo, mid) if kept > target else (mid, hi)
    return (lo + hi) / 2


def _layer_rows(args, dtype):
    from mixops.nn import MoE

    cfg = QUICK_LAYER if args.quick else LAYER
    T, H, Fd, E, k = (cfg[n] for n in ("tokens", "hidden", "ffn", "experts", "k"))
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(1)).to(dtype).to(args.device)
    kw = dict(device=args.device, dtype=dtype)
    torch.manual_seed(0)
    base = MoE(H, Fd, E, k, **kw)
    rows = []
    for rule in RULES:
        p = _layer_threshold(base, x, rule, k / 2)
        if rule == "relu":  # the shift as a gate bias: logits - p
            layer = MoE(H, Fd, E, k, score_fn="relu", renormalize=False, **kw)
            layer.load_state_dict(base.state_dict())
            inner = layer.gate.forward
            layer.gate.forward = lambda z, inner=inner, p=p: inner(z) - p
        else:
            layer = MoE(H, Fd, E, k, rule=rule, threshold=p, renormalize=False, **kw)
            layer.load_state_dict(base.state_dict())
        kept = _kept(layer, x)
        xs = {n: x.clone().requires_grad_() for n in ("rule", "top-k")}
        fns = {
            "rule": lambda m=layer, xs=xs: m(xs["rule"]).sum().backward(),
            "top-k": lambda xs=xs: base(xs["top-k"]).sum().backward(),
        }
        t = interleaved_median_ms(fns, args.device, args.reps)
        rows.append((dtype, rule, p, kept, t))
    return rows


def _kept(layer, x):
    from mixops.ops import router_topk

    logits = layer.gate(x)
    r = router_topk(logits.float(), **layer.router_config.op_kwargs())
    return (r.ids >= 0).sum(-1).float().mean().item()


def run_rules(args, dtypes):
    print(
        f"\nrouting rules (variable experts per token) on {args.device} ({where(args.device)}), "
        f"torch {torch.__version__}; median ms of {args.reps} reps"
    )
    head = (
        f"{'dtype':<9} {'tokens':>6} {'E':>3} {'k':>2} {'rule':<13} {'kept':>5} {'mixops':>8} "
        f"{'torch':>8} {'top-k':>8} {'torch/mixops':>12} {'mixops/top-k':>12}"
    )
    print("1. the router alone (kept: mean experts per token; torch: the authors' code)")
    print(head)
    print("-" * len(head))
    for dtype in dtypes:
        for dt, T, E, k, rule, kept, t in _router_rows(args, dtype):
            print(
                f"{str(dt)[6:]:<9} {T:>6} {E:>3} {k:>2} {rule:<13} {kept:>5.2f} "
                f"{t['mixops']:>8.3f} {t['torch']:>8.3f} {t['top-k']:>8.3f} "
                f"{t['torch'] / t['mixops']:>11.2f}x {t['mixops'] / t['top-k']:>11.2f}x"
            )
    cfg = QUICK_LAYER if args.quick else LAYER
    print(
        f"2. the MoE layer, fwd+bwd: the rule at k/2 experts on average against top-k (bound k "
        f"= {cfg['k']}); {cfg['tokens']} tokens, hidden {cfg['hidden']}, ffn {cfg['ffn']}, "
        f"E {cfg['experts']}"
    )
    head = f"{'dtype':<9} {'rule':<13} {'p':>8} {'kept':>5} {'rule ms':>9} {'top-k ms':>9} {'ratio':>6}"
    print(head)
    print("-" * len(head))
    for dtype in dtypes:
        for dt, rule, p, kept, t in _layer_rows(args, dtype):
            print(
                f"{str(dt)[6:]:<9} {rule:<13} {p:>8.4f} {kept:>5.2f} {t['rule']:>9.2f} "
                f"{t['top-k']:>9.2f} {t['rule'] / t['top-k']:>5.2f}x"
            )
