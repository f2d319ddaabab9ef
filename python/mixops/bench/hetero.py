"""Experts of different widths (`python -m mixops.bench hetero`): ``MoE(ffn_sizes=[...])`` with its
packed weights against the same layer padded to its widest expert (HF's way: every expert
``[2*Fm, hidden]``, zero rows; the same function) and against a per-expert loop over the packed
weights (what HMoE-style code does: one set of GEMMs per expert, on the tokens that chose it).

The packed layer does each expert's real FLOPs; the padded one does ``Fm`` columns for every
expert. Target (issue 27): packed time / padded time within 1.2x the FLOP ratio, where the FLOP
ratio is ``sum_e rows_e * F_e / (sum_e rows_e * Fm)`` over the rows the router actually sent to
each expert (every impl routes the same tokens the same way). Memory: the packed weights alone
against the padded ones. Forward and forward+backward (full fine-tuning: gradients of x and every
weight), fp32 and bf16, one interleaved run per case (timing.interleaved_median_ms). Before
timing, the padded layer and the loop must equal the packed layer in fp32.
"""

import argparse
import sys
from collections import namedtuple

import torch
import torch.nn.functional as F

from ..nn.moe import MoE
from ..ops import router_topk
from .grouped_mm import native_lowp_matmul
from .timing import interleaved_median_ms, selected_dtypes, where

Config = namedtuple("Config", "name tokens hidden ffn_sizes topk")
# HMoE-like: pairs of widths from small to large (mean 960, widest 2048)
FULL = Config("hmoe-8x2", 2048, 1024, (256, 256, 512, 512, 1024, 1024, 2048, 2048), 2)
QUICK = Config("hmoe-8x2", 128, 64, (8, 8, 16, 16, 32, 32, 64, 64), 2)
IMPLS = ("mixops packed", "padded to widest", "per-expert loop")
PASSES = ("fwd", "fwd+bwd")
TARGET = 1.2  # (packed / padded time) / FLOP ratio
TOL = dict(rtol=1e-4, atol=1e-5)


def build(cfg, device, dtype, seed=0):
    """(packed MoE, the padded MoE with the same function)."""
    torch.manual_seed(seed)
    kw = dict(device=device, dtype=dtype)
    packed = MoE(cfg.hidden, top_k=cfg.topk, ffn_sizes=cfg.ffn_sizes, **kw)
    padded = MoE(cfg.hidden, max(cfg.ffn_sizes), len(cfg.ffn_sizes), cfg.topk, **kw)
    with torch.no_grad():
        padded.gate.weight.copy_(packed.gate.weight)
        gate_up, down = packed.experts.to_padded()
        padded.experts.gate_up_proj.copy_(gate_up)
        padded.experts.down_proj.copy_(down)
    return packed, padded


def route(packed, x2):
    """The packed layer's routing of the tokens x2 [T, hidden] (router_topk's result)."""
    logits = packed.gate(x2.float() if packed.router_fp32 else x2)
    return router_topk(logits, **packed.router_config.op_kwargs())


def loop(packed, x):
    """The per-expert loop over the packed layer's weights (its router, the same routing)."""
    x2 = x.reshape(-1, x.shape[-1])
    r = route(packed, x2)
    out = torch.zeros_like(x2)
    for e in range(packed.experts.num_experts):
        tok, slot = torch.where(r.ids == e)
        w = packed.experts.expert_weights(e)
        xe = x2[tok]
        h = F.silu(xe @ w["gate_proj"].t()) * (xe @ w["up_proj"].t())
        ye = (h @ w["down_proj"].t()) * r.weights[tok, slot, None].to(x.dtype)
        out = out.index_add(0, tok, ye)
    return out.view(x.shape)


def flop_ratio(packed, x):
    """sum_e rows_e * F_e / (sum_e rows_e * Fm) for the rows the router sends to each expert."""
    with torch.no_grad():
        ids = route(packed, x.reshape(-1, x.shape[-1])).ids
        rows = torch.bincount(ids[ids >= 0].long(), minlength=packed.experts.num_experts)
        widths = torch.tensor(packed.experts.ffn_sizes, device=rows.device)
        return float((rows * widths).sum()) / float(rows.sum() * widths.max())


def weight_mib(module):
    return sum(p.numel() * p.element_size() for p in module.experts.parameters()) / 2**20


def check(cfg, device):
    """fp32: the padded layer and the loop equal the packed layer (output and input gradient)."""
    packed, padded = build(cfg, device, torch.float32)
    got = []
    for fn in (packed, padded, lambda x: loop(packed, x)):
        x = torch.randn(cfg.tokens, cfg.hidden, generator=torch.Generator().manual_seed(5))
        x = x.to(device).requires_grad_(True)
        y = fn(x)
        y.backward(torch.ones_like(y))
        got.append((y.detach(), x.grad))
    for name, (y, g) in zip(IMPLS[1:], got[1:]):
        torch.testing.assert_close(y, got[0][0], **TOL, msg=f"{name}: output differs")
        torch.testing.assert_close(g, got[0][1], **TOL, msg=f"{name}: input gradient differs")


def case(cfg, device, dtype, reps):
    """{pass: {impl: ms}} and the FLOP ratio."""
    packed, padded = build(cfg, device, dtype)
    x = torch.randn(cfg.tokens, cfg.hidden, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    fns = {IMPLS[0]: packed, IMPLS[1]: padded, IMPLS[2]: lambda t: loop(packed, t)}

    def fwd(fn):
        def step():
            with torch.no_grad():
                fn(x)

        return step

    def fwd_bwd(fn):
        def step():
            x.grad = None
            for m in (packed, padded):
                m.zero_grad(set_to_none=True)
            fn(x).backward(grad)

        return step

    out = {}
    for pas, wrap in zip(PASSES, (fwd, fwd_bwd)):
        out[pas] = interleaved_median_ms({k: wrap(f) for k, f in fns.items()}, device, reps)
    return out, flop_ratio(packed, x), weight_mib(packed), weight_mib(padded)


def run(args):
    device = args.device
    cfg = QUICK if args.quick else FULL
    dtypes = selected_dtypes(args)
    print(
        f"mixops heterogeneous-experts benchmark on {device} ({where(device)}), CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, bf16 GEMM native: "
        f"{native_lowp_matmul(torch.bfloat16, device)}; median ms of {args.reps} reps"
    )
    print(
        f"{cfg.name}: {cfg.tokens} tokens, hidden {cfg.hidden}, top-{cfg.topk} of "
        f"{len(cfg.ffn_sizes)} experts of widths {list(cfg.ffn_sizes)} (swiglu); padded: every "
        f"expert {max(cfg.ffn_sizes)} wide"
    )
    check(QUICK, device)
    print(f"checked: padded layer and per-expert loop == packed layer in float32 ({QUICK.name})")
    rows = []
    for dtype in dtypes:
        dt = str(dtype)[6:]
        ms, ratio, mib_packed, mib_padded = case(cfg, device, dtype, args.reps)
        for pas in PASSES:
            t = ms[pas]
            rows.append((dt, pas, t, ratio, mib_packed, mib_padded))
            print(f"{dt} {pas}: {t}", file=sys.stderr, flush=True)
    print()
    head = (
        f"{'dtype':<9} {'pass':<8} {'packed ms':>10} {'padded ms':>10} {'loop ms':>10} "
        f"{'packed/padded':>14} {'FLOP ratio':>11} {'time/FLOPs':>11} {'target':>7} {'met':>6} "
        f"{'loop/packed':>12}"
    )
    print(head)
    print("-" * len(head))
    for dt, pas, t, ratio, _, _ in rows:
        p, d, lo = (t[i] for i in IMPLS)
        rel = (p / d) / ratio
        met = "met" if rel <= TARGET else "MISSED"
        print(
            f"{dt:<9} {pas:<8} {p:>10.2f} {d:>10.2f} {lo:>10.2f} {p / d:>13.2f}x {ratio:>11.3f} "
            f"{rel:>10.2f}x {TARGET:>6.1f}x {met:>6} {lo / p:>11.2f}x"
        )
    print()
    print(f"{'dtype':<9} {'packed weights MiB':>19} {'padded weights MiB':>19} {'ratio':>6}")
    seen = set()
    for dt, _, _, _, a, b in rows:
        if dt not in seen:
            seen.add(dt)
            print(f"{dt:<9} {a:>19.1f} {b:>19.1f} {a / b:>6.2f}")


def add_args(p: argparse.ArgumentParser):
    """hetero has no options of its own (--device, --quick, --reps, --dtype are shared)."""
