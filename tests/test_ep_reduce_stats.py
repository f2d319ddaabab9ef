"""ExpertParallelMoE(reduce_stats=True) emits no warning on its forward or backward (it used
torch.distributed.nn.functional.all_reduce, which torch 2.14 deprecates with a FutureWarning on
every call), and its aux loss and every gradient are bit for bit those of that deprecated path."""

import warnings

import torch
from torch.distributed.tensor import DTensor

from dist_harness import run_world

H, F, E, K = 16, 24, 4, 2


def _step(rank, token_mask=None):
    from mixops.parallel import ExpertParallelMoE

    torch.manual_seed(0)
    ep = ExpertParallelMoE(
        H, F, E, K, reduce_stats=True, aux_loss_coef=0.01, z_loss_coef=0.001, dtype=torch.float64
    )
    g = torch.Generator().manual_seed(10 + rank)
    x = torch.randn(6 + 3 * rank, H, generator=g, dtype=torch.float64, requires_grad=True)
    y = ep(x, token_mask=token_mask(x.shape[0]) if token_mask else None)
    (y.square().sum() + 100 * ep.aux_loss).backward()
    local = [
        g.to_local() if isinstance(g, DTensor) else g for g in (p.grad for p in ep.parameters())
    ]
    return [ep.aux_loss.detach(), x.grad] + local


def _deprecated_all_reduce_sum():
    """The old path: torch.distributed.nn.functional.all_reduce (its warning silenced here)."""

    class Old:
        @staticmethod
        def apply(group, t):
            from torch.distributed.nn.functional import all_reduce

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                return all_reduce(t, group=group)

    return Old


def _worker(rank, world):
    import mixops.parallel.moe as ep_mod

    masks = (None, lambda T: torch.arange(T) % 3 != 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning, deprecation or other, fails the test
        new = [_step(rank, m) for m in masks]
    fixed = ep_mod._AllReduceSum
    ep_mod._AllReduceSum = _deprecated_all_reduce_sum()
    try:
        old = [_step(rank, m) for m in masks]
    finally:
        ep_mod._AllReduceSum = fixed
    for a_list, b_list in zip(new, old):
        for a, b in zip(a_list, b_list):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_reduce_stats_warns_nothing_and_matches_the_deprecated_all_reduce_bitwise():
    run_world(_worker, 2)


def test_reduce_stats_on_one_rank_warns_nothing():
    run_world(_worker, 1)
