"""Expert weights as DTensors: each rank's experts are the ``Shard(0)`` shard of the global
``[E, ...]`` tensors over the expert-parallel mesh, so ``state_dict()`` and torch.distributed
.checkpoint see global tensors (DCP reshards them on load: a checkpoint saved at ep 2 loads at
ep 1 or 4), FSDP2 composes with them (``fully_shard`` over the expert-data-parallel dimension),
and the compute reads the local shards (``to_local``: no copy).

Also the conversions between such state dicts and single-process (full) ones."""

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

__all__ = ["ep_mesh_of", "shard_experts", "to_full", "from_full"]


def ep_mesh_of(group, pg, device=None) -> DeviceMesh:
    """The 1-D DeviceMesh of the expert-parallel group: ``group`` itself when it is a mesh
    dimension (so it shares its root with the data-parallel dimensions, as FSDP2 requires),
    else one over the ProcessGroup ``pg`` on the device type of ``device`` (default: CUDA for an
    NCCL group, else the CPU)."""
    if callable(getattr(group, "get_group", None)):  # a DeviceMesh (1-D, resolve_group checked)
        return group
    device_type = None if device is None else torch.device(device).type
    if device_type in (None, "meta"):  # meta: built to be materialised on the group's device
        device_type = "cuda" if "nccl" in str(dist.get_backend(pg)) else "cpu"
    return DeviceMesh.from_group(pg, device_type)


def shard_experts(experts: nn.Module, mesh: DeviceMesh) -> None:
    """Replace each (local, this rank's experts) parameter of ``experts`` by a DTensor parameter
    sharded ``Shard(0)`` over ``mesh``, sharing the local storage."""
    for name, p in list(experts.named_parameters(recurse=False)):
        d = DTensor.from_local(p.detach(), mesh, [Shard(0)], run_check=False)
        setattr(experts, name, nn.Parameter(d, requires_grad=p.requires_grad))


def to_full(value, group=None, world: int = 1):
    """A state-dict value as the full (single-process) tensor: a DTensor gathered over its mesh
    (every rank gets it); a plain local slice (``dtensor=False`` layers) all-gathered over
    ``group`` of size ``world`` and concatenated; anything else as it is."""
    if isinstance(value, DTensor):
        return value.full_tensor()
    if group is None:
        return value
    v = value.contiguous()
    parts = [torch.empty_like(v) for _ in range(world)]
    dist.all_gather(parts, v, group=group)
    return torch.cat(parts)


def from_full(full, current, expert_slice=None):
    """A full (single-process) value made to load into ``current`` (this rank's state-dict
    value): this rank's part of it as a DTensor with ``current``'s mesh and placements (cut
    locally, no communication), or ``full[expert_slice]`` for a plain local slice."""
    if isinstance(current, DTensor) and not isinstance(full, DTensor):
        if tuple(full.shape) != tuple(current.shape):
            raise ValueError(
                f"mixops.parallel: a full tensor of shape {tuple(full.shape)} cannot load into a "
                f"parameter of global shape {tuple(current.shape)}"
            )
        return distribute_tensor(
            full.to(current.device), current.device_mesh, current.placements, src_data_rank=None
        )
    if expert_slice is not None and not isinstance(full, DTensor):
        return full[expert_slice]
    return full
