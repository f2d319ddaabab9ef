"""Model-level helpers for expert parallelism: keeping data-parallel wrappers off the sharded
expert parameters, reducing expert gradients over the expert-data-parallel group of a 2-D mesh,
and moving whole-model state dicts between the single-process layout and the shards."""

import torch
import torch.distributed as dist
from torch import nn

from .moe import EXPERT_PARALLEL_ATTR, ExpertParallelMoE

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
            dist.all_reduce(p.grad, group=group)
            if average:
                p.grad.div_(world)


def _moe_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ExpertParallelMoE)]


def load_full_state_dict(model: nn.Module, state_dict, strict: bool = True):
    """Load a single-process (or HF) state dict into a model whose MoE layers are
    ``ExpertParallelMoE``: each layer's expert tensors are sliced to this rank's experts."""
    sd = dict(state_dict)
    for name, m in _moe_layers(model):
        prefix = f"{name}.experts." if name else "experts."
        sl = slice(m.expert_range.start, m.expert_range.stop)
        for k in list(sd):
            if k.startswith(prefix):
                sd[k] = sd[k][sl]
    return model.load_state_dict(sd, strict=strict)


def full_state_dict(model: nn.Module):
    """The single-process state dict of the model (every rank gets it): expert tensors gathered
    from the ranks of each layer's group."""
    sd = model.state_dict()
    for name, m in _moe_layers(model):
        prefix = f"{name}.experts." if name else "experts."
        for k in list(sd):
            if k.startswith(prefix):
                v = sd[k].contiguous()
                parts = [torch.empty_like(v) for _ in range(m.world_size)]
                dist.all_gather(parts, v, group=m.group)
                sd[k] = torch.cat(parts)
    return sd
