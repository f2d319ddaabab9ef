"""Expert-parallel dispatch and combine: permute's expert-major rows to the ranks that own the
experts (rank r owns experts r*E/R .. (r+1)*E/R - 1), regrouped there by local expert for the
grouped GEMMs, and back.

Dropless: every (rank, expert) count travels in one all-to-all before any payload, and the split
sizes reach the host in ONE sync per layer (``_host_splits``, the only host sync of the layer);
the rows then move in one variable-split all-to-all per chunk, arrive source-rank-major
(rank, local expert), and ``reorder_chunks`` regroups them local-expert-major. Capacity: each rank
keeps at most ``capacity`` rows per expert of its own tokens (permute's GShard priority) in a
padded layout ``[E, capacity, H]``, so every split is fixed: no host sync, CUDA-graph capturable,
compilable; the received ``[R, E_local, capacity, H]`` is transposed to local-expert-major.

Stages (each returns a handle): ``dispatch_start`` (permute done by the caller; starts the
all-to-all) -> ``experts`` (waits for it, runs ``fn`` on the local rows, starts the combine) ->
``combine_finish`` (waits, returns rows in permute's order for unpermute). Chunks: the rows are
split into n chunks whose all-to-alls are started so that chunk c+1's exchange runs while chunk
c's experts compute.
"""

import contextlib
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
import torch.distributed as dist

from ..ops import permute, reorder_chunks, rows_to_slots, slots_to_rows, unpermute
from .comm import start_exchange
from .overlap import ChunkedExperts, GradBox, StartGrad, WaitGrad

__all__ = [
    "DispatchPlan",
    "plan_dropless",
    "plan_capacity",
    "permute_and_plan",
    "unpermute_all",
    "start_stage",
    "take_sends",
    "experts_all",
    "finish_all",
]


def _reorder(x, counts):
    """Rows of ``x`` in chunks ordered (a, b) with sizes ``counts [A, B]`` -> order (b, a)."""
    return reorder_chunks(x, counts.to(torch.int32))


@dataclass
class _Chunk:
    """One chunk's exchange: its rows in permute's layout and what the combine needs."""

    send: torch.Tensor  # rows to send (dropless: this chunk's expert-major rows; capacity: padded)
    send_splits: Optional[List[int]]
    recv_splits: Optional[List[int]]
    recv_counts: Optional[torch.Tensor]  # [R, E_local] (dropless)
    offsets: torch.Tensor  # [E_local] int32 ends of each local expert's rows
    handle: object = None
    out: object = None
    send_in: object = None  # ``send`` through WaitGrad (the split backward), until run_experts
    grad_box: object = None  # WaitGrad's box (the dispatch's gradient exchange)
    back_box: object = None  # StartGrad's box (the combine's gradient exchange)


@dataclass
class DispatchPlan:
    """How this layer's rows travel: per chunk, what to send and how the answer comes back."""

    group: object
    world: int
    local_experts: int
    mode: str  # "dropless" | "capacity"
    chunks: List[_Chunk] = field(default_factory=list)
    unpad: Optional[Callable] = None  # capacity: padded [E*cap, H] -> permute's rows
    row_maps: list = field(default_factory=list)  # permute's row map of each permuted part
    num_rows: list = field(default_factory=list)  # permute's row count of each permuted part
    compiled: bool = False  # under torch.compile: functional collectives, no overlap

    def local_rows(self, ch, recv):
        """Received rows (source-rank-major) -> local-expert-major."""
        if self.mode == "dropless":
            return _reorder(recv, ch.recv_counts)
        R, El, H = self.world, self.local_experts, recv.shape[-1]
        return recv.view(R, El, -1, H).transpose(0, 1).reshape(-1, H)

    def back_rows(self, ch, out):
        """Expert outputs (local-expert-major) -> source-rank-major, for the combine."""
        if self.mode == "dropless":
            return _reorder(out, ch.recv_counts.t())
        R, El, H = self.world, self.local_experts, out.shape[-1]
        return out.view(El, R, -1, H).transpose(0, 1).reshape(-1, H)


def plan_dropless(x_sorted_chunks, offsets_chunks, num_experts, group) -> DispatchPlan:
    """Dropless plan for chunks of permute output (each chunk a separate permute of a slice of
    the tokens): one all-to-all of all chunks' counts, one host sync for all split sizes."""
    world = dist.get_world_size(group)
    El = num_experts // world
    counts = torch.stack(
        [torch.diff(o, prepend=o.new_zeros(1)) for o in offsets_chunks]
    )  # [n, E] int32, expert-major = rank-major
    n = counts.shape[0]
    send = counts.view(n, world, El).transpose(0, 1).contiguous()  # [R(dest), n, El]
    recv = torch.empty_like(send)  # [R(src), n, El]
    dist.all_to_all_single(recv, send, group=group)
    # THE host sync of a dropless layer: every chunk's split sizes at once.
    host = torch.stack([send.sum(2), recv.sum(2)]).cpu().tolist()  # [2, R, n]
    plan = DispatchPlan(group, world, El, "dropless")
    for c, xs in enumerate(x_sorted_chunks):
        send_splits = [host[0][r][c] for r in range(world)]
        recv_splits = [host[1][r][c] for r in range(world)]
        rc = recv[:, c, :]  # [R, El]
        local = torch.cumsum(rc.sum(0), 0).to(torch.int32)
        plan.chunks.append(_Chunk(xs[: sum(send_splits)], send_splits, recv_splits, rc, local))
    return plan


def plan_capacity(x_sorted, offsets, num_experts, capacity, group, num_chunks=1):
    """Capacity plan: permute's rows (at most ``capacity`` per expert) padded to [E, capacity, H]
    and cut into ``num_chunks`` chunks along the capacity slots; fixed splits, no host sync."""
    world = dist.get_world_size(group)
    E, El, H = num_experts, num_experts // world, x_sorted.shape[1]
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
    start = offsets - counts
    j = torch.arange(capacity, device=x_sorted.device)
    row = torch.where(j < counts.unsqueeze(1), start.unsqueeze(1) + j, -1)  # [E, cap]
    row_map = row.to(torch.int32).reshape(-1, 1)
    padded = rows_to_slots(x_sorted, row_map, 1).view(E, capacity, H)
    plan = DispatchPlan(group, world, El, "capacity")
    bounds = [capacity * c // num_chunks for c in range(num_chunks + 1)]
    for c in range(num_chunks):
        w = bounds[c + 1] - bounds[c]
        send = padded[:, bounds[c] : bounds[c + 1]].reshape(E * w, H)
        local = (torch.arange(1, El + 1, device=x_sorted.device) * world * w).to(torch.int32)
        plan.chunks.append(_Chunk(send, None, None, None, local))
    num_rows = x_sorted.shape[0]

    def unpad(chunk_outs):
        full = torch.cat([o.view(E, -1, H) for o in chunk_outs], dim=1)  # [E, cap, H]
        return slots_to_rows(full.reshape(E * capacity, 1, 1, H), row_map, num_rows)

    plan.unpad = unpad
    return plan


def permute_and_plan(x, ids, num_experts, group, num_chunks=1, capacity=None, stage=None):
    """Permute ``x`` [T, H] by ``ids`` [T, K] (global expert ids over ``group``'s ranks; -1: no
    expert) and plan its exchange: dropless (``capacity`` None), one permute per chunk of the
    tokens (one count all-to-all and one host sync for all); with a capacity, one permute whose
    padded slots are cut into the chunks. ``stage(name, x)``: an optional context manager
    naming the parts (NVTX ranges). Start it with ``start_stage``; ``unpermute_all`` undoes it."""
    stage = stage or (lambda name, x: contextlib.nullcontext())
    E, n = num_experts, num_chunks
    with stage("permute", x):
        if capacity is None:
            bounds = [x.shape[0] * c // n for c in range(n + 1)]
            ps = [
                permute(x[bounds[c] : bounds[c + 1]], ids[bounds[c] : bounds[c + 1]], E)
                for c in range(n)
            ]
            with stage("dispatch_counts", x):
                plan = plan_dropless([p.x_sorted for p in ps], [p.offsets for p in ps], E, group)
        else:
            ps = [permute(x, ids, E, capacity=capacity)]
            plan = plan_capacity(ps[0].x_sorted, ps[0].offsets, E, capacity, group, n)
    plan.row_maps = [p.row_map for p in ps]
    plan.num_rows = [p.x_sorted.shape[0] for p in ps]
    return plan


def unpermute_all(plan, outs, weights):
    """The combined rows ``outs`` (``finish_all``) back in token order, each token's rows
    summed with its routing ``weights`` [T, K] (unpermute): [T, H]."""
    if plan.mode == "capacity":
        return unpermute(plan.unpad(outs), plan.row_maps[0], weights)
    n, T = len(outs), weights.shape[0]
    bounds = [T * c // n for c in range(n + 1)]
    ys = []
    for c, o in enumerate(outs):  # rows this rank kept (dropped: none in dropless) + zeros
        o = torch.cat((o, o.new_zeros(plan.num_rows[c] - o.shape[0], o.shape[1])))
        ys.append(unpermute(o, plan.row_maps[c], weights[bounds[c] : bounds[c + 1]]))
    return torch.cat(ys) if n > 1 else ys[0]


def start_stage(plan):
    """Start the first chunk's dispatch (the staged API's first stage; no autograd: the
    ChunkedExperts Function carries the gradient of every exchange) and put every chunk's rows
    through WaitGrad, so the dispatch's gradient is waited for here, after the backward of
    whatever the caller runs before ``experts_all``."""
    for ch in plan.chunks:
        ch.grad_box = GradBox()
        ch.send_in = WaitGrad.apply(ch.grad_box, ch.send)
    if plan.chunks:
        ch = plan.chunks[0]
        ch.handle = start_exchange(ch.send, plan.group, ch.recv_splits, ch.send_splits, "dispatch")


def take_sends(plan):
    """The chunks' rows to send (through WaitGrad), handed over by the plan: pass them to
    ``experts_all`` as ``sends`` (as arguments of a module's forward, so that the hooks of a
    wrapper such as FSDP2 see the tensors its gradients flow through)."""
    sends = [ch.send_in for ch in plan.chunks]
    for ch in plan.chunks:
        ch.send_in = None
    return sends


def experts_all(plan, fn, *weights, sends=None):
    """Every chunk's experts ``fn(rows, offsets, *weights)``, overlapped with the exchanges
    (overlap.ChunkedExperts, forward and backward); each chunk's combine is started. Returns the
    chunks' outputs (still arriving; ``finish_all`` waits for them)."""
    if sends is None:
        sends = take_sends(plan)
    outs = ChunkedExperts.apply(plan, fn, len(weights), *weights, *sends)
    for ch, o in zip(plan.chunks, outs):
        ch.out = o
    return outs


def compiled_experts_all(plan, fn, *weights):
    """Capacity mode under torch.compile: each chunk's exchanges as functional collectives
    (traceable, with autograd); the compiler schedules them (no explicit overlap)."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd

    for ch in plan.chunks:
        recv = all_to_all_single_autograd(ch.send, None, None, plan.group)
        out = fn(plan.local_rows(ch, recv), ch.offsets, *weights)
        ch.out = all_to_all_single_autograd(plan.back_rows(ch, out), None, None, plan.group)
    return tuple(ch.out for ch in plan.chunks)


def finish_all(plan):
    """Wait for every chunk's combine; the chunks' rows in the order they were sent, each through
    StartGrad (its backward starts the combine's gradient exchange before the backward of what
    the caller ran between ``experts_all`` and here). The plan lets go of the outputs (and their
    handles): ChunkedExperts' context holds the plan, and an output held by the plan would hold
    that context in turn (a cycle through the autograd graph that Python's gc cannot free: the
    plan, its tensors and the process group would leak)."""
    outs = [None] * len(plan.chunks)
    # StartGrad nodes made last chunk first: the engine runs the node made last first, so the
    # gradient exchanges start in chunk order (the order ChunkedExperts' backward waits for them).
    for c in reversed(range(len(plan.chunks))):
        ch = plan.chunks[c]
        if ch.handle is not None:
            ch.handle.wait()
            ch.handle = None
        out = ch.out
        if not plan.compiled and torch.is_grad_enabled() and out.requires_grad:
            ch.back_box = GradBox()
            out = StartGrad.apply(ch.back_box, plan.group, ch.recv_splits, ch.send_splits, out)
        outs[c] = out
        ch.out = None
    return outs
