"""The delay harness and compute tracing that both ``nn/`` and ``parallel/`` use: a model of one
slow link that every expert-parallel all-to-all goes through inside ``slow_link`` (tests and
``python -m mixops.bench ep``/``scmoe``), and the trace of exchanges and compute intervals from
which the benchmarks and tests read how much link time compute covered. Outside ``slow_link``
everything here is a plain call.
"""

import time
from contextlib import contextmanager

import torch
from torch.autograd import Function

__all__ = ["slow_link", "traced", "traced_call", "current_link"]


class _SlowLink:
    """The delay harness (tests and ``python -m mixops.bench ep``): every all-to-all completes no
    earlier than its start plus bytes / ``bytes_per_s`` after the previous one on the link ended
    (one link, transfers in order), while the call itself returns at once; ``trace`` records
    [kind, name, start, end(, bytes)] for the exchanges ("comm") and for ``traced`` compute
    ("compute")."""

    def __init__(self, bytes_per_s):
        self.bytes_per_s = float(bytes_per_s)
        self.free_at = 0.0
        self.trace = []

    def schedule(self, nbytes):
        start = time.monotonic()
        begin = max(start, self.free_at)
        self.free_at = begin + nbytes / self.bytes_per_s
        return start, self.free_at


_LINK = None


def current_link():
    """The active delay harness (a _SlowLink), or None outside ``slow_link``."""
    return _LINK


@contextmanager
def slow_link(bytes_per_s):
    """Within the block every expert-parallel all-to-all of this process behaves as over a link
    of ``bytes_per_s`` (see _SlowLink); yields the trace list."""
    global _LINK
    if not bytes_per_s > 0:
        raise ValueError(f"slow_link: bytes_per_s must be > 0, got {bytes_per_s!r}")
    prev, _LINK = _LINK, _SlowLink(bytes_per_s)
    try:
        yield _LINK.trace
    finally:
        _LINK = prev


@contextmanager
def traced(name):
    """Record a compute interval in the delay harness's trace (nothing without it)."""
    link = _LINK
    t0 = time.monotonic()
    try:
        yield
    finally:
        if link is not None:
            link.trace.append(["compute", name, t0, time.monotonic()])


class _BackwardMark(Function):
    """Identity; its backward stamps the time into a trace record (slot 2: the gradient reached
    the traced call's output; slot 3: it left one of its inputs, the latest one kept)."""

    @staticmethod
    def forward(ctx, link, record, slot, x):
        ctx.link, ctx.record, ctx.slot = link, record, slot
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        now, rec = time.monotonic(), ctx.record
        if ctx.slot == 2:
            rec[2] = now
            ctx.link.trace.append(rec)
        else:
            rec[3] = now if rec[3] is None else max(rec[3], now)
        return None, None, None, grad


def traced_call(name, fn, *args):
    """``fn(*args)``; in the delay harness its forward is recorded as compute ``name`` and its
    backward as compute ``name + ".backward"`` (from the gradient reaching its output to the last
    one leaving its tensor inputs). Without the harness: the plain call, nothing added."""
    link = _LINK
    if link is None:
        return fn(*args)
    rec = ["compute", name + ".backward", None, None]
    marked = [
        _BackwardMark.apply(link, rec, 3, a)
        if isinstance(a, torch.Tensor) and a.requires_grad and torch.is_grad_enabled()
        else a
        for a in args
    ]
    with traced(name):
        out = fn(*marked)
    if isinstance(out, torch.Tensor) and out.requires_grad:
        out = _BackwardMark.apply(link, rec, 2, out)
    return out
