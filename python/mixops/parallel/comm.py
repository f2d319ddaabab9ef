"""The collectives of expert parallelism, over a torch.distributed process group (NCCL on GPUs,
gloo on CPUs; the same code): group resolution, a differentiable all-to-all that can be started
and finished apart (for overlap), and the configuration check that turns a mismatch between
ranks into an error instead of a hang.
"""

import time
from typing import List, Optional

import torch
import torch.distributed as dist
from torch.autograd import Function

from .._nvtx import nvtx_range
from .._trace import current_link, slow_link, traced, traced_call

__all__ = [
    "resolve_group",
    "all_to_all",
    "AllToAllHandle",
    "check_same_config",
    "start_config_check",
    "ConfigCheck",
    "slow_link",
    "traced",
    "traced_call",
    "start_exchange",
]


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


class _DelayedWork:
    """A collective's Work whose wait() also waits for the simulated link."""

    def __init__(self, work, ready, record):
        self.work, self.ready, self.record = work, ready, record

    def wait(self):
        if self.work is not None:
            self.work.wait()
            self.work = None
        delay = self.ready - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        self.record[3] = max(self.ready, self.record[2])
        return True


def _a2a(out, inp, out_splits, in_splits, group, async_op, name="all_to_all"):
    link = current_link()
    work = dist.all_to_all_single(
        out, inp, out_splits, in_splits, group=group, async_op=async_op or link is not None
    )
    if link is None:
        return work
    nbytes = max(inp.numel() * inp.element_size(), out.numel() * out.element_size())
    start, ready = link.schedule(nbytes)
    record = ["comm", name, start, None, nbytes]
    link.trace.append(record)
    delayed = _DelayedWork(work, ready, record)
    if async_op:
        return delayed
    delayed.wait()
    return None


class _AllReduceSum(torch.autograd.Function):
    """A differentiable sum over ``group``: each rank gets the sum, and the gradient of each
    rank's input is the sum of the ranks' output gradients. The same collectives, values and
    gradients as ``torch.distributed.nn.functional.all_reduce``, which torch 2.14 deprecates
    with a FutureWarning on every call (reduce_stats called it on every forward)."""

    @staticmethod
    def forward(ctx, group, t):
        ctx.group = group
        out = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return None, _AllReduceSum.apply(ctx.group, grad)


class AllToAllHandle:
    """An all-to-all in flight: ``wait()`` returns its output (autograd attached at start)."""

    def __init__(self, out, work):
        self.out, self.work = out, work

    def wait(self):
        if self.work is not None:
            with nvtx_range("mixops.ep.wait", enabled=self.out.is_cuda):
                self.work.wait()
            self.work = None
        return self.out


class _AllToAll(Function):
    """``all_to_all_single`` with autograd: the backward is the reverse exchange. ``splits``:
    (out_splits, in_splits) as lists, or None for equal splits. async: the forward only starts
    the exchange; the output must not be read before ``AllToAllHandle.wait()``."""

    @staticmethod
    def forward(ctx, x, out_rows, out_splits, in_splits, group, holder, name):
        ctx.group, ctx.out_splits, ctx.in_splits = group, out_splits, in_splits
        ctx.in_rows, ctx.name = x.shape[0], name
        out = x.new_empty((out_rows, *x.shape[1:]))
        work = _a2a(out, x.contiguous(), out_splits, in_splits, group, holder is not None, name)
        if holder is not None:
            holder.append(work)
        return out

    @staticmethod
    def backward(ctx, grad):
        g = grad.new_empty((ctx.in_rows, *grad.shape[1:]))
        name = ctx.name + ".backward"
        _a2a(g, grad.contiguous(), ctx.in_splits, ctx.out_splits, ctx.group, False, name)
        return g, None, None, None, None, None, None


def all_to_all(
    x: torch.Tensor,
    group,
    out_splits: Optional[List[int]] = None,
    in_splits: Optional[List[int]] = None,
    async_op: bool = False,
    name: str = "all_to_all",
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
    out = _AllToAll.apply(x, out_rows, out_splits, in_splits, group, holder, name)
    if not async_op:
        return out
    return AllToAllHandle(out, holder[0] if holder else None)


_COMM_STREAMS = {}
# Test hook (GPU): cycles of torch.cuda._sleep queued on the communication stream before each
# exchange, standing for a slow link (tests/test_ep_cuda.py).
CUDA_LINK_SLEEP_CYCLES = 0


def comm_stream(device):
    """The communication stream of a CUDA device (one per device, made once)."""
    s = _COMM_STREAMS.get(device)
    if s is None:
        s = _COMM_STREAMS[device] = torch.cuda.Stream(device=device)
    return s


class _StreamWork:
    """A CUDA exchange queued on the communication stream: ``wait()`` makes the current stream
    wait for it (an event; the host does not block)."""

    def __init__(self, event, inner):
        self.event, self.inner = event, inner

    def wait(self):
        if self.inner is not None:  # the delay harness's host-side link, if any
            self.inner.wait()
        torch.cuda.current_stream().wait_event(self.event)
        return True


def start_exchange(x, group, out_splits=None, in_splits=None, name="all_to_all"):
    """An all-to-all without autograd, started: an ``AllToAllHandle`` whose ``wait()`` returns
    the received rows (the overlapped schedule's own functions call this). CUDA tensors: queued
    on the device's communication stream after an event of the current stream (so it sees the
    rows), with ``record_stream`` on both tensors so the caching allocator does not reuse them
    while the exchange runs; gloo (CPU): an async work handle."""
    out_rows = x.shape[0] if out_splits is None else sum(out_splits)
    x = x.contiguous()
    out = x.new_empty((out_rows, *x.shape[1:]))
    with nvtx_range(f"mixops.ep.{name}", enabled=x.is_cuda):
        if not x.is_cuda:
            return AllToAllHandle(out, _a2a(out, x, out_splits, in_splits, group, True, name))
        ready = torch.cuda.Event()
        ready.record()
        stream = comm_stream(x.device)
        with torch.cuda.stream(stream):
            stream.wait_event(ready)
            if CUDA_LINK_SLEEP_CYCLES:
                torch.cuda._sleep(CUDA_LINK_SLEEP_CYCLES)
            work = _a2a(out, x, out_splits, in_splits, group, current_link() is not None, name)
            done = torch.cuda.Event()
            done.record(stream)
        x.record_stream(stream)
        out.record_stream(stream)
    return AllToAllHandle(out, _StreamWork(done, work))


class ConfigCheck:
    """A configuration check in flight (``start_config_check``): ``finish()`` waits for its
    all_gather and raises on every rank if the ranks disagree."""

    def __init__(self, names, every, work, what):
        self.names, self.every, self.work, self.what = names, every, work, what

    def finish(self) -> None:
        if self.work is None:
            return
        self.work.wait()
        self.work = None
        table = torch.stack(self.every).cpu()  # (NCCL: the host sync of the check)
        bad = []
        for i, n in enumerate(self.names):
            col = table[:, i].tolist()
            if len(set(col)) > 1:
                bad.append(f"{n}: " + ", ".join(f"rank {r}: {v}" for r, v in enumerate(col)))
        if bad:
            raise ValueError(f"{self.what}: the ranks disagree on " + "; ".join(bad))


def start_config_check(values: dict, group, what="mixops.parallel") -> ConfigCheck:
    """Start comparing ``values`` (name -> int) between the ranks of ``group``: one all_gather
    of an int64 tensor of ``len(values)`` elements, so every rank must pass the same names (then
    the collective has the same shape everywhere, whatever the values). Work that needs no
    collective may run before ``finish()``; any other collective of the group must come after."""
    names = sorted(values)
    mine = torch.tensor([int(values[n]) for n in names], dtype=torch.int64)
    backend = dist.get_backend(group)
    dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu"
    mine = mine.to(dev)
    world = dist.get_world_size(group)
    every = [torch.empty_like(mine) for _ in range(world)]
    work = dist.all_gather(every, mine, group=group, async_op=True)
    return ConfigCheck(names, every, work, what)


def check_same_config(values: dict, group, what="mixops.parallel") -> None:
    """Raise on every rank if the ranks of ``group`` disagree on ``values`` (name -> int; the
    same names on every rank); the message names each disagreeing field and each rank's value.
    One small all_gather (a host round trip)."""
    start_config_check(values, group, what).finish()
