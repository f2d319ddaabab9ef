"""mixops.nn.MoE: a Mixture-of-Experts layer composed of the mixops ops.

router logits -> router_topk -> permute -> grouped_mm (gate+up) -> activation -> grouped_mm (down)
-> unpermute, plus optional shared experts. Submodule and parameter names follow HF transformers
(``gate.weight``, ``gate.e_score_correction_bias``, ``experts.gate_up_proj``,
``experts.down_proj``, ``shared_experts.{gate,up,down}_proj``), so state dicts move between the two.
"""
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._nvtx import nvtx_range
from ..ops import grouped_mm, permute, router_topk, unpermute
from .activations import GATED, act_fn, apply_activation, check_activation

__all__ = ["MoE", "MoEParts", "TopKRouter", "Experts", "MLP"]


class TopKRouter(nn.Module):
    """The router's projection: ``logits = x @ weight.T`` ([tokens, E]). With a selection bias it
    also holds ``e_score_correction_bias`` [E] (fp32 buffer, saved in the state dict)."""

    def __init__(self, hidden_size, num_experts, selection_bias=False, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, device=device, dtype=dtype))
        if selection_bias:
            self.register_buffer("e_score_correction_bias",
                                 torch.zeros(num_experts, device=device, dtype=torch.float32))
        nn.init.normal_(self.weight, std=hidden_size ** -0.5)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))  # (a no-op cast unless under autocast)

    def _apply(self, fn, recurse=True):
        # module.to(bf16) must not round the selection bias (its updates are ~1e-3 steps): it
        # follows device moves only and stays fp32.
        bias = getattr(self, "e_score_correction_bias", None)
        out = super()._apply(fn, recurse)
        if bias is not None and self.e_score_correction_bias.dtype != torch.float32:
            self.e_score_correction_bias = bias.to(self.e_score_correction_bias.device)
        return out


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
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_size, device=device,
                                                  dtype=dtype))
        nn.init.normal_(w1, std=hidden_size ** -0.5)
        nn.init.normal_(self.down_proj, std=ffn_size ** -0.5)


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


def _nvtx_enabled(x):
    # NVTX ranges on CUDA only, and not while torch.compile traces (no NVTX calls in graphs).
    return x.is_cuda and not torch.compiler.is_compiling()


def _stage(name, x):
    """An NVTX range around one stage of the layer (nsys shows router, permute, GEMMs, activation,
    unpermute, shared experts), closed even when the stage raises."""
    return nvtx_range(f"mixops.moe.{name}", enabled=_nvtx_enabled(x))


def _capacity_fraction(capacity_factor):
    if capacity_factor is None:
        return None
    if not (isinstance(capacity_factor, (int, float)) and math.isfinite(capacity_factor)
            and capacity_factor > 0):
        raise ValueError(f"MoE: capacity_factor must be a finite number > 0 (or None for dropless), "
                         f"got {capacity_factor!r}")
    return Fraction(capacity_factor).limit_denominator(1 << 20)


@dataclass
class MoEParts:
    """Existing modules for MoE to use (and share parameters with) instead of making its own:
    ``gate`` has ``weight`` [E, hidden] (and ``e_score_correction_bias`` with a selection bias;
    its forward returns the logits, or a tuple whose first item they are); ``experts`` has
    ``gate_up_proj``/``up_proj`` and ``down_proj`` in HF's layout; ``shared`` maps x -> y;
    ``shared_gate`` maps x -> [tokens, 1]. ``shared_name`` is the attribute (and state-dict prefix)
    the shared module goes under."""
    gate: nn.Module
    experts: nn.Module
    shared: Optional[nn.Module] = None
    shared_gate: Optional[nn.Module] = None
    shared_name: str = "shared_experts"


class MoE(nn.Module):
    """A Mixture-of-Experts layer: input ``[..., hidden]``, output the same shape.

    Args:
        hidden_size, ffn_size, num_experts, top_k: the layer's shape (ffn_size per expert).
        activation: ``"swiglu"`` (default), ``"geglu"``, ``"geglu_tanh"``, ``"reglu"`` (gated:
            ``experts.gate_up_proj`` [E, 2*ffn, hidden]) or ``"gelu"``, ``"gelu_tanh"``, ``"relu"``,
            ``"silu"`` (``experts.up_proj`` [E, ffn, hidden]).
        score_fn, topk_then_score, renormalize, renorm_eps, scaling, num_groups, groups_kept,
            group_score, num_modalities: router_topk's options (see ``mixops.ops.router_topk``).
        selection_bias: keep a bias buffer ``gate.e_score_correction_bias`` added to the scores for
            choosing experts only (auxiliary-loss-free balancing); see ``update_bias``.
        router_fp32: compute the router logits in fp32 (DeepSeek-V3); otherwise in the input's
            dtype (Mixtral, Qwen). The routing math itself always runs in fp32.
        shared_ffn_size: > 0 adds always-on shared experts (one MLP of that width) to the output.
        shared_expert_gate: scale the shared experts' output per token by
            ``sigmoid(shared_expert_gate(x))`` (Qwen2-MoE).
        capacity_factor: None = dropless; else each expert keeps
            ``ceil(capacity_factor * tokens * top_k / E)`` slots (GShard/Switch priority, dropped
            slots contribute zero), computed exactly in integers from the factor as a fraction
            (so it stays symbolic under torch.compile: 1.1 means 11/10, not the float 1.1).
        aux_loss_coef, z_loss_coef: weights of the load-balancing loss (HF transformers'
            ``load_balancing_loss_func`` for one layer) and the ST-MoE router z-loss; after each
            forward ``self.aux_loss`` holds their weighted sum (a 0-dim fp32 tensor with autograd).

    forward(x, token_mask=None, modality=None): ``token_mask`` [tokens] (bool, or 0/1 like an
    attention mask; any shape with x's leading dims) leaves tokens (padding)
    out of the losses and the load statistics (they are still routed); ``modality`` [tokens] int
    picks each token's expert group when ``num_modalities > 1``.
    """

    def __init__(self, hidden_size: int, ffn_size: int, num_experts: int, top_k: int, *,
                 activation: str = "swiglu", score_fn: str = "softmax",
                 topk_then_score: bool = False, renormalize: bool = True,
                 renorm_eps: float = 0.0, scaling: float = 1.0, selection_bias: bool = False,
                 num_groups: int = 1, groups_kept: int = 1, group_score: str = "top2_sum",
                 num_modalities: int = 1, router_fp32: bool = False, shared_ffn_size: int = 0,
                 shared_expert_gate: bool = False, capacity_factor: Optional[float] = None,
                 aux_loss_coef: float = 0.0, z_loss_coef: float = 0.0,
                 parts: Optional[MoEParts] = None, device=None, dtype=None):
        super().__init__()
        if parts is not None:
            shared_ffn_size = 1 if parts.shared is not None else 0
            shared_expert_gate = parts.shared_gate is not None
        _check_config(hidden_size, ffn_size, num_experts, top_k, activation, score_fn, num_groups,
                      groups_kept, group_score, num_modalities, shared_ffn_size, shared_expert_gate)
        self.hidden_size, self.ffn_size = hidden_size, ffn_size
        self.num_experts, self.top_k = num_experts, top_k
        self.activation = activation
        self.router_options = dict(score_fn=score_fn, topk_then_score=topk_then_score,
                                   renormalize=renormalize, renorm_eps=float(renorm_eps),
                                   scaling=float(scaling), num_groups=num_groups,
                                   groups_kept=groups_kept, group_score=group_score,
                                   num_modalities=num_modalities)
        self.router_fp32 = router_fp32
        self.capacity_factor = capacity_factor
        self._capacity = _capacity_fraction(capacity_factor)
        self.aux_loss_coef, self.z_loss_coef = float(aux_loss_coef), float(z_loss_coef)
        if parts is None:
            parts = MoEParts(
                gate=TopKRouter(hidden_size, num_experts, selection_bias, device=device, dtype=dtype),
                experts=Experts(hidden_size, ffn_size, num_experts, activation in GATED,
                                device=device, dtype=dtype),
                shared=(MLP(hidden_size, shared_ffn_size, activation, device=device, dtype=dtype)
                        if shared_ffn_size else None),
                shared_gate=(nn.Linear(hidden_size, 1, bias=False, device=device, dtype=dtype)
                             if shared_expert_gate else None))
        elif selection_bias and not hasattr(parts.gate, "e_score_correction_bias"):
            raise ValueError("MoE: selection_bias=True needs parts.gate.e_score_correction_bias")
        self.gate = parts.gate
        self.experts = parts.experts
        self.shared_name = parts.shared_name
        if parts.shared is not None:
            self.add_module(parts.shared_name, parts.shared)
        self.shared_expert_gate = parts.shared_gate
        self.selection_bias = selection_bias
        if device is None:
            device = parts.gate.weight.device
        # Tokens routed to each expert since the last update_bias (not saved: a training-loop state).
        self.register_buffer("tokens_per_expert",
                             torch.zeros(self.num_experts, dtype=torch.int64, device=device),
                             persistent=False)
        self.aux_loss = None

    @property
    def shared(self):
        return getattr(self, self.shared_name, None)

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, token_mask: Optional[torch.Tensor] = None,
                modality: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"MoE: x must have hidden size {self.hidden_size} in its last "
                             f"dimension, got shape {tuple(x.shape)}")
        shape = x.shape
        x2 = x.reshape(-1, self.hidden_size)
        if token_mask is not None:  # HF-style 0/1 attention masks are accepted too
            token_mask = token_mask.reshape(-1)
            if token_mask.dtype != torch.bool:
                token_mask = token_mask != 0
        if modality is not None:
            modality = modality.reshape(-1)
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            # Custom ops are not autocast: cast explicitly (weights through differentiable casts,
            # so fp32 master weights get fp32 gradients) and run the routed path without autocast.
            cdt = torch.get_autocast_dtype(dev)
            with torch.autocast(dev, enabled=False):
                y = self._routed(x2.to(cdt), token_mask, modality, cdt)
        else:
            y = self._routed(x2, token_mask, modality, None)
        shared = self.shared
        if shared is not None:
            with _stage("shared_experts", x2):
                s = shared(x2)
                if self.shared_expert_gate is not None:
                    s = torch.sigmoid(self.shared_expert_gate(x2)) * s
                y = y + s
        return y.reshape(shape)

    def _router_logits(self, x2):
        out = self.gate(x2.float() if self.router_fp32 else x2)
        return out[0] if isinstance(out, tuple) else out

    def _routed(self, x2, token_mask, modality, cast):
        num_tokens = x2.shape[0]
        E, k = self.num_experts, self.top_k
        with _stage("router", x2):
            logits = self._router_logits(x2)
            bias = None
            if self.selection_bias:
                bias = self.gate.e_score_correction_bias.float()
            r = router_topk(logits, k, bias=bias, modality=modality, token_mask=token_mask,
                            **self.router_options)
        if self.selection_bias and self.training:
            with torch.no_grad():
                self.tokens_per_expert.add_(r.counts)
        self.aux_loss = self._aux_loss(r, num_tokens, token_mask)

        capacity = None
        if self._capacity is not None:  # ceil(cf * T * k / E) in integers (T may be symbolic)
            num, den = self._capacity.numerator, self._capacity.denominator
            capacity = (num * num_tokens * k + den * E - 1) // (den * E)
        experts = self.experts
        gated = self.activation in GATED
        w1 = experts.gate_up_proj if gated else experts.up_proj
        w2 = experts.down_proj
        if cast is not None:
            w1, w2 = w1.to(cast), w2.to(cast)
        with _stage("permute", x2):
            p = permute(x2, r.ids, E, capacity=capacity)
        with _stage("gate_up_gemm", x2):
            h = grouped_mm(p.x_sorted, w1.transpose(1, 2), p.offsets)
        with _stage("activation", x2):
            a = apply_activation(self.activation, h)
        with _stage("down_gemm", x2):
            o = grouped_mm(a, w2.transpose(1, 2), p.offsets)
        with _stage("unpermute", x2):
            y = unpermute(o, p.row_map, r.weights)
        return y

    def _aux_loss(self, r, num_tokens, token_mask):
        if not (self.aux_loss_coef or self.z_loss_coef):
            return None
        loss = r.lse.new_zeros(())
        if token_mask is None:
            n = float(max(num_tokens, 1)) if isinstance(num_tokens, int) else num_tokens
        else:
            n = token_mask.sum().clamp(min=1).to(r.lse.dtype)
        if self.aux_loss_coef:
            f = r.counts.to(r.score_sum.dtype) / n
            p = r.score_sum / n
            loss = loss + self.aux_loss_coef * self.num_experts * (f * p).sum()
        if self.z_loss_coef:
            z = r.lse.square()
            if token_mask is not None:
                z = torch.where(token_mask, z, z.new_zeros(()))
            loss = loss + self.z_loss_coef * z.sum() / n
        return loss

    # -- training-loop API ------------------------------------------------------------------------
    @torch.no_grad()
    def update_bias(self, rate: float, group=None) -> torch.Tensor:
        """Auxiliary-loss-free balancing (DeepSeek-V3): ``bias += rate * sign(mean_load - load)``,
        where ``load`` counts the tokens routed to each expert by the training forwards since the
        last call, summed over ``group`` (a torch.distributed process group) first when given.
        Resets the count and returns the load that was used."""
        if not self.selection_bias:
            raise RuntimeError("MoE.update_bias: this layer has no selection bias "
                               "(construct it with selection_bias=True)")
        load = self.tokens_per_expert.to(torch.float32)
        if group is not None:
            import torch.distributed as dist
            dist.all_reduce(load, op=dist.ReduceOp.SUM, group=group)
        bias = self.gate.e_score_correction_bias
        bias.add_((rate * torch.sign(load.mean() - load)).to(bias.dtype))
        self.tokens_per_expert.zero_()
        return load

    def extra_repr(self):
        opts = ", ".join(f"{k}={v}" for k, v in self.router_options.items())
        return (f"hidden={self.hidden_size}, ffn={self.ffn_size}, experts={self.num_experts}, "
                f"top_k={self.top_k}, activation={self.activation}, {opts}, "
                f"selection_bias={self.selection_bias}, capacity_factor={self.capacity_factor}")


def _check_config(hidden_size, ffn_size, num_experts, top_k, activation, score_fn, num_groups,
                  groups_kept, group_score, num_modalities, shared_ffn_size, shared_expert_gate):
    for name, v in (("hidden_size", hidden_size), ("ffn_size", ffn_size),
                    ("num_experts", num_experts), ("top_k", top_k), ("num_groups", num_groups),
                    ("groups_kept", groups_kept), ("num_modalities", num_modalities)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"MoE: {name} must be a positive int, got {v!r}")
    check_activation(activation)
    if score_fn not in ("softmax", "sigmoid", "none"):
        raise ValueError(f"MoE: score_fn must be 'softmax', 'sigmoid' or 'none', got {score_fn!r}")
    if group_score not in ("top2_sum", "max"):
        raise ValueError(f"MoE: group_score must be 'top2_sum' or 'max', got {group_score!r}")
    if num_experts % num_groups:
        raise ValueError(f"MoE: num_groups ({num_groups}) must divide num_experts ({num_experts})")
    if groups_kept > num_groups:
        raise ValueError(f"MoE: groups_kept ({groups_kept}) must be <= num_groups ({num_groups})")
    if num_experts % num_modalities:
        raise ValueError(f"MoE: num_modalities ({num_modalities}) must divide num_experts "
                         f"({num_experts})")
    if num_groups > 1 and num_modalities > 1:
        raise ValueError("MoE: num_groups > 1 and num_modalities > 1 cannot be combined")
    pool = num_experts // num_modalities
    if num_groups > 1:
        pool = groups_kept * (num_experts // num_groups)
    if top_k > pool:
        raise ValueError(f"MoE: top_k ({top_k}) must be <= the experts a token can choose from "
                         f"({pool}: num_experts={num_experts}, num_groups={num_groups}, "
                         f"groups_kept={groups_kept}, num_modalities={num_modalities})")
    if group_score == "top2_sum" and num_groups > 1 and num_experts // num_groups < 2:
        raise ValueError("MoE: group_score='top2_sum' needs at least 2 experts per group")
    if not isinstance(shared_ffn_size, int) or shared_ffn_size < 0:
        raise ValueError(f"MoE: shared_ffn_size must be an int >= 0, got {shared_ffn_size!r}")
    if shared_expert_gate and not shared_ffn_size:
        raise ValueError("MoE: shared_expert_gate needs shared experts (shared_ffn_size > 0)")
