"""Model-level helpers for expert parallelism: keeping data-parallel wrappers off the sharded
expert parameters, reducing expert gradients over the expert-data-parallel group of a 2-D mesh,
and moving whole-model state dicts between the single-process layout and the shards."""

import torch
import torch.distributed as dist
from torch import nn

from ..nn.experts import local_tensor
from .moe import EXPERT_PARALLEL_ATTR, ExpertParallelMoE
from .shards import from_full, to_full

__all__ = [
    "expert_parameter_names",
    "ignore_experts_in_ddp",
    "allreduce_expert_grads",
    "load_full_state_dict",
    "full_state_dict",
]


def expert_parameter_names(model: nn.Module):
    """Names (as ``model.named_parameters()`` gives them) of the sharded expert parameters."""
    return [n for n, p in model.named_parameters() if getattr(p, EXPERT_PARALLEL_ATTR, False)]


def ignore_experts_in_ddp(model: nn.Module) -> list:
    """Mark the expert parameters for DistributedDataParallel to leave out of its all-reduce (call
    before wrapping); reduce them with ``allreduce_expert_grads`` over the expert-data-parallel
    group instead. Returns the names."""
    names = expert_parameter_names(model)
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return names


@torch.no_grad()
def allreduce_expert_grads(model: nn.Module, group, average: bool = True) -> None:
    """All-reduce the expert gradients over ``group`` (the expert-data-parallel group: the ranks
    holding the same experts), averaged as DDP does unless ``average=False``."""
    world = dist.get_world_size(group)
    for _, p in model.named_parameters():
        if getattr(p, EXPERT_PARALLEL_ATTR, False) and p.grad is not None:
            g = local_tensor(p.grad)  # a DTensor's shard: summed over the replicas holding it
            dist.all_reduce(g, group=group)
            if average:
                g.div_(world)


def _moe_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ExpertParallelMoE)]


def _local_expert_layers(model):
    """{state-dict prefix of its experts: layer} for the layers holding plain local slices."""
    return {
        (f"{name}.experts." if name else "experts."): m
        for name, m in _moe_layers(model)
        if m.ep_mesh is None
    }


def load_full_state_dict(model: nn.Module, state_dict, strict: bool = True):
    """Load a single-process (or HF) state dict into a model with ``ExpertParallelMoE`` layers,
    whether or not it is also under FSDP2: each DTensor parameter (expert shards, FSDP2 shards)
    takes its part of the full tensor, cut locally (no communication); ``dtensor=False`` layers'
    expert tensors are sliced to this rank's experts."""
    current = model.state_dict()
    local = _local_expert_layers(model)
    sd = {}
    for k, v in state_dict.items():
        m = next((m for p, m in local.items() if k.startswith(p)), None)
        sl = None if m is None else slice(m.expert_range.start, m.expert_range.stop)
        sd[k] = from_full(v, current[k], sl) if k in current else v
    return model.load_state_dict(sd, strict=strict)


def full_state_dict(model: nn.Module):
    """The single-process state dict of the model (every rank gets it): DTensors (expert shards,
    FSDP2 shards) gathered over their meshes, ``dtensor=False`` layers' expert slices over their
    groups."""
    sd = model.state_dict()
    local = _local_expert_layers(model)
    for k in list(sd):
        m = next((m for p, m in local.items() if k.startswith(p)), None)
        sd[k] = to_full(sd[k], None if m is None else m.group, 1 if m is None else m.world_size)
    return sd
