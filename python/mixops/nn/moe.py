"""mixops.nn.MoE: a Mixture-of-Experts layer composed of the mixops ops (its router and experts
live in router.py and experts.py), and MoEParts, to build one around existing modules.

router logits -> router_topk -> permute -> grouped_mm (gate+up) -> activation -> grouped_mm (down)
-> unpermute, plus optional shared experts. Submodule and parameter names follow HF transformers
(``gate.weight``, ``gate.e_score_correction_bias``, ``experts.gate_up_proj``,
``experts.down_proj``, ``shared_experts.{gate,up,down}_proj``), so state dicts move between the two.
The options' parsing is in moe_config.py, the staged API (dispatch_start, run_experts,
combine_finish) in moe_staged.py, reset_parameters and update_bias in moe_training.py, LoRA on the
experts (add_lora, merge_lora, ...) in moe_lora.py.
"""

from types import SimpleNamespace
from typing import Optional

import torch
from torch import nn

from .._nvtx import nvtx_range
from ..ops import permute, router_topk, unpermute
from .activations import GATED
from .expert_choice import expert_choice_config, expert_choice_routed
from .experts import MLP, _cast_weights, _fsdp_sharded, expert_mlp
from .moe_config import (
    MoEParts,
    _capacity_fraction,
    _check_layer,
    _check_packed_parts,
    _check_size_losses,
    _experts_widths,
    _router_config,
    _zero_kinds,
    add_zero_experts,
    per_token,
    slot_capacity,
)
from .moe_lora import MoELoRA

# StagedCall, autocast_dtype and no_autocast: parallel/moe.py and integrations/jetmoe.py import
# them from here.
from .moe_staged import StagedCall as StagedCall
from .moe_staged import StagedMoE, below_autograd_without_grad
from .moe_staged import autocast_dtype as autocast_dtype
from .moe_staged import no_autocast as no_autocast
from .moe_training import TrainingLoopAPI
from .packed_experts import PackedExperts, check_ffn_sizes, make_experts, size_weights
from .router import RouterConfig, TopKRouter
from .router_losses import router_losses

__all__ = ["MoE", "MoEParts"]


def _nvtx_enabled(x):
    # NVTX ranges on CUDA only, and not while torch.compile traces (no NVTX calls in graphs).
    return x.is_cuda and not torch.compiler.is_compiling()


def _stage(name, x):
    """An NVTX range around one stage of the layer (nsys shows router, permute, GEMMs, activation,
    unpermute, shared experts), closed even when the stage raises."""
    return nvtx_range(f"mixops.moe.{name}", enabled=_nvtx_enabled(x))


class MoE(StagedMoE, TrainingLoopAPI, MoELoRA, nn.Module):
    """A Mixture-of-Experts layer: input ``[..., hidden]``, output the same shape.

    Args:
        hidden_size, ffn_size, num_experts, top_k: the layer's shape (ffn_size per expert);
            ``num_experts`` and ``top_k`` may be left out when ``router`` is given.
        ffn_sizes: instead of ffn_size, one width per computing expert (HMoE, AutoMoE;
            ``num_experts`` may be left out): ``experts`` is a ``PackedExperts``, packed weights
            without padding (nn/packed_experts.py, with ``to_padded``/``from_padded``); token
            and expert choice, capacity, shared and zero experts work; expert parallelism and
            ``add_lora`` refuse it. Widths that are multiples of 8 keep the GPU fast paths.
        router: a ``RouterConfig`` (how tokens choose experts), or ``"expert_choice"``: each
            expert picks its ``min(T, ceil(capacity_factor * T / E))`` best tokens by their softmax
            scores over the experts (Zhou et al. 2022; ``top_k`` must not be given; a token may get
            0..E experts; it looks across every token of the batch, so it is not causal, see
            ``causal``; padding tokens of ``token_mask`` are never picked; ``z_loss_coef``
            applies, ``aux_loss_coef`` must be 0: balanced by construction). Instead of a
            RouterConfig, its options may be given as keywords: ``score_fn``,
            ``topk_then_score``, ``renormalize``, ``renorm_eps``, ``scaling``, ``num_groups``,
            ``groups_kept``, ``group_score``, ``num_modalities`` (``mixops.ops.router_topk``'s
            options), ``selection_bias`` (a buffer
            ``gate.e_score_correction_bias`` added to the scores for choosing only; see
            ``update_bias``) and ``router_fp32`` (router logits in fp32, DeepSeek-V3; the routing
            math itself always runs in fp32).
        activation: ``"swiglu"`` (default), ``"geglu"``, ``"geglu_tanh"``, ``"reglu"`` (gated:
            ``experts.gate_up_proj`` [E, 2*ffn, hidden]) or ``"gelu"``, ``"gelu_tanh"``, ``"relu"``,
            ``"silu"`` (``experts.up_proj`` [E, ffn, hidden]).
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
        aux_loss_weighting, param_loss_coef (with ffn_sizes): ``"size"`` makes the balancing loss
            HMoE's P-Penalty loss (size-aware, charging large experts more); ``param_loss_coef``
            weighs a size penalty of mixops' own, not HMoE's (formulas: nn/router_losses.py).
            Default ``"tokens"``, 0.
        zero_experts: zero-computation experts the router may choose besides the computing ones
            (LongCat-Flash, AdaMoE): an int Z (Z identity experts) or a sequence of "identity"
            (returns its input times the routing weight) / "null" (returns zero). With
            ``num_experts`` E the router chooses among E + Z (ids E .. E + Z - 1 are the zero
            experts; a given RouterConfig counts all E + Z); they take no GEMM rows (permute
            skips them), their share is added in the combine, and the load counts, losses and
            selection bias cover all E + Z. ``experts`` holds the E computing experts.
        parts: existing modules to build the layer around (see ``MoEParts``).
        causal: whether the layer is in a causal model (a decoder); only expert choice uses it.
            True: expert choice warns on its first forward (it leaks later tokens into earlier
            outputs); None (unknown): it warns on a decoding step's ``[batch, 1, hidden]``; False
            (encoders, non-causal training): never. Once per layer.

    forward(x, token_mask=None, modality=None): ``token_mask`` (bool, or 0/1 like an attention
    mask; shaped as x's leading dims, e.g. ``[batch, seq]``, or flat ``[tokens]``; another shape
    raises) leaves tokens (padding) out of the losses and the load statistics (they are still
    routed); ``modality`` int (same shapes) picks each token's expert group when
    ``num_modalities > 1``.

    Built on the meta device: ``to_empty(device=...)`` then ``reset_parameters()``. LoRA on the
    routed experts: ``add_lora`` (moe_lora.py).
    """

    def __init__(
        self,
        hidden_size: int,
        ffn_size: Optional[int] = None,
        num_experts: Optional[int] = None,
        top_k: Optional[int] = None,
        *,
        router: Optional[RouterConfig] = None,
        activation: str = "swiglu",
        shared_ffn_size: int = 0,
        shared_expert_gate: bool = False,
        capacity_factor: Optional[float] = None,
        aux_loss_coef: float = 0.0,
        z_loss_coef: float = 0.0,
        zero_experts=None,
        parts: Optional[MoEParts] = None,
        causal: Optional[bool] = None,
        ffn_sizes=None,
        aux_loss_weighting: str = "tokens",
        param_loss_coef: float = 0.0,
        device=None,
        dtype=None,
        **router_options,
    ):
        super().__init__()
        if ffn_sizes is not None:  # one width per computing expert: num_experts may be left out
            ffn_sizes = check_ffn_sizes(ffn_sizes)
            if num_experts is None and not isinstance(router, RouterConfig):
                num_experts = len(ffn_sizes)
        self.expert_choice = isinstance(router, str) and router == "expert_choice"
        self.zero_experts = _zero_kinds(zero_experts)
        if self.zero_experts and self.expert_choice:
            raise ValueError("MoE: zero_experts are for token choice, not expert choice")
        if self.expert_choice:
            router = expert_choice_config(
                num_experts, top_k, capacity_factor, aux_loss_coef, router_options
            )
        if causal is not None and not isinstance(causal, bool):
            raise ValueError(f"MoE: causal must be True, False or None, got {causal!r}")
        self.causal = causal
        if self.zero_experts and router is None and isinstance(num_experts, int):
            num_experts += len(self.zero_experts)  # the router chooses among E + Z
        router = _router_config(num_experts, top_k, router, router_options)
        if router.num_experts <= len(self.zero_experts):
            raise ValueError(
                f"MoE: the router's {router.num_experts} choices must include computing experts "
                f"besides the {len(self.zero_experts)} zero_experts"
            )
        if parts is not None:
            shared_ffn_size = 1 if parts.shared is not None else 0
            shared_expert_gate = parts.shared_gate is not None
        E = router.num_experts
        Ec = E - len(self.zero_experts)  # the computing experts
        ffn_size, ffn_sizes = _experts_widths(ffn_size, ffn_sizes, Ec)
        _check_layer(hidden_size, ffn_size, activation, shared_ffn_size, shared_expert_gate)
        _check_size_losses(aux_loss_weighting, param_loss_coef, ffn_sizes, self.expert_choice)
        self.hidden_size, self.ffn_size, self.ffn_sizes = hidden_size, ffn_size, ffn_sizes
        self.aux_loss_weighting, self.param_loss_coef = aux_loss_weighting, float(param_loss_coef)
        self.router_config = router
        self._router_kwargs = router.op_kwargs()
        self.activation = activation
        self.capacity_factor = capacity_factor
        self._capacity = _capacity_fraction(capacity_factor)
        self.aux_loss_coef, self.z_loss_coef = float(aux_loss_coef), float(z_loss_coef)
        if parts is None:
            # Built in the order reset_parameters() initialises them (draw for draw).
            gate = TopKRouter(hidden_size, E, router.selection_bias, device=device, dtype=dtype)
            gated = activation in GATED
            experts = make_experts(hidden_size, ffn_size, ffn_sizes, Ec, gated, device, dtype)
            parts = MoEParts(
                gate=gate,
                experts=experts,
                shared=(
                    MLP(hidden_size, shared_ffn_size, activation, device=device, dtype=dtype)
                    if shared_ffn_size
                    else None
                ),
                shared_gate=(
                    nn.Linear(hidden_size, 1, bias=False, device=device, dtype=dtype)
                    if shared_expert_gate
                    else None
                ),
            )
        elif router.selection_bias and not hasattr(parts.gate, "e_score_correction_bias"):
            raise ValueError("MoE: selection_bias=True needs parts.gate.e_score_correction_bias")
        else:
            _check_packed_parts(parts.experts, ffn_sizes, activation in GATED)
        self.gate_name = parts.gate_name
        self.add_module(parts.gate_name, parts.gate)
        self.experts = parts.experts
        self.shared_name = parts.shared_name
        if parts.shared is not None:
            self.add_module(parts.shared_name, parts.shared)
        self.shared_expert_gate = parts.shared_gate
        if device is None:
            device = next(parts.gate.parameters()).device
        # Tokens routed to each expert since the last update_bias (not saved: a training-loop state).
        self.register_buffer(
            "tokens_per_expert", torch.zeros(E, dtype=torch.int64, device=device), persistent=False
        )
        self.aux_loss = None

    # The router's shape and flags, read from its config (which is immutable).
    # The router's choices (computing experts, then zero-computation experts).
    num_experts = property(lambda self: self.router_config.num_experts)
    # The computing (GEMM) experts: ids 0 .. num_computing_experts - 1.
    num_computing_experts = property(lambda self: self.num_experts - len(self.zero_experts))
    top_k = property(lambda self: self.router_config.top_k)
    selection_bias = property(lambda self: self.router_config.selection_bias)
    router_fp32 = property(lambda self: self.router_config.router_fp32)

    @property
    def shared(self):
        return getattr(self, self.shared_name, None)

    @property
    def gate(self):
        """The router module (which makes the logits), under ``gate_name``."""
        gate = self._modules.get(self.__dict__.get("gate_name", "gate"))
        if gate is None:  # (nn.Module.add_module asks hasattr before the router is added)
            raise AttributeError("MoE.gate: the router is not set yet")
        return gate

    # -- training-loop API (reset_parameters, reset_buffers, update_bias): moe_training.py ------

    # -- forward ----------------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        token_mask: Optional[torch.Tensor] = None,
        modality: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        # The three stages back to back (on one process nothing travels between them). Custom ops
        # are not autocast: under autocast the routed path runs without it, on explicit casts
        # (weights through differentiable casts, so fp32 master weights get fp32 gradients).
        with below_autograd_without_grad():  # (no_grad: the ops' autograd kernels are skipped)
            return self.combine_finish(
                self.run_experts(self.dispatch_start(x, token_mask, modality))
            )

    def _flatten(self, x, token_mask, modality):
        """x as [tokens, hidden], token_mask as bool [tokens], modality as [tokens]."""
        if x.shape[-1] != self.hidden_size:
            raise ValueError(
                f"MoE: x must have hidden size {self.hidden_size} in its last "
                f"dimension, got shape {tuple(x.shape)}"
            )
        w = self.experts.down_proj
        # The gate's dtype too: under FSDP2 mixed precision the gate is gathered in param_dtype
        # (the input's) before this call, the separately sharded experts only inside theirs.
        gate_w = getattr(self.gate, "weight", None) if _fsdp_sharded(self.experts) else None
        ok = (w.dtype,) if gate_w is None else (w.dtype, gate_w.dtype)
        if x.dtype not in ok and autocast_dtype(x) is None:
            raise ValueError(
                f"MoE: x is {x.dtype} but the layer's weights are {w.dtype}: convert the layer "
                f"(moe.to({x.dtype})) or the input (x.to({w.dtype})), or run under torch.autocast"
            )
        x2 = x.reshape(-1, self.hidden_size)
        lead = x.shape[:-1]
        token_mask = per_token("MoE", "token_mask", token_mask, lead, x2.shape[0])
        if token_mask is not None and token_mask.dtype != torch.bool:
            token_mask = token_mask != 0  # HF-style 0/1 attention masks are accepted too
        modality = per_token("MoE", "modality", modality, lead, x2.shape[0])
        return x2, token_mask, modality

    # -- the stages' parts (the stages themselves: StagedMoE, in moe_staged.py) -------------------
    def _add_shared(self, x2, y):
        """y + the shared experts' output (gated per token when there is a shared_expert_gate)."""
        s = self._shared_out(x2)
        return y if s is None else y + s

    def _shared_out(self, x2):
        """The shared experts' output on x2 (gated per token when there is a shared_expert_gate),
        or None without shared experts."""
        shared = self.shared
        if shared is None:
            return None
        with _stage("shared_experts", x2):
            s = shared(x2)
            if self.shared_expert_gate is not None:
                s = torch.sigmoid(self.shared_expert_gate(x2)) * s
            return s

    def _router_logits(self, x2):
        out = self.gate(x2.float() if self.router_fp32 else x2)
        return out[0] if isinstance(out, tuple) else out

    def _route(self, x2, token_mask, modality):
        """The router (top-k, the load counter, the losses) and the capacity: (r, capacity)."""
        num_tokens = x2.shape[0]
        E, k = self.num_experts, self.top_k
        with _stage("router", x2):
            logits = self._router_logits(x2)
            bias = None
            if self.selection_bias:
                bias = self.gate.e_score_correction_bias.float()
            r = router_topk(
                logits, bias=bias, modality=modality, token_mask=token_mask, **self._router_kwargs
            )
        if self.selection_bias and self.training:
            with torch.no_grad():
                self.tokens_per_expert.add_(r.counts)
        by_size = self.aux_loss_weighting == "size"  # HMoE's options: router_losses.py
        w = None
        if by_size or self.param_loss_coef:
            w = size_weights(self.experts.ffn_ends[1], len(self.zero_experts))
        coefs = (self.aux_loss_coef, self.z_loss_coef)
        self.aux_loss = router_losses(r, num_tokens, token_mask, E, *coefs, w, by_size,
                                      self.param_loss_coef)  # fmt: skip
        return r, slot_capacity(self._capacity, num_tokens, k, E)

    def _experts_routed(self, x2, r, capacity, cast):
        """permute -> the experts' grouped GEMMs (+ their LoRA adapters) -> unpermute (expert
        parallelism replaces it), plus the zero-computation experts' share."""
        E = self.num_computing_experts
        w1, w2 = self._expert_weights(cast)
        with _stage("permute", x2):
            p = permute(x2, self._computing_ids(r.ids), E, capacity=capacity)
        ad = self.lora_adapters()
        o = expert_mlp(p.x_sorted, p.offsets, w1, w2, self.activation, ad, _stage, self._packed())
        with _stage("unpermute", x2):
            y = unpermute(o, p.row_map, r.weights)
        return self._add_zero_experts(x2, y, r)

    def _computing_ids(self, ids):
        """ids with the zero-computation experts' choices as -1 (permute leaves them out)."""
        if not self.zero_experts:
            return ids
        return torch.where(ids < self.num_computing_experts, ids, -1)

    def _add_zero_experts(self, x2, y, r):
        """``y`` plus the zero-computation experts' share (moe_config.add_zero_experts)."""
        return add_zero_experts(x2, y, r, self.zero_experts, self.num_computing_experts)

    def _expert_weights(self, cast):
        """The experts' first (gate_up or up) and down projections, cast to ``cast`` when given
        (differentiable casts: fp32 master weights get fp32 gradients)."""
        gated = self.activation in GATED
        w1 = self.experts.gate_up_proj if gated else self.experts.up_proj
        return _cast_weights(w1, self.experts.down_proj, cast)

    def _packed(self):
        """The packed experts' spec (experts of different widths, ffn_sizes), else None."""
        return self.experts.spec() if isinstance(self.experts, PackedExperts) else None

    def _expert_choice_routed(self, x2, token_mask, cast):
        w1, w2 = self._expert_weights(cast)
        with _stage("router", x2):
            logits = self._router_logits(x2)
        # The router z-loss as token choice computes it (no aux loss: balanced by construction).
        self.aux_loss = None
        if self.z_loss_coef:
            lse = torch.logsumexp(logits.double() if logits.dtype == torch.float64 else
                                  logits.float(), dim=-1)  # fmt: skip
            self.aux_loss = router_losses(
                SimpleNamespace(lse=lse), x2.shape[0], token_mask, None, 0.0, self.z_loss_coef
            )
        with _stage("expert_choice", x2):
            return expert_choice_routed(
                logits, x2, w1, w2, self.activation, self._capacity, token_mask,
                self.lora_adapters(), self._packed(),
            )  # fmt: skip

    def extra_repr(self):
        ffn = self.ffn_size if self.ffn_sizes is None else list(self.ffn_sizes)
        return (
            f"hidden={self.hidden_size}, ffn={ffn}, activation={self.activation}, "
            f"capacity_factor={self.capacity_factor},\n{self.router_config}"
        )
