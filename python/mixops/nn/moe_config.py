"""MoE's configuration: ``MoEParts`` (existing modules to build a layer around), the parsing and
checks of the constructor's options (the RouterConfig from ``router=`` or keywords, the capacity
factor as an exact fraction, the zero-computation experts' kinds, the layer's own sizes and
activation), and ``per_token``, the shape check of the per-token forward arguments. MoA and
ExpertParallelMoE use them too (imported from moe.py)."""

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

from torch import nn

from .activations import check_activation
from .router import RouterConfig


@dataclass
class MoEParts:
    """Existing modules for MoE to use (and share parameters with) instead of making its own:
    ``gate`` has ``weight`` [E, hidden] (and ``e_score_correction_bias`` with a selection bias;
    its forward returns the logits, or a tuple whose first item they are); ``experts`` has
    ``gate_up_proj``/``up_proj`` and ``down_proj`` in HF's layout; ``shared`` maps x -> y;
    ``shared_gate`` maps x -> [tokens, 1]. ``shared_name`` and ``gate_name`` are the attributes (and
    state-dict prefixes) the shared module and the router go under (LongCat-Flash: ``router``).
    ``experts`` may hold more first-projection slices than computing experts (LongCat-Flash's
    ``gate_up_proj`` [E + Z, 2F, H]): the first E are used, the rest get zero gradient."""

    gate: nn.Module
    experts: nn.Module
    shared: Optional[nn.Module] = None
    shared_gate: Optional[nn.Module] = None
    shared_name: str = "shared_experts"
    gate_name: str = "gate"


def _router_config(num_experts, top_k, router, options, who="MoE"):
    """The layer's RouterConfig: ``router`` itself, or one made from the keyword options
    (errors name the layer ``who``)."""
    unknown = set(options) - RouterConfig.option_names()
    if unknown:
        raise TypeError(f"{who} got unexpected keyword arguments: {', '.join(sorted(unknown))}")
    if router is None:
        return RouterConfig(num_experts=num_experts, top_k=top_k, **options)
    if not isinstance(router, RouterConfig):
        raise TypeError(
            f"{who}: router must be a RouterConfig or 'expert_choice', got {router!r}"
            if isinstance(router, str) and who == "MoE"
            else f"{who}: router must be a RouterConfig, got {type(router).__name__}"
        )
    if options:
        raise ValueError(
            f"{who}: give the routing options either as router=RouterConfig(...) or as "
            f"keywords, not both (got router= and {', '.join(sorted(options))})"
        )
    for name, v in (("num_experts", num_experts), ("top_k", top_k)):
        if v is not None and v != getattr(router, name):
            raise ValueError(
                f"{who}: {name}={v!r} disagrees with router.{name}={getattr(router, name)!r}"
            )
    return router


def _capacity_fraction(capacity_factor):
    if capacity_factor is None:
        return None
    if not (
        isinstance(capacity_factor, (int, float))
        and math.isfinite(capacity_factor)
        and capacity_factor > 0
    ):
        raise ValueError(
            f"MoE: capacity_factor must be a finite number > 0 (or None for dropless), "
            f"got {capacity_factor!r}"
        )
    return Fraction(capacity_factor).limit_denominator(1 << 20)


def _zero_kinds(zero_experts):
    """zero_experts: None, an int Z (Z identity experts), or a sequence of "identity" / "null"."""
    if zero_experts is None:
        return ()
    if isinstance(zero_experts, int) and not isinstance(zero_experts, bool):
        if zero_experts < 0:
            raise ValueError(f"MoE: zero_experts must be >= 0, got {zero_experts}")
        return ("identity",) * zero_experts
    kinds = tuple(zero_experts)
    for k in kinds:
        if k not in ("identity", "null"):
            raise ValueError(f"MoE: zero_experts kinds are 'identity' or 'null', got {k!r}")
    return kinds


def per_token(who, name, t, lead_shape, num_tokens, x_name="x"):
    """A per-token argument (``token_mask``, ``modality``) as ``[num_tokens]``, or None. Its shape
    must be the input's leading dims ``lead_shape`` or flat ``[num_tokens]``: same count is not
    enough (a transposed ``[seq, batch]`` mask would silently pair other tokens)."""
    if t is None:
        return None
    if t.shape != lead_shape and tuple(t.shape) != (num_tokens,):

        def dims(shape):
            return "[" + ", ".join(str(d) for d in shape) + "]"

        flat = "" if len(lead_shape) == 1 else f" or [{num_tokens}]"
        raise ValueError(
            f"{who}: {name} must be {dims(lead_shape)} ({x_name}'s leading dims){flat}, "
            f"got shape {dims(t.shape)}"
        )
    return t.reshape(-1)


def _check_layer(hidden_size, ffn_size, activation, shared_ffn_size, shared_expert_gate):
    """The checks of the layer's own arguments (the router's are RouterConfig's)."""
    for name, v in (("hidden_size", hidden_size), ("ffn_size", ffn_size)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"MoE: {name} must be a positive int, got {v!r}")
    check_activation(activation)
    if not isinstance(shared_ffn_size, int) or shared_ffn_size < 0:
        raise ValueError(f"MoE: shared_ffn_size must be an int >= 0, got {shared_ffn_size!r}")
    if shared_expert_gate and not shared_ffn_size:
        raise ValueError("MoE: shared_expert_gate needs shared experts (shared_ffn_size > 0)")
