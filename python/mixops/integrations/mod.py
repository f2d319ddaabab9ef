"""Mixture-of-Depths for HF transformers decoder-only models (Llama, Qwen3, and others whose decoder
layers are called ``layer(hidden_states, attention_mask=..., position_embeddings=...,
position_ids=..., cache=..., **kwargs)`` and return the residual sum), the way Router-Tuning adds
MoD to a pretrained model::

    from mixops.integrations.mod import add_mod, mod_from_pretrained
    mods = add_mod(model, layers=range(1, n, 2), capacity=0.5, causal_rule="router")
    loss = out.loss + sum(m.aux_loss for m in mods)   # train the routers (use_cache=False)
    model.generate(...)                               # each token routed by sigmoid(r) > 0.5
    model.save_pretrained(path)
    model = mod_from_pretrained(LlamaForCausalLM, path)  # the same MoD model back

In place: each chosen decoder layer keeps its object, its Parameters and every state-dict key; its
class becomes a subclass of its own and of ``mixops.nn.MoD`` (``MoD<LayerClass>``, built once per
class; ``isinstance(layer, MoD)`` holds) whose forward is
MoD's routing around the original forward, and it gains ``router.weight`` (and ``predictor.*``).
So a plain HF ``from_pretrained`` of a saved MoD model loads every original weight (and reports
the router keys as unexpected), HF's output recording, gradient checkpointing and hooks see the
MoD layer, and the model deep-copies and pickles. What ``add_mod`` did is recorded in
``model.config.mixops_mod`` (saved with the config); ``mod_from_pretrained`` (or
``restore_mod`` on a loaded model) rebuilds it and loads the routers. Checkpoints saved by earlier
versions, whose wrapped layers' keys carry a ``block.`` prefix, load too (give ``add_mod``'s
arguments: those versions did not record them).

The padding mask: HF hands decoder layers a 4-D (or no) mask, so a pre-hook on the decoder model
passes its 2-D ``attention_mask`` to the MoD layers (padding is never chosen, and is never a kept
key). Training and evaluation without a cache use top-C (pass ``use_cache=False``: HF creates a
cache by default in evaluation); with a cache every token is routed by the causal rule. Attention
must be "sdpa" or "eager" (flash attention cannot hide arbitrary keys). Recorded outputs are full
length: ``output_hidden_states`` records the MoD layer's output, and ``output_attentions``
(eager attention) maps a top-C layer's compacted weights back to ``[batch, heads, seq, seq]`` (zero
for the skipped tokens' rows and columns).
"""

import copy
from fractions import Fraction

import torch
from torch import nn

from ..nn.mod import MoD, MoDRouting
from .mod_checkpoint import mod_from_pretrained, restore_mod

__all__ = ["add_mod", "mod_from_pretrained", "restore_mod", "MoDDecoderLayer"]

# What MoD sets on a layer (hidden_size and layer_idx may exist already, with the same meaning).
_OWN = (
    "router", "predictor", "capacity", "gate", "scale_skipped", "residual", "causal",
    "causal_rule", "aux_loss_coef", "predictor_hidden", "router_bias", "router_logits", "chosen",
    "aux_loss", "hf_padding_mask", "mod_compaction",
)  # fmt: skip


class MoDDecoderLayer(MoD):
    """The base of the in-place MoD layers (``MoD<LayerClass>``, a subclass of this and of the
    layer's class, so ``isinstance(layer, MoD)`` holds): MoD's routing around the layer class's
    own forward. There is no ``block`` submodule: the layer is its own block."""

    _mod_base = None

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise TypeError(
                f"MoD: {type(self).__name__} takes hidden_states positionally and the rest by "
                f"keyword, got {len(args)} more positional arguments"
            )
        return MoD.forward(self, hidden_states, **kwargs)

    def _run_block(self, x, **kwargs):
        return type(self)._mod_base.forward(self, x, **kwargs)

    def _block_root(self):
        return self

    def reset_parameters(self):
        base = getattr(type(self)._mod_base, "reset_parameters", None)
        if base is not None:
            base(self)
        self.reset_mod_parameters()

    def __reduce_ex__(self, protocol):
        # The class is built at run time: rebuild it from the layer class (pickle, deepcopy).
        return _new_layer, (type(self)._mod_base,), self.__dict__

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints of the wrapper MoD (earlier add_mod) hold this layer's keys under "block.".
        old = prefix + "block."
        for k in [k for k in state_dict if k.startswith(old)]:
            state_dict[prefix + k[len(old) :]] = state_dict.pop(k)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


_CLASSES = {}


def _layer_class(base):
    cls = _CLASSES.get(base)
    if cls is None:
        attrs = {"_mod_base": base, "__module__": __name__}
        cls = type("MoD" + base.__name__, (MoDDecoderLayer, base), attrs)
        _CLASSES[base] = cls
    return cls


def _new_layer(base):
    cls = _layer_class(base)
    return cls.__new__(cls)


def _decoder(model):
    """The module holding ``layers`` (``model.model`` for ``*ForCausalLM``)."""
    for m in (getattr(model, "model", None), model):
        if m is not None and isinstance(getattr(m, "layers", None), nn.ModuleList):
            return m
    raise ValueError(
        f"add_mod: {type(model).__name__} has no decoder ``layers`` ModuleList (model.model.layers)"
    )


def _pass_padding_mask(decoder, args, kwargs):
    """Forward pre-hook of the decoder: its 2-D attention_mask (or None) to every MoD layer."""
    m = kwargs.get("attention_mask")
    pad = m if torch.is_tensor(m) and m.dim() == 2 else None
    for layer in decoder.layers:
        if isinstance(layer, MoDRouting):
            layer.hf_padding_mask = pad


def _to_full(w, pos, ok, S):
    """Compacted attention weights ``[B, h, C, C]`` at the tokens' positions in ``[B, h, S, S]``
    (zero elsewhere; empty slots dropped)."""
    B, h, C, _ = w.shape
    w = w * (ok[:, None, :, None] & ok[:, None, None, :]).to(w.dtype)
    rows = w.new_zeros(B, h, S, C).scatter_add_(2, pos[:, None, :, None].expand(B, h, C, C), w)
    return w.new_zeros(B, h, S, S).scatter_add_(3, pos[:, None, None, :].expand(B, h, S, C), rows)


class _OnTheLossPath(torch.autograd.Function):
    """``out`` unchanged, with the full-length weights ``full`` (a leaf) on the loss path: the
    backward hands ``out``'s gradient on, and gives ``full`` the gradient the compacted weights
    ``w`` receive through ``out``, at the tokens' positions (what HF users read from
    ``attentions[i].grad``). ``w`` itself gets its gradient through ``out``'s own graph."""

    @staticmethod
    def forward(ctx, out, w, full, pos, ok):
        ctx.out, ctx.w, ctx.where = out, w, (pos, ok, full.shape[-1])
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        (gw,) = torch.autograd.grad(ctx.out, ctx.w, grad, retain_graph=True, allow_unused=True)
        gfull = None if gw is None else _to_full(gw, *ctx.where)
        return grad, None, gfull, None, None


class _FullLengthAttentions:
    """Forward hook (run before HF's recorder) of an attention module inside a MoD layer: while
    the layer runs its block on a top-C compacted sequence and HF records attentions, weights
    ``[B, h, C, C]`` go back to ``[B, h, seq, seq]`` at the tokens' positions, with gradients."""

    def __init__(self, layer, index):
        self.layer, self.index = layer, index

    def __call__(self, module, args, output):
        ctx = self.layer.mod_compaction
        if ctx is None or not isinstance(output, tuple) or len(output) <= self.index:
            return None
        w = output[self.index]
        if not torch.is_tensor(w) or w.dim() != 4 or not _recording_attentions():
            return None
        pos, ok, S = ctx
        full = _to_full(w.detach(), pos, ok, S)
        out = list(output)
        main = 1 if self.index == 0 else 0  # the attention output, on the loss path
        if w.requires_grad and torch.is_tensor(out[main]) and out[main].requires_grad:
            full.requires_grad_(True)
            out[main] = _OnTheLossPath.apply(out[main], w, full, pos, ok)
        out[self.index] = full
        return tuple(out)


def _recording_attentions():
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # another transformers layout: map them always
        return True
    collected = _active_collector.get()
    return collected is not None and "attentions" in collected


def _attention_specs(decoder):
    """(class or class name, index) of the modules whose output HF records as attentions."""
    specs = getattr(decoder, "_can_record_outputs", None) or {}
    specs = specs.get("attentions")
    specs = specs if isinstance(specs, list) else [specs] if specs is not None else []
    out = []
    for s in specs:
        target = getattr(s, "target_class", None) or getattr(s, "class_name", None) or s
        out.append((target, getattr(s, "index", 1)))
    return out


def _hook_attentions(layer, specs):
    for m in layer.modules():
        for target, index in specs:
            hit = isinstance(m, target) if isinstance(target, type) else type(m).__name__ == target
            if hit and not any(
                isinstance(h, _FullLengthAttentions) for h in m._forward_hooks.values()
            ):
                m.register_forward_hook(_FullLengthAttentions(layer, index), prepend=True)


def _options_record(model):
    cfg = getattr(model, "config", None)
    rec = getattr(cfg, "mixops_mod", None) if cfg is not None else None
    return rec if isinstance(rec, dict) else None


def _record(model, index, layer):
    cfg = getattr(model, "config", None)
    if cfg is None:
        return
    rec = _options_record(model) or {"version": 1, "layers": {}}
    rec["layers"][str(index)] = layer.mod_options()
    cfg.mixops_mod = rec


def add_mod(
    model: nn.Module, layers=None, capacity=0.125, *, capacities=None, **mod_options
) -> list:
    """Turn the decoder layers at the indices ``layers`` (an int or an iterable; default every
    layer) into MoD layers with ``capacity``, in place; or give ``capacities``, one entry per layer
    (None: the layer stays dense), as ``pmod_capacity_schedule`` returns. ``mod_options`` go to
    MoD (default ``gate="tanh"``: a zero router, so every chosen token starts with weight 1).
    Returns the MoD layers (the model's own layer objects)."""
    n = len(_decoder(model).layers)
    if isinstance(layers, int):
        layers = [layers]
    if capacities is not None:
        if layers is not None:
            raise ValueError("add_mod: give layers (with capacity) or capacities, not both")
        if len(capacities) != n:
            raise ValueError(
                f"add_mod: capacities needs one entry per layer ({n}), got {len(capacities)}"
            )
        plan = {i: c for i, c in enumerate(capacities) if c is not None}
    elif layers is None:
        plan = {i: capacity for i in range(n)}
    else:
        plan = {}
        for i in layers:
            if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n:
                raise ValueError(f"add_mod: layer index {i!r} is out of range for {n} layers")
            plan[i % n] = capacity
    mod_options.setdefault("gate", "tanh")
    return convert_layers(model, {i: dict(mod_options, capacity=c) for i, c in plan.items()})


def convert_layers(model, plan):
    """``plan``: {layer index: MoD options including capacity} (as ``config.mixops_mod`` records
    them). Converts those layers in place, records them and installs the model-level hooks."""
    decoder = _decoder(model)
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl == "flex_attention":
        raise ValueError(
            "add_mod: attn_implementation 'flex_attention' is not supported (its BlockMask "
            "cannot be compacted or hide skipped keys); use 'sdpa' or 'eager' (flash attention: "
            "top-C training only, not generation)"
        )
    for i in plan:
        if isinstance(decoder.layers[i], MoDRouting):
            raise ValueError(f"add_mod: layer {i} is already a MoD layer")
    cfg = getattr(model, "config", None)
    before = copy.deepcopy(getattr(cfg, "mixops_mod", None))
    mods, undo = [], []
    try:
        for i, opts in sorted(plan.items()):
            layer, opts = decoder.layers[i], dict(opts)
            cap = opts.pop("capacity")
            if isinstance(cap, str):
                cap = Fraction(cap)
            clash = [a for a in _OWN if hasattr(layer, a)]
            if clash:
                raise ValueError(
                    f"add_mod: layer {i} ({type(layer).__name__}) already has {clash}, which MoD "
                    "adds"
                )
            p = next(layer.parameters(), None)
            kw = {} if p is None else dict(device=p.device, dtype=p.dtype)
            undo.append(_layer_state(layer))
            layer.__class__ = _layer_class(type(layer))
            layer._mod_init(layer, hidden, cap, **opts, **kw)
            _record(model, i, layer)
            mods.append(layer)
    except BaseException:
        # A bad option of any layer leaves the model as it was: no half-converted layer.
        for state in reversed(undo):
            _restore_layer(*state)
        if cfg is not None:
            if before is None:
                cfg.__dict__.pop("mixops_mod", None)
            else:
                cfg.mixops_mod = before
        raise
    if not any(h is _pass_padding_mask for h in decoder._forward_pre_hooks.values()):
        decoder.register_forward_pre_hook(_pass_padding_mask, with_kwargs=True)
    specs = _attention_specs(decoder)
    for layer in mods:
        _hook_attentions(layer, specs)
    _hook_init(model)
    return mods


def _layer_state(layer):
    """What converting ``layer`` changes: its class and the names in its attribute tables."""
    tables = ("_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks")
    return layer, type(layer), set(vars(layer)), {t: set(getattr(layer, t)) for t in tables}


def _restore_layer(layer, cls, names, tables):
    layer.__class__ = cls
    for t, keys in tables.items():
        table = getattr(layer, t)
        for k in set(table) - keys:
            del table[k]
    for k in set(vars(layer)) - names:
        delattr(layer, k)


def _hook_init(model):
    """HF's init (``init_weights()``, also after ``to_empty()``) re-initialises every module; MoD's
    routers then get MoD's own init again through HF's init functions (loaded tensors kept)."""
    try:
        from .transformers import _hook_hf_models
    except ImportError:  # no transformers: nothing re-initialises the routers
        return
    _hook_hf_models(model)
