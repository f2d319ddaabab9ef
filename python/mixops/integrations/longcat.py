"""HF transformers' LongCat-Flash on mixops (``patch_model`` calls ``plan`` on every module).

Each ``LongcatFlashDecoderLayer`` keeps its modules and changes class to a subclass defined here
(so patched models pickle) whose forward is mixops' shortcut schedule
(``mixops.nn.shortcut.dual_sublayer_forward``: the MoE's dispatch starts on
``post_attention_layernorm[0]``'s output, the dense sublayers run, then the experts, and the
combine finishes last), and its ``mlp`` (``LongcatFlashMoE``) becomes a
``mixops.nn.MoE`` holding HF's router (as ``router``) and experts (as ``experts``): the same
Parameter objects and state-dict keys.

What HF computes, and mixops with it: fp32 router logits ``x @ classifier.weight.T`` (HF's forward
does not add ``classifier.bias`` even when the config has ``router_bias``: neither does mixops;
the Parameter stays), softmax over the E routed + Z zero experts, top-k chosen on scores +
``e_score_correction_bias``, weights = the chosen scores (not renormalised) x
``routed_scaling_factor``; the zero experts are identity experts (input x weight). The experts'
``gate_up_proj`` [E + Z, 2F, H] is used whole: its first E slices compute, the Z unused ones get
zero gradient, as in HF.
"""

import torch
import torch.nn.functional as F
from transformers.models.longcat_flash.modeling_longcat_flash import (
    LongcatFlashDecoderLayer,
    LongcatFlashTopkRouter,
)

from ..nn.moe import MoE, MoEParts
from ..nn.router import RouterConfig
from ..nn.shortcut import dual_sublayer_forward

__all__ = [
    "plan",
    "build",
    "from_hf",
    "Unsupported",
    "MixopsLongcatFlashDecoderLayer",
    "MixopsLongcatFlashTopkRouter",
]

# HF hidden_act of the gated experts -> mixops activation.
_GATED_ACTS = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu", "relu": "reglu"}


class Unsupported(ValueError):
    """What mixops cannot express about one LongCat-Flash layer."""


def _router_logits_forward(self, hidden_states):
    # The patched router computes only the logits (fp32, no bias: HF's forward) and returns them
    # first in a tuple, so HF's output recorder (router_logits) still sees them.
    x = hidden_states.reshape(-1, self.classifier.weight.shape[-1])
    return (F.linear(x.to(torch.float32), self.classifier.weight.to(torch.float32)),)


# The classes patch_model gives HF's modules: subclasses (HF's isinstance-based initialisation and
# output recorders still find them) defined here, so patched models pickle.
class MixopsLongcatFlashTopkRouter(LongcatFlashTopkRouter):
    """LongCat-Flash's router after patch_model: only the fp32 logits (mixops routes)."""

    forward = _router_logits_forward


class MixopsLongcatFlashDecoderLayer(LongcatFlashDecoderLayer):
    """LongCat-Flash's layer after patch_model: mixops' shortcut schedule. HF's keyword arguments
    (attention_mask, position_ids, the cache under this transformers version's name,
    position_embeddings, ...) go to both attention sublayers as HF's own layer passes them."""

    def forward(self, hidden_states, **kwargs):
        return dual_sublayer_forward(self, hidden_states, **kwargs)


class _Logits(torch.nn.Module):
    """The logits of an HF LongCat-Flash router (sharing its classifier and bias buffer), for
    ``from_hf``: the HF block keeps its own router working."""

    def __init__(self, router):
        super().__init__()
        self.classifier = router.classifier
        self.register_buffer("e_score_correction_bias", router.e_score_correction_bias)

    forward = _router_logits_forward


def from_hf(block, moe_kwargs) -> MoE:
    """A mixops.nn.MoE computing what a ``LongcatFlashMoE`` computes, sharing its Parameters and
    bias buffer (same state-dict keys); the HF block keeps working."""
    return build(block, moe_kwargs, gate=_Logits(block.router))


def build(block, moe_kwargs, gate=None) -> MoE:
    """A mixops.nn.MoE around a ``LongcatFlashMoE``'s router (or ``gate``) and experts (changes
    nothing)."""
    router, experts = getattr(block, "router", None), getattr(block, "experts", None)
    if router is None or experts is None or not hasattr(router, "classifier"):
        raise Unsupported(f"{type(block).__name__}: no router.classifier / experts")
    if getattr(experts, "gate_up_proj", None) is None:
        raise Unsupported(f"{type(block).__name__}: no routed experts (n_routed_experts = 0)")
    act = getattr(getattr(block, "config", None), "hidden_act", None)
    if act not in _GATED_ACTS:
        raise Unsupported(f"{type(block).__name__}: activation {act!r} is not supported")
    E, Z = experts.num_routed_experts, experts.zero_expert_num
    H = experts.hidden_size
    try:
        cfg = RouterConfig(
            num_experts=E + Z,
            top_k=router.top_k,
            score_fn="softmax",
            renormalize=False,
            scaling=float(router.routed_scaling_factor),
            selection_bias=True,
            router_fp32=True,
        )
    except ValueError as e:
        raise Unsupported(f"{type(router).__name__}: {e}") from e
    parts = MoEParts(gate=router if gate is None else gate, experts=experts, gate_name="router")
    moe = MoE(
        H,
        experts.intermediate_size,
        router=cfg,
        activation=_GATED_ACTS[act],
        zero_experts=Z or None,
        parts=parts,
        **moe_kwargs,
    )
    moe._modules["router"] = moe._modules.pop("router")  # HF's order: experts, then router
    return moe


def plan(layer, moe_kwargs):
    """For a module of patch_model: a function applying the patch (which cannot fail), or None
    when ``layer`` is not an unpatched LongCat-Flash decoder layer. Raises Unsupported when mixops
    cannot express it (the MoE is built here, before anything changes)."""
    if not isinstance(layer, LongcatFlashDecoderLayer) or isinstance(layer.mlp, MoE):
        return None
    moe = build(layer.mlp, moe_kwargs)

    def apply():
        layer.mlp.router.__class__ = MixopsLongcatFlashTopkRouter
        moe.train(layer.mlp.training)
        layer.mlp = moe
        layer.__class__ = MixopsLongcatFlashDecoderLayer

    return apply
