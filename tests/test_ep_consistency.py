"""Expert parallelism when the ranks disagree, or would drift apart, mid-training (issue 21):
a token count that differs between ranks only at a later step is an error on every rank within
seconds (never a hang on the process-group timeout), and ``update_bias`` keeps the replicated
router bias equal on every rank that holds it (2 ranks, and a 2 x 2 dp x ep mesh), equal to the
update computed in one process from the union of the ranks' tokens."""

import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from dist_harness import run_world

H, F, E, K = 16, 24, 8, 2
F64 = dict(dtype=torch.float64)
RATE = 1e-3
# A collective that waits longer than this raises: a regression to a hang fails in 20 s.
SHORT_TIMEOUT = timedelta(seconds=20)


def _short_group():
    return dist.new_group(backend="gloo", timeout=SHORT_TIMEOUT)


# ---- finding 6: a token count that differs only at step 2 -------------------------------------


def _tokens_differ_at_step_2(rank, world, changing_rank):
    from mixops.parallel import ExpertParallelMoE

    ep = ExpertParallelMoE(H, F, E, K, capacity_factor=1.0, group=_short_group(), **F64)
    g = torch.Generator().manual_seed(rank)
    ep(torch.randn(6, H, generator=g, **F64))  # step 1: 6 tokens on both ranks, checked
    counts = [6] * world
    counts[changing_rank] = 4  # step 2: one rank passes 4 (the other's check was cached)
    t0 = time.monotonic()
    want = ", ".join(f"rank {r}: {n}" for r, n in enumerate(counts))
    with pytest.raises(ValueError, match=rf"disagree on tokens \(.*\): {want}$"):
        ep(torch.randn(counts[rank], H, generator=g, **F64))
    elapsed = time.monotonic() - t0
    assert elapsed < 10, f"rank {rank}: the mismatch took {elapsed:.1f} s to raise"
    # Both ranks raised at the same collective: the group is still in step, step 3 runs.
    assert ep(torch.randn(6, H, generator=g, **F64)).shape == (6, H)


@pytest.mark.parametrize("changing_rank", [0, 1])
def test_token_counts_differing_at_step_2_raise_on_every_rank(changing_rank):
    run_world(_tokens_differ_at_step_2, 2, changing_rank)


def _dtype_differs_at_step_2(rank, world):
    from mixops.parallel import ExpertParallelMoE

    ep = ExpertParallelMoE(H, F, E, K, group=_short_group(), **F64)  # dropless
    ep(torch.randn(5, H, **F64))
    if rank == 1:
        ep.float()
    dt = torch.float64 if rank == 0 else torch.float32
    want = (
        r"disagree on dtype \(float32=0, bfloat16=1, float16=2, float64=3\): rank 0: 3, rank 1: 0$"
    )
    with pytest.raises(ValueError, match=want):
        ep(torch.randn(5, H, dtype=dt))


def test_dropless_config_change_at_step_2_raises_on_every_rank():
    run_world(_dtype_differs_at_step_2, 2)


# ---- finding 7: update_bias keeps the replicated router bias equal ----------------------------


def _moe_kwargs():
    return dict(score_fn="sigmoid", selection_bias=True, **F64)


def _rank_tokens(world):
    """Different token counts per rank (so that the ranks' own loads disagree)."""
    g = torch.Generator().manual_seed(7)
    return [torch.randn(5 + 4 * r, H, generator=g, **F64) for r in range(world)]


def _one_process_update(weight, bias, tokens):
    """The update of one process that sees every token: plain torch (sigmoid scores, the bias
    added for choosing only, top-k), then ``bias + rate * sign(mean(load) - load)``."""
    scores = torch.sigmoid(torch.cat(tokens) @ weight.t())
    ids = torch.topk(scores + bias.to(scores.dtype), K, dim=1).indices
    load = torch.bincount(ids.reshape(-1), minlength=E).to(torch.float32)
    return bias + RATE * torch.sign(load.mean() - load), load


def _start_bias(ep):
    torch.manual_seed(0)  # the same router weight and bias on every rank
    with torch.no_grad():
        ep.gate.weight.copy_(torch.randn(E, H, **F64))
        ep.gate.e_score_correction_bias.copy_(0.1 * torch.randn(E))
    return ep.gate.weight.detach().clone(), ep.gate.e_score_correction_bias.clone()


def _assert_replicas_equal_reference(ep, weight, bias, xs, group):
    want, want_load = _one_process_update(weight, bias, xs)
    assert not torch.equal(want, bias), "the test needs an update that moves the bias"
    got = ep.gate.e_score_correction_bias
    every = [torch.empty_like(got) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, got, group=group)
    for r, b in enumerate(every):
        torch.testing.assert_close(b, want, rtol=0, atol=0, msg=f"bias on rank {r}")
    return want_load


def _default_group_is_the_world(rank, world):
    from mixops.parallel import ExpertParallelMoE

    ep = ExpertParallelMoE(H, F, E, K, **_moe_kwargs())
    weight, bias = _start_bias(ep)
    xs = _rank_tokens(world)
    ep(xs[rank])
    used = ep.update_bias(RATE)  # group=None: the EP group is the world, the router's group
    want_load = _assert_replicas_equal_reference(ep, weight, bias, xs, dist.group.WORLD)
    torch.testing.assert_close(used, want_load, rtol=0, atol=0)
    assert not ep.tokens_per_expert.any(), "the count is reset"


def test_update_bias_default_group_keeps_two_ranks_equal():
    run_world(_default_group_is_the_world, 2)


def _mesh_2x2(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    from mixops.parallel import ExpertParallelMoE

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))  # ep {0,1},{2,3}
    xs = _rank_tokens(world)

    # The EP group is 2 of the 4 ranks: the router is replicated over data-parallel replicas
    # the layer cannot see, so the default is ambiguous: an error, on every rank, before any
    # collective.
    ep = ExpertParallelMoE(H, F, E, K, group=mesh["ep"], **_moe_kwargs())
    ep(xs[rank])
    with pytest.raises(ValueError, match=r"update_bias: .*2 of the 4 ranks.*router_group"):
        ep.update_bias(RATE)
    assert ep.tokens_per_expert.any(), "a refused update keeps the count"

    # An explicit group (the world: the router's replicas) works on the same layer.
    weight, bias = _start_bias(ep)
    ep.tokens_per_expert.zero_()
    ep(xs[rank])
    ep.update_bias(RATE, group=dist.group.WORLD)
    _assert_replicas_equal_reference(ep, weight, bias, xs, dist.group.WORLD)

    # router_group= the 2-D dp x ep mesh: update_bias() sums the load over all of it.
    ep = ExpertParallelMoE(H, F, E, K, group=mesh["ep"], router_group=mesh, **_moe_kwargs())
    weight, bias = _start_bias(ep)
    ep(xs[rank])
    used = ep.update_bias(RATE)
    want_load = _assert_replicas_equal_reference(ep, weight, bias, xs, dist.group.WORLD)
    torch.testing.assert_close(used, want_load, rtol=0, atol=0)

    # A router group that does not hold this rank's EP peers cannot be the router's replicas.
    with pytest.raises(ValueError, match=r"router_group .* must contain every rank of the EP"):
        ExpertParallelMoE(H, F, E, K, group=mesh["ep"], router_group=mesh["dp"], **_moe_kwargs())


def test_update_bias_on_a_2x2_mesh_keeps_every_replica_equal():
    run_world(_mesh_2x2, 4)
