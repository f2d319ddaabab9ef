"""HF transformers' JetMoE on mixops: the MoA attention (``JetMoeAttention``) and the MoE MLP
(``JetMoeMoE``, with its output bias), for ``patch_model`` and ``from_hf``.

``patch_model`` keeps every module, Parameter and state-dict key: the attention, MLP and router
modules change class to subclasses (defined here, so patched models pickle) whose forwards run the
mixops ops; the routers then compute only the logits, in fp32 as HF does, and still return them at
index 4, so HF's output recorder (``output_router_logits``) and its load-balancing loss see them.
Nothing syncs the host (HF's ``expert_size.tolist()`` is gone), so the blocks compile fullgraph.
"""

import torch.nn.functional as F
from transformers.models.jetmoe.modeling_jetmoe import (
    JetMoeAttention,
    JetMoeMoE,
    JetMoeTopKGating,
)

from ..nn import MoA, MoAParts, RouterConfig
from ..nn.activations import apply_activation
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
        logits = self.layer(hidden_states).float()
        return (logits,) * 5


class _JetMoeMoA(MoA):
    """MoA with JetMoE's router logits: computed in the input dtype, then cast to fp32 (also in
    fp64 models)."""

    def _router_logits(self, x2):
        return F.linear(x2, self.experts.router.layer.weight.to(x2.dtype)).float()


class _RecordedMoA(MoA):
    """A MoA whose router logits come from calling the (patched) HF router module."""

    def _router_logits(self, x2):
        return self.experts.router(x2)[4]


class MixopsJetMoeAttention(JetMoeAttention):
    """JetMoeAttention on mixops.nn.MoA (kept outside the module tree, over the same modules)."""

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None,
                **kwargs):  # fmt: skip
        moa = self.__dict__["_mixops_moa"]
        moa.training = self.training
        out = moa(
            hidden_states,
            attention_mask=attention_mask,
            position_embeddings=position_embeddings,
            cache=cache,
            cache_kwargs={"kwargs": kwargs},  # as JetMoeAttention calls cache.update
        )
        return out, None, moa.router_logits


class MixopsJetMoeMoE(JetMoeMoE):
    """JetMoeMoE on the mixops ops: router_topk -> permute -> grouped_mm -> gated activation ->
    grouped_mm -> unpermute (gates) -> + bias."""

    def forward(self, layer_input):
        act, router_kwargs = self.__dict__["_mixops_mlp"]
        shape = layer_input.shape
        x2 = layer_input.reshape(-1, shape[-1])
        logits = self.router(x2)[4]
        r = router_topk(logits, **router_kwargs)
        p = permute(x2, r.ids, self.router.num_experts)
        h = grouped_mm(p.x_sorted, self.input_linear.weight.transpose(1, 2), p.offsets)
        h = apply_activation(act, h)
        o = grouped_mm(h, self.output_linear.weight.transpose(1, 2), p.offsets)
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
