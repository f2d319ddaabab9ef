"""The overlap of the shortcut-connected schedules (mixops.nn.ScMoEBlock, ShortcutDecoderLayer) with
ExpertParallelMoE in a world of 2 gloo processes, read from the delay harness's trace
(``mixops.parallel.slow_link``: [kind, name, start, end(, bytes)] records of the exchanges and of
the "dense" compute): each of the MoE's four exchanges (dispatch, combine, and their gradients) is
still on the link when dense compute of the same pass starts. Structural, not a speed-up threshold:
every exchange holds the link for LINK_S, and the dense work it hides behind starts within a
millisecond of it, so only a stall of more than LINK_S - MARGIN_S could fail a correct schedule;
a serial one (the MoE's stages back to back before or after the dense work) starts no dense
compute while an exchange travels. (test_shortcut_ep.py measures how much of each exchange the
dense work hides for LongCat-Flash's layer.)"""

import torch

from dist_harness import run_world

H, FF, E, K = 16, 24, 8, 2
F64 = dict(dtype=torch.float64)
LINK_S = 0.3  # seconds each exchange holds the simulated link
MARGIN_S = 0.1  # dense compute must start this long before the exchange ends
EXCHANGES = ["combine", "combine.backward", "dispatch", "dispatch.backward"]


def _layer(kind):
    from torch import nn

    from mixops.nn import ScMoEBlock
    from mixops.parallel import ExpertParallelMoE
    from test_shortcut import PreNormAttention, _dual_layer

    torch.manual_seed(0)
    if kind == "dual":
        return _dual_layer(ExpertParallelMoE(H, FF, E, K, **F64))
    moe = ExpertParallelMoE(H, FF, E, K, shared_ffn_size=12, **F64)
    return ScMoEBlock(PreNormAttention(), moe, norm=nn.RMSNorm(H, **F64))


def _traced_step(layer, x, bytes_per_s):
    from mixops.parallel import slow_link

    with slow_link(bytes_per_s) as trace:
        layer(x).square().sum().backward()
    return trace


def _exchanges_travel_during_dense_compute(rank, world):
    for kind in ("scmoe", "dual"):
        layer = _layer(kind)
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(2, 8, H, generator=g, **F64).requires_grad_(True)
        fast = _traced_step(layer, x, 1e15)  # warm-up; the exchanges' sizes
        slowest = min(t[4] for t in fast if t[0] == "comm")
        trace = _traced_step(layer, x, slowest / LINK_S)
        comms = [t for t in trace if t[0] == "comm"]
        assert sorted(t[1] for t in comms) == EXCHANGES, (kind, trace)
        for t in comms:
            assert t[3] - t[2] >= LINK_S - 1e-3, (kind, t, trace)  # the link held it
            dense = "dense.backward" if t[1].endswith(".backward") else "dense"
            starts = [d[2] for d in trace if d[0] == "compute" and d[1] == dense]
            assert any(t[2] <= s < t[3] - MARGIN_S for s in starts), (
                f"{kind}: no {dense} compute starts while {t[1]} travels",
                trace,
            )


def test_exchanges_travel_while_the_dense_sublayers_compute():
    run_world(_exchanges_travel_during_dense_compute, 2)
