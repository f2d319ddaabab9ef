"""MoE with expert groups per modality, and update_bias summed over a process group (gloo)."""

import torch
import torch.distributed as dist

from dist_harness import run_world
from mixops.nn import MoE

H, FFN, T = 32, 24, 41


def test_modality_groups_equal_one_moe_per_modality():
    # Token t routes among its modality's experts only, scored over them alone: the same as a
    # separate MoE per modality holding that slice of the router and experts.
    torch.manual_seed(0)
    E, G, k = 12, 3, 2
    m = MoE(H, FFN, E, k, num_modalities=G)
    x = torch.randn(T, H)
    modality = torch.randint(0, G, (T,))
    y = m(x, modality=modality)
    per = E // G
    for g in range(G):
        sub = MoE(H, FFN, per, k)
        with torch.no_grad():
            sub.gate.weight.copy_(m.gate.weight[g * per : (g + 1) * per])
            sub.experts.gate_up_proj.copy_(m.experts.gate_up_proj[g * per : (g + 1) * per])
            sub.experts.down_proj.copy_(m.experts.down_proj[g * per : (g + 1) * per])
        rows = modality == g
        assert rows.any()
        torch.testing.assert_close(y[rows], sub(x[rows]), rtol=1e-5, atol=1e-6)


def _rank(rank, world, rate):
    torch.manual_seed(0)  # the same layer on both ranks
    m = MoE(H, FFN, 8, 2, selection_bias=True).train()
    with torch.no_grad():
        m.gate.e_score_correction_bias.normal_()
    bias0 = m.gate.e_score_correction_bias.clone()
    torch.manual_seed(1 + rank)  # different tokens on each rank
    for _ in range(2):
        m(torch.randn(T + 7 * rank, H))
    mine = m.tokens_per_expert.clone()
    loads = [torch.zeros_like(mine) for _ in range(2)]
    dist.all_gather(loads, mine)
    total = (loads[0] + loads[1]).float()
    assert not torch.equal(loads[0], loads[1])  # the ranks really saw different loads
    used = m.update_bias(rate, group=dist.group.WORLD)
    torch.testing.assert_close(used, total, rtol=0, atol=0)
    expect = bias0 + rate * torch.sign(total.mean() - total)
    torch.testing.assert_close(m.gate.e_score_correction_bias, expect, rtol=0, atol=0)
    assert m.tokens_per_expert.sum() == 0


def test_update_bias_sums_the_load_over_a_process_group():
    run_world(_rank, 2, 1e-3)
