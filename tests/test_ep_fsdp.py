"""FSDP2 (fully_shard) with ExpertParallelMoE on a 2 x 2 (dp x ep) mesh of 4 gloo processes,
against one process holding the whole model: a two-block model (a dense sublayer and an MoE each)
in float64 with fully_shard_experts + fully_shard over the flattened mesh (outputs, gradients
after FSDP's reduce, one optimizer step), with activation checkpointing around the MoE layers, in
capacity mode; bf16 mixed precision (fp32 reduce) by the tolerance rule against the plain-PyTorch
reference of tests/moe_reference.py; and the misuses fully_shard_experts refuses."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dist_harness import run_world
from helpers import assert_close_to_ref
from moe_reference import moe_forward

H, F, E, K = 16, 24, 8, 2
F64 = dict(dtype=torch.float64)
TOL = dict(rtol=1e-10, atol=1e-12)
TOKENS = 6  # per rank


class Block(nn.Module):
    def __init__(self, moe, **kw):
        super().__init__()
        self.lin = nn.Linear(H, H, **kw)
        self.moe = moe

    def forward(self, x):
        h = x + self.lin(x)
        return h + self.moe(h)


class Net(nn.Module):
    """Two blocks of (dense, MoE); ``make_moe()`` builds each block's MoE layer."""

    def __init__(self, make_moe, **kw):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(Block(make_moe(), **kw) for _ in range(2))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def _tokens(world, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(TOKENS, H, generator=g, dtype=torch.float64).to(dtype) for _ in range(world)
    ]


def _wrap(model, mesh, mp=None, checkpoint=False):
    """The recipe of mixops.parallel.fsdp: experts over dp, everything else over dp x ep."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.fsdp import fully_shard

    from mixops.parallel import fully_shard_experts

    if checkpoint:
        for b in model.blocks:
            b.moe = checkpoint_wrapper(b.moe)
    kw = {} if mp is None else {"mp_policy": mp}
    fully_shard_experts(model, mesh["dp"], **kw)
    dense = mesh._flatten("dp_ep")
    for b in model.blocks:
        fully_shard(b, mesh=dense, **kw)
    return fully_shard(model, mesh=dense, **kw)


def _fp64_equals_one_process(rank, world, cap, checkpoint):
    from torch.distributed.device_mesh import init_device_mesh

    from mixops.nn import MoE
    from mixops.parallel import ExpertParallelMoE, full_state_dict, load_full_state_dict

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))
    opts = dict(capacity_factor=cap, shared_ffn_size=8, **F64)
    ref = Net(lambda: MoE(H, F, E, K, **opts), **F64)
    ours = Net(lambda: ExpertParallelMoE(H, F, E, K, group=mesh["ep"], num_chunks=2, **opts), **F64)
    load_full_state_dict(ours, ref.state_dict())
    _wrap(ours, mesh, checkpoint=checkpoint)
    xs = _tokens(world)
    y = ours(xs[rank])
    y.square().mean().backward()
    # One process: the mean of the ranks' losses (capacity: each rank's tokens routed alone).
    ys = [ref(x) for x in xs]
    (sum(t.square().mean() for t in ys) / world).backward()
    torch.testing.assert_close(y, ys[rank], **TOL)
    want = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        name = name.replace("_checkpoint_wrapped_module.", "")
        got = p.grad.full_tensor()  # after FSDP's reduce-scatter (and the dp * ep division)
        torch.testing.assert_close(got, want[name].grad, **TOL, msg=f"rank {rank} {name}")
    for m in (ours, ref):
        torch.optim.SGD(m.parameters(), lr=0.1).step()
    full = full_state_dict(ours)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(full[k], v, **TOL, msg=f"rank {rank} {k} after a step")


@pytest.mark.parametrize(
    "cap,checkpoint", [(None, False), (1.0, True)], ids=["dropless", "capacity-checkpointed"]
)
def test_fsdp2_on_a_2x2_mesh_equals_one_process(cap, checkpoint):
    run_world(_fp64_equals_one_process, 4, cap, checkpoint)


def _mixed_precision(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from mixops.parallel import ExpertParallelMoE

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))
    cfg = dict(hidden_size=H, ffn_size=F, num_experts=E, top_k=K)
    torch.manual_seed(0)
    full = {  # fp32 master weights, drawn here (the reference's parameters)
        "gate.weight": torch.randn(E, H) * H**-0.5,
        "experts.gate_up_proj": torch.randn(E, 2 * F, H) * H**-0.5,
        "experts.down_proj": torch.randn(E, H, F) * F**-0.5,
    }
    moe = ExpertParallelMoE(H, F, E, K, group=mesh["ep"])
    net = nn.Sequential(moe)
    from mixops.parallel import load_full_state_dict

    load_full_state_dict(net, {f"0.{k}": v for k, v in full.items()})
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    from torch.distributed.fsdp import fully_shard

    from mixops.parallel import fully_shard_experts

    fully_shard_experts(net, mesh["dp"], mp_policy=mp)
    fully_shard(net, mesh=mesh._flatten("dp_ep"), mp_policy=mp)
    xs = _tokens(world, seed=3, dtype=torch.float32)
    y = net(xs[rank])  # bf16 (FSDP casts the input to param_dtype)
    assert y.dtype == torch.bfloat16
    y.float().square().mean().backward()

    def reference(dtype):
        p = {k: v.to(dtype).requires_grad_(True) for k, v in full.items()}
        loss, outs = 0.0, []
        for x in xs:
            xb = x.to(torch.bfloat16)  # the layer's input (the selection is made from bf16 logits)
            sel = (xb @ p["gate.weight"].detach().to(torch.bfloat16).T).double()
            o = moe_forward(p, xb.to(dtype), cfg, dtype, sel).y
            outs.append(o)
            loss = loss + o.float().square().mean() / world
        loss.backward()
        return outs[rank], {k: v.grad for k, v in p.items()}

    y_hi, g_hi = reference(torch.float64)
    y_lo, g_lo = reference(torch.bfloat16)
    assert_close_to_ref(y, y_hi, y_lo, f"rank {rank} output")
    for name, p in net.named_parameters():
        got = p.grad.full_tensor()
        assert got.dtype == torch.float32  # fp32 master weights, fp32 reduce
        k = name.removeprefix("0.")
        assert_close_to_ref(got, g_hi[k], g_lo[k].float(), f"rank {rank} {k} gradient")


def test_fsdp2_mixed_precision_bf16_params_fp32_reduce():
    run_world(_mixed_precision, 4)


def _misuse(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    from mixops.parallel import ExpertParallelMoE, fully_shard_experts

    mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp", "ep"))
    plain = nn.Sequential(ExpertParallelMoE(H, F, E, K, group=mesh["ep"], dtensor=False))
    with pytest.raises(ValueError, match="dtensor=False"):
        fully_shard_experts(plain, mesh["dp"])
    with pytest.raises(ValueError, match="1-D DeviceMesh"):
        fully_shard_experts(plain, mesh)
    with pytest.raises(ValueError, match="no ExpertParallelMoE"):
        fully_shard_experts(nn.Linear(2, 2), mesh["dp"])
    dist.barrier()


def test_fully_shard_experts_refuses_what_it_cannot_shard():
    run_world(_misuse, 2)
