"""Routing benchmark: router_topk + permute + unpermute against the plain-PyTorch chain doing
the same work (softmax, topk, renormalise, per-expert counts/score sums/logsumexp, stable sort,
index, index_add), with identity experts in between so only routing is timed.

Grid: num_tokens in {1, 128, 4096, 32768} x E in {8, 64, 256} x k in {1, 2, 8},
float32 and bfloat16, hidden 1024 (--hidden). Target on CPU: >= 3x at T=4096, E=64, k=8 and
never slower at T=1. Then the variable-count rules (top-p, XMoE's threshold, ReMoE's relu):
routing_rules.py; ``--rules`` runs that part alone.
"""

import argparse
import itertools

import torch

from .routing_rules import run_rules
from .timing import interleaved_median_ms, nvtx_range, selected_dtypes, where

TOKENS = (1, 128, 4096, 32768)
EXPERTS = (8, 64, 256)
TOPK = (1, 2, 8)
QUICK = ((1, 8, 2), (128, 64, 8), (1024, 64, 8))


def mixops_chain(logits, x, k, num_experts):
    from mixops.ops import permute, router_topk, unpermute

    with nvtx_range("router_topk"):
        r = router_topk(logits, k)
    with nvtx_range("permute"):
        p = permute(x, r.ids, num_experts)
    with nvtx_range("unpermute"):
        return unpermute(p.x_sorted, p.row_map, r.weights), p.offsets, r.score_sum, r.lse


def torch_chain(logits, x, k, num_experts):
    probs = torch.softmax(logits.float(), dim=-1)
    w, ids = probs.topk(k, dim=-1)
    w = w / w.sum(dim=-1, keepdim=True)
    flat = ids.flatten()
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = counts.cumsum(0)
    score_sum = probs.sum(0)
    lse = torch.logsumexp(logits.float(), dim=-1)
    order = torch.sort(flat, stable=True).indices
    token = order // k
    x_sorted = x[token]
    y = torch.zeros_like(x)
    y.index_add_(0, token, x_sorted * w.flatten()[order, None].to(x.dtype))
    return y, offsets, score_sum, lse


def run(args):
    dtypes = selected_dtypes(args)
    rows = [] if args.rules else run_chain(args, dtypes)
    run_rules(args, dtypes)
    return rows


def run_chain(args, dtypes):
    device = args.device
    grid = QUICK if args.quick else tuple(itertools.product(TOKENS, EXPERTS, TOPK))
    grid = [
        (t, e, k)
        for t, e, k in grid
        if args.experts in (0, e) and (not args.tokens or t in args.tokens)
    ]
    hidden = args.hidden
    print(
        f"mixops routing benchmark on {device} "
        f"({where(device)}), "
        f"torch {torch.__version__}; hidden {hidden}; median ms of {args.reps} reps; "
        "router_topk + permute + unpermute vs the PyTorch chain"
    )
    header = f"{'dtype':<9} {'tokens':>6} {'E':>4} {'k':>2} {'mixops ms':>10} {'torch ms':>10} {'speedup':>8}"
    rows = []
    total = len(grid) * len(dtypes)
    for dtype in dtypes:
        for num_tokens, num_experts, k in grid:
            gen = torch.Generator().manual_seed(num_tokens * 1000 + num_experts)
            logits = torch.randn(num_tokens, num_experts, generator=gen).to(dtype).to(device)
            x = torch.randn(num_tokens, hidden, generator=gen).to(dtype).to(device)
            inputs = (logits, x, k, num_experts)
            fns = {
                "mixops": lambda inputs=inputs: mixops_chain(*inputs),
                "torch": lambda inputs=inputs: torch_chain(*inputs),
            }
            if dtype == torch.float32:  # same answer first (bf16 logits tie; torch.topk breaks
                ours, theirs = fns["mixops"](), fns["torch"]()  # ties its own way)
                torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(ours[1].long(), theirs[1].long())
            t = interleaved_median_ms(fns, device, args.reps)
            line = (
                f"{str(dtype)[6:]:<9} {num_tokens:>6} {num_experts:>4} {k:>2} "
                f"{t['mixops']:>10.3f} {t['torch']:>10.3f} {t['torch'] / t['mixops']:>7.2f}x"
            )
            print(f"[{len(rows) + 1}/{total}] {line}", flush=True)
            rows.append(line)
    print()
    print(header)
    print("-" * len(header))
    for line in rows:
        print(line)
    return rows


def add_args(p: argparse.ArgumentParser):
    """routing's own options (--quick, --reps, --dtype, --experts are shared)."""
    p.add_argument("--hidden", type=int, default=1024, help="hidden size of x")
    p.add_argument("--tokens", type=int, nargs="*", default=[], help="only these token counts")
    p.add_argument(
        "--rules",
        action="store_true",
        help="only the variable-count routing rules (top-p, cum_threshold, relu)",
    )
