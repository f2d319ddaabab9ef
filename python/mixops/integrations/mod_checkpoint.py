"""Saving and restoring HF models with MoD layers (``mixops.integrations.mod``).

``save_pretrained`` needs nothing from mixops: the MoD layers keep the original keys and add
their routers' (``model.layers.<i>.router.weight``, ``.predictor.*``), and ``add_mod`` records what
it did in ``config.mixops_mod``. A plain ``from_pretrained`` therefore loads every original weight
and drops the routers (HF lists them as unexpected keys). ``mod_from_pretrained`` is that call
plus ``restore_mod``: the recorded layers become MoD layers again and their keys are read from
the checkpoint's files, so the model is the one that was saved.

Checkpoints of earlier versions (the wrapped layer's keys under ``block.``, nothing recorded):
give ``add_mod``'s arguments; the ``block.`` keys are read back into the layers.
"""

import json
import os

import torch

from ..nn.mod_select import TokenCount

__all__ = ["mod_from_pretrained", "restore_mod"]

_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


def mod_from_pretrained(model_class, path, *args, mod_layers=None, mod_options=None, **kwargs):
    """``model_class.from_pretrained(path, *args, **kwargs)`` with its MoD layers restored
    (``restore_mod``). ``mod_layers`` / ``mod_options``: ``add_mod``'s ``layers`` and options, for
    checkpoints that did not record them (saved by earlier versions)."""
    model = model_class.from_pretrained(path, *args, **kwargs)
    hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
    restore_mod(model, path, layers=mod_layers, options=mod_options, **hub)
    return model


def restore_mod(model, checkpoint=None, *, layers=None, options=None, **hub_kwargs):
    """Turn the layers recorded in ``model.config.mixops_mod`` (or ``layers`` with ``options``,
    as ``add_mod`` takes them) into MoD layers, then load their MoD keys (and ``block.`` keys of an
    earlier version's checkpoint) from ``checkpoint`` (a folder or hub id holding
    ``model.safetensors``, a sharded index, or ``pytorch_model.bin``). Returns the MoD layers."""
    from .mod import _options_record, add_mod, convert_layers

    rec = _options_record(model)
    if layers is not None:
        mods = add_mod(model, layers, **(options or {}))
    elif rec is not None:
        if options:
            raise ValueError("restore_mod: the config records the MoD layers; give no options")
        plan = {int(i): dict(o) for i, o in rec["layers"].items()}
        for o in plan.values():  # a recorded int is a token count (1 included: one token)
            if isinstance(o.get("capacity"), int) and not isinstance(o["capacity"], bool):
                o["capacity"] = TokenCount(o["capacity"])
        mods = convert_layers(model, plan)
    else:
        raise ValueError(
            "restore_mod: the config records no MoD layers (config.mixops_mod); for a checkpoint "
            "saved by an earlier version give layers= and options= as add_mod takes them"
        )
    if checkpoint is None:
        return mods
    names = {id(m): n for n, m in model.named_modules()}
    prefixes = [names[id(m)] + "." for m in mods]
    own = tuple(p + s for p in prefixes for s in ("router.", "predictor.", "block."))
    found = _read(checkpoint, lambda k: k.startswith(own), hub_kwargs)
    missing = [
        n
        for m, p in zip(mods, prefixes)
        for n, _ in m.named_parameters(prefix=p[:-1])
        if n.startswith(own) and n not in found
    ]
    if missing:
        raise ValueError(
            f"restore_mod: the checkpoint has no {missing[:4]}{'...' if len(missing) > 4 else ''}"
            " (saved before add_mod, or with other layers?)"
        )
    result = model.load_state_dict(found, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"restore_mod: checkpoint keys fit no MoD layer: {result.unexpected_keys}")
    # As HF marks what it loads: its init functions (init_weights()) then keep these tensors.
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    for k in found:
        for p in prefixes:
            if k.startswith(p + "block."):
                k = p + k[len(p) + len("block.") :]
        if k in tensors:
            tensors[k]._is_hf_initialized = True
    return mods


def _read(checkpoint, want, hub_kwargs):
    """The tensors of ``checkpoint`` whose keys ``want`` accepts (only those are read)."""
    files = _files(checkpoint, hub_kwargs)
    out = {}
    for f in files:
        if f.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(f, framework="pt") as sf:
                for k in sf.keys():
                    if want(k):
                        out[k] = sf.get_tensor(k)
        else:
            sd = torch.load(f, map_location="cpu", weights_only=True)
            out.update({k: v for k, v in sd.items() if want(k)})
    return out


def _files(checkpoint, hub_kwargs):
    from transformers.utils import cached_file

    sub = hub_kwargs.get("subfolder") or ""
    for index, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        if os.path.isdir(checkpoint):
            root = os.path.join(checkpoint, sub)
            idx, one = os.path.join(root, index), os.path.join(root, single)
            idx, one = (
                (idx if os.path.isfile(idx) else None),
                (one if os.path.isfile(one) else None),
            )
        else:
            kw = dict(hub_kwargs, _raise_exceptions_for_missing_entries=False)
            idx, one = cached_file(checkpoint, index, **kw), cached_file(checkpoint, single, **kw)
        if idx is not None:
            with open(idx) as fh:
                shards = sorted(set(json.load(fh)["weight_map"].values()))
            if os.path.isdir(checkpoint):
                return [os.path.join(os.path.dirname(idx), s) for s in shards]
            return [cached_file(checkpoint, s, **hub_kwargs) for s in shards]
        if one is not None:
            return [one]
    raise FileNotFoundError(f"restore_mod: no model weights found in {checkpoint!r}")
