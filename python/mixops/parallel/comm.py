"""The collectives of expert parallelism, over a torch.distributed process group (NCCL on GPUs,
gloo on CPUs; the same code): group resolution, a differentiable all-to-all that can be started
and finished apart (for overlap), and the configuration check that turns a mismatch between
ranks into an error instead of a hang.
"""

from typing import List, Optional

import torch
import torch.distributed as dist
from torch.autograd import Function

__all__ = ["resolve_group", "all_to_all", "AllToAllHandle", "check_same_config"]


def resolve_group(group):
    """A ProcessGroup from ``group`` (a ProcessGroup, or a 1-D DeviceMesh / one dimension of it,
    or None for the default group)."""
    if group is None:
        if not dist.is_initialized():
            raise RuntimeError("mixops.parallel: torch.distributed is not initialised")
        return dist.group.WORLD
    get_group = getattr(group, "get_group", None)  # DeviceMesh
    if callable(get_group):
        if group.ndim != 1:
            raise ValueError(
                "mixops.parallel: give one dimension of the DeviceMesh (mesh['ep']), "
                f"got a {group.ndim}-D mesh"
            )
        return get_group()
    return group


def _a2a(out, inp, out_splits, in_splits, group, async_op):
    return dist.all_to_all_single(out, inp, out_splits, in_splits, group=group, async_op=async_op)


class AllToAllHandle:
    """An all-to-all in flight: ``wait()`` returns its output (autograd attached at start)."""

    def __init__(self, out, work):
        self.out, self.work = out, work

    def wait(self):
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.out


class _AllToAll(Function):
    """``all_to_all_single`` with autograd: the backward is the reverse exchange. ``splits``:
    (out_splits, in_splits) as lists, or None for equal splits. async: the forward only starts
    the exchange; the output must not be read before ``AllToAllHandle.wait()``."""

    @staticmethod
    def forward(ctx, x, out_rows, out_splits, in_splits, group, holder):
        ctx.group, ctx.out_splits, ctx.in_splits = group, out_splits, in_splits
        ctx.in_rows = x.shape[0]
        out = x.new_empty((out_rows, *x.shape[1:]))
        work = _a2a(out, x.contiguous(), out_splits, in_splits, group, holder is not None)
        if holder is not None:
            holder.append(work)
        return out

    @staticmethod
    def backward(ctx, grad):
        g = grad.new_empty((ctx.in_rows, *grad.shape[1:]))
        _a2a(g, grad.contiguous(), ctx.in_splits, ctx.out_splits, ctx.group, False)
        return g, None, None, None, None, None


def all_to_all(
    x: torch.Tensor,
    group,
    out_splits: Optional[List[int]] = None,
    in_splits: Optional[List[int]] = None,
    async_op: bool = False,
):
    """Rows of ``x`` to the ranks of ``group`` (``in_splits[r]`` rows to rank r, equal parts when
    None) and back from them (``out_splits``); differentiable. Returns the output, or an
    ``AllToAllHandle`` when ``async_op``."""
    world = dist.get_world_size(group)
    if out_splits is None:
        if x.shape[0] % world:
            raise ValueError(
                f"mixops.parallel: an equal-split all-to-all needs rows divisible by the group "
                f"size {world}, got {x.shape[0]}"
            )
        out_rows = x.shape[0]
    else:
        out_rows = sum(out_splits)
    holder = [] if async_op else None
    out = _AllToAll.apply(x, out_rows, out_splits, in_splits, group, holder)
    if not async_op:
        return out
    return AllToAllHandle(out, holder[0] if holder else None)


def check_same_config(values: dict, group, what="mixops.parallel") -> None:
    """Raise on every rank if the ranks of ``group`` disagree on ``values`` (name -> int); the
    message names the field and each rank's value. One small all_gather (a host round trip)."""
    names = sorted(values)
    mine = torch.tensor([int(values[n]) for n in names], dtype=torch.int64)
    backend = dist.get_backend(group)
    dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu"
    mine = mine.to(dev)
    world = dist.get_world_size(group)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    table = torch.stack(every).cpu()
    for i, n in enumerate(names):
        col = table[:, i].tolist()
        if len(set(col)) > 1:
            raise ValueError(
                f"{what}: the ranks disagree on {n}: "
                + ", ".join(f"rank {r}: {v}" for r, v in enumerate(col))
            )
