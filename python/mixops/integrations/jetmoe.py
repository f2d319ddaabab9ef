"""HF transformers' JetMoE on mixops: the MoA attention (``JetMoeAttention``) and the MoE MLP
(``JetMoeMoE``, with its output bias), for ``patch_model`` and ``from_hf``.

``patch_model`` keeps every module, Parameter and state-dict key: the attention, MLP and router
modules change class to subclasses (defined here, so patched models pickle) whose forwards run the
mixops ops; the routers then compute only the logits, in fp32 as HF does, and still return them at
index 4, so HF's output recorder (``output_router_logits``) and its load-balancing loss see them.
Nothing syncs the host (HF's ``expert_size.tolist()`` is gone), so the blocks compile fullgraph.

Runtime modes, as HF's own JetMoE: autocast (the mixops ops run on explicit casts to the autocast
dtype, the router in that dtype as HF's autocast Linear, fp32 master weights get fp32 gradients);
every mask HF's attention backends pass (eager's additive and sdpa's bool 4-D masks, flash's 2-D
padding mask or none, flex's ``BlockMask``: the attention itself is always mixops', with SDPA or
flex_attention); packed (padding-free) batches, from ``cu_seq_lens_q/k`` or from ``position_ids``
restarting per document, attend only within each document; eager ``output_attentions`` returns
each layer's weights in HF's head order (assisted decoding reads them).
"""

import torch
import torch.nn.functional as F
from transformers.models.jetmoe.modeling_jetmoe import (
    JetMoeAttention,
    JetMoeMoE,
    JetMoeTopKGating,
)

from ..nn import MoA, MoAParts, RouterConfig
from ..nn.activations import apply_activation
from ..nn.moa_attention import document_ids_from_cu_seq_lens, document_ids_from_position_ids
from ..nn.moe import autocast_dtype, no_autocast
from ..ops import grouped_mm, permute, router_topk, unpermute

__all__ = ["moa_from_hf", "plan", "MixopsJetMoeAttention", "MixopsJetMoeMoE"]

# The class of JetMoE's activation module (ACT2FN[activation_function], applied to the first half
# of the GEMM output, times the second) -> the mixops gated activation.
_GATED = {
    "SiLUActivation": "swiglu",
    "SiLU": "swiglu",
    "GELUActivation": "geglu",
    "NewGELUActivation": "geglu_tanh",
    "PytorchGELUTanh": "geglu_tanh",
    "GELUTanh": "geglu_tanh",
    "ReLU": "reglu",
}


class Unsupported(ValueError):
    """What mixops cannot express about a JetMoE block."""


def _router_config(router: JetMoeTopKGating) -> RouterConfig:
    # JetMoE: top-k of the fp32 logits, softmax over the k.
    return RouterConfig(num_experts=router.num_experts, top_k=router.top_k, topk_then_score=True)


class MixopsJetMoeTopKGating(JetMoeTopKGating):
    """JetMoE's router after patch_model: only the fp32 logits (mixops routes), at every index
    of the 5-tuple HF's forward returns, so its output recorder (index 4) still finds them."""

    def forward(self, hidden_states):
        w = self.layer.weight
        if hidden_states.dtype != w.dtype and not torch.is_autocast_enabled(
            hidden_states.device.type
        ):
            # MoA under autocast: its input is already cast to the autocast dtype and autocast is
            # off; the logits in that dtype, as HF's router Linear computes them under autocast.
            logits = F.linear(hidden_states, w.to(hidden_states.dtype))
        else:
            logits = self.layer(hidden_states)
        return (logits.float(),) * 5


class _JetMoeMoA(MoA):
    """MoA with JetMoE's router logits: computed in the input dtype, then cast to fp32 (also in
    fp64 models)."""

    def _router_logits(self, x2):
        return F.linear(x2, self.experts.router.layer.weight.to(x2.dtype)).float()


class _RecordedMoA(MoA):
    """A MoA whose router logits come from calling the (patched) HF router module."""

    def _router_logits(self, x2):
        return self.experts.router(x2)[4]


# HF's attention backends whose masks (create_causal_mask) hold packed documents from position_ids
# when no cache is passed.
_MASKS_WITH_DOCUMENTS = ("eager", "sdpa", "flex_attention")


class MixopsJetMoeAttention(JetMoeAttention):
    """JetMoeAttention on mixops.nn.MoA (kept outside the module tree, over the same modules).
    Returns HF's triple: the output, the attention weights (eager with ``output_attentions``,
    else None) and the router logits."""

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None,
                **kwargs):  # fmt: skip
        moa = self.__dict__["_mixops_moa"]
        moa.training = self.training
        impl = self.config._attn_implementation
        if "paged" in str(impl) or type(cache).__name__ == "PagedAttentionCache":
            raise ValueError(
                f"mixops JetMoE attention: attn_implementation {impl!r} (continuous batching's "
                "paged cache) is not supported; supported: eager, sdpa, flex_attention, "
                "flash_attention_2/3 (mixops computes the attention itself with SDPA or flex)"
            )
        # HF's eager attention returns its weights; HF's recorder keeps them when asked for.
        want_weights = impl == "eager" and bool(
            kwargs.get("output_attentions") or getattr(self.config, "output_attentions", False)
        )
        out = moa(
            hidden_states,
            attention_mask=attention_mask,
            position_embeddings=position_embeddings,
            cache=cache,
            cache_kwargs={"kwargs": kwargs},  # as JetMoeAttention calls cache.update
            document_ids=self._document_ids(hidden_states, attention_mask, cache, kwargs),
            output_attentions=want_weights,
        )
        weights = None
        if want_weights:
            out, weights = out
        return out, weights, moa.router_logits

    def _document_ids(self, x, attention_mask, cache, kwargs):
        """Packed (padding-free) documents, or None. From ``cu_seq_lens_q/k`` (flash-attn's
        varlen kwargs) whenever given; else from ``position_ids`` restarting per document (HF's
        rule) in a call that holds every key (no earlier cached tokens, not a static cache) and
        whose documents HF's mask lacks: HF's eager/sdpa/flex masks hold them only without a
        cache (``use_cache``, the default, passes one), flash passes no mask. With a 2-D padding
        mask (flash) packing is not looked for, as in HF's flash path."""
        B, S = x.shape[:2]
        cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
        if cu_q is None and cu_k is None:
            position_ids = kwargs.get("position_ids")
            if position_ids is None or S == 1:
                return None
            if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
                return None
            if cache is None:
                if self.config._attn_implementation in _MASKS_WITH_DOCUMENTS:
                    return None  # HF's mask already holds them
            elif getattr(cache, "is_compileable", False) or cache.get_seq_length(self.layer_idx):
                return None  # a static cache's keys, or decoding: no documents for them
            # (eager: one host read per layer, as HF's flash path makes: is the batch packed?)
            return document_ids_from_position_ids(position_ids.to(x.device), B)
        if cache is not None:
            if getattr(cache, "is_compileable", False):
                raise ValueError(
                    "mixops JetMoE attention: cu_seq_lens_q/k (packed documents) with a static "
                    "cache are not supported (its keys run to max_cache_len): use a dynamic cache "
                    "or use_cache=False"
                )
            earlier = cache.get_seq_length(self.layer_idx)
            if earlier:
                raise ValueError(
                    f"mixops JetMoE attention: cu_seq_lens_q/k (packed documents) with a cache "
                    f"that already holds {earlier} tokens: the documents must be this call's "
                    "tokens alone (prefill them with an empty cache)"
                )
        cu = cu_q if cu_q is not None else cu_k
        if (
            cu_q is not None
            and cu_k is not None
            and cu_k is not cu_q
            and not torch.compiler.is_compiling()
            and not torch.equal(cu_q.to(cu_k.device), cu_k)
        ):
            raise ValueError(
                "mixops JetMoE attention: cu_seq_lens_q and cu_seq_lens_k differ; packed "
                "documents need this call's tokens to be all the keys (equal cu_seq_lens)"
            )
        return document_ids_from_cu_seq_lens(cu.to(x.device), B, S)


class MixopsJetMoeMoE(JetMoeMoE):
    """JetMoeMoE on the mixops ops: router_topk -> permute -> grouped_mm -> gated activation ->
    grouped_mm -> unpermute (gates) -> + bias."""

    def forward(self, layer_input):
        act, router_kwargs = self.__dict__["_mixops_mlp"]
        shape = layer_input.shape
        x2 = layer_input.reshape(-1, shape[-1])
        logits = self.router(x2)[4]  # under autocast as HF's (its Linear autocasts)
        cast = autocast_dtype(x2)
        w1, w2 = self.input_linear.weight, self.output_linear.weight
        with no_autocast(x2, cast):  # custom ops are not autocast: explicit casts instead
            if cast is not None:  # differentiable casts: fp32 master weights, fp32 gradients
                x2, w1, w2 = x2.to(cast), w1.to(cast), w2.to(cast)
            r = router_topk(logits, **router_kwargs)
            p = permute(x2, r.ids, self.router.num_experts)
            h = grouped_mm(p.x_sorted, w1.transpose(1, 2), p.offsets)
            h = apply_activation(act, h)
            o = grouped_mm(h, w2.transpose(1, 2), p.offsets)
            return (unpermute(o, p.row_map, r.weights) + self.bias).view(shape)


def moa_from_hf(attn: JetMoeAttention, *, recorded=False, **moa_kwargs) -> MoA:
    """A mixops.nn.MoA computing what ``attn`` computes, sharing its modules (``experts``,
    ``kv_proj``); ``moa_kwargs`` adds MoA options (e.g. ``aux_loss_coef``)."""
    if not isinstance(attn, JetMoeAttention):
        raise Unsupported(f"{type(attn).__name__} is not a JetMoeAttention")
    ex = attn.experts
    cls = _RecordedMoA if recorded else _JetMoeMoA
    return cls(
        ex.input_size,
        head_dim=attn.head_dim,
        num_kv_heads=attn.num_key_value_heads,
        router=_router_config(ex.router),
        bias=True,
        causal=bool(getattr(attn, "is_causal", True)),
        scaling=float(attn.scaling),
        attention_dropout=float(attn.attention_dropout),
        layer_idx=attn.layer_idx,
        parts=MoAParts(experts=ex, kv_proj=attn.kv_proj),
        device=ex.bias.device,
        **moa_kwargs,
    )


def _mlp_activation(mlp: JetMoeMoE) -> str:
    name = type(mlp.activation).__name__
    if name not in _GATED:
        raise Unsupported(f"JetMoeMoE: activation {name} has no mixops equivalent")
    return _GATED[name]


def plan(block, moe_kwargs=None):
    """For a JetMoE block of patch_model: a function applying the patch (which cannot fail), or
    None when ``block`` is not a JetMoE block. Raises Unsupported when it cannot be expressed.
    (``moe_kwargs``, patch_model's MoE options, do not apply to JetMoE's blocks.)"""
    if isinstance(block, (MixopsJetMoeAttention, MixopsJetMoeMoE)):
        return None
    if isinstance(block, JetMoeAttention):
        moa = moa_from_hf(block, recorded=True)

        def apply():
            block.__class__ = MixopsJetMoeAttention
            block.experts.router.__class__ = MixopsJetMoeTopKGating
            block.__dict__["_mixops_moa"] = moa

        return apply
    if isinstance(block, JetMoeMoE):
        # Made once here, not on every forward: the activation and router_topk's options.
        mlp = (_mlp_activation(block), _router_config(block.router).op_kwargs())

        def apply():
            block.__class__ = MixopsJetMoeMoE
            block.router.__class__ = MixopsJetMoeTopKGating
            block.__dict__["_mixops_mlp"] = mlp

        return apply
    return None
