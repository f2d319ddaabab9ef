"""MoD benchmark (`python -m mixops.bench mod`): what mixops.nn.MoD costs beyond the work it cannot
avoid, and expert choice against token choice in mixops.nn.MoE at equal expert FLOPs.

Table 1: MoD(DecoderBlock, capacity 1/8, sigmoid gate) with RoPE position embeddings, against the
same block dense over every token, and the floor: the block run directly on a contiguous [batch, C,
hidden] input (the chosen tokens with their cos/sin) plus the router projection over all tokens
(fwd+bwd: gradients into the block's input and weights and the router weight). Overhead = a MoD
around a pass-through block (routing, selection, gathers, scatter, gate) minus the router
projection alone, as % of the floor. Table 2: MoE top-k token choice against expert choice with
capacity_factor = k (each expert takes k*T/E tokens: the same expert GEMM FLOPs).

Forward and forward+backward, fp32 and bf16; every case timed in one interleaved run
(timing.interleaved_median_ms). Before timing, MoD's output and input gradient must equal a
masked-dense oracle in fp32 (the block over the whole sequence, keys limited to chosen tokens).
"""

import argparse
import copy
import gc
import sys
from collections import namedtuple
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.mod import MoD
from ..nn.mod_select import capacity_count
from ..nn.moe import MoE
from ..reference.decoder import DecoderBlock, rotary
from .grouped_mm import native_lowp_matmul
from .moa import Bound
from .moe import FLOOR, PASSES, fwd_bwd_step, fwd_step
from .timing import interleaved_median_ms, selected_dtypes, where

# MoD: batch, seq, hidden, heads, ffn; MoE: tokens, hidden, ffn, experts, top-k
Config = namedtuple(
    "Config", "batch seq hidden heads ffn moe_tokens moe_hidden moe_ffn experts topk"
)
FULL = Config(4, 2048, 1024, 16, 2816, 4096, 1024, 1408, 8, 2)
QUICK = Config(2, 64, 64, 4, 96, 256, 64, 96, 8, 2)
CAPACITY = Fraction(1, 8)
TOL = dict(rtol=1e-4, atol=1e-4)
MOD_IMPLS = ("MoD", "dense", FLOOR, "MoD(pass-through)", "router")


class PassThrough(nn.Module):
    """A block that returns its input through one elementwise op (so gradients flow)."""

    def forward(self, x, **unused):
        return x * 1.0


def build_mod(cfg, device, dtype, seed=0):
    """(MoD around a DecoderBlock, x [B, S, H] leaf, grad_output, (cos, sin) [1, S, head_dim])."""
    torch.manual_seed(seed)
    kw = dict(device=device, dtype=dtype)
    block = DecoderBlock(cfg.hidden, cfg.heads, cfg.ffn, **kw)
    mod = MoD(block, capacity=CAPACITY, gate="sigmoid", **kw)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    shape = (cfg.batch, cfg.seq, cfg.hidden)
    x = torch.randn(*shape, generator=g, **kw).requires_grad_(True)
    gy = torch.randn(*shape, generator=g, **kw)
    pos = torch.arange(cfg.seq, device=device).unsqueeze(0)
    return mod, x, gy, rotary(pos, cfg.hidden // cfg.heads, dtype=dtype)


def check_oracle(cfg, device):
    """fp32: MoD's output and input gradient == the block over the whole sequence with attention
    mask causal & (key chosen or key == query), out = where(chosen, x + sigmoid(r) (y - x), x)."""
    mod, x, gy, rot = build_mod(cfg, device, torch.float32)
    out = mod(x, position_embeddings=rot)
    chosen, r = mod.chosen, F.linear(x, mod.router.weight).squeeze(-1)  # r with its graph
    S = cfg.seq
    causal = torch.ones(S, S, dtype=torch.bool, device=device).tril()
    eye = torch.eye(S, dtype=torch.bool, device=device)
    mask = (causal & (chosen.unsqueeze(1) | eye)).unsqueeze(1)  # [B, 1, S, S]
    y = mod.block(x, attention_mask=mask, position_embeddings=rot)
    ref = torch.where(chosen.unsqueeze(-1), x + torch.sigmoid(r).unsqueeze(-1) * (y - x), x)
    if not bool((chosen.sum(1) == capacity_count(CAPACITY, S)).all()):
        sys.exit(f"error: MoD chose {chosen.sum(1).tolist()} tokens per sequence, not C")
    (gx,) = torch.autograd.grad(out, x, gy, retain_graph=True)
    (gx_ref,) = torch.autograd.grad(ref, x, gy)
    for what, a, b in (("output", out, ref), ("input gradient", gx, gx_ref)):
        try:
            torch.testing.assert_close(a, b, **TOL)
        except AssertionError as e:
            sys.exit(f"error: float32: MoD's {what} differs from the masked-dense oracle\n{e}")


def floor_steps(mod, x, rot, dtype):
    """The floor's (fwd, fwd+bwd): mod's block (in dtype) on the chosen tokens as a contiguous
    [B, C, H] leaf (their cos/sin) + the router projection over all tokens; the router alone."""
    with torch.no_grad():
        mod(x, position_embeddings=rot)
    chosen = mod.chosen
    B, S, H = x.shape
    block = mod.block if dtype == x.dtype else copy.deepcopy(mod.block).to(dtype)
    xc = x.detach()[chosen].view(B, -1, H).to(dtype).requires_grad_(True)
    pe = tuple(t.expand(B, -1, -1)[chosen].view(B, xc.shape[1], -1).to(dtype) for t in rot)
    xf = x.detach().to(dtype)
    w = mod.router.weight.detach().to(dtype).requires_grad_(True)
    g = torch.Generator(device=x.device).manual_seed(2)
    gyc = torch.randn(xc.shape, generator=g, device=x.device, dtype=dtype)
    gr = torch.randn(B, S, 1, generator=g, device=x.device, dtype=dtype)
    leaves = [xc, w, *block.parameters()]

    def floor_fwd():
        return block(xc, position_embeddings=pe), F.linear(xf, w)

    def floor_fwd_bwd():
        for t in leaves:
            t.grad = None
        torch.autograd.backward(list(floor_fwd()), [gyc, gr])

    def router_fwd_bwd():
        w.grad = None
        F.linear(xf, w).backward(gr)

    return (floor_fwd, floor_fwd_bwd), (lambda: F.linear(xf, w), router_fwd_bwd)


def steps(mods, x, gy, pas):
    """{name: the pass's step} for one-argument modules (moe's fwd_step / fwd_bwd_step)."""
    if pas == "fwd":
        return {name: fwd_step(m, x, name) for name, m in mods.items()}
    return {name: fwd_bwd_step(m, x, gy, name) for name, m in mods.items()}


def mod_case(cfg, device, dtype, floor_dtype, reps):
    """{pass: {impl: median ms}} for MOD_IMPLS, each pass one interleaved run."""
    mod, x, gy, rot = build_mod(cfg, device, dtype)
    thru = MoD(PassThrough(), cfg.hidden, CAPACITY, gate="sigmoid", device=device, dtype=dtype)
    thru.router.load_state_dict(mod.router.state_dict())
    mods = {
        "MoD": Bound(mod, position_embeddings=rot),
        "dense": Bound(mod.block, position_embeddings=rot),
        "MoD(pass-through)": Bound(thru, position_embeddings=rot),
    }
    floor, router = floor_steps(mod, x, rot, floor_dtype)
    out = {}
    for i, pas in enumerate(PASSES):
        fns = steps(mods, x, gy, pas)
        fns[FLOOR], fns["router"] = floor[i], router[i]
        with torch.set_grad_enabled(pas != "fwd"):
            out[pas] = interleaved_median_ms({n: fns[n] for n in MOD_IMPLS}, device, reps)
    return out


def moe_case(cfg, device, dtype, reps):
    """{pass: {"token choice", "expert choice": median ms}}, the same weights in both layers."""
    torch.manual_seed(0)
    kw = dict(device=device, dtype=dtype)
    tc = MoE(cfg.moe_hidden, cfg.moe_ffn, cfg.experts, top_k=cfg.topk, **kw)
    ec = MoE(
        cfg.moe_hidden, cfg.moe_ffn, cfg.experts, router="expert_choice",
        capacity_factor=cfg.topk, **kw,
    )  # fmt: skip
    ec.load_state_dict(tc.state_dict())
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(cfg.moe_tokens, cfg.moe_hidden, generator=g, **kw).requires_grad_(True)
    gy = torch.randn(cfg.moe_tokens, cfg.moe_hidden, generator=g, **kw)
    mods = {"token choice": tc, "expert choice": ec}
    out = {}
    for pas in PASSES:
        with torch.set_grad_enabled(pas != "fwd"):
            out[pas] = interleaved_median_ms(steps(mods, x, gy, pas), device, reps)
    return out


def print_mod_table(results, lowp_note):
    print(
        "\nTable 1, MoD: median ms; x floor = MoD / floor (target <= 1.05), x dense = dense / MoD "
        "(speedup), overhead = MoD(pass-through) - router, % floor (target <= 5)"
    )
    head = (
        f"{'dtype':<9} {'pass':<8} {'MoD ms':>9} {'dense ms':>9} {'floor ms':>9} "
        f"{'x floor':>8} {'x dense':>8} {'MoD(pass-through) ms':>21} {'router ms':>10} "
        f"{'overhead ms':>12} {'overhead % floor':>17}"
    )
    print(head)
    print("-" * len(head))
    for (dt, pas), ms in results:
        ovh = ms["MoD(pass-through)"] - ms["router"]
        floor = f"{ms[FLOOR]:.3f}" + ("*" if lowp_note.get(dt) else "")
        print(
            f"{dt:<9} {pas:<8} {ms['MoD']:>9.3f} {ms['dense']:>9.3f} {floor:>9} "
            f"{ms['MoD'] / ms[FLOOR]:>7.3f}x {ms['dense'] / ms['MoD']:>7.2f}x "
            f"{ms['MoD(pass-through)']:>21.3f} {ms['router']:>10.3f} {ovh:>12.3f} "
            f"{100 * ovh / ms[FLOOR]:>16.2f}%"
        )
    if any(lowp_note.values()):
        print("* floor GEMMs in float32: this CPU has no native bf16 GEMM")


def print_moe_table(results):
    print("\nTable 2, expert choice vs token choice at equal expert FLOPs: median ms")
    head = f"{'dtype':<9} {'pass':<8} {'token-choice ms':>16} {'expert-choice ms':>17} {'EC/TC':>7}"
    print(head)
    print("-" * len(head))
    for (dt, pas), ms in results:
        tc, ec = ms["token choice"], ms["expert choice"]
        print(f"{dt:<9} {pas:<8} {tc:>16.3f} {ec:>17.3f} {ec / tc:>6.2f}x")


def run(args):
    device = args.device
    cfg = QUICK if args.quick else FULL
    dtypes = selected_dtypes(args)
    print(
        f"mixops MoD benchmark on {device} ({where(device)}), CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, bf16 GEMM native: "
        f"{native_lowp_matmul(torch.bfloat16, device)}; median ms of {args.reps} reps"
    )
    C = capacity_count(CAPACITY, cfg.seq)
    print(
        f"MoD: DecoderBlock(hidden {cfg.hidden}, heads {cfg.heads}, ffn {cfg.ffn}), batch "
        f"{cfg.batch} x seq {cfg.seq}, capacity {CAPACITY} (C = {C}), gate sigmoid, RoPE; floor = "
        f"the block on [{cfg.batch}, {C}, {cfg.hidden}] + router projection over all tokens"
    )
    print(
        f"MoE: hidden {cfg.moe_hidden}, ffn {cfg.moe_ffn}, E {cfg.experts}, tokens "
        f"{cfg.moe_tokens}; token choice top_k {cfg.topk} vs expert choice capacity_factor "
        f"{cfg.topk} (C = {cfg.topk * cfg.moe_tokens // cfg.experts} tokens per expert)"
    )
    check_oracle(QUICK, device)
    print(
        f"checked: MoD output and input gradient == masked-dense oracle in float32 (rtol "
        f"{TOL['rtol']}, atol {TOL['atol']}) at batch {QUICK.batch} x seq {QUICK.seq}, hidden "
        f"{QUICK.hidden}",
        flush=True,
    )
    lowp_note = {str(d)[6:]: not native_lowp_matmul(d, device) for d in dtypes}
    mod_results, moe_results = [], []
    for dtype in dtypes:
        dt = str(dtype)[6:]
        floor_dtype = torch.float32 if lowp_note[dt] else dtype
        for pas, ms in mod_case(cfg, device, dtype, floor_dtype, args.reps).items():
            mod_results.append(((dt, pas), ms))
            print(
                f"MoD {dt} {pas}: {ms['MoD']:.2f} ms, {ms['MoD'] / ms[FLOOR]:.3f}x floor",
                file=sys.stderr,
                flush=True,
            )
        gc.collect()
    for dtype in dtypes:
        dt = str(dtype)[6:]
        for pas, ms in moe_case(cfg, device, dtype, args.reps).items():
            moe_results.append(((dt, pas), ms))
        gc.collect()
    print_mod_table(mod_results, lowp_note)
    print_moe_table(moe_results)
    return mod_results, moe_results


def add_args(p: argparse.ArgumentParser):
    """mod has no options of its own (--device, --quick, --reps, --dtype are shared)."""
