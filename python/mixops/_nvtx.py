"""NVTX ranges for the whole package (the MoE layer's stages, the benchmarks): one context manager,
so a range is closed even when its body raises and an nsys trace never shows a stage that runs on
into the rest of the program."""

from contextlib import contextmanager, nullcontext

import torch

__all__ = ["nvtx_range"]


@contextmanager
def _range(name):
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()


def nvtx_range(name: str, enabled: bool = True):
    """A context manager holding an NVTX range ``name`` (visible in ``nsys profile``) open around
    its body; a ``nullcontext`` when not ``enabled`` (off GPU, or while torch.compile traces, so
    compiled graphs stay free of NVTX calls)."""
    return _range(name) if enabled else nullcontext()
