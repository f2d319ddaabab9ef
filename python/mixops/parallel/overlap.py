"""The chunked exchange-and-experts schedule as one autograd Function, so that the backward
overlaps too.

Forward, chunk by chunk: chunk c+1's dispatch all-to-all is started before chunk c's experts run,
and each chunk's combine starts as soon as its experts are done. Backward, the same shape: chunk
c+1's combine gradient travels while chunk c's expert backward runs, and each chunk's dispatch
gradient leaves as soon as it exists. With per-chunk autograd Functions the engine would run each
chunk's exchange backward and immediately block on it (on gloo the wait is on the calling
thread), so the backward would not overlap.

Each chunk's experts run under ``torch.enable_grad`` on the received rows as a leaf; the chunk's
graph (rows -> local order -> experts -> return order) is kept and differentiated in the backward
with ``torch.autograd.grad`` for the rows and the expert weights (which are this Function's inputs:
parameters, or their autocast copies). The exchanges here carry no autograd of their own.

Split backward (``WaitGrad``, ``StartGrad``): the layer's two backward exchanges can also overlap
work outside the layer (the shortcut-connected schedule's dense sublayers). ``StartGrad`` sits on
each chunk's combined rows (made in ``combine_finish``): its backward only starts the combine's
gradient exchange and hands its gradient on unread. ``WaitGrad`` sits on each chunk's rows to send (made
in ``dispatch_start``): ChunkedExperts' backward starts the dispatch's gradient exchange and
returns placeholders, and ``WaitGrad``'s backward waits for it. The autograd engine runs the nodes
made later first, so the backward of whatever ran between ``dispatch_start`` and ``run_experts``
(or between ``run_experts`` and ``combine_finish``) runs while those exchanges travel. A
placeholder is never read before its wait: each has exactly one consumer, the waiting node. The
nodes share only a ``GradBox`` (no reference to the plan), so no reference cycle forms.
"""

import torch
from torch.autograd import Function

from .comm import start_exchange, traced

__all__ = ["ChunkedExperts", "GradBox", "WaitGrad", "StartGrad"]


class ChunkedExperts(Function):
    """``outs = ChunkedExperts.apply(plan, fn, num_weights, *weights, *sends)``: every chunk's
    combined rows ``fn(rows, offsets, *weights)`` (still arriving: read them after ``plan``'s
    combine handles are waited). The first chunk's
    dispatch may already be started (``plan.chunks[0].handle``). ``sends`` are the chunks' rows
    through WaitGrad (``dispatch.start_stage``), which waits for their gradients."""

    @staticmethod
    def forward(ctx, plan, fn, num_weights, *weights_and_sends):
        weights = weights_and_sends[:num_weights]
        ctx.plan = plan
        chunks = plan.chunks
        outs = []
        for c, ch in enumerate(chunks):
            if ch.handle is None:
                ch.handle = _dispatch(plan, ch)
            if c + 1 < len(chunks):
                chunks[c + 1].handle = _dispatch(plan, chunks[c + 1])
            recv = ch.handle.wait()
            with torch.enable_grad(), traced("experts"):
                ch.leaf = recv.detach().requires_grad_(True)
                ch.back = plan.back_rows(ch, fn(plan.local_rows(ch, ch.leaf), ch.offsets, *weights))
            ch.handle = start_exchange(
                ch.back.detach(), plan.group, ch.send_splits, ch.recv_splits, "combine"
            )
            ch.out_shape = ch.handle.out.shape
            outs.append(ch.handle.out)
        ctx.save_for_backward(*weights)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_outs):
        plan = ctx.plan
        weights = ctx.saved_tensors
        chunks = plan.chunks

        def start_back(c):  # a chunk whose StartGrad did not run: an output the loss ignores
            ch = chunks[c]
            g = ch.back.new_zeros(ch.out_shape) if grad_outs[c] is None else grad_outs[c]
            return start_exchange(g, plan.group, ch.recv_splits, ch.send_splits, "combine.backward")

        # StartGrad's backward started each chunk's combine gradient exchange (in chunk order).
        pending = [ch.back_box.take() if ch.back_box is not None else None for ch in chunks]
        pending = [h if h is not None else start_back(c) for c, h in enumerate(pending)]
        gws = [None] * len(weights)
        placeholders = []
        for ch, h in zip(chunks, pending):
            g_back = h.wait()
            with traced("experts.backward"):
                g_leaf, *gs = torch.autograd.grad(
                    ch.back, (ch.leaf, *weights), g_back, allow_unused=True
                )
            gws = [g if a is None else (a if g is None else a + g) for a, g in zip(gws, gs)]
            if g_leaf is None:
                g_leaf = torch.zeros_like(ch.leaf)
            # WaitGrad (on this chunk's rows to send) waits for it; it gets the placeholder.
            ch.grad_box.handle = start_exchange(
                g_leaf, plan.group, ch.send_splits, ch.recv_splits, "dispatch.backward"
            )
            placeholders.append(ch.grad_box.handle.out)
            ch.leaf = ch.back = None  # free the chunk's graph
        return (None, None, None, *gws, *placeholders)


class GradBox:
    """Where one backward exchange in flight waits between two autograd nodes."""

    __slots__ = ("handle",)

    def __init__(self):
        self.handle = None

    def take(self):
        h, self.handle = self.handle, None
        return h


class WaitGrad(Function):
    """Identity forward on a chunk's rows to send; backward: the dispatch's gradient, waited for
    (ChunkedExperts' backward started it and put it in ``box``)."""

    @staticmethod
    def forward(ctx, box, x):
        ctx.box = box
        return x.view_as(x)

    @staticmethod
    def backward(ctx, placeholder):
        return None, ctx.box.take().wait()


class StartGrad(Function):
    """Identity forward on a chunk's combined rows; backward: starts the combine's gradient
    exchange (into ``box``, for ChunkedExperts' backward) and passes its placeholder on."""

    @staticmethod
    def forward(ctx, box, group, recv_splits, send_splits, x):
        ctx.box, ctx.group, ctx.splits = box, group, (recv_splits, send_splits)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.box.handle = start_exchange(grad, ctx.group, *ctx.splits, "combine.backward")
        # ChunkedExperts' backward reads the exchange's output from the box, not this gradient
        # (which is the exchange's input, still being sent: passed on, never written).
        return None, None, None, None, grad


def _dispatch(plan, ch):
    return start_exchange(ch.send, plan.group, ch.recv_splits, ch.send_splits, "dispatch")
