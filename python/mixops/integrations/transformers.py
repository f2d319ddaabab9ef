"""HF transformers integration: convert MoE blocks to mixops.nn.MoE, patch loaded models in place,
and the ``"mixops"`` experts implementation (``experts_implementation="mixops"``).

::

    from mixops.integrations.transformers import from_hf, patch_model, register
    moe = from_hf(model.model.layers[0].mlp)   # a mixops.nn.MoE sharing the block's parameters
    patch_model(model)                          # every convertible block, in place, for training
    register()                                  # then from_pretrained(..., experts_implementation="mixops")

transformers is an optional dependency (``pip install mixops[transformers]``); importing this module
without it raises ImportError saying so. Which blocks and routers convert, and how: hf_blocks.py.
"""

import importlib
import warnings

import torch
import torch.nn.functional as F
from torch import nn

try:
    import transformers  # noqa: F401
    from transformers import initialization as hf_init
    from transformers.integrations.moe import ExpertsInterface
    from transformers.modeling_utils import PreTrainedModel
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "mixops.integrations.transformers needs HF transformers: pip install 'mixops[transformers]'"
    ) from e

from ..nn import MoE, MoEParts
from ..nn.lora import lora_delta
from ..nn.mod import MoDRouter
from ..ops import grouped_mm, permute, unpermute
from .hf_blocks import (
    _PATCHED_ROUTER_CLASSES,
    SUPPORTED_BLOCKS,
    _base_experts,
    _check_block,
    _hidden_act,
    _router_config,
    _shared,
    _Unsupported,
)

__all__ = ["from_hf", "patch_model", "register", "mixops_experts_forward", "SUPPORTED_BLOCKS"]


def _build(block, gate, moe_kwargs, cls=MoE) -> MoE:
    """A mixops.nn.MoE around ``block``'s modules (routing through ``gate``). Raises _Unsupported
    for what mixops cannot express, and MoE's own errors for bad ``moe_kwargs``. Changes nothing."""
    _check_block(block)
    experts = _base_experts(block.experts)
    if experts is not block.experts and _PEFT is None:
        raise _Unsupported(
            "its experts are wrapped by PEFT, and mixops runs PEFT's LoRA on experts only with "
            "peft in mixops.integrations.peft.PEFT_TESTED (pip install -r requirements-peft.txt)"
        )
    router = _router_config(block.gate)
    activation = _hidden_act(experts)
    E, H = block.gate.weight.shape
    shared, shared_gate, shared_name = _shared(block)
    parts = MoEParts(
        gate=gate,
        experts=block.experts,
        shared=shared,
        shared_gate=shared_gate,
        shared_name=shared_name,
    )
    moe = cls(
        H,
        experts.down_proj.shape[-1],
        router=router,
        activation=activation,
        parts=parts,
        **moe_kwargs,
    )
    _keep_hf_order(moe, block)
    if _PEFT is not None:
        _PEFT.adopt(moe)  # PEFT's LoRA on the experts -> the layer's adapter path
    return moe


def _keep_hf_order(moe, block):
    """Give ``moe``'s submodules the order ``block`` registered them in (Qwen3-MoE, DeepSeek-V3
    and GLM-4-MoE register the experts before the router; MoE the router first), so that
    ``named_parameters()`` and ``state_dict()`` keep HF's order: an optimizer state saved before
    patching is loaded by position, and would otherwise put moments onto other tensors."""
    hf = [n for n in block._modules if n in moe._modules]
    for name in hf + [n for n in moe._modules if n not in hf]:
        moe._modules[name] = moe._modules.pop(name)


class _Logits(nn.Module):
    """A router for mixops.nn.MoE that shares an HF router's weight (and bias buffer)."""

    def __init__(self, hf_gate):
        super().__init__()
        self.weight = hf_gate.weight
        if hasattr(hf_gate, "e_score_correction_bias"):
            self.register_buffer("e_score_correction_bias", hf_gate.e_score_correction_bias)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))


def _hf_router_logits_forward(self, hidden_states):
    # The patched HF router computes only the logits (mixops does the rest) and returns them first
    # in a tuple, so HF's output recorder (router_logits, aux loss) still sees them.
    x = hidden_states.reshape(-1, self.weight.shape[-1])
    return (F.linear(x, self.weight.to(x.dtype)),)


def _patch_router_class(gate):
    """Make an HF router compute only the logits: a subclass (so HF's isinstance-based weight
    initialisation still reaches it) with another forward."""
    cls = type(gate)
    if cls in _PATCHED_ROUTER_CLASSES.values():
        return
    if cls not in _PATCHED_ROUTER_CLASSES:
        _PATCHED_ROUTER_CLASSES[cls] = type(
            "Mixops" + cls.__name__, (cls,), {"forward": _hf_router_logits_forward}
        )
    gate.__class__ = _PATCHED_ROUTER_CLASSES[cls]


class _InitWeights:
    """``_init_weights`` of an HF model after patch_model: HF's own, then the buffers mixops adds
    (MoE's load counter) and MoD's router init, through HF's init functions, so the
    ``_is_hf_initialized`` flags hold.
    HF's ``init_weights()`` (also after ``to_empty()`` on a model built on the meta device) calls
    it for every module. The routers stay HF's classes' subclasses: HF initialises them itself."""

    def __init__(self, model):
        self.model = model

    def __call__(self, module):
        type(self.model)._init_weights(self.model, module)
        if isinstance(module, MoE):
            hf_init.zeros_(module.tokens_per_expert)
        elif isinstance(module, MoDRouter):  # after HF's nn.Linear init: MoD's (zero for tanh)
            module.reset_parameters(init=hf_init)


class PatchedMoE(MoE):
    """patch_model's replacement of an HF MoE block: a ``mixops.nn.MoE`` around the block's own
    modules that also follows an explicit ``model.set_experts_implementation(...)`` made after
    patching. With one of HF's implementations ("eager", "batched_mm", "grouped_mm", ...) the
    routed experts run through HF's experts module, which dispatches on the config as HF's block
    would (routing, shared experts and the aux-loss statistics stay mixops'); with "mixops" (and
    until such a call) they run mixops' grouped GEMMs."""

    hf_experts_implementation = None  # set by the model's set_experts_implementation

    def dispatch_start(self, *args, **kwargs):
        if _PEFT is not None:  # get_peft_model after patch_model wraps the experts
            _PEFT.adopt(self)
        return super().dispatch_start(*args, **kwargs)

    def follows_experts_implementation(self) -> bool:
        """HF's experts module computes what this layer's routed experts compute: no capacity
        (HF's blocks drop nothing), no zero-computation experts, no add_lora adapters."""
        plain = self.capacity_factor is None and not self.zero_experts and not self.expert_choice
        return plain and "experts_lora" not in self._modules

    def _experts_routed(self, x2, r, capacity, cast):
        impl = self.hf_experts_implementation
        if impl in (None, "mixops") or not self.follows_experts_implementation():
            return super()._experts_routed(x2, r, capacity, cast)
        weights = r.weights.to(x2.dtype)
        experts = self._modules["experts"]  # with PEFT's wrapper, if any (HF computes it)
        if cast is None:
            return experts(x2, r.ids.long(), weights)
        with torch.autocast(x2.device.type, dtype=cast):  # as HF's block runs under autocast
            return experts(x2, r.ids.long(), weights).to(x2.dtype)


class _SetExpertsImplementation:
    """``set_experts_implementation`` of an HF model after patch_model: HF's own, and the blocks
    patch_model replaced follow it (PatchedMoE); a warning names the mixops layers that cannot
    (a capacity, zero experts, LongCat-Flash's and JetMoE's layers)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, experts_implementation):
        out = type(self.model).set_experts_implementation(self.model, experts_implementation)
        impl = self.model.config._experts_implementation
        stuck = []
        for name, m in self.model.named_modules():
            if isinstance(m, PatchedMoE) and m.follows_experts_implementation():
                m.hf_experts_implementation = impl
            elif isinstance(m, MoE) and impl != "mixops":
                stuck.append(name)
        if stuck:
            warnings.warn(
                f"mixops: set_experts_implementation({impl!r}) does not change these mixops "
                f"layers of patch_model (a capacity, zero experts, or a family's own layer): "
                f"{', '.join(stuck[:4])}{' ...' if len(stuck) > 4 else ''}",
                UserWarning,
                stacklevel=2,
            )
        return out


def _hook_hf_models(model):
    # Instance attributes (deep copies and pickles carry them along with the model they serve).
    # Every PreTrainedModel inside needs them: HF's init hands sub-models their own _init_weights.
    for m in model.modules():
        if isinstance(m, PreTrainedModel) and not isinstance(
            m.__dict__.get("_init_weights"), _InitWeights
        ):
            m._init_weights = _InitWeights(m)
            m.set_experts_implementation = _SetExpertsImplementation(m)


def from_hf(block: nn.Module, **moe_kwargs):
    """A ``mixops.nn.MoE`` computing what the HF MoE ``block`` computes, sharing its Parameters
    (and the selection-bias buffer); the HF block keeps working. ``moe_kwargs`` adds MoE options
    HF blocks do not have (e.g. ``aux_loss_coef``, ``capacity_factor``).

    Supported: Mixtral, Qwen2-MoE (sigmoid-gated shared expert), Qwen3-MoE and OLMoE (softmax top-k,
    with or without ``norm_topk_prob``), DeepSeek-V3 and GLM-4-MoE (sigmoid, selection bias,
    group-limited top-k, routed scaling, shared experts), LongCat-Flash (softmax over routed and
    identity zero experts, selection bias, routed scaling). A ``JetMoeAttention`` gives a
    ``mixops.nn.MoA`` (``moe_kwargs`` are then MoA options). Anything else raises ValueError
    saying what is missing."""
    _check_no_router(moe_kwargs, "from_hf")
    if type(block).__name__ in ("JetMoeAttention", "MixopsJetMoeAttention"):
        from .jetmoe import moa_from_hf

        return moa_from_hf(block, **moe_kwargs)
    if type(block).__name__ == "LongcatFlashMoE":
        from . import longcat

        try:
            return longcat.from_hf(block, moe_kwargs)
        except longcat.Unsupported as e:
            raise ValueError(f"mixops.from_hf: cannot convert: {e}") from None
    try:
        _check_block(block)
        return _build(block, _Logits(block.gate), moe_kwargs)
    except _Unsupported as e:
        raise ValueError(f"mixops.from_hf: cannot convert: {e}") from None


def patch_model(model: nn.Module, **moe_kwargs) -> list:
    """Replace every convertible MoE block of ``model`` in place by a ``mixops.nn.MoE`` that keeps
    the block's own submodules: the same Parameter objects (an optimizer built before keeps
    working), the same state-dict keys, and the HF router module (now computing only the logits),
    so ``output_router_logits`` and HF's load-balancing loss still work, and HF's order of
    parameters, state-dict keys and buffers (an optimizer state is loaded by position). Returns
    the names of the replaced blocks. ``router=`` is not an option (the routing is HF's).

    Every layer is built before anything changes: a block mixops cannot express stays exactly as
    it was, with a warning saying why, and invalid ``moe_kwargs`` raise with the model untouched.
    Afterwards ``model.init_weights()`` also zeroes the buffers mixops adds, and
    ``model.set_experts_implementation(impl)`` makes the replaced blocks' routed experts run HF's
    ``impl`` ("mixops" again: mixops' grouped GEMMs), except with a capacity or zero experts.

    JetMoE: the MoA attention (``JetMoeAttention``) and the MoE MLP (``JetMoeMoE``) keep their
    modules and change class to mixops-backed subclasses (see ``mixops.integrations.jetmoe``).
    ``moe_kwargs`` do not apply to them.

    LongCat-Flash: each decoder layer keeps its modules and runs mixops' shortcut-connected
    schedule; its MoE (zero experts, selection bias, routed scaling) becomes a ``mixops.nn.MoE``
    holding HF's router and experts (see ``mixops.integrations.longcat``)."""
    _check_no_router(moe_kwargs, "patch_model")
    plans = []
    for name, block in model.named_modules():
        if isinstance(block, MoE) or not (
            type(block).__name__ in SUPPORTED_BLOCKS or _looks_like_moe(block)
        ):
            continue
        try:
            plans.append((name, block, _build(block, block.gate, moe_kwargs, PatchedMoE)))
        except _Unsupported as e:
            warnings.warn(
                f"mixops.patch_model: {name} left as it is: {e}", UserWarning, stacklevel=2
            )
    family_plans = _family_plans(model, moe_kwargs)
    for name, block, moe in plans:  # nothing can fail from here on
        _patch_router_class(block.gate)
        moe.train(block.training)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, moe)
    for _, apply in family_plans:
        apply()
    # Also when every block was patched before (by the post_init of a model nested in this one):
    # this model's own init_weights and set_experts_implementation must reach them too.
    if plans or family_plans or any(isinstance(m, MoE) for m in model.modules()):
        _hook_hf_models(model)
    return [name for name, _, _ in plans] + [name for name, _ in family_plans]


def _check_no_router(moe_kwargs, what):
    """The routing is the HF router's own: ``router=`` is not an option (it would also reach MoE
    twice). Expert choice in particular is not causal, and these models are causal decoders."""
    if "router" in moe_kwargs:
        raise ValueError(
            f"mixops.{what}: router= is not an option (got router={moe_kwargs['router']!r}): each "
            "block keeps its HF router's routing. These are causal decoders, and expert choice "
            "is not causal (a token's output depends on later tokens): use token choice for them"
        )


# Model families whose blocks change class in place (integrations/<module>.py, each with
# ``plan(block, moe_kwargs)`` and ``Unsupported``), by their HF class-name prefix.
_FAMILIES = (("JetMoe", "jetmoe"), ("LongcatFlash", "longcat"))


def _family_plans(model, moe_kwargs):
    """[(name, apply)] for the blocks of the families above (imported only when present); a block
    mixops cannot express is left with a warning."""
    out = []
    for prefix, module in _FAMILIES:
        if not any(type(m).__name__.startswith(prefix) for m in model.modules()):
            continue
        family = importlib.import_module(f"{__package__}.{module}")
        for name, block in model.named_modules():
            try:
                apply = family.plan(block, moe_kwargs)
            except family.Unsupported as e:
                warnings.warn(
                    f"mixops.patch_model: {name} left as it is: {e}", UserWarning, stacklevel=3
                )
                continue
            if apply is not None:
                out.append((name, apply))
    return out


def _looks_like_moe(module):
    return isinstance(getattr(module, "gate", None), nn.Module) and isinstance(
        getattr(module, "experts", None), nn.Module
    )


def mixops_experts_forward(
    self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The ``"mixops"`` experts implementation: permute -> grouped_mm -> HF's own gating ->
    grouped_mm -> unpermute, on any HF experts module made with ``use_experts_implementation``;
    inside PEFT's LoRA wrappers, plus their adapters' terms (integrations/peft.py)."""
    if getattr(self, "has_post_expert_norm", False):
        raise NotImplementedError("mixops experts: post-expert norms are not supported")
    E = self.num_experts
    ids = top_k_index
    if getattr(self, "_is_expert_parallel", False):  # EP sentinels (>= E) mean "no expert"
        ids = torch.where(ids >= E, ids.new_full((), -1), ids)
    w1 = self.gate_up_proj if self.has_gate else self.up_proj
    b1 = (self.gate_up_proj_bias if self.has_gate else self.up_proj_bias) if self.has_bias else None
    w2 = self.down_proj
    b2 = self.down_proj_bias if self.has_bias else None
    ad = {} if _PEFT is None else _PEFT.call_adapters(self)
    x = hidden_states.to(w1.dtype)
    p = permute(x, ids, E)
    if not self.is_transposed:
        w1, w2 = w1.transpose(1, 2), w2.transpose(1, 2)
    h = grouped_mm(p.x_sorted, w1, p.offsets)
    if ad.get("gate_up") is not None:
        h = h.add_(lora_delta(p.x_sorted, p.offsets, ad["gate_up"]))
    row_expert = None
    if b1 is not None:
        rows = torch.arange(h.shape[0], device=h.device, dtype=torch.int32)
        row_expert = torch.bucketize(rows, p.offsets, right=True).clamp_(max=E - 1)
        h = h + b1[row_expert]
    h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
    o = grouped_mm(h, w2, p.offsets)
    if ad.get("down") is not None:
        o = o.add_(lora_delta(h, p.offsets, ad["down"]))
    if b2 is not None:
        o = o + b2[row_expert]
    weights = top_k_weights
    if weights.dtype not in (torch.float32, torch.float64, o.dtype):
        weights = weights.float()
    return unpermute(o, p.row_map, weights).to(hidden_states.dtype)


def register() -> None:
    """Register ``"mixops"`` in transformers' experts-implementation registry, so that
    ``from_pretrained(..., experts_implementation="mixops")`` and
    ``model.set_experts_implementation("mixops")`` use mixops' grouped GEMMs. Idempotent."""
    ExpertsInterface.register("mixops", mixops_experts_forward)


def _load_peft():
    """integrations/peft.py, PEFT's expert LoRA routed through mixops before any forward of a model
    get_peft_model wraps later; None without PEFT (or outside its tested range)."""
    try:
        from . import peft
    except ImportError:  # no PEFT, or one that does not import: PEFT stays PEFT's own
        return None
    return peft if peft.install() else None


register()
_PEFT = _load_peft()
