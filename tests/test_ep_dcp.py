"""Checkpoints that reshard: ExpertParallelMoE's experts are DTensors, so a torch.distributed
.checkpoint (DCP) saved at one expert-parallel degree loads at another. In a world of 4 gloo
processes: saved from FSDP2 x EP on a 2 x 2 mesh (experts sharded over both dimensions), loaded
at ep 4, at ep 1 (a 4 x 1 mesh), under FSDP2 at ep 4, and by one process into mixops.nn.MoE
(no process group): every load gives the saved weights exactly and the single-process outputs,
and AdamW's moments saved from the 2 x 2 mesh load resharded under FSDP2 x ep 4."""

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from dist_harness import run_world

H, F, E, K = 16, 24, 8, 2
F64 = dict(dtype=torch.float64)
TOL = dict(rtol=1e-10, atol=1e-12)


def _layer(group, seed):
    from mixops.parallel import ExpertParallelMoE

    torch.manual_seed(seed)  # a different draw per layer: only the load can make them equal
    return nn.Sequential(ExpertParallelMoE(H, F, E, K, group=group, shared_ffn_size=8, **F64))


def _load(net, path):
    import torch.distributed.checkpoint as dcp

    sd = {"model": net.state_dict()}
    dcp.load(sd, checkpoint_id=path)
    net.load_state_dict(sd["model"])
    return net


def _full_moments(net, opt):
    """{(parameter name, moment): the full tensor} of AdamW's state (collective: every rank)."""
    out = {}
    for name, p in net.named_parameters():
        for m in ("exp_avg", "exp_avg_sq"):
            v = opt.state[p][m]
            out[(name, m)] = v.full_tensor() if isinstance(v, DTensor) else v
    return out


def _reshard(rank, world, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        get_state_dict,
        set_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from mixops.nn import MoE
    from mixops.parallel import full_state_dict, fully_shard_experts, load_full_state_dict

    torch.manual_seed(0)
    ref = nn.Sequential(MoE(H, F, E, K, shared_ffn_size=8, **F64))
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(5, H, generator=g, **F64) for _ in range(world)]
    want = ref(torch.cat(xs))[5 * rank : 5 * rank + 5]

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))
    saved = _layer(mesh["ep"], seed=1)
    load_full_state_dict(saved, ref.state_dict())
    fully_shard_experts(saved, mesh["dp"])
    fully_shard(saved, mesh=mesh._flatten("dp_ep"))
    opt = torch.optim.AdamW(saved.parameters(), lr=0.0)  # lr 0: moments, weights unchanged
    saved(xs[rank]).square().mean().backward()
    opt.step()
    moments = _full_moments(saved, opt)
    dcp.save(
        {"model": saved.state_dict(), "optim": get_optimizer_state_dict(saved, opt)},
        checkpoint_id=path,
    )

    def check(net, what):
        full = full_state_dict(net)
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(full[k], v, rtol=0, atol=0, msg=f"{what}: {k}")
        torch.testing.assert_close(net(xs[rank]), want, **TOL, msg=what)

    ep4 = init_device_mesh("cpu", (1, 4), mesh_dim_names=("dp", "ep"))
    check(_load(_layer(ep4["ep"], seed=2), path), "ep 4")
    ep1 = init_device_mesh("cpu", (4, 1), mesh_dim_names=("dp", "ep"))
    check(_load(_layer(ep1["ep"], seed=3), path), "ep 1 (4 x 1 mesh)")
    net = _layer(ep4["ep"], seed=4)
    fully_shard_experts(net, ep4["dp"])
    fully_shard(net, mesh=ep4._flatten("dp_ep"))
    opt4 = torch.optim.AdamW(net.parameters(), lr=0.0)
    net(xs[rank]).sum().backward()  # a step of lr 0 makes the state to load into
    opt4.step()
    model_sd, optim_sd = get_state_dict(net, opt4)  # torch's recipe for model + optimizer
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    set_state_dict(net, opt4, model_state_dict=model_sd, optim_state_dict=optim_sd)
    # The optimizer's moments resharded too (read before a forward: on the CPU FSDP2 swaps the
    # parameter objects of a module loaded this way at its next forward, torch 2.14, also for a
    # plain Linear, so opt4 would not find them).
    got = _full_moments(net, opt4)
    check(net, "FSDP2 x ep 4")
    assert got.keys() == moments.keys() and moments
    for k, v in moments.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=f"optimizer {k}")
    dist.barrier()
    if rank == 0:  # one process, no group: the plain layer
        torch.manual_seed(5)
        single = nn.Sequential(MoE(H, F, E, K, shared_ffn_size=8, **F64))
        sd = {"model": single.state_dict()}
        dcp.load(sd, checkpoint_id=path, no_dist=True)
        single.load_state_dict(sd["model"])
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(single.state_dict()[k], v, rtol=0, atol=0, msg=k)
        torch.testing.assert_close(single(torch.cat(xs)), ref(torch.cat(xs)), **TOL)
    dist.barrier()


def test_a_checkpoint_saved_at_ep2_loads_at_ep1_and_ep4(tmp_path):
    run_world(_reshard, 4, str(tmp_path / "ckpt"))
