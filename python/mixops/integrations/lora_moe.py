"""Mixtures of LoRA experts in HF transformers decoders (Llama, Qwen3, and any model whose
projections are plain ``nn.Linear``), the way MixLoRA / MoLA / LoRAMoE fine-tune a pretrained
model::

    from mixops.integrations.lora_moe import add_lora_moe, lora_moe_aux_loss
    add_lora_moe(model, ["q_proj", "v_proj", "up_proj"], num_experts=8, top_k=2, rank=8,
                 aux_loss_coef=0.01)                    # in place; only the adapters train
    loss = model(ids, labels=ids).loss + lora_moe_aux_loss(model)
    model.save_pretrained(path)                         # the base keys unchanged + the adapters'
    model = lora_moe_from_pretrained(LlamaForCausalLM, path)   # the same model back

Each chosen ``nn.Linear`` is replaced by a ``mixops.nn.LoRAMoE`` holding the same ``weight`` /
``bias`` Parameters under the same names, so the base checkpoint keys stay as they were: a plain
HF ``from_pretrained`` of a saved model loads every original weight (and reports the adapters as
unexpected keys). What ``add_lora_moe`` did (modules, expert counts, options) is recorded in
``model.config.mixops_lora_moe``; ``lora_moe_from_pretrained`` (or ``restore_lora_moe`` on a
loaded model) rebuilds the layers and loads the adapters and routers.

Padding: a forward pre-hook on the model hands its 2-D ``attention_mask`` (given by keyword, as
HF's ``generate`` and ``Trainer`` do) to every layer, so padding stays out of the router losses
and load counts (the padded tokens are still routed).
"""

import re
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from ..nn.lora_moe import LoRAMoE, lora_moe_aux_loss
from .mod_checkpoint import _HUB_KWARGS, _read

__all__ = ["add_lora_moe", "lora_moe_aux_loss", "lora_moe_from_pretrained", "restore_lora_moe"]

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def _matches(name, target_modules):
    if isinstance(target_modules, str):  # PEFT's rule: a string is a regex on the full name
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _experts_of(name, num_experts, per_layer):
    """The expert count of module ``name``: ``per_layer`` (a sequence or a callable of the layer
    index, MoLA) for modules under ``layers.<i>``, else ``num_experts``."""
    m = _LAYER.search(name)
    if per_layer is None or m is None:
        if num_experts is None:
            raise ValueError(
                f"add_lora_moe: num_experts is needed for {name!r}"
                + ("" if per_layer is None else " (not under layers.<i>)")
            )
        return num_experts
    i = int(m.group(1))
    if callable(per_layer):
        return per_layer(i)
    if i >= len(per_layer):
        raise ValueError(
            f"add_lora_moe: num_experts_per_layer has {len(per_layer)} entries, but {name!r} is "
            f"in layer {i}"
        )
    return per_layer[i]


def add_lora_moe(
    model: nn.Module,
    target_modules: Union[str, Sequence[str]],
    num_experts: Optional[int] = None,
    top_k: Optional[int] = None,
    rank: int = 8,
    *,
    num_experts_per_layer: Union[Sequence[int], Callable[[int], int], None] = None,
    freeze_base: bool = True,
    dtype: Optional[torch.dtype] = None,
    **options,
) -> nn.Module:
    """Wrap the ``nn.Linear`` modules of ``model`` named by ``target_modules`` in
    ``mixops.nn.LoRAMoE``, in place; returns ``model``.

    Args:
        target_modules: names (a module matches when its name is one or ends in ``.<name>``:
            ``["q_proj", "v_proj", "up_proj"]``) or a regex matched against the full names
            (PEFT's rule). Every match must be an ``nn.Linear``; at least one must match.
        num_experts, top_k, rank: each layer's adapters (see ``LoRAMoE``).
        num_experts_per_layer: MoLA's per-layer expert counts: a sequence indexed by decoder
            layer (``model.layers.<i>``) or a callable ``i -> count``; modules outside the
            decoder layers use ``num_experts``.
        freeze_base: every parameter of the model but the adapters and routers gets
            ``requires_grad=False`` (PEFT's behaviour); False changes no flag.
        dtype: the adapters' dtype (default: each base's), e.g. fp32 adapters on a bf16 model.
        options: ``LoRAMoE``'s other keywords (``alpha``, ``use_rslora``, ``dropout``,
            ``shared_adapter``, ``aux_loss_coef``, ``z_loss_coef``, router options such as
            ``score_fn`` or ``renormalize``); JSON-able values, recorded in the config.

    Errors name the module. Nothing is changed when a layer cannot be built.
    """
    if "router" in options:
        raise TypeError("add_lora_moe: give the router options as keywords, not router=")
    if isinstance(target_modules, str):
        re.compile(target_modules)
    elif not target_modules or not all(isinstance(t, str) for t in target_modules):
        raise ValueError(
            f"add_lora_moe: target_modules must be module names or a regex, got {target_modules!r}"
        )
    inside = {  # a LoRAMoE's own submodules (its router) are never targets
        id(m)
        for lm in model.modules()
        if isinstance(lm, LoRAMoE)
        for m in lm.modules()
        if m is not lm
    }
    plan = {}
    for name, mod in model.named_modules():
        if id(mod) in inside or not name or not _matches(name, target_modules):
            continue
        if isinstance(mod, LoRAMoE):
            raise ValueError(f"add_lora_moe: {name!r} is already a LoRAMoE")
        if not isinstance(mod, nn.Linear):
            raise ValueError(
                f"add_lora_moe: target_modules matched {name!r}, a {type(mod).__name__}, "
                "not an nn.Linear"
            )
        plan[name] = _experts_of(name, num_experts, num_experts_per_layer)
    if not plan:
        raise ValueError(f"add_lora_moe: target_modules={target_modules!r} matched no module")
    options = dict(options, top_k=top_k, rank=rank)
    if dtype is not None:
        options["dtype"] = str(dtype).removeprefix("torch.")
    _convert(model, {name: dict(options, num_experts=E) for name, E in plan.items()})
    if freeze_base:
        _freeze_base(model)
    return model


def _pass_padding_mask(model, args, kwargs):
    """Forward pre-hook of the model: its 2-D ``attention_mask`` (or None) to every LoRAMoE, so
    padding stays out of their losses and load counts. Kept until the next forward (gradient
    checkpointing recomputes with it)."""
    m = kwargs.get("attention_mask")
    pad = m if torch.is_tensor(m) and m.dim() == 2 else None
    for layer in model.modules():
        if isinstance(layer, LoRAMoE):
            layer.padding_mask = pad


def _freeze_base(model):
    trainable = {
        id(p) for m in model.modules() if isinstance(m, LoRAMoE) for p in _adapter_params(m)
    }
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)


def _adapter_params(m):
    return [p for n, p in m.named_parameters() if n not in ("weight", "bias")]


def _convert(model, plan):
    """``plan``: {module name: LoRAMoE keywords, ``num_experts`` included, dtype as a string}.
    Builds every layer first (errors name the module and change nothing), then swaps them in and
    records the plan in ``config.mixops_lora_moe``."""
    built = {}
    for name, opts in plan.items():
        kw = dict(opts)
        if "dtype" in kw:
            kw["dtype"] = getattr(torch, kw["dtype"])
        try:
            built[name] = LoRAMoE(model.get_submodule(name), freeze_base=False, **kw)
        except (TypeError, ValueError) as e:
            raise type(e)(f"add_lora_moe: {name}: {e}") from e
    for name, layer in built.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    if not any(h is _pass_padding_mask for h in model._forward_pre_hooks.values()):
        model.register_forward_pre_hook(_pass_padding_mask, with_kwargs=True)
    cfg = getattr(model, "config", None)
    if cfg is not None:
        rec = dict(getattr(cfg, "mixops_lora_moe", None) or {})
        rec.update(plan)
        cfg.mixops_lora_moe = rec


def restore_lora_moe(model: nn.Module, checkpoint=None, *, freeze_base=True, **hub_kwargs):
    """Rebuild the LoRAMoE layers recorded in ``model.config.mixops_lora_moe`` (a plain HF
    ``from_pretrained`` of a saved model keeps the record but not the layers), then load their
    adapters and routers from ``checkpoint`` (a folder or hub id holding the model's weights;
    None: leave them as initialised). ``freeze_base`` as in ``add_lora_moe``. Returns ``model``."""
    rec = getattr(getattr(model, "config", None), "mixops_lora_moe", None)
    if not isinstance(rec, dict) or not rec:
        raise ValueError("restore_lora_moe: the config records no LoRAMoE layers")
    todo = {n: o for n, o in rec.items() if not isinstance(model.get_submodule(n), LoRAMoE)}
    _convert(model, todo)
    if checkpoint is not None:
        own = {
            f"{n}.{k}"
            for n in rec
            for k in model.get_submodule(n).state_dict()
            if k not in ("weight", "bias")
        }
        found = _read(checkpoint, lambda k: k in own, hub_kwargs)
        missing = sorted(own - set(found))
        if missing:
            raise ValueError(f"restore_lora_moe: the checkpoint has no {missing[:4]}")
        model.load_state_dict(found, strict=False)
    if freeze_base:
        _freeze_base(model)
    return model


def lora_moe_from_pretrained(model_class, path, *args, **kwargs):
    """``model_class.from_pretrained(path, *args, **kwargs)`` with its LoRAMoE layers, adapters
    and routers restored (``restore_lora_moe``)."""
    model = model_class.from_pretrained(path, *args, **kwargs)
    hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
    return restore_lora_moe(model, path, **hub)
