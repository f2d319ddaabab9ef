"""Low-rank adapters on grouped experts: the shared math of expert LoRA (LoRA on an MoE layer's
``gate_up_proj`` / ``down_proj``, PEFT's ``target_parameters`` included) and of mixtures of LoRA
experts (LoRAMoE, MixLoRA, MoLA).

An adapter on a projection with per-expert weights ``W_e [out, in]`` adds ``scale * B_e A_e x``
with ``A_e [r, in]`` and ``B_e [out, r]``. On rows already grouped by expert (permute's
``x_sorted`` and ``offsets``) that is two thin grouped GEMMs, ``x -> [rows, r] -> [rows, out]``,
added to the base GEMM's output: no per-expert ``W + B A`` is ever formed, and no per-expert
loop runs.
"""

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..ops import grouped_mm

__all__ = ["ProjectionAdapter", "lora_delta"]


@dataclass
class ProjectionAdapter:
    """One projection's adapter: ``A [E, r, in]``, ``B [E, out, r]`` (any strides: views of
    other layouts, such as PEFT's, are fine), ``scale`` (alpha / r, or alpha / sqrt(r) for
    rsLoRA) and ``dropout`` (applied to the adapter's input only; None: identity)."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    dropout: Optional[Callable] = None


def lora_delta(x_sorted: torch.Tensor, offsets: torch.Tensor, ad: ProjectionAdapter):
    """``scale * B_e A_e x`` for every row of ``x_sorted`` [N, in] (grouped by expert, ``offsets``
    [E] int32 ends as for ``grouped_mm``): [N, out] in ``x_sorted``'s dtype."""
    x = x_sorted if ad.dropout is None else ad.dropout(x_sorted)
    A, B = ad.A.to(x.dtype), ad.B.to(x.dtype)
    if ad.scale != 1:  # on the thin factor [E, r, in], not on the [N, out] product
        A = A * ad.scale
    t = grouped_mm(x, A.transpose(1, 2), offsets)  # [N, r]
    return grouped_mm(t, B.transpose(1, 2), offsets)  # [N, out]
