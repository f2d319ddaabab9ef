"""mixops.nn.MoA: Mixture of Attention heads (Zhang et al. 2022; JetMoE's attention), composed of
the mixops ops. Each token chooses k of E attention experts; expert e owns a query projection
``hidden -> num_kv_heads * head_dim`` and an output projection back; keys and values come from one
shared projection (``num_kv_heads`` heads), cached once per token whatever k is.

router -> permute -> grouped_mm (queries) -> rows_to_slots -> RoPE -> SDPA -> slots_to_rows
-> grouped_mm (output projection) -> unpermute (gates) -> + bias

Head order: slot j's query head h is SDPA head ``h * k + j``, so ``enable_gqa`` maps it to key/value
head h (JetMoE's pairing, which HF makes by repeating K/V k times; mixops never copies K/V). The slot
layout ``[tokens, num_kv_heads, k, head_dim]`` that ``rows_to_slots`` writes is that query tensor
with no copy. Names follow HF transformers' JetMoE (``experts.input_linear.weight``,
``experts.output_linear.weight``, ``experts.bias``, ``experts.router.layer.weight``,
``kv_proj.weight``), so state dicts move between the two.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._nvtx import nvtx_range
from ..ops import grouped_mm, permute, router_topk, rows_to_slots, slots_to_rows, unpermute
from .moa_attention import attend, padding_token_mask, rope, rope_tables
from .moe import _router_config, per_token, router_losses
from .router import RouterConfig

__all__ = ["MoA", "MoAParts", "MoAExperts"]


def _nvtx_enabled(x):
    # On CUDA only, and not while torch.compile traces (as MoE's stages).
    return x.is_cuda and not torch.compiler.is_compiling()


def _stage(name, x):
    """An NVTX range around one stage (router, permute, query_gemm, kv_proj, attention,
    output_gemm, unpermute), closed even when the stage raises."""
    return nvtx_range(f"mixops.moa.{name}", enabled=_nvtx_enabled(x))


class _ExpertLinear(nn.Module):
    """E projections in one tensor: ``weight`` [E, out, in] (JetMoE's ParallelExperts layout)."""

    def __init__(self, num_experts, in_size, out_size, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(
            torch.empty(num_experts, out_size, in_size, device=device, dtype=dtype)
        )
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.normal_(self.weight, std=self.weight.shape[2] ** -0.5)


class _Router(nn.Module):
    """The router's projection ``layer`` (JetMoE's ``router.layer``): logits = layer(x)."""

    def __init__(self, hidden_size, num_experts, device=None, dtype=None):
        super().__init__()
        self.layer = nn.Linear(hidden_size, num_experts, bias=False, device=device, dtype=dtype)

    def forward(self, x):
        return self.layer(x)


class MoAExperts(nn.Module):
    """The attention experts: ``input_linear.weight`` [E, kv_size, hidden] (queries),
    ``output_linear.weight`` [E, hidden, kv_size], ``bias`` [hidden] (or None), ``router.layer``."""

    def __init__(self, hidden_size, num_experts, kv_size, bias=True, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.input_linear = _ExpertLinear(num_experts, hidden_size, kv_size, **kw)
        self.output_linear = _ExpertLinear(num_experts, kv_size, hidden_size, **kw)
        self.bias = nn.Parameter(torch.zeros(hidden_size, **kw)) if bias else None
        self.router = _Router(hidden_size, num_experts, **kw)

    def reset_parameters(self):
        if self.bias is not None:
            nn.init.zeros_(self.bias)


@dataclass
class MoAParts:
    """Existing modules for MoA to use (and share parameters with): ``experts`` has
    ``input_linear.weight``, ``output_linear.weight``, ``bias`` (or None) and ``router.layer``
    (HF's ``JetMoeMoA`` qualifies); ``kv_proj`` maps hidden -> 2 * num_kv_heads * head_dim
    (keys then values)."""

    experts: nn.Module
    kv_proj: nn.Module


def _positive_int(name, v):
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"MoA: {name} must be a positive int, got {v!r}")
    return v


class MoA(nn.Module):
    """Mixture of attention heads: ``[batch, seq, hidden] -> [batch, seq, hidden]``.

    Args:
        hidden_size, num_experts, top_k: the layer's shape (``num_experts``/``top_k`` may be left
            out when ``router`` is given).
        head_dim, num_kv_heads: each expert's query projection gives ``num_kv_heads`` heads of
            ``head_dim``; keys and values have ``num_kv_heads`` heads (SDPA sees
            ``num_kv_heads * top_k`` query heads).
        router: a ``RouterConfig``, or its options as keywords. JetMoE: ``topk_then_score=True``
            (top-k on the logits, softmax over the k); the MoA paper: ``renormalize=False``
            (softmax over all E, top-k, no renormalisation).
        bias: an output bias ``experts.bias`` [hidden] (JetMoE has one).
        causal: causal attention (else bidirectional). scaling: the softmax scale
            (default ``head_dim ** -0.5``). attention_dropout: dropout on the attention weights
            while training.
        aux_loss_coef, z_loss_coef: as in ``mixops.nn.MoE``; ``self.aux_loss`` after each forward.
        layer_idx: this layer's index in an HF ``Cache``.
        parts: existing modules to build around (see ``MoAParts``).

    forward(hidden_states, attention_mask=None, position_embeddings=None, cache=None,
    token_mask=None, cache_kwargs=None, document_ids=None, output_attentions=False):
        attention_mask: None, a ``[batch, kv_len]`` 0/1 padding mask (combined with ``causal``),
            HF's 4-D mask ``[batch, 1 or heads, q_len, kv_len]`` (bool, True = attend, or
            additive float), or a flex-attention ``BlockMask`` (run with ``flex_attention``; no
            attention dropout); the 4-D and BlockMask forms are the whole mask (``causal`` is
            not added); position_embeddings: ``(cos, sin)`` ``[batch, q_len, head_dim]`` for
            RoPE at the tokens' own positions (HF's rotary embedding output); cache: an HF
            ``Cache`` (one key and value per token; needs ``layer_idx``); token_mask
            ``[batch, q_len]`` (or flat ``[batch * q_len]``; another shape raises): tokens counted
            in the losses (default: from a 2-D padding mask, else all); document_ids
            ``[batch, q_len]`` ints: packed (padding-free) documents, a token attends only to
            tokens of its own document (combined with the mask; the call's tokens must be all the
            keys: ``moa_attention.document_ids_from_cu_seq_lens`` / ``_from_position_ids`` make
            them); output_attentions: also return the attention weights
            ``[batch, top_k * num_kv_heads, q_len, kv_len]``, slot j's head h at
            ``j * num_kv_heads + h`` (HF JetMoE's order; attention written out, as HF's eager:
            a fully masked row gets uniform weights).
    Returns ``[batch, q_len, hidden]``, or ``(output, weights)`` with ``output_attentions``.
    ``self.router_logits`` holds the last forward's logits ``[tokens, E]`` (fp32).
    """

    def __getstate__(self):
        # aux_loss and router_logits are the last call's results, with their autograd graph,
        # not state: copies and pickles leave them out (copy.deepcopy of a graph's non-leaf
        # tensor raises).
        state = dict(super().__getstate__())
        for k in ("aux_loss", "router_logits"):
            if k in state:
                state[k] = None
        return state

    def __init__(
        self,
        hidden_size: int,
        num_experts: Optional[int] = None,
        top_k: Optional[int] = None,
        head_dim: Optional[int] = None,
        num_kv_heads: int = 1,
        *,
        router: Optional[RouterConfig] = None,
        bias: bool = True,
        causal: bool = True,
        scaling: Optional[float] = None,
        attention_dropout: float = 0.0,
        aux_loss_coef: float = 0.0,
        z_loss_coef: float = 0.0,
        layer_idx: Optional[int] = None,
        parts: Optional[MoAParts] = None,
        device=None,
        dtype=None,
        **router_options,
    ):
        super().__init__()
        try:
            router = _router_config(num_experts, top_k, router, router_options)
        except (TypeError, ValueError) as e:
            raise type(e)(str(e).replace("MoE", "MoA", 1)) from None
        self.hidden_size = _positive_int("hidden_size", hidden_size)
        self.head_dim = _positive_int("head_dim", head_dim)
        self.num_kv_heads = _positive_int("num_kv_heads", num_kv_heads)
        if scaling is None:
            scaling = head_dim**-0.5
        if not (isinstance(scaling, (int, float)) and math.isfinite(scaling) and scaling > 0):
            raise ValueError(f"MoA: scaling must be a finite number > 0, got {scaling!r}")
        if not (isinstance(attention_dropout, (int, float)) and 0 <= attention_dropout < 1):
            raise ValueError(f"MoA: attention_dropout must be in [0, 1), got {attention_dropout!r}")
        if router.num_modalities > 1 or router.selection_bias:
            raise ValueError("MoA: num_modalities > 1 and selection_bias are MoE-only options")
        self.router_config = router
        self._router_kwargs = router.op_kwargs()
        self.causal, self.scaling = bool(causal), float(scaling)
        self.attention_dropout = float(attention_dropout)
        self.aux_loss_coef, self.z_loss_coef = float(aux_loss_coef), float(z_loss_coef)
        self.layer_idx = layer_idx
        kv = self.num_kv_heads * self.head_dim
        if parts is None:
            parts = MoAParts(
                experts=MoAExperts(
                    hidden_size, router.num_experts, kv, bias, device=device, dtype=dtype
                ),
                kv_proj=nn.Linear(hidden_size, 2 * kv, bias=False, device=device, dtype=dtype),
            )
        _check_parts(parts, hidden_size, router.num_experts, kv)
        self.experts = parts.experts
        self.kv_proj = parts.kv_proj
        self.aux_loss = None
        self.router_logits = None

    num_experts = property(lambda self: self.router_config.num_experts)
    top_k = property(lambda self: self.router_config.top_k)

    def reset_parameters(self):
        """Initialise again as the constructor does (each submodule's ``reset_parameters``)."""
        for m in self.modules():
            if m is not self and callable(getattr(m, "reset_parameters", None)):
                m.reset_parameters()

    def _router_logits(self, x2):
        """Logits [tokens, E] in fp32 (fp64 for fp64; JetMoE computes them in the input dtype,
        then casts)."""
        logits = F.linear(x2, self.experts.router.layer.weight.to(x2.dtype))
        return logits if logits.dtype == torch.float64 else logits.float()

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_embeddings=None,
        cache=None,
        token_mask: Optional[torch.Tensor] = None,
        cache_kwargs: Optional[dict] = None,
        document_ids: Optional[torch.Tensor] = None,
        output_attentions: bool = False,
    ):
        x = hidden_states
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(
                f"MoA: hidden_states must be [batch, seq, {self.hidden_size}], "
                f"got shape {tuple(x.shape)}"
            )
        if cache is not None and self.layer_idx is None:
            raise ValueError(
                "MoA: a cache needs this layer's index in it: build MoA with layer_idx=... "
                "(or set .layer_idx) before passing cache="
            )
        if document_ids is not None and tuple(document_ids.shape) != tuple(x.shape[:2]):
            raise ValueError(
                f"MoA: document_ids must be [batch, q_len] = {tuple(x.shape[:2])} "
                f"(hidden_states' leading dims), got shape {tuple(document_ids.shape)}"
            )
        if position_embeddings is not None:
            rope_tables(position_embeddings, x.shape[0], x.shape[1], self.head_dim)
        args = (attention_mask, position_embeddings, cache, token_mask, cache_kwargs,
                document_ids, bool(output_attentions))  # fmt: skip
        dev = x.device.type
        w = self.experts.input_linear.weight
        if x.dtype != w.dtype and not torch.is_autocast_enabled(dev):
            raise ValueError(
                f"MoA: hidden_states is {x.dtype} but the layer's weights are {w.dtype}: convert "
                f"the layer (.to({x.dtype})) or the input (.to({w.dtype})), or run under "
                f"torch.autocast"
            )
        if torch.is_autocast_enabled(dev):
            # Custom ops are not autocast: cast explicitly (weights through differentiable casts,
            # so fp32 master weights get fp32 gradients) and run without autocast, as MoE does.
            cdt = torch.get_autocast_dtype(dev)
            with torch.autocast(dev, enabled=False):
                return self._forward(x.to(cdt), *args, cdt)
        return self._forward(x, *args, None)

    def _weights(self, cast):
        """(query, output, kv, kv bias, output bias) weights, cast to ``cast`` when given."""
        ex = self.experts
        ws = (
            ex.input_linear.weight,
            ex.output_linear.weight,
            self.kv_proj.weight,
            getattr(self.kv_proj, "bias", None),
            ex.bias,
        )
        return ws if cast is None else tuple(None if w is None else w.to(cast) for w in ws)

    def _forward(self, x, attention_mask, position_embeddings, cache, token_mask, cache_kwargs,
                 document_ids, output_attentions, cast):  # fmt: skip
        B, S, H = x.shape
        E, k, Hkv, d = self.num_experts, self.top_k, self.num_kv_heads, self.head_dim
        w_q, w_o, w_kv, b_kv, bias = self._weights(cast)
        x2 = x.reshape(-1, H)
        if token_mask is None:
            token_mask = padding_token_mask(attention_mask, B, S)
        token_mask = per_token("MoA", "token_mask", token_mask, x.shape[:2], B * S, "hidden_states")
        if token_mask is not None and token_mask.dtype != torch.bool:
            token_mask = token_mask != 0
        with _stage("router", x):
            logits = self._router_logits(x2)
            r = router_topk(logits, token_mask=token_mask, **self._router_kwargs)
        self.router_logits = logits
        self.aux_loss = router_losses(
            r, x2.shape[0], token_mask, E, self.aux_loss_coef, self.z_loss_coef
        )
        with _stage("permute", x):
            p = permute(x2, r.ids, E)
        with _stage("query_gemm", x):
            q_rows = grouped_mm(p.x_sorted, w_q.transpose(1, 2), p.offsets)
            q = rows_to_slots(q_rows, p.row_map, Hkv)  # [T, Hkv, k, d]: heads h * k + j
        q = q.view(B, S, Hkv * k, d).transpose(1, 2)  # [B, Hq, S, d], no copy
        with _stage("kv_proj", x):
            kv = F.linear(x, w_kv, b_kv)
            key, value = kv.view(B, S, 2, Hkv, d).permute(2, 0, 3, 1, 4).unbind(0)
        if position_embeddings is not None:
            cos, sin = position_embeddings
            q, key = rope(q, cos, sin), rope(key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, **(cache_kwargs or {}))
        with _stage("attention", x):
            o = attend(
                q,
                key,
                value,
                attention_mask,
                k,
                causal=self.causal,
                scale=self.scaling,
                dropout_p=self.attention_dropout if self.training else 0.0,
                document_ids=document_ids,
                output_attentions=output_attentions,
            )  # [B, S, Hkv, k, d] (a view when it can be)
        weights = None
        if output_attentions:
            o, weights = o
        with _stage("output_gemm", x):
            rows = slots_to_rows(o.reshape(B * S, Hkv, k, d), p.row_map, p.x_sorted.shape[0])
            y_rows = grouped_mm(rows, w_o.transpose(1, 2), p.offsets)
        with _stage("unpermute", x):
            y = unpermute(y_rows, p.row_map, r.weights)
        if bias is not None:
            # In place: unpermute's output is fresh, and its backward does not keep it.
            y = y.add_(bias)
        y = y.view(B, S, H)
        return (y, weights) if output_attentions else y

    def extra_repr(self):
        return (
            f"hidden={self.hidden_size}, head_dim={self.head_dim}, "
            f"num_kv_heads={self.num_kv_heads}, causal={self.causal},\n{self.router_config}"
        )


def _check_parts(parts, hidden, num_experts, kv):
    ex = parts.experts
    for name, shape in (
        ("input_linear.weight", (num_experts, kv, hidden)),
        ("output_linear.weight", (num_experts, hidden, kv)),
        ("router.layer.weight", (num_experts, hidden)),
    ):
        t = ex
        for a in name.split("."):
            t = getattr(t, a, None)
        if t is None or tuple(t.shape) != shape:
            got = None if t is None else tuple(t.shape)
            raise ValueError(f"MoA: parts.experts.{name} must have shape {shape}, got {got}")
    w = getattr(parts.kv_proj, "weight", None)
    if w is None or tuple(w.shape) != (2 * kv, hidden):
        got = None if w is None else tuple(w.shape)
        raise ValueError(f"MoA: parts.kv_proj.weight must have shape {(2 * kv, hidden)}, got {got}")
