"""MoD's gather of the chosen rows and its write-back over the skipped ones (the ``scatter_rows``
op), with a backward that makes one full-size pass.

Written with torch's index ops, the input's gradient took about seven full-size passes: the
write-back's backward cloned the gradient and filled the chosen rows, the gather's backward
zero-filled a full tensor and added its rows, autograd summed the two full tensors, and slicing
views added their own. On the MoD benchmark (batch 4 x 2048 x 1024, 2 CPU cores, fp32) that was
93 ms of forward+backward overhead against a 513 ms floor.

Here the gather also returns an alias of its input, which only the write-back consumes. The
write-back's backward (``scatter_rows_backward``) makes the one fresh full-size gradient (the
upstream gradient with the chosen rows zeroed) and hands it over through a shared link; the
gather's backward then adds the block's row gradients into that same tensor in place, and the
input's gradient is that tensor. On the CPU both full-size outputs come from mixops' block cache
(a fresh 32 MiB fp32 tensor costs ~11 ms of page faults there, 1.6 ms when mapped). Eager mode
only: under torch.compile MoD gathers with ``index_select`` and writes back with ``scatter_rows``
and its registered autograd.

Row indices are flat (``b * seq + position``), int32; ``dest`` holds -1 for empty slots (a
sequence with fewer eligible tokens than C), whose rows are neither written nor given gradient.
"""

import torch
from torch.autograd import Function

from ..ops import scatter_rows

__all__ = ["gather_rows", "write_rows"]


class _Link:
    """The write-back's fresh input gradient, for the gather's backward to finish in place."""

    __slots__ = ("grad",)

    def __init__(self):
        self.grad = None


class _GatherRows(Function):
    @staticmethod
    def forward(ctx, x2, src, dest, link, may_be_empty):
        ctx.save_for_backward(dest)
        ctx.link, ctx.shape, ctx.may_be_empty = link, x2.shape, may_be_empty
        return x2.index_select(0, src), x2.view_as(x2)

    @staticmethod
    def backward(ctx, grad_rows, grad_alias):
        (dest,) = ctx.saved_tensors
        fresh, ctx.link.grad = ctx.link.grad, None
        if grad_alias is None:
            grad_alias = grad_rows.new_zeros(ctx.shape)
        elif grad_alias is not fresh:  # not the write-back's own tensor: do not write into it
            grad_alias = grad_alias.clone(memory_format=torch.contiguous_format)
        if grad_rows is not None and ctx.may_be_empty:  # empty slots (-1) add nothing
            ok = (dest >= 0).unsqueeze(1)
            grad_alias.index_add_(0, dest.clamp(min=0), torch.where(ok, grad_rows, 0))
        elif grad_rows is not None:
            grad_alias.index_add_(0, dest, grad_rows)
        return grad_alias, None, None, None, None


class _WriteRows(Function):
    @staticmethod
    def forward(ctx, alias, rows, dest, link):
        ctx.save_for_backward(dest)
        ctx.link = link
        return torch.ops.mixops.scatter_rows.default(alias, rows, dest)

    @staticmethod
    def backward(ctx, grad):
        (dest,) = ctx.saved_tensors
        grad_base, grad_rows = torch.ops.mixops.scatter_rows_backward.default(grad, dest)
        ctx.link.grad = grad_base
        return grad_base, grad_rows, None, None


def gather_rows(x2, src, dest, fused, may_be_empty):
    """``(rows [R, H] = x2[src], base, link)``: give base and link to ``write_rows``; ``fused``
    (eager, not under compile) pairs the two backwards as the module docstring says;
    ``may_be_empty``: dest may hold -1."""
    if not fused:
        return x2.index_select(0, src), x2, None
    link = _Link()
    rows, alias = _GatherRows.apply(x2, src, dest, link, may_be_empty)
    return rows, alias, link


def write_rows(base, rows, dest, link):
    """``out [T, H]``: ``base`` with row ``dest[i]`` replaced by ``rows[i]`` (none for -1)."""
    if link is None:
        return scatter_rows(base, rows, dest)
    return _WriteRows.apply(base, rows, dest, link)
