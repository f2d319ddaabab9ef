"""Shortcut-connected MoE benchmark (`python -m mixops.bench scmoe --world 2`): a LongCat-Flash
style layer (two attention + two dense MLP sublayers and an expert-parallel MoE, gloo processes
on this machine) with the standard schedule (the MoE called in place on its input: dispatch,
experts and combine back to back) against the shortcut-connected schedule
(``mixops.nn.ShortcutDecoderLayer``: the dispatch starts before the dense sublayers, the combine
finishes after them), forward and forward+backward, through the delay harness's link
(``mixops.parallel.slow_link``) at two speeds: the all-to-alls of a forward take 15% and 60% of the
standard layer's MoE forward time (the ScMoE paper's NVLink and PCIe cases). Reports per pass,
speed and schedule: step ms without and with the link, the communication time, the fraction
hidden, (step without link + comm - step with link) / comm, and the traced share: how much of each
exchange's link time the recorded compute covers in the harness's trace (``_overlap.covered_share``,
the measure ep reports too).
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from ._overlap import step_ms
from .world import spawn_world

SHARES = (0.15, 0.60)  # all-to-all time / the standard layer's MoE forward time


def _shape(quick):
    # batch, seq (per rank), hidden, dense ffn, expert ffn, experts, top-k, heads
    return (2, 64, 128, 384, 128, 8, 2, 4) if quick else (2, 256, 512, 1408, 512, 8, 2, 8)


def _layer(shape):
    from torch import nn

    from mixops.nn import MLP, ShortcutDecoderLayer
    from mixops.parallel import ExpertParallelMoE
    from mixops.reference.decoder import SelfAttention

    _, _, H, FD, FE, E, k, heads = shape
    torch.manual_seed(0)
    moe = ExpertParallelMoE(H, FE, E, k)
    return ShortcutDecoderLayer(
        moe,
        [SelfAttention(H, heads), SelfAttention(H, heads)],
        [MLP(H, FD, "swiglu"), MLP(H, FD, "swiglu")],
        [nn.RMSNorm(H), nn.RMSNorm(H)],
        [nn.RMSNorm(H), nn.RMSNorm(H)],
    )


class _InPlace:
    """A MoE whose whole forward runs at ``dispatch_start``: the standard schedule (dispatch,
    experts and combine back to back, nothing overlapped) through the very same layer code."""

    def __init__(self, moe):
        self.moe = moe

    def dispatch_start(self, x):
        return self.moe(x)

    def run_experts(self, y):
        return y

    def combine_finish(self, y):
        return y


def standard_forward(layer, x):
    """The same layer with the MoE called in place (no overlap): what the shortcut saves. Its
    dense regions are traced as the shortcut layer's are (the same schedule function)."""
    from types import SimpleNamespace

    from mixops.nn.shortcut import dual_sublayer_forward

    names = ("self_attn", "mlps", "input_layernorm", "post_attention_layernorm")
    standard = SimpleNamespace(mlp=_InPlace(layer.mlp), **{n: getattr(layer, n) for n in names})
    return dual_sublayer_forward(standard, x)


def _worker(rank, world, args):
    from mixops.parallel import slow_link

    shape = _shape(args.quick)
    B, S, H = shape[:3]
    layer = _layer(shape)
    x = torch.randn(B, S, H, generator=torch.Generator().manual_seed(rank)).requires_grad_(True)
    fwds = {"standard": lambda: standard_forward(layer, x), "shortcut": lambda: layer(x)}

    def step(which, bwd):
        if bwd:  # a training step: the gradients were handed to an optimizer and reset
            x.grad = None
            layer.zero_grad(set_to_none=True)
            fwds[which]().square().mean().backward()
        else:
            with torch.no_grad():
                fwds[which]()

    def once_ms(which, bwd, speed, covered):
        return step_ms(lambda: step(which, bwd), speed, covered)

    def paired_ms(which, bwd, speed):
        """Median ms without and with the link, the two interleaved in both orders (so that the
        machine's drift and any order effect hit both alike), and the median share of the
        exchanges' time that compute covered in the trace."""
        ts, covered = {None: [], speed: []}, []
        for rep in range(args.reps):
            for sp in (None, speed) if rep % 2 else (speed, None):
                ts[sp].append(once_ms(which, bwd, sp, covered))
        return statistics.median(ts[None]), statistics.median(ts[speed]), statistics.median(covered)

    for which in fwds:  # warm up
        step(which, True)
    with slow_link(1e15) as trace:  # bytes per pass, measured once
        step("standard", False)
        fwd_bytes = sum(t[4] for t in trace if t[0] == "comm")
        trace.clear()
        step("standard", True)
        bwd_bytes = sum(t[4] for t in trace if t[0] == "comm")
    with torch.no_grad():  # the standard layer's MoE forward time (no link)
        u = torch.randn(B, S, H)
        moe_ms = statistics.median(
            [_timed_ms(lambda: layer.mlp(u), dist) for _ in range(args.reps)]
        )
    rows = []
    for share in SHARES:
        speed = fwd_bytes / (share * moe_ms / 1e3)
        for b, nbytes in ((0, fwd_bytes), (1, bwd_bytes)):
            comm = nbytes / speed * 1e3
            for w in fwds:
                base, ms, traced = paired_ms(w, b, speed)
                hidden = (base + comm - ms) / comm
                rows.append((share, "fwd+bwd" if b else "fwd", w, base, ms, comm, hidden, traced))
    return rows, moe_ms, shape, torch.get_num_threads()


def _timed_ms(fn, dist):
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def run(args):
    world = args.world
    rows, moe_ms, (B, S, H, FD, FE, E, k, heads), threads = spawn_world(_worker, world, args)
    print(
        f"mixops shortcut-connected MoE benchmark: world {world} (gloo, one machine, "
        f"{os.cpu_count()} cores, {threads} thread(s) per rank, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}; per rank "
        f"batch {B} x seq {S}, hidden {H}, dense ffn {FD}, {heads} heads; MoE: E {E}, k {k}, "
        f"expert ffn {FE}; fp32; standard MoE forward {moe_ms:.2f} ms; median ms of {args.reps} "
        "reps; link: the delay harness"
    )
    print(
        "hidden = (step without link + comm - step with link) / comm; traced = the share of the "
        "exchanges' link time that compute intervals cover in the trace (target >= 85%)"
    )
    head = (
        f"{'a2a/MoE':>8} {'pass':<8} {'schedule':<9} {'no-link ms':>11} {'link ms':>9} "
        f"{'comm ms':>9} {'hidden':>8} {'traced':>8}"
    )
    print(head)
    print("-" * len(head))
    for share, pas, w, base, ms, comm, hid, traced in rows:
        print(
            f"{100 * share:>7.0f}% {pas:<8} {w:<9} {base:>11.2f} {ms:>9.2f} {comm:>9.2f} "
            f"{100 * hid:>7.1f}% {100 * traced:>7.1f}%"
        )
    sys.stdout.flush()
    return rows


def add_args(p: argparse.ArgumentParser):
    pass  # --world comes from the ep job
