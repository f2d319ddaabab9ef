"""Experts of different widths (``MoE(ffn_sizes=...)``) under FSDP2 (``fully_shard``): two gloo
ranks over loopback train the packed layer on different tokens, and the gradients FSDP reduces
equal those of the unsharded layer on all ranks' tokens (the mean of the ranks' losses), in
float64; the packed weights' shards hold rows of several experts (FSDP2 cuts dim 0 evenly, not at
expert bounds) and the layer gathers them whole before its grouped GEMMs. A run past the harness
deadline fails, never hangs."""

import torch

from dist_harness import run_world
from mixops.nn import MoE

H, T = 16, 13
SIZES = [8, 1, 24, 5, 16]  # 2S = 108 rows of gate_up_proj: each rank's shard cuts expert 2


def _layer():
    torch.manual_seed(0)
    return MoE(H, ffn_sizes=SIZES, top_k=2, shared_ffn_size=6, dtype=torch.float64)


def _tokens(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(T, H, generator=g, dtype=torch.float64)


def _fsdp_equals_unsharded(rank, world):
    from torch.distributed.fsdp import fully_shard

    ref = _layer()
    xs = [_tokens(r) for r in range(world)]
    (sum(ref(x).square().sum() for x in xs) / world).backward()

    m = _layer()
    fully_shard(m)
    shard = m.experts.gate_up_proj.to_local()
    assert shard.shape[0] == 2 * sum(SIZES) // world, "FSDP2 should shard the packed rows"
    y = m(xs[rank])
    torch.testing.assert_close(y, ref(xs[rank]), rtol=1e-12, atol=1e-12)
    y.square().sum().backward()
    grads = {n: p.grad.full_tensor() for n, p in m.named_parameters()}
    for n, p in ref.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-9, atol=1e-12, msg=n)


def test_fsdp2_gradients_equal_the_unsharded_layer():
    run_world(_fsdp_equals_unsharded, 2)
