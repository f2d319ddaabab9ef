"""MoE's configuration: ``MoEParts`` (existing modules to build a layer around), the parsing and
checks of the constructor's options (the RouterConfig from ``router=`` or keywords, the capacity
factor as an exact fraction, the zero-computation experts' kinds, the layer's own sizes and
activation, the experts' widths, the HMoE loss options), ``per_token``, the shape check of the
per-token forward arguments, and ``add_zero_experts``, the zero-computation experts' share. MoA and
ExpertParallelMoE use them too (imported from moe.py)."""

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

import torch
from torch import nn

from .._compat import sym_min
from .activations import check_activation
from .packed_experts import PackedExperts, check_ffn_sizes
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


def slot_capacity(fraction, num_tokens, k, num_experts):
    """Slots per expert for ``capacity_factor`` (as ``_capacity_fraction`` gives it; None: dropless,
    returns None): ``ceil(cf * T * k / E)`` in integers (T may be symbolic), capped at ``T * k``
    (more slots drop nothing, and the cap keeps any capacity_factor within int64)."""
    if fraction is None:
        return None
    num, den = fraction.numerator, fraction.denominator
    capacity = (num * num_tokens * k + den * num_experts - 1) // (den * num_experts)
    return sym_min(capacity, num_tokens * k)


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


def _experts_widths(ffn_size, ffn_sizes, num_computing):
    """(ffn_size, ffn_sizes): exactly one of them given; ``ffn_sizes`` (experts of different
    widths) one int >= 1 per computing expert, and then ffn_size = max(ffn_sizes)."""
    if (ffn_size is None) == (ffn_sizes is None):
        raise ValueError(
            "MoE: give exactly one of ffn_size (every expert's width) and ffn_sizes (one width "
            f"per expert), got ffn_size={ffn_size!r}, ffn_sizes={ffn_sizes!r}"
        )
    if ffn_sizes is None:
        return ffn_size, None
    sizes = check_ffn_sizes(ffn_sizes)
    if len(sizes) != num_computing:
        raise ValueError(
            f"MoE: ffn_sizes must give one width per computing expert ({num_computing}), got "
            f"{len(sizes)}"
        )
    return max(sizes), sizes


def _check_packed_parts(experts, ffn_sizes, gated):
    """``parts.experts`` against the layer's widths: PackedExperts exactly with ffn_sizes."""
    packed = isinstance(experts, PackedExperts)
    if packed != (ffn_sizes is not None) or (packed and experts.ffn_sizes != ffn_sizes):
        got = experts.ffn_sizes if packed else type(experts).__name__
        raise ValueError(f"MoE: ffn_sizes={ffn_sizes!r} but parts.experts has widths {got!r}")
    if packed and experts.gated != gated:
        raise ValueError(f"MoE: parts.experts.gated={experts.gated} disagrees with the activation")


def _check_size_losses(aux_loss_weighting, param_loss_coef, ffn_sizes, expert_choice):
    """The HMoE loss options (router_losses.py): they need experts of different widths."""
    if aux_loss_weighting not in ("tokens", "size"):
        raise ValueError(
            f"MoE: aux_loss_weighting must be 'tokens' or 'size', got {aux_loss_weighting!r}"
        )
    if not isinstance(param_loss_coef, (int, float)) or not param_loss_coef >= 0:
        raise ValueError(f"MoE: param_loss_coef must be a number >= 0, got {param_loss_coef!r}")
    sized = aux_loss_weighting == "size" or param_loss_coef
    if sized and ffn_sizes is None:
        raise ValueError(
            "MoE: aux_loss_weighting='size' and param_loss_coef weigh experts by their widths: "
            "they need ffn_sizes"
        )
    if sized and expert_choice:
        raise ValueError("MoE: router='expert_choice' has no load-balancing or parameter loss")


def add_zero_experts(x2, y, r, kinds, num_computing):
    """``y + (sum of the routing weights on identity experts) * x``: identity experts return
    their input times the weight, null experts nothing; no GEMM rows, no atomics."""
    if "identity" not in kinds:
        return y
    # Choices of an identity expert: the zero experts' ids less the null ones (comparisons
    # only: no per-call lookup table copied to the device, which would also break capture).
    on = r.ids >= num_computing
    for j, kind in enumerate(kinds):
        if kind == "null":
            on = on & (r.ids != num_computing + j)
    w = torch.where(on, r.weights, 0).sum(-1, keepdim=True)
    dt = torch.promote_types(w.dtype, x2.dtype)  # fp32 weights, fp64 inputs: in fp64
    return y + (w.to(dt) * x2.to(dt)).to(y.dtype)
