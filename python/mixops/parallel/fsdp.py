"""FSDP2 (``fully_shard``) with expert parallelism on a (dp x ep) DeviceMesh.

The recipe (as torchtitan and Megatron-Core shard MoE models)::

    mesh = init_device_mesh("cuda", (dp, ep), mesh_dim_names=("dp", "ep"))
    model = MyModel(..., moe=ExpertParallelMoE(H, F, E, k, group=mesh["ep"]))  # experts: Shard(0)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    fully_shard_experts(model, mesh["dp"], mp_policy=mp)   # each layer's experts over dp
    dense = mesh._flatten("dp_ep")                          # everything else over all dp * ep
    for block in model.blocks:
        fully_shard(block, mesh=dense, mp_policy=mp)
    fully_shard(model, mesh=dense, mp_policy=mp)

The expert weights are DTensors sharded ``Shard(0)`` over ``ep`` (each rank's experts); FSDP2 shards
each rank's experts again over ``dp`` (the ranks holding the same experts: the expert-data-parallel
group), giving a 2-D DTensor over (dp, ep). The rest of the model is replicated over the whole
mesh, so FSDP2 shards it over the flattened (dp, ep) mesh.

Gradients: FSDP2 averages a parameter's gradient over its mesh. A dense parameter's gradient is
averaged over all ``dp * ep`` ranks; an expert's local gradient already sums the contributions of
the ``ep`` ranks whose tokens it served, so its reduce over ``dp`` is divided by ``dp * ep`` too
(``set_gradient_divide_factor``): both equal the gradient of the mean of the ranks' losses, as one
process on all the tokens would compute it.
"""

from typing import Optional

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard

from .moe import ExpertParallelMoE

__all__ = ["fully_shard_experts"]


def fully_shard_experts(
    model: nn.Module,
    dp_mesh: DeviceMesh,
    *,
    mp_policy=None,
    reshard_after_forward: bool = True,
    offload_policy=None,
    gradient_divide_factor: Optional[float] = None,
) -> list:
    """``fully_shard`` the experts of every ``ExpertParallelMoE`` in ``model`` over ``dp_mesh``
    (the expert-data-parallel dimension: ranks holding the same experts; 1-D, sharing its root
    mesh with the layers' ``ep`` dimension). Call it before ``fully_shard`` on the blocks and the
    root (module docstring). Each layer's local experts are sharded along the expert dimension when
    ``dp_mesh``'s size divides their number, else along their rows (dimension 1).

    gradient_divide_factor: what each expert gradient's sum over ``dp_mesh`` is divided by;
        default ``dp * ep``, the data-parallel world of the dense parameters (module docstring).
    Returns the sharded expert modules (``FSDPModule``s)."""
    from torch.distributed.fsdp import fully_shard

    if not callable(getattr(dp_mesh, "get_group", None)) or dp_mesh.ndim != 1:
        raise ValueError(
            "fully_shard_experts: dp_mesh must be a 1-D DeviceMesh (the expert-data-parallel "
            f"dimension, e.g. mesh['dp']), got {dp_mesh!r}"
        )
    layers = [m for m in model.modules() if isinstance(m, ExpertParallelMoE)]
    if not layers:
        raise ValueError("fully_shard_experts: the model holds no ExpertParallelMoE layer")
    dp = dp_mesh.size()
    gloo = "gloo" in str(dist.get_backend(dp_mesh.get_group()))
    sharded = []
    for m in layers:
        if m.ep_mesh is None:
            raise ValueError(
                "fully_shard_experts: an ExpertParallelMoE built with dtensor=False holds plain "
                "local expert slices; FSDP2 needs them as DTensors (dtensor=True, the default)"
            )
        dim = 0 if m.local_experts % dp == 0 else 1
        fully_shard(
            m.experts,
            mesh=dp_mesh,
            reshard_after_forward=reshard_after_forward,
            shard_placement_fn=lambda p, dim=dim: Shard(dim),
            **({} if mp_policy is None else {"mp_policy": mp_policy}),
            **({} if offload_policy is None else {"offload_policy": offload_policy}),
        )
        factor = gradient_divide_factor if gradient_divide_factor is not None else dp * m.world_size
        m.experts.set_gradient_divide_factor(float(factor))
        if gloo:  # gloo has no PREMUL_SUM (FSDP2's fp32/bf16 reduce with a divide factor)
            m.experts.set_force_sum_reduction_for_comms(True)
        sharded.append(m.experts)
    return sharded
