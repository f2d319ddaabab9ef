"""Expert parallelism (mixops.parallel) in worlds of 2 and 4 gloo processes against the
single-process MoE with the same full weights: outputs and gradients under the convention (the
total loss is the ranks' sum; expert gradients are the rank's slice, router and shared-expert
gradients equal after an all-reduce), dropless and capacity modes, uneven routing, a rank with no
tokens, chunked and staged schedules (the staged API against tests/moe_reference.py), the chunked
schedule's overlap under the delay harness, configuration mismatches, state dicts and DDP."""

import pytest
import torch
import torch.distributed as dist

from dist_harness import run_world, single_process_reference
from helpers import TRANSFORMERS_MIN, skip_unsupported_transformers
from moe_reference import moe_forward

H, F, E, K = 16, 24, 8, 2
F64 = dict(dtype=torch.float64)
TOL = dict(rtol=1e-10, atol=1e-12)


def _tokens(world, T, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (
        [torch.randn(t, H, generator=g, **F64) for t in T]
        if isinstance(T, list)
        else [torch.randn(T, H, generator=g, **F64) for _ in range(world)]
    )


def _local(t):
    """A DTensor's local shard (the expert shards), any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _pair(cap=None, shared=0, num_chunks=1, reduce_stats=False, dtensor=True, **kw):
    from mixops.nn import MoE
    from mixops.parallel import ExpertParallelMoE

    torch.manual_seed(0)
    ref = MoE(H, F, E, K, capacity_factor=cap, shared_ffn_size=shared, **kw, **F64)
    ep = ExpertParallelMoE(
        H, F, E, K, capacity_factor=cap, shared_ffn_size=shared, num_chunks=num_chunks,
        reduce_stats=reduce_stats, dtensor=dtensor, **kw, **F64,
    )  # fmt: skip
    ep.load_full_state_dict(ref.state_dict())
    return ref, ep


def _check_grads(rank, world, ref, ep):
    """Expert grads: this rank's slice; router/shared grads: equal after an all-reduce."""
    sl = slice(rank * E // world, (rank + 1) * E // world)
    for name, p in ep.named_parameters():
        want = dict(ref.named_parameters())[name].grad
        got = p.grad
        if name.startswith("experts."):
            assert isinstance(got, torch.distributed.tensor.DTensor) == (ep.ep_mesh is not None)
            got = _local(got)
            torch.testing.assert_close(got, want[sl], **TOL, msg=f"rank {rank} {name}")
        else:
            got = got.clone()
            dist.all_reduce(got)
            torch.testing.assert_close(got, want, **TOL, msg=f"rank {rank} {name}")


def _equals_single_process(rank, world, cap, num_chunks, T, route, dtensor=True):
    ref, ep = _pair(cap, shared=12, num_chunks=num_chunks, dtensor=dtensor)
    if route == "one_expert":  # every token to experts 0 and 1 (both on rank 0)
        with torch.no_grad():
            ref.gate.weight.zero_()
            ref.gate.weight[0].fill_(5.0)
            ref.gate.weight[1].fill_(4.0)
            ep.gate.weight.copy_(ref.gate.weight)
    xs = _tokens(world, T)
    x = xs[rank].clone().requires_grad_(True)
    y = ep(x)
    (y * y).sum().backward()
    want, gx = single_process_reference(ref, xs, rank, dropless=cap is None)
    torch.testing.assert_close(y, want, **TOL)
    torch.testing.assert_close(x.grad, gx, **TOL)
    _check_grads(rank, world, ref, ep)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("cap", [None, 1.0, 0.5], ids=["dropless", "cap1", "cap0.5"])
def test_equals_single_process(world, cap):
    run_world(_equals_single_process, world, cap, 1, 10, "random")


@pytest.mark.parametrize("cap", [None, 1.0], ids=["dropless", "cap1"])
def test_plain_local_expert_slices_equal_single_process(cap):
    """dtensor=False: the experts as plain local slices (the DDP-era layout)."""
    run_world(_equals_single_process, 2, cap, 2, 10, "random", False)


@pytest.mark.parametrize("cap", [None, 1.25], ids=["dropless", "cap1.25"])
def test_chunked_schedule_equals_single_process(cap):
    run_world(_equals_single_process, 2, cap, 3, 11, "random")


def test_all_tokens_to_one_rank_and_a_rank_without_tokens():
    run_world(_equals_single_process, 2, None, 2, 9, "one_expert")
    run_world(_equals_single_process, 2, None, 1, [7, 0], "random")


def _staged(rank, world):
    ref, ep = _pair(None, shared=12, num_chunks=2)
    xs = _tokens(world, 10)
    x = xs[rank].clone().requires_grad_(True)
    h = ep.dispatch_start(x)
    side = (x @ x.t()).sum()  # the caller's independent work
    ep.run_experts(h)
    side = side + x.sum()
    got = ep.combine_finish(h)
    assert torch.isfinite(side)
    with pytest.raises(RuntimeError, match="the handle is finished"):
        ep.combine_finish(h)
    got.square().sum().backward()
    # moe_reference.py's layer (plain torch, a per-expert loop) on every rank's tokens, with the
    # single-process layer's parameters (not calling it): the total loss is the ranks' sum.
    cfg = dict(hidden_size=H, ffn_size=F, num_experts=E, top_k=K, shared_ffn_size=12)
    xa = torch.cat(xs).requires_grad_(True)
    p = dict(ref.named_parameters())
    want = moe_forward(p, xa, cfg, torch.float64, xa.detach() @ p["gate.weight"].detach().T).y
    want.square().sum().backward()
    torch.testing.assert_close(got, want[rank * 10 : (rank + 1) * 10], **TOL)
    torch.testing.assert_close(x.grad, xa.grad[rank * 10 : (rank + 1) * 10], **TOL)
    _check_grads(rank, world, ref, ep)


def test_staged_api_equals_reference():
    run_world(_staged, 2)


def _mismatch(rank, world, what):
    from mixops.parallel import ExpertParallelMoE

    ffn = F + (rank if what == "ffn" else 0)
    # reduce_stats on one rank only: its loss all-reduces would meet the other's exchange.
    stats = dict(reduce_stats=rank == 0, aux_loss_coef=0.01) if what == "reduce_stats" else {}
    ep = ExpertParallelMoE(
        H, ffn, E, K, capacity_factor=1.0 if what == "tokens" else None, **stats, **F64
    )
    T = 10 + (rank if what == "tokens" else 0)
    match = {
        "ffn": "ffn_size: rank 0: 24, rank 1: 25",
        "tokens": r"tokens \(capacity mode needs equal token counts\): rank 0: 10, rank 1: 11",
        "reduce_stats": "reduce_stats: rank 0: 1, rank 1: 0",
    }[what]
    with pytest.raises(ValueError, match=f"disagree on .*{match}"):
        ep(torch.randn(T, H, **F64))


@pytest.mark.parametrize("what", ["ffn", "tokens", "reduce_stats"])
def test_mismatched_configurations_are_errors(what):
    run_world(_mismatch, 2, what)


def _state_dicts(rank, world):
    import copy

    from torch.distributed.tensor import DTensor, Shard

    from mixops.parallel import ExpertParallelMoE, full_state_dict, load_full_state_dict

    ref, ep = _pair(None)
    sl = slice(rank * E // world, (rank + 1) * E // world)
    for name, p in ep.experts.named_parameters():  # global DTensors, this rank's experts local
        assert isinstance(p, DTensor) and p.placements == (Shard(0),), name
        assert p.shape == ref.experts.get_parameter(name).shape, name
        torch.testing.assert_close(p.to_local(), ref.experts.get_parameter(name)[sl], **TOL)
    twin = copy.deepcopy(ep)  # own parameters, the same group and mesh
    assert twin.group is ep.group and twin.ep_mesh is ep.ep_mesh
    x = _tokens(world, 4)[rank]
    torch.testing.assert_close(twin(x), ep(x), **TOL)
    with torch.no_grad():
        twin.experts.down_proj.mul_(2)
    assert not torch.equal(twin.experts.down_proj.to_local(), ep.experts.down_proj.to_local())
    lazy = ExpertParallelMoE(H, F, E, K, device="meta", **F64)  # meta, then materialised
    lazy.to_empty(device="cpu").load_full_state_dict(ref.state_dict())
    torch.testing.assert_close(lazy(x), ep(x), **TOL)
    full = ep.full_state_dict()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(full[k], v, rtol=0, atol=0)
    model = torch.nn.Sequential(ep)
    load_full_state_dict(model, {f"0.{k}": v * 2 for k, v in ref.state_dict().items()})
    back = full_state_dict(model)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(back[f"0.{k}"], v * 2, rtol=0, atol=0)


def test_state_dicts_shard_and_gather():
    run_world(_state_dicts, 2)


def _ddp(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from mixops.parallel import expert_parameter_names, ignore_experts_in_ddp

    ref, ep = _pair(None)
    names = ignore_experts_in_ddp(ep)
    assert sorted(names) == ["experts.down_proj", "experts.gate_up_proj"]
    assert expert_parameter_names(ep) == names
    model = DDP(ep)
    xs = _tokens(world, 10)
    model(xs[rank]).square().sum().backward()
    xa = torch.cat(xs)
    ref(xa).square().sum().backward()
    sl = slice(rank * E // world, (rank + 1) * E // world)
    # DDP averages the router gradient; the expert gradients are left alone (the rank's slice).
    torch.testing.assert_close(ep.gate.weight.grad * world, ref.gate.weight.grad, **TOL)
    got = _local(ep.experts.down_proj.grad)
    torch.testing.assert_close(got, ref.experts.down_proj.grad[sl], **TOL)


def test_ddp_leaves_expert_gradients_alone():
    run_world(_ddp, 2)


def _group_losses(rank, world):
    ref, ep = _pair(None, aux_loss_coef=0.01, z_loss_coef=0.001, reduce_stats=True)
    xs = _tokens(world, 10)
    ep(xs[rank])
    total = ep.aux_loss.detach().clone()
    dist.all_reduce(total)
    ref(torch.cat(xs))
    torch.testing.assert_close(total, ref.aux_loss.detach(), **TOL)


def test_reduced_aux_loss_sums_to_the_single_process_loss():
    run_world(_group_losses, 2)


def test_bad_construction():
    run_world(_bad_construction, 2)


def _bad_construction(rank, world):
    from mixops.parallel import ExpertParallelMoE

    with pytest.raises(ValueError, match="divisible by the group size"):
        ExpertParallelMoE(H, F, 3, K)
    with pytest.raises(ValueError, match="num_chunks"):
        ExpertParallelMoE(H, F, E, K, num_chunks=0)
    with pytest.raises(ValueError, match="expert-choice"):
        ExpertParallelMoE(H, F, E, router="expert_choice", capacity_factor=1.0)


def _overlap(rank, world, num_chunks):
    from mixops.parallel import ExpertParallelMoE, slow_link

    torch.manual_seed(0)
    ep = ExpertParallelMoE(64, 128, E, K, num_chunks=num_chunks)
    x = torch.randn(512, 64)
    x.requires_grad_(True)
    ep(x).sum().backward()  # warm up outside the harness, forward and backward
    # A link slow enough that every chunk's exchange takes >= 100 ms: noise cannot decide.
    nbytes = 512 * K * 64 * 4 // num_chunks  # about one chunk's rows
    x.requires_grad_(True)
    with slow_link(nbytes / 0.15) as trace:
        ep(x).sum().backward()

    def overlap(a, b):
        return min(a[3], b[3]) - max(a[2], b[2])

    # Forward (dispatch / experts) and backward (combine.backward / experts.backward) alike.
    for comm_name, compute_name in (
        ("dispatch", "experts"),
        ("combine.backward", "experts.backward"),
    ):
        comm = [t for t in trace if t[0] == "comm" and t[1] == comm_name]
        compute = [t for t in trace if t[0] == "compute" and t[1] == compute_name]
        links = [t for t in trace if t[0] == "comm" and t[1] != "all_to_all"]
        assert len(compute) == num_chunks and len(comm) == num_chunks, trace
        assert all(t[3] - t[2] >= 0.1 for t in comm[1:]), trace  # >= 100 ms each
        if num_chunks == 1:  # the plain schedule: compute never runs while the link is busy
            assert all(overlap(c, m) <= 0 for c in compute for m in links), trace
        else:  # chunk c's compute starts while chunk c + 1's exchange is on the link
            for c in range(num_chunks - 1):
                assert comm[c + 1][2] <= compute[c][2] < comm[c + 1][3] - 0.05, trace
    if num_chunks > 1:
        # And what a chunk sends on (forward: its combine; backward: its dispatch's gradient) is
        # still in flight when the next chunk's experts start: nothing waits for it in between.
        for comm_name, compute_name in (
            ("combine", "experts"),
            ("dispatch.backward", "experts.backward"),
        ):
            comm = [t for t in trace if t[0] == "comm" and t[1] == comm_name]
            compute = [t for t in trace if t[0] == "compute" and t[1] == compute_name]
            assert len(compute) == num_chunks and len(comm) == num_chunks, trace
            for c in range(num_chunks - 1):
                assert comm[c][2] <= compute[c + 1][2] < comm[c][3] - 0.05, (comm_name, c, trace)


@pytest.mark.parametrize("num_chunks", [1, 4])
def test_chunked_exchanges_overlap_the_experts(num_chunks):
    run_world(_overlap, 2, num_chunks)


def _mesh_step(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    from mixops.nn import MoE
    from mixops.parallel import ExpertParallelMoE, allreduce_expert_grads

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))
    torch.manual_seed(0)
    ref = MoE(H, F, E, K, **F64)
    ep = ExpertParallelMoE(H, F, E, K, group=mesh["ep"], **F64)
    ep.load_full_state_dict(ref.state_dict())
    assert ep.world_size == 2 and ep.rank == mesh.get_local_rank("ep")
    xs = _tokens(world, 6)
    ep(xs[rank]).square().sum().backward()
    ref(torch.cat(xs)).square().sum().backward()
    # Data parallel over the whole world for the replicated router; expert gradients over the
    # expert-data-parallel group (the ranks holding the same experts) only.
    dist.all_reduce(ep.gate.weight.grad)
    allreduce_expert_grads(ep, mesh["dp"].get_group(), average=False)
    with torch.no_grad():
        for m in (ep, ref):
            for p in m.parameters():
                p -= 0.1 * p.grad
    sl = slice(ep.expert_range.start, ep.expert_range.stop)
    for name, p in ep.named_parameters():
        want = dict(ref.named_parameters())[name]
        if name.startswith("experts."):
            torch.testing.assert_close(_local(p), want[sl], **TOL)
        else:
            torch.testing.assert_close(p, want, **TOL)


def test_2x2_mesh_trains_one_step_like_the_single_process():
    run_world(_mesh_step, 4)


def _compiled(rank, world):
    ref, ep = _pair(1.0, num_chunks=2)
    x = _tokens(world, 10)[rank].requires_grad_(True)
    want = ep(x)
    (gw,) = torch.autograd.grad(want.square().sum(), [ep.experts.down_proj])
    cm = torch.compile(ep, fullgraph=True)
    got = cm(x)
    (gc,) = torch.autograd.grad(got.square().sum(), [ep.experts.down_proj])
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(_local(gc), _local(gw), **TOL)


def test_capacity_mode_compiles_fullgraph():
    run_world(_compiled, 2)


def _hf_state_dict(rank, world):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from mixops.parallel import ExpertParallelMoE

    torch.manual_seed(0)
    cfg = MixtralConfig(hidden_size=H, intermediate_size=F, num_local_experts=E,
                        num_experts_per_tok=K, router_jitter_noise=0.0)  # fmt: skip
    hf = MixtralSparseMoeBlock(cfg).double()
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ep = ExpertParallelMoE(H, F, E, K, **F64)
    ep.load_full_state_dict(hf.state_dict())
    xs = _tokens(world, 7)
    want = hf(torch.cat(xs).unsqueeze(0))
    want = (want[0] if isinstance(want, tuple) else want)[0, rank * 7 : (rank + 1) * 7]
    # HF's softmax runs in fp32 (its weights are cast back to fp64): fp32-level agreement.
    torch.testing.assert_close(ep(xs[rank]), want, rtol=1e-4, atol=1e-5)
    full = ep.full_state_dict()
    for k, v in hf.state_dict().items():
        torch.testing.assert_close(full[k], v, rtol=0, atol=0)


def test_hf_mixtral_state_dict_shards_and_matches():
    pytest.importorskip("transformers", minversion=TRANSFORMERS_MIN)
    skip_unsupported_transformers()
    run_world(_hf_state_dict, 2)


def _zero_experts(rank, world, cap):
    ref, ep = _pair(cap, zero_experts=("identity", "null"))
    with torch.no_grad():  # some tokens choose the zero experts
        ref.gate.weight[E:].mul_(3.0)
        ep.gate.weight.copy_(ref.gate.weight)
    xs = _tokens(world, 10)
    y = ep(xs[rank])
    want = ref(torch.cat(xs))[rank * 10 : (rank + 1) * 10] if cap is None else ref(xs[rank])
    torch.testing.assert_close(y, want, **TOL)
    assert ep.gate.weight.shape[0] == E + 2 and ep.experts.down_proj.shape[0] == E
    assert _local(ep.experts.down_proj).shape[0] == E // world


@pytest.mark.parametrize("cap", [None, 1.0], ids=["dropless", "cap1"])
def test_zero_experts_stay_on_their_rank(cap):
    run_world(_zero_experts, 2, cap)


def _all_to_all(rank, world):
    from mixops.parallel import all_to_all

    # rank r sends r + 1 + d rows to rank d; rows carry (source, destination, index) values.
    send_splits = [rank + 1 + d for d in range(world)]
    recv_splits = [s + 1 + rank for s in range(world)]
    x = torch.cat(
        [torch.full((n, 2), float(10 * rank + d), **F64) for d, n in enumerate(send_splits)]
    ).requires_grad_(True)
    for async_op in (False, True):
        out = all_to_all(x, dist.group.WORLD, recv_splits, send_splits, async_op=async_op)
        out = out.wait() if async_op else out
        want = torch.cat(
            [torch.full((n, 2), float(10 * s + rank), **F64) for s, n in enumerate(recv_splits)]
        )
        torch.testing.assert_close(out, want, rtol=0, atol=0)
        (g,) = torch.autograd.grad((out * out).sum(), x)  # d/dx = 2 x, back through the exchange
        torch.testing.assert_close(g, 2 * x.detach(), rtol=0, atol=0)


def test_differentiable_all_to_all_with_variable_splits():
    run_world(_all_to_all, 2)


def _no_leak(rank, world, cap):
    import gc

    from mixops.parallel.dispatch import DispatchPlan

    ref, ep = _pair(cap, num_chunks=2)
    x = _tokens(world, 10)[rank].requires_grad_(True)
    y = ep(x)
    y.square().sum().backward()
    del y
    gc.collect()
    alive = [o for o in gc.get_objects() if isinstance(o, DispatchPlan)]
    assert not alive, f"{len(alive)} dispatch plans still alive after the step"


@pytest.mark.parametrize("cap", [None, 1.0], ids=["dropless", "cap1"])
def test_a_step_leaves_no_plan_alive(cap):
    run_world(_no_leak, 2, cap)
