"""Checkpoints that reshard: ExpertParallelMoE's experts are DTensors, so a torch.distributed
.checkpoint (DCP) saved at one expert-parallel degree loads at another. In a world of 4 gloo
processes: saved from FSDP2 x EP on a 2 x 2 mesh (experts sharded over both dimensions), loaded
at ep 4, at ep 1 (a 4 x 1 mesh), under FSDP2 at ep 4, and by one process into mixops.nn.MoE
(no process group): every load gives the saved weights exactly and the single-process outputs."""

import torch
import torch.distributed as dist
from torch import nn

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

    sd = net.state_dict()
    dcp.load(sd, checkpoint_id=path)
    net.load_state_dict(sd)
    return net


def _reshard(rank, world, path):
    import torch.distributed.checkpoint as dcp
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
    dcp.save(saved.state_dict(), checkpoint_id=path)

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
    check(_load(net, path), "FSDP2 x ep 4")
    dist.barrier()
    if rank == 0:  # one process, no group: the plain layer
        torch.manual_seed(5)
        single = nn.Sequential(MoE(H, F, E, K, shared_ffn_size=8, **F64))
        sd = single.state_dict()
        dcp.load(sd, checkpoint_id=path, no_dist=True)
        single.load_state_dict(sd)
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(single.state_dict()[k], v, rtol=0, atol=0, msg=k)
        torch.testing.assert_close(single(torch.cat(xs)), ref(torch.cat(xs)), **TOL)
    dist.barrier()


def test_a_checkpoint_saved_at_ep2_loads_at_ep1_and_ep4(tmp_path):
    run_world(_reshard, 4, str(tmp_path / "ckpt"))
