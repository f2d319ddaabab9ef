"""Mixture-of-Depths for HF transformers decoder-only models (Llama, Qwen3, and others whose decoder
layers are called ``layer(hidden_states, attention_mask=..., position_embeddings=...,
position_ids=..., cache=..., **kwargs)`` and return the residual sum), the way Router-Tuning adds
MoD to a pretrained model::

    from mixops.integrations.mod import add_mod
    mods = add_mod(model, layers=range(1, n, 2), capacity=0.5, causal_rule="router")
    loss = out.loss + sum(m.aux_loss for m in mods)   # train the routers (use_cache=False)
    model.generate(...)                               # each token routed by sigmoid(r) > 0.5

The chosen layers are replaced by ``mixops.nn.MoD(layer)`` holding the original layer (its
Parameters, not copies) as ``block``: state-dict keys gain ``block.`` and each MoD layer adds
``router.weight`` (and ``predictor.*``). Load pretrained weights before converting.

The padding mask: HF hands decoder layers a 4-D (or no) mask, so a pre-hook on the decoder model
passes its 2-D ``attention_mask`` to the MoD layers (padding is never chosen, and is never a kept
key). Training and evaluation without a cache use top-C (pass ``use_cache=False``: HF creates a
cache by default in evaluation); with a cache every token is routed by the causal rule. Attention
must be "sdpa" or "eager" (flash attention cannot hide arbitrary keys).
"""

from torch import nn

from ..nn import MoD

__all__ = ["add_mod"]


def _decoder(model):
    """The module holding ``layers`` (``model.model`` for ``*ForCausalLM``)."""
    for m in (getattr(model, "model", None), model):
        if m is not None and isinstance(getattr(m, "layers", None), nn.ModuleList):
            return m
    raise ValueError(
        f"add_mod: {type(model).__name__} has no decoder ``layers`` ModuleList (model.model.layers)"
    )


def _padding_hook(mods):
    def hook(module, args, kwargs):
        m = kwargs.get("attention_mask")
        pad = m if m is not None and getattr(m, "dim", lambda: 0)() == 2 else None
        for mod in mods:
            mod.hf_padding_mask = pad

    return hook


def add_mod(
    model: nn.Module, layers=None, capacity=0.125, *, capacities=None, **mod_options
) -> list:
    """Wrap the decoder layers at the indices ``layers`` (an int or an iterable; default every
    layer) in ``mixops.nn.MoD`` with ``capacity``, in place; or give ``capacities``, one entry per
    layer (None: the layer stays dense), as ``pmod_capacity_schedule`` returns. ``mod_options`` go
    to MoD (default ``gate="tanh"``: a zero router, so every chosen token starts with weight 1).
    Returns the new MoD modules."""
    decoder = _decoder(model)
    n = len(decoder.layers)
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
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    mods = []
    for i, cap in sorted(plan.items()):
        layer = decoder.layers[i]
        if isinstance(layer, MoD):
            raise ValueError(f"add_mod: layer {i} is already a MoD layer")
        p = next(layer.parameters(), None)
        kw = {} if p is None else dict(device=p.device, dtype=p.dtype)
        mod = MoD(layer, hidden, cap, **mod_options, **kw).train(layer.training)
        decoder.layers[i] = mod
        mods.append(mod)
    all_mods = [m for m in decoder.layers if isinstance(m, MoD)]
    old = getattr(decoder, "_mixops_mod_hook", None)
    if old is not None:
        old.remove()
    decoder._mixops_mod_hook = decoder.register_forward_pre_hook(
        _padding_hook(all_mods), with_kwargs=True
    )
    return mods
