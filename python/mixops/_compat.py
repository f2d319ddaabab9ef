"""Fallbacks for torch APIs that behave differently across the supported torch versions (2.11
through 2.14; README). One function per difference, with the version that needs it."""

import torch

__all__ = ["sym_min"]


def sym_min(a, b):
    """``torch.sym_min(a, b)``, or builtin ``min`` when both are plain ints.

    torch 2.11's dynamo cannot trace ``torch.sym_min`` on two plain ints (a static-shape compile:
    "torch.* op returned non-Tensor"); 2.14's can. SymInts (dynamic shapes) keep ``torch.sym_min``,
    which does not specialise the shape.
    """
    if isinstance(a, int) and isinstance(b, int):
        return min(a, b)
    return torch.sym_min(a, b)
