"""MoE's staged API: the three stages ``dispatch_start`` -> ``run_experts`` -> ``combine_finish``
(StagedMoE, a mixin of MoE), ``StagedCall``, the state of one call in flight through them (which
ExpertParallelMoE's stages carry too), and the autocast helpers of the routed path."""

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from .expert_choice import warn_not_causal


class StagedMoE:
    """A mixin of MoE (whose ``forward`` runs the three stages back to back); the subclass provides
    ``_flatten``, ``_route``, ``_experts_routed``, ``_expert_choice_routed`` and ``_add_shared``."""

    # -- staged API -------------------------------------------------------------------------------
    # The same three stages as ExpertParallelMoE, so that a schedule written against them (the
    # shortcut-connected blocks of nn/shortcut.py) runs on one process too, in order, with the
    # results of forward().
    def dispatch_start(self, x, token_mask=None, modality=None) -> "StagedCall":
        """Stage 1 of 3: the router (with expert parallelism the dispatch all-to-all then starts;
        on one process nothing travels). ``combine_finish(run_experts(dispatch_start(x)))``
        equals ``forward(x)``."""
        x2, token_mask, modality = self._flatten(x, token_mask, modality)
        cast = autocast_dtype(x)
        h = StagedCall(x.shape, x2, cast)
        with no_autocast(x, cast):
            xr = h.routed_input()
            if self.expert_choice:
                warn_not_causal(self, x)
                h.r = token_mask
            else:
                h.r, h.capacity = self._route(xr, token_mask, modality)
        return h

    def run_experts(self, h: "StagedCall") -> "StagedCall":
        """Stage 2 of 3: the routed experts (expert parallelism: as their rows arrive, and the
        combine all-to-all starts)."""
        h.advance("dispatching", "combining", "MoE.run_experts")
        with no_autocast(h.x2, h.cast):
            xr = h.routed_input()
            if self.expert_choice:
                h.y = self._expert_choice_routed(xr, h.r, h.cast)
            else:
                h.y = self._experts_routed(xr, h.r, h.capacity, h.cast)
        return h

    def combine_finish(self, h: "StagedCall", shared_input=None) -> torch.Tensor:
        """Stage 3 of 3: the routed output plus the shared experts' output; the shared experts
        take ``shared_input`` (same shape as x; the shortcut-connected form feeds them the current
        representation while the routed experts took the shortcut) or x itself."""
        shared_x2 = h.shared_x2(self, shared_input)
        h.advance("combining", "finished", "MoE.combine_finish")
        y, h.y = h.y, None
        return shaped_output(self._add_shared(shared_x2, y), h.x_shape)


@dataclass
class StagedCall:
    """One call in flight through the staged API of MoE (and ExpertParallelMoE, which adds its
    exchange plan)."""

    x_shape: torch.Size
    x2: torch.Tensor  # [tokens, hidden] the routed experts' input
    cast: Optional[torch.dtype]  # the autocast dtype the routed path runs in, or None
    r: object = None  # the router's result (expert choice: the token mask)
    capacity: object = None
    y: object = None
    plan: object = None  # expert parallelism: the exchange plan (with permute's row maps)
    stage: str = "dispatching"

    def routed_input(self):
        return self.x2 if self.cast is None else self.x2.to(self.cast)

    def advance(self, want, to, what):
        if self.stage != want:
            raise RuntimeError(f"{what}: the handle is {self.stage}, expected {want}")
        self.stage = to

    def shared_x2(self, moe, shared_input):
        if shared_input is None:
            return self.x2
        if shared_input.shape != self.x_shape:
            raise ValueError(
                f"MoE.combine_finish: shared_input must have x's shape {tuple(self.x_shape)}, "
                f"got {tuple(shared_input.shape)}"
            )
        return shared_input.reshape(-1, moe.hidden_size)


def shaped_output(y, shape):
    """The layer's output ``y`` [T, H] (a fresh tensor) in the input's shape, not as a view: FSDP2
    warns about a wrapped module returning a view (an in-place op on it would drop its backward
    hook), and a 3-D output of ``reshape`` is a view of the 2-D one."""
    if tuple(y.shape) == tuple(shape):
        return y
    return torch.ops.aten._unsafe_view(y, shape)


def below_autograd_without_grad():
    """Without grad mode (generation runs under torch.no_grad()), dispatch below autograd: every
    custom op's registered Python autograd kernel would only re-dispatch below itself, ~7 us of
    Python per op (the layer's decode step at 1 token: 137 -> 99 us of overhead on a tiny layer).
    Not while torch.compile traces (it needs the plain calls) or with grad mode on."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch._C._AutoDispatchBelowAutograd()


def autocast_dtype(x):
    """The autocast dtype of x's device type when autocast is on there, else None."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


class no_autocast:
    """Runs the routed path without autocast when the caller had it on (custom ops are not
    autocast: the layer casts explicitly)."""

    def __init__(self, x, cast):
        self.ctx = torch.autocast(x.device.type, enabled=False) if cast is not None else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            return self.ctx.__exit__(*exc)
        return False
