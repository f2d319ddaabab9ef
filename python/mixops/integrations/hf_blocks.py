"""The HF MoE blocks that mixops.integrations.transformers converts: the supported block and router
classes (by class name), what each router computes as a RouterConfig, the experts' activations,
the checks that say what mixops cannot express about a block, and the names of routers that
patch_model has patched (their classes are recorded here)."""

import sys
from dataclasses import dataclass

from ..nn import RouterConfig


@dataclass(frozen=True)
class _RouterSpec:
    score_fn: str  # "softmax" | "sigmoid"
    deepseek: bool = (
        False  # sigmoid + selection bias + groups + eps 1e-20 + routed scaling, fp32 logits
    )
    always_renormalize: bool = False  # Mixtral renormalises without a flag


# Router classes whose forward mixops reproduces exactly (by class name, so that importing every
# model of transformers is not needed). Block classes: a gate, 3-D experts, optional shared experts.
_ROUTERS = {
    "MixtralTopKRouter": _RouterSpec("softmax", always_renormalize=True),
    "Qwen2MoeTopKRouter": _RouterSpec("softmax"),
    "Qwen3MoeTopKRouter": _RouterSpec("softmax"),
    "OlmoeTopKRouter": _RouterSpec("softmax"),
    "DeepseekV3TopkRouter": _RouterSpec("sigmoid", deepseek=True),
    "Glm4MoeTopkRouter": _RouterSpec("sigmoid", deepseek=True),
}
SUPPORTED_BLOCKS = (
    "MixtralSparseMoeBlock",
    "Qwen2MoeSparseMoeBlock",
    "Qwen3MoeSparseMoeBlock",
    "OlmoeSparseMoeBlock",
    "DeepseekV3MoE",
    "Glm4MoeMoE",
)
# from_hf (and patch_model) also take these, through their own converters (integrations/longcat.py,
# integrations/jetmoe.py: a JetMoeAttention gives a mixops.nn.MoA).
FROM_HF_BLOCKS = SUPPORTED_BLOCKS + ("LongcatFlashMoE", "JetMoeAttention")

# HF hidden_act of gated experts -> mixops activation.
_GATED_ACTS = {
    "silu": "swiglu",
    "swish": "swiglu",
    "gelu": "geglu",
    "gelu_pytorch_tanh": "geglu_tanh",
    "gelu_new": "geglu_tanh",
    "relu": "reglu",
}


class _Unsupported(ValueError):
    """What mixops cannot express about one HF block."""


def _hidden_act(experts):
    act = getattr(getattr(experts, "config", None), "hidden_act", None)
    if act is None:
        raise _Unsupported(
            f"cannot tell the activation of {type(experts).__name__} (no config.hidden_act)"
        )
    if act not in _GATED_ACTS:
        raise _Unsupported(
            f"activation {act!r} of {type(experts).__name__} is not supported "
            f"(supported: {', '.join(_GATED_ACTS)})"
        )
    return _GATED_ACTS[act]


def _check_block(block):
    """Raises _Unsupported saying what is missing unless mixops can hold this block's modules."""
    name = type(block).__name__
    if name not in SUPPORTED_BLOCKS:
        raise _Unsupported(
            f"{name} is not a supported MoE block (supported: {', '.join(FROM_HF_BLOCKS)}; "
            "JetMoeAttention gives a mixops.nn.MoA)"
        )
    gate, experts = getattr(block, "gate", None), _base_experts(getattr(block, "experts", None))
    if gate is None or _router_name(gate) not in _ROUTERS:
        raise _Unsupported(f"{name}: router {type(gate).__name__} has no mixops equivalent")
    if experts is None or not hasattr(experts, "gate_up_proj") or not hasattr(experts, "down_proj"):
        raise _Unsupported(
            f"{name}: experts without 3-D gate_up_proj/down_proj weights are not supported"
        )
    if (
        getattr(experts, "has_bias", False)
        or getattr(experts, "is_transposed", False)
        or getattr(experts, "has_post_expert_norm", False)
        or not getattr(experts, "is_concatenated", True)
    ):
        raise _Unsupported(
            f"{name}: expert biases, transposed or interleaved weights and "
            "post-expert norms are not supported"
        )
    if getattr(block, "jitter_noise", 0) and block.jitter_noise > 0:
        raise _Unsupported(
            f"{name}: router_jitter_noise={block.jitter_noise} has no mixops equivalent"
        )


def _base_experts(experts):
    """``experts``, or the experts module inside PEFT's ``lora.ParamWrapper``s (LoRA on
    ``target_parameters``, one wrapper per targeted weight, nested; integrations/peft.py)."""
    peft_lora = sys.modules.get("peft.tuners.lora.layer")  # no wrapper without PEFT imported
    while peft_lora is not None and isinstance(experts, peft_lora.ParamWrapper):
        experts = experts.base_layer
    return experts


def _router_config(gate) -> RouterConfig:
    """The RouterConfig choosing what the HF router ``gate`` chooses, with the same weights."""
    spec = _ROUTERS[_router_name(gate)]
    E, k = gate.weight.shape[0], gate.top_k
    if not spec.deepseek:
        return RouterConfig(
            num_experts=E,
            top_k=k,
            score_fn=spec.score_fn,
            renormalize=spec.always_renormalize or bool(gate.norm_topk_prob),
        )
    groups, kept = gate.num_group, gate.topk_group
    if k == E:
        # HF masks the dropped groups' scores to -inf and still takes the top E: every expert,
        # weighted by its sigmoid score. Group limiting changes nothing.
        groups = kept = 1
    elif groups and kept and E % groups == 0 and k > kept * (E // groups):
        raise _Unsupported(
            f"{type(gate).__name__}: top_k ({k}) is more than the {kept * (E // groups)} experts "
            f"of the {kept} kept group(s) (n_group={groups}, topk_group={kept}); HF then also "
            "picks experts of dropped groups, whose -inf scores torch.topk orders in no "
            "specified way, and mixops does not reproduce that choice"
        )
    try:
        return RouterConfig(
            num_experts=E,
            top_k=k,
            score_fn="sigmoid",
            renormalize=bool(gate.norm_topk_prob),
            renorm_eps=1e-20,
            scaling=float(gate.routed_scaling_factor),
            selection_bias=True,
            num_groups=groups,
            groups_kept=kept,
            group_score="top2_sum",
            router_fp32=True,
        )
    except ValueError as e:
        raise _Unsupported(f"{type(gate).__name__}: {e}") from e


def _shared(block):
    if hasattr(block, "shared_expert"):
        return block.shared_expert, getattr(block, "shared_expert_gate", None), "shared_expert"
    if hasattr(block, "shared_experts"):
        return block.shared_experts, None, "shared_experts"
    return None, None, "shared_experts"


# HF router class -> its patched subclass (transformers.py's _patch_router_class fills it).
_PATCHED_ROUTER_CLASSES = {}


def _router_name(gate):
    """The HF class name of a router, also once patch_model has patched it."""
    cls = type(gate)
    return cls.__base__.__name__ if cls in _PATCHED_ROUTER_CLASSES.values() else cls.__name__
