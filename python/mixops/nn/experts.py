"""The expert weights of the mixture layers: ``Experts`` (the routed experts, all E of them in 3-D
tensors for the grouped GEMMs, in HF transformers' v5 layout) and ``MLP`` (one dense expert: the
shared experts that every token goes through); ``expert_mlp``, the routed experts' computation on
rows grouped by expert, which every routed path (token choice, expert choice, expert
parallelism) shares, low-rank adapters included."""

import contextlib

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ..ops import grouped_mm
from .activations import GATED, act_fn, apply_activation, check_activation
from .lora import lora_delta

__all__ = ["Experts", "MLP", "expert_mlp"]


class Experts(nn.Module):
    """Expert weights in HF transformers' v5 layout: ``gate_up_proj`` [E, 2*ffn, hidden] (gate rows
    first) for gated activations, else ``up_proj`` [E, ffn, hidden]; ``down_proj`` [E, hidden, ffn]."""

    def __init__(self, hidden_size, ffn_size, num_experts, gated=True, device=None, dtype=None):
        super().__init__()
        first = 2 * ffn_size if gated else ffn_size
        w1 = nn.Parameter(torch.empty(num_experts, first, hidden_size, device=device, dtype=dtype))
        if gated:
            self.gate_up_proj = w1
        else:
            self.up_proj = w1
        self.down_proj = nn.Parameter(
            torch.empty(num_experts, hidden_size, ffn_size, device=device, dtype=dtype)
        )
        self.reset_parameters()

    def weights(self):
        """``(w1, w2)``: the first projection (``gate_up_proj`` or ``up_proj``) and ``down_proj``
        as plain tensors: a DTensor parameter (expert parallelism: this rank's experts, sharded
        ``Shard(0)``) gives its local shard, differentiably and without a copy."""
        w1 = self.gate_up_proj if hasattr(self, "gate_up_proj") else self.up_proj
        return local_tensor(w1), local_tensor(self.down_proj)

    def forward(self, fn, *args):
        """``fn(w1, w2, *args)`` on ``weights()``, as this module's call: wrappers that hook a
        module's forward see the weights used inside it (FSDP2's ``fully_shard`` on the experts
        gathers their shards before and frees them after; tensors in ``args`` and in the result
        carry its backward hooks)."""
        w1, w2 = self.weights()
        return fn(w1, w2, *args)

    def reset_parameters(self):
        """Each projection ~ N(0, 1/fan_in)."""
        w1 = self.gate_up_proj if hasattr(self, "gate_up_proj") else self.up_proj
        nn.init.normal_(w1, std=w1.shape[2] ** -0.5)
        nn.init.normal_(self.down_proj, std=self.down_proj.shape[2] ** -0.5)


class MLP(nn.Module):
    """A dense expert (the shared experts): ``down(act(gate(x)) * up(x))`` or ``down(act(up(x)))``."""

    def __init__(self, hidden_size, ffn_size, activation="swiglu", device=None, dtype=None):
        super().__init__()
        check_activation(activation)
        self.activation = activation
        kw = dict(bias=False, device=device, dtype=dtype)
        if activation in GATED:
            self.gate_proj = nn.Linear(hidden_size, ffn_size, **kw)
        self.up_proj = nn.Linear(hidden_size, ffn_size, **kw)
        self.down_proj = nn.Linear(ffn_size, hidden_size, **kw)

    def forward(self, x):
        fn = act_fn(self.activation)
        if self.activation in GATED:
            return self.down_proj(fn(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(fn(self.up_proj(x)))


def local_tensor(w):
    """A DTensor's local shard (differentiable, no copy); any other tensor as it is."""
    return w.to_local() if isinstance(w, DTensor) else w


def _no_stage(name, x):
    return contextlib.nullcontext()


def expert_mlp(rows, offsets, w1, w2, activation, adapters=None, stage=None, packed=None):
    """The experts on ``rows`` [N, hidden] grouped by expert (``offsets`` [E] int32 ends): [N,
    hidden]. ``w1`` [E, 2*ffn or ffn, hidden] and ``w2`` [E, hidden, ffn] in the HF layout (used
    through transposed views); ``adapters``: ``{"gate_up": ProjectionAdapter or None, "down":
    ...}`` (nn/lora.py), whose low-rank terms are added to the first and the down projection's
    GEMM outputs (``gate_up`` stands for ``w1`` whatever the activation); ``stage(name, x)``: a
    context manager around each stage (MoE's NVTX ranges). ``packed``: experts of different
    widths (``PackedExperts.spec()``; w1/w2 then 2-D packed, see nn/packed_experts.py)."""
    stage = stage or _no_stage
    adapters = adapters or {}
    if packed is not None:
        from .packed_experts import packed_expert_mlp  # (packed_experts imports this module)

        if any(a is not None for a in adapters.values()):
            raise ValueError("MoE: LoRA adapters on experts of different widths (ffn_sizes)")
        return packed_expert_mlp(rows, offsets, packed, w1, w2, activation, stage)
    with stage("gate_up_gemm", rows):
        h = grouped_mm(rows, w1.transpose(1, 2), offsets)
        if adapters.get("gate_up") is not None:
            h = h.add_(lora_delta(rows, offsets, adapters["gate_up"]))  # h: fresh, unsaved
    with stage("activation", rows):
        a = apply_activation(activation, h)
    with stage("down_gemm", rows):
        o = grouped_mm(a, w2.transpose(1, 2), offsets)
        if adapters.get("down") is not None:
            o = o.add_(lora_delta(a, offsets, adapters["down"]))
    return o


def _cast_weights(w1, w2, cast):
    """The experts' (w1, w2) for the GEMMs: DTensors as their local shards, a 3-D w1 cut to w2's
    experts (the zero experts' gate_up rows of LongCat-Flash: a view; the 2-D packed weights of
    experts of different widths are used whole), both cast to ``cast`` when given."""
    w1, w2 = local_tensor(w1), local_tensor(w2)
    if w1.dim() == 3 and w1.shape[0] != w2.shape[0]:
        w1 = w1[: w2.shape[0]]
    return (w1, w2) if cast is None else (w1.to(cast), w2.to(cast))


def _fsdp_sharded(module):
    """``module`` is under its own FSDP2 ``fully_shard`` (parameters gathered in its call)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)
