"""mixops.nn.LoRAMoE: a mixture of LoRA experts around a frozen ``nn.Linear`` (MixLoRA, MoLA,
LoRAMoE, Octavius, PERFT), and ``lora_moe_aux_loss``, the sum of a model's LoRA-MoE router losses.

``y = base(x) + sum_j w_j * scale * B_{e_j} A_{e_j} x  [+ scale_s * B_s A_s x]``: the router
(``TopKRouter`` + ``router_topk``, every ``RouterConfig`` option) picks ``top_k`` of
``num_experts`` adapters per token, ``permute`` groups the token rows by adapter,
``lora_delta`` (nn/lora.py) runs the two thin grouped GEMMs, ``unpermute`` combines them with the
routing weights; an optional shared adapter is always on. The layer keeps the base's Parameters
as its own ``weight`` / ``bias``, so a wrapped HF projection keeps its checkpoint keys (see
``LoRAMoE``).
"""

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import permute, router_topk, unpermute
from .lora import ProjectionAdapter, lora_delta
from .moe_config import _router_config, per_token
from .moe_staged import autocast_dtype, no_autocast
from .moe_training import TrainingLoopAPI
from .router import RouterConfig, TopKRouter
from .router_losses import router_losses

__all__ = ["LoRAMoE", "lora_moe_aux_loss"]


def _positive_int(name, v):
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"LoRAMoE: {name} must be a positive int, got {v!r}")
    return v


class LoRAMoE(TrainingLoopAPI, nn.Module):
    """A mixture of LoRA experts around a frozen linear layer: input ``[..., in]``, output
    ``[..., out]``, ``y = base(x) + sum_j w_j * scale * B_{e_j} A_{e_j} dropout(x)`` over the
    token's ``top_k`` routed adapters (plus the shared adapter when there is one).

    Args:
        base: the ``nn.Linear`` to wrap (its class's forward must be ``nn.Linear.forward``). Its
            ``weight`` [out, in] and ``bias`` [out] Parameters become this module's own
            ``weight`` / ``bias`` (the same objects, any dtype), so the state-dict keys of the
            wrapped layer are the base's keys plus the adapters': a checkpoint of the
            original model loads into the wrapped one with only the adapters missing, and one of
            the wrapped model into the original with only the adapters unexpected. (No
            ``base_layer.`` prefix, no key-renaming hooks: ``named_parameters()``, the state
            dict, optimizers and HF's loaders all see the same names.)
        num_experts, top_k: ``top_k`` of ``num_experts`` adapters per token; may be left out
            when ``router`` is given.
        rank: the adapters' rank r. ``alpha``: their scale is ``alpha / r`` (PEFT's default
            alpha 8), or ``alpha / sqrt(r)`` with ``use_rslora``.
        dropout: dropout probability on the adapters' input (each routed row, and the shared
            adapter's input, draws its own mask; the base sees x itself).
        shared_adapter: False, True (an always-on adapter of rank ``rank``) or its rank (int).
        router: a ``RouterConfig``, or its options as keywords (``score_fn``, ``renormalize``,
            ``topk_then_score``, ``renorm_eps``, ``scaling``, ``num_groups``, ``groups_kept``,
            ``group_score``, ``num_modalities``, ``selection_bias``, ``router_fp32``; see
            ``mixops.nn.MoE``).
        aux_loss_coef, z_loss_coef: after each forward ``self.aux_loss`` holds
            ``aux_loss_coef`` x the load-balancing loss + ``z_loss_coef`` x the router z-loss
            (as ``mixops.nn.MoE``), or None when both are 0.
        freeze_base: set ``requires_grad=False`` on the base's Parameters.
        dtype: the adapters' and router's dtype (default: the base weight's).

    Parameters: ``weight``, ``bias`` (the base's), ``gate.weight`` [E, in] (the router; with a
    selection bias the buffer ``gate.e_score_correction_bias``), ``lora_A`` [E, r, in],
    ``lora_B`` [E, out, r], and with a shared adapter ``shared_lora_A`` [r_s, in],
    ``shared_lora_B`` [out, r_s]. Initialised as PEFT: A kaiming-uniform(a=sqrt(5)) per expert
    (U(-1/sqrt(in), 1/sqrt(in))), B zero, so a new layer equals its base exactly.

    Numerics: the base runs as ``nn.Linear`` would (under the caller's autocast if any). The
    adapter path (router, grouped GEMMs, combine) runs in the adapters' dtype (x is cast to it,
    as PEFT does: fp32 adapters on a bf16 base compute in fp32), or under autocast in the autocast
    dtype; its result is cast to the base output's dtype and added.

    Routing is dropless (no capacity); ``update_bias`` balances a selection bias as in MoE.

    forward(x, token_mask=None, modality=None): as ``mixops.nn.MoE`` (``token_mask`` leaves
    padding out of the losses and load counts; ``modality`` with ``num_modalities > 1``).
    Without ``token_mask``, ``self.padding_mask`` (None, or a ``[batch, length]`` 0/1 mask that
    an integration sets: ``add_lora_moe`` gives every layer the HF model's ``attention_mask``)
    serves for inputs ``[batch, seq, in]`` with ``seq <= length``: its last ``seq`` columns (a
    decoding step's new tokens, or ``lm_head``'s kept positions).
    """

    def __init__(
        self,
        base: nn.Linear,
        num_experts: Optional[int] = None,
        top_k: Optional[int] = None,
        rank: int = 8,
        *,
        alpha: float = 8.0,
        use_rslora: bool = False,
        dropout: float = 0.0,
        shared_adapter: Union[bool, int] = False,
        router: Optional[RouterConfig] = None,
        aux_loss_coef: float = 0.0,
        z_loss_coef: float = 0.0,
        freeze_base: bool = True,
        dtype=None,
        **router_options,
    ):
        super().__init__()
        if not isinstance(base, nn.Linear) or type(base).forward is not nn.Linear.forward:
            raise TypeError(
                "LoRAMoE: base must be an nn.Linear (whose forward is nn.Linear.forward), "
                f"got {type(base).__name__}"
            )
        cfg = _router_config(num_experts, top_k, router, router_options, who="LoRAMoE")
        rank = _positive_int("rank", rank)
        if isinstance(shared_adapter, bool):
            shared_rank = rank if shared_adapter else 0
        else:
            shared_rank = _positive_int("shared_adapter (its rank, or True/False)", shared_adapter)
        for name, v in (("alpha", alpha), ("aux_loss_coef", aux_loss_coef),
                        ("z_loss_coef", z_loss_coef)):  # fmt: skip
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ValueError(f"LoRAMoE: {name} must be a finite number, got {v!r}")
        if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"LoRAMoE: dropout must be a number in [0, 1), got {dropout!r}")
        if not isinstance(use_rslora, bool):
            raise ValueError(f"LoRAMoE: use_rslora must be a bool, got {use_rslora!r}")

        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)  # a Parameter or None, as nn.Linear
        if freeze_base:
            for p in (self.weight, self.bias):
                if p is not None:
                    p.requires_grad_(False)
        self.router_config = cfg
        self._router_kwargs = cfg.op_kwargs()
        self.rank, self.shared_rank, self.alpha = rank, shared_rank, float(alpha)
        self.use_rslora = use_rslora
        self.scale = float(alpha) / (math.sqrt(rank) if use_rslora else rank)
        self.shared_scale = (
            float(alpha) / (math.sqrt(shared_rank) if use_rslora else shared_rank)
            if shared_rank
            else 0.0
        )
        self.aux_loss_coef, self.z_loss_coef = float(aux_loss_coef), float(z_loss_coef)
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()

        E, (out_f, in_f) = cfg.num_experts, self.weight.shape
        device = self.weight.device
        if dtype is None:
            dtype = self.weight.dtype if self.weight.dtype.is_floating_point else torch.float32
        kw = dict(device=device, dtype=dtype)
        self.gate = TopKRouter(in_f, E, cfg.selection_bias, **kw)
        self.lora_A = nn.Parameter(torch.empty(E, rank, in_f, **kw))
        self.lora_B = nn.Parameter(torch.empty(E, out_f, rank, **kw))
        if shared_rank:
            self.shared_lora_A = nn.Parameter(torch.empty(shared_rank, in_f, **kw))
            self.shared_lora_B = nn.Parameter(torch.empty(out_f, shared_rank, **kw))
        self.register_buffer(
            "tokens_per_expert", torch.zeros(E, dtype=torch.int64, device=device), persistent=False
        )
        self.aux_loss = None
        self.padding_mask = None
        self.reset_parameters()

    num_experts = property(lambda self: self.router_config.num_experts)
    top_k = property(lambda self: self.router_config.top_k)
    selection_bias = property(lambda self: self.router_config.selection_bias)

    @torch.no_grad()
    def reset_parameters(self):
        """Initialise the adapters (A kaiming-uniform(a=sqrt(5)) per expert, B zero: PEFT's
        init) and the router (``TopKRouter.reset_parameters``), zero the load counter. The base
        is left as it is. For a layer materialised with ``to_empty()``, or to start over."""
        for a in (self.lora_A, getattr(self, "shared_lora_A", None)):
            if a is not None:
                bound = 1.0 / math.sqrt(a.shape[-1])  # kaiming_uniform_(a=sqrt(5)), fan_in = in
                a.uniform_(-bound, bound)
        for b in (self.lora_B, getattr(self, "shared_lora_B", None)):
            if b is not None:
                b.zero_()
        self.gate.reset_parameters()
        self.reset_buffers()

    def forward(
        self,
        x: torch.Tensor,
        token_mask: Optional[torch.Tensor] = None,
        modality: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"LoRAMoE: x must have {self.in_features} features in its last dimension, "
                f"got shape {tuple(x.shape)}"
            )
        cast = autocast_dtype(x)
        if cast is None and x.dtype != self.weight.dtype:
            raise ValueError(
                f"LoRAMoE: x is {x.dtype} but the base weight is {self.weight.dtype}: convert "
                f"one of them, or run under torch.autocast"
            )
        y = F.linear(x, self.weight, self.bias)  # the base, exactly as nn.Linear runs it
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if token_mask is None:
            token_mask = self._from_padding_mask(lead)
        token_mask = per_token("LoRAMoE", "token_mask", token_mask, lead, x2.shape[0])
        if token_mask is not None and token_mask.dtype != torch.bool:
            token_mask = token_mask != 0
        modality = per_token("LoRAMoE", "modality", modality, lead, x2.shape[0])
        with no_autocast(x, cast):  # custom ops are not autocast: cast explicitly
            delta = self._adapters(x2.to(cast or self.lora_A.dtype), token_mask, modality)
        return y + delta.to(y.dtype).view(y.shape)

    def _from_padding_mask(self, lead):
        """The last ``seq`` columns of ``padding_mask`` for an input ``[batch, seq, in]``, or None
        (no mask, or one that does not fit)."""
        m = self.padding_mask
        if m is None or len(lead) != 2 or m.dim() != 2:
            return None
        if m.shape[0] != lead[0] or m.shape[1] < lead[1]:
            return None
        return m[:, m.shape[1] - lead[1] :]

    def _adapters(self, xa, token_mask, modality):
        """The routed adapters' sum (and the shared adapter) on xa [T, in]: [T, out]."""
        cfg = self.router_config
        fp32 = cfg.router_fp32 and xa.dtype != torch.float64
        logits = self.gate(xa.float() if fp32 else xa)
        bias = self.gate.e_score_correction_bias.float() if cfg.selection_bias else None
        r = router_topk(
            logits, bias=bias, modality=modality, token_mask=token_mask, **self._router_kwargs
        )
        if cfg.selection_bias and self.training:
            with torch.no_grad():
                self.tokens_per_expert.add_(r.counts)
        self.aux_loss = router_losses(
            r, xa.shape[0], token_mask, cfg.num_experts, self.aux_loss_coef, self.z_loss_coef
        )
        drop = None if isinstance(self.lora_dropout, nn.Identity) else self.lora_dropout
        p = permute(xa, r.ids, cfg.num_experts)
        rows = lora_delta(
            p.x_sorted, p.offsets, ProjectionAdapter(self.lora_A, self.lora_B, self.scale, drop)
        )
        delta = unpermute(rows, p.row_map, r.weights)
        if self.shared_rank:
            xs = self.lora_dropout(xa)
            t = F.linear(xs, self.shared_lora_A.to(xa.dtype))
            delta = delta + F.linear(t, self.shared_lora_B.to(xa.dtype)) * self.shared_scale
        return delta

    def __getstate__(self):
        # aux_loss is the last call's result, with its autograd graph: copies and pickles leave
        # it out (deepcopy of a graph's non-leaf tensor raises).
        state = dict(super().__getstate__())
        state["aux_loss"] = state["padding_mask"] = None
        return state

    def extra_repr(self):
        shared = f", shared_rank={self.shared_rank}" if self.shared_rank else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, rank={self.rank}, alpha={self.alpha}, "
            f"use_rslora={self.use_rslora}{shared},\n{self.router_config}"
        )


def lora_moe_aux_loss(model: nn.Module, reduction: str = "sum") -> Optional[torch.Tensor]:
    """The ``aux_loss`` of every ``LoRAMoE`` in ``model`` from its last forward, summed
    (``reduction="sum"``) or averaged over the layers that have one (``"mean"``, as HF's
    Mixtral-style ``router_aux_loss_coef`` scales one loss for the whole model): add it to the
    training loss. None when no layer has one (both coefficients 0)."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"lora_moe_aux_loss: reduction must be 'sum' or 'mean', got {reduction!r}")
    losses = [m.aux_loss for m in model.modules() if isinstance(m, LoRAMoE)]
    losses = [a for a in losses if a is not None]
    if not losses:
        return None
    total = losses[0]
    for a in losses[1:]:
        total = total + a
    return total / len(losses) if reduction == "mean" else total
