"""Shortcut-connected blocks with expert parallelism in 2 gloo processes: the layers with
ExpertParallelMoE equal the single-process layers (outputs and gradients, dropless and capacity,
zero experts and shared experts), and under the delay harness every MoE exchange, forward and
backward, travels inside the dense sublayers' compute when the communication is shorter than the
dense work (the step times are printed; speed belongs to the benchmarks)."""

import statistics
import time

import pytest
import torch
import torch.distributed as dist

from dist_harness import run_world, single_process_reference
from test_shortcut import PreNormAttention, _dual_layer

H, FF, E, K = 16, 24, 8, 2
F64 = dict(dtype=torch.float64)
TOL = dict(rtol=1e-10, atol=1e-12)


def _moes(cap, **kw):
    from mixops.nn import MoE
    from mixops.parallel import ExpertParallelMoE

    torch.manual_seed(0)
    ref = MoE(H, FF, E, K, zero_experts=2, capacity_factor=cap, **kw, **F64)
    ep = ExpertParallelMoE(H, FF, E, K, zero_experts=2, capacity_factor=cap, **kw, **F64)
    ep.load_full_state_dict(ref.state_dict())
    return ref, ep


def _build(kind, moe):
    from torch import nn

    from mixops.nn import ScMoEBlock

    if kind == "dual":
        return _dual_layer(moe)
    torch.manual_seed(2)
    return ScMoEBlock(PreNormAttention(), moe, norm=nn.RMSNorm(H, **F64),
                      shortcut_norm=nn.RMSNorm(H, **F64))  # fmt: skip


def _equals_single_process(rank, world, kind, cap):
    shared = dict(shared_ffn_size=12) if kind == "scmoe" else {}
    ref_moe, ep_moe = _moes(cap, selection_bias=True, **shared)
    with torch.no_grad():  # a selection bias that sends part of the tokens to the zero experts
        for m in (ref_moe, ep_moe):
            m.gate.e_score_correction_bias[E] = 0.3  # top-2: zero expert E + a computing one
    ref, ours = _build(kind, ref_moe), _build(kind, ep_moe)
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(2, 5, H, generator=g, **F64) for _ in range(world)]
    x = xs[rank].clone().requires_grad_(True)
    y = ours(x)
    y.square().sum().backward()
    want, gx = single_process_reference(ref, xs, rank, dropless=cap is None)
    torch.testing.assert_close(y, want, **TOL)
    torch.testing.assert_close(x.grad, gx, **TOL)
    sl = slice(rank * E // world, (rank + 1) * E // world)
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        want_g = ref_params[name].grad
        if ".experts." in name:
            torch.testing.assert_close(p.grad.to_local(), want_g[sl], **TOL, msg=name)
        else:  # replicated: the ranks' gradients sum to the single process's
            got = p.grad.clone()
            dist.all_reduce(got)
            torch.testing.assert_close(got, want_g, **TOL, msg=name)
    chosen = ep_moe.tokens_per_expert
    assert chosen[E:].sum() > 0 and chosen[:E].sum() > 0  # zero and computing experts chosen


def _both_layers(rank, world, cap):
    for kind in ("dual", "scmoe"):
        _equals_single_process(rank, world, kind, cap)


@pytest.mark.parametrize("cap", [None, 1.0], ids=["dropless", "cap1"])
def test_shortcut_layers_equal_single_process(cap):
    run_world(_both_layers, 2, cap)


# -- overlap under the delay harness ------------------------------------------------------------
HB, FB, EB = 256, 1024, 4  # hidden, dense ffn, experts: dense sublayers of tens of ms per pass


def _big_layer():
    from torch import nn

    from mixops.nn import MLP, ShortcutDecoderLayer
    from mixops.parallel import ExpertParallelMoE
    from test_shortcut import Attention

    torch.manual_seed(0)
    moe = ExpertParallelMoE(HB, 256, EB, 2)
    return ShortcutDecoderLayer(
        moe,
        [Attention(HB, 4).float(), Attention(HB, 4).float()],
        [MLP(HB, FB, "swiglu"), MLP(HB, FB, "swiglu")],
        [nn.RMSNorm(HB), nn.RMSNorm(HB)],
        [nn.RMSNorm(HB), nn.RMSNorm(HB)],
    )


def _covered(interval, spans):
    """The part of ``interval`` [a, b] inside the union of ``spans``."""
    a, b = interval
    cut = sorted((max(a, s), min(b, e)) for s, e in spans if min(b, e) > max(a, s))
    total, end = 0.0, a
    for s, e in cut:
        s = max(s, end)
        if e > s:
            total, end = total + e - s, e
    return total


def _overlap(rank, world):
    from mixops.parallel import slow_link

    layer = _big_layer()
    x = torch.randn(2, 512, HB, generator=torch.Generator().manual_seed(rank)).requires_grad_(True)

    def step():  # a training step: the gradients were handed to an optimizer and reset
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x).square().mean().backward()

    for _ in range(2):
        step()  # warm up
    regions = {}  # the dense regions' times (forward: 2, backward: 2), over 5 steps
    for _ in range(5):
        with slow_link(1e15) as trace:
            step()
        dense = [t for t in trace if t[0] == "compute" and t[1].startswith("dense")]
        for i, t in enumerate(dense):
            regions.setdefault(i, []).append(t[3] - t[2])
    per_exchange = max(t[4] for t in trace if t[0] == "comm")
    # Each exchange takes about 40% of the (median) time of the shortest dense region it may hide
    # behind: communication shorter than the dense work.
    speed = per_exchange / (0.4 * min(statistics.median(v) for v in regions.values()))

    base, slow, steps = [], [], []
    for rep in range(6):  # interleaved, in both orders, so drift and order hit both alike
        for link in (False, True) if rep % 2 else (True, False):
            dist.barrier()
            t0 = time.perf_counter()
            if link:
                with slow_link(speed) as trace:
                    step()
                steps.append(trace)
            else:
                step()
            (slow if link else base).append(time.perf_counter() - t0)

    def hidden(trace):
        """The least hidden share of a step's exchanges: the part of each inside dense compute,
        over the most that could be (the exchange, or the dense region after its start when
        the machine made that one shorter)."""
        dense = [(t[2], t[3]) for t in trace if t[0] == "compute" and t[1] != "experts"]
        comms = [t for t in trace if t[0] == "comm"]
        names = sorted({t[1] for t in comms})
        assert names == ["combine", "combine.backward", "dispatch", "dispatch.backward"], names
        worst = 1.0
        for t in comms:
            after = [e - s for s, e in dense if s >= t[2] - 1e-3]
            most = min(t[3] - t[2], after[0] if after else 0.0)
            worst = min(worst, _covered((t[2], t[3]), dense) / most if most > 0 else 0.0)
        return worst

    # Every exchange of a step mostly hidden, in most steps (a step the machine stalls in may not
    # be). Exchanges waited on at once (no overlap) give 0.0 in every step; overlapped ones give
    # 0.8-0.95 on a quiet machine, less than 1 because the glue between the traced dense regions
    # (norms, residual adds) counts as uncovered. 0.85 flaked in CI (a median step at 0.8 on a
    # loaded machine), hence the margin.
    fractions = [hidden(t) for t in steps]
    assert sorted(fractions)[len(fractions) // 2] >= 0.5, (fractions, steps)
    # The step times are printed, not asserted: overlap is judged from the trace above (how much
    # of each exchange lies inside dense compute). A wall-time ratio flaked in CI (a 1.12x step on
    # a busy 2-core machine with 99% of every exchange hidden); speed belongs to the benchmarks
    # (python -m mixops.bench scmoe).
    b, s = statistics.median(base), statistics.median(slow)
    print(
        f"rank {rank}: hidden {fractions}, step {s * 1e3:.1f} ms with link, {b * 1e3:.1f} without"
    )


def test_shortcut_communication_hides_behind_the_dense_sublayers():
    run_world(_overlap, 2)
