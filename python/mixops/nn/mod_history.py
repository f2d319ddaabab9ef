"""MoD's skip history on a KV cache: which cached tokens each MoD layer kept (a skipped token's
key is hidden from every later query of that layer), and how it follows the cache's edits.

The history lives on the cache object (``cache._mixops_mod``), one entry per MoD layer (keyed by
the layer index), in one of two layouts:
- a growing cache (HF ``DynamicCache`` and anything that is not static): a bool tensor
  ``[batch, tokens seen]`` to which each forward appends its tokens' kept mask;
- a static cache (HF ``StaticCache``): a bool buffer ``[batch, maxcache_len]`` allocated once and
  written at the positions the cache writes (its ``cumulative_length`` + 0..seq-1, a device tensor:
  no host sync and a static shape, as compiled generation needs); crop moves nothing (the stale
  entries are overwritten by the next write and hidden by the causal mask until then).

The cache's edits must reach the history, or a reordered beam reads another beam's skips. The
first MoD forward on a cache changes the cache object's class in place to a subclass whose edit
methods (``reorder_cache``, ``batch_select_indices``, ``batch_repeat_interleave``, ``crop``,
``reset``) run the cache's own and then apply the same edit to every history. For
``DynamicCache`` and ``StaticCache`` (and subclasses that inherit their edits) the subclass
follows; for any other cache class an edit raises MoD's error instead (never a wrong answer).
The subclass pickles and deep-copies as its base with the history attached.
"""

import torch

__all__ = ["layer_history", "history_key"]

_EDITS = ("reorder_cache", "batch_select_indices", "batch_repeat_interleave", "crop", "reset")
_STORE = "_mixops_mod"


class _Store:
    """The histories of one cache: ``{layer key: Tensor}`` and whether the layout is static."""

    __slots__ = ("tensors", "static")

    def __init__(self, static):
        self.tensors, self.static = {}, static

    def __getstate__(self):
        return {"tensors": self.tensors, "static": self.static}

    def __setstate__(self, state):
        self.tensors, self.static = state["tensors"], state["static"]

    def apply(self, name, arg):
        for k, h in list(self.tensors.items()):
            if name == "reset":
                if self.static:
                    h.zero_()
                else:
                    del self.tensors[k]
            elif name == "reorder_cache":
                idx = arg.to(h.device)
                if self.static:
                    h.copy_(h.index_select(0, idx))
                else:
                    self.tensors[k] = h.index_select(0, idx)
            elif name == "batch_select_indices":
                self.tensors[k] = h[arg.to(h.device) if torch.is_tensor(arg) else arg]
            elif name == "batch_repeat_interleave":
                self.tensors[k] = h.repeat_interleave(arg, dim=0)
            elif name == "crop" and not self.static and arg < 0:
                self.tensors[k] = h[:, :arg]


def _known(cache):
    """The HF cache classes whose edits the history follows (None without transformers)."""
    try:
        from transformers import DynamicCache, StaticCache
    except ImportError:
        return None
    if isinstance(cache, StaticCache):
        return "static"
    if isinstance(cache, DynamicCache):
        return "dynamic"
    return None


def _edit(name):
    def method(self, *args, **kwargs):
        base = type(self)._mixops_base
        store = self.__dict__.get(_STORE)
        active = store is not None and bool(store.tensors)
        if active and not type(self)._mixops_follows and name != "reset":
            # Before the edit: the cache and its history stay consistent.
            raise NotImplementedError(
                f"MoD: {base.__name__}.{name} would edit a cache whose MoD skip history cannot "
                f"follow it (MoD follows DynamicCache and StaticCache); use one of those"
            )
        out = getattr(base, name)(self, *args, **kwargs)
        if active:
            store.apply(name, args[0] if args else next(iter(kwargs.values()), None))
        return out

    method.__name__ = name
    return method


def _rebuild(base, follows):
    cls = _following_class(base, follows)
    return cls.__new__(cls)


class _Following:
    """Mixin of the cache subclasses (see the module docstring)."""

    _mixops_base = None
    _mixops_follows = True

    def __reduce_ex__(self, protocol):
        cls = type(self)
        return _rebuild, (cls._mixops_base, cls._mixops_follows), self.__dict__


for _name in _EDITS:
    setattr(_Following, _name, _edit(_name))

_CLASSES = {}


def _following_class(base, follows):
    cls = _CLASSES.get((base, follows))
    if cls is None:
        attrs = {"_mixops_base": base, "_mixops_follows": follows, "__module__": __name__}
        cls = type(base.__name__, (_Following, base), attrs)
        _CLASSES[(base, follows)] = cls
    return cls


def _store(cache):
    store = cache.__dict__.get(_STORE)
    if store is None:
        kind = _known(cache)
        store = _Store(kind == "static")
        if not isinstance(cache, _Following):
            cache.__class__ = _following_class(type(cache), kind is not None)
        setattr(cache, _STORE, store)
    return store


def history_key(layer):
    """A MoD layer's key in the store: its layer index (shared by deep copies of the model)."""
    return layer.layer_idx if layer.layer_idx is not None else id(layer)


def _static_positions(cache, layer, S, device):
    """The positions ``[S]`` the static cache writes this step (its length + 0..S-1, no sync)."""
    if layer.layer_idx is None:
        raise ValueError("MoD: a static cache needs the wrapped layer's layer_idx")
    cache_layer = cache.layers[layer.layer_idx]
    if getattr(cache_layer, "is_sliding", False):
        raise NotImplementedError(
            f"MoD: layer {layer.layer_idx}'s static cache is a sliding window "
            f"({type(cache_layer).__name__}); MoD follows full static layers and growing caches"
        )
    start = getattr(cache_layer, "cumulative_length", None)
    if not torch.is_tensor(start):
        start = torch.tensor(int(start or 0))
    return start.to(device) + torch.arange(S, device=device)


def layer_history(cache, layer, keep):
    """``(history [B, kv], q_pos [S])``: the kept mask of every key this layer's attention reads
    (the past tokens', then ``keep`` [B, S] of this step's), and the queries' key positions."""
    B, S = keep.shape
    if cache is None:
        return keep, torch.arange(S, device=keep.device)
    store, key = _store(cache), history_key(layer)
    if store.static:
        buf = store.tensors.get(key)
        max_len = cache.get_max_length(layer.layer_idx)
        pos = _static_positions(cache, layer, S, keep.device)
        if buf is None or buf.shape != (B, max_len) or buf.device != keep.device:
            # A new history starts with an empty cache (one host read, at the prefill): a cache
            # another model filled has no skip history to give.
            if not torch.compiler.is_compiling() and int(pos[0]) != 0:
                raise ValueError(
                    f"MoD: the static cache already holds {int(pos[0])} tokens for layer "
                    f"{layer.layer_idx} but this layer has no skip history for it (a cache "
                    f"filled without MoD, or for another batch size)"
                )
            buf = torch.zeros(B, max_len, dtype=torch.bool, device=keep.device)
            store.tensors[key] = buf
        buf.index_copy_(1, pos, keep)
        return buf, pos
    past = store.tensors.get(key)
    n_past = cache_len(cache, layer)
    if n_past == 0 or (n_past is None and past is None):
        past = None
    elif past is None or past.shape[0] != B or (n_past is not None and past.shape[1] != n_past):
        have = None if past is None else tuple(past.shape)
        raise ValueError(
            f"MoD: the cache holds {n_past} tokens for layer {layer.layer_idx} but this layer's "
            f"skip history is {have} for a batch of {B}: a cache filled without MoD, or edited "
            f"in a way MoD cannot follow"
        )
    hist = keep if past is None else torch.cat((past, keep), dim=1)
    store.tensors[key] = hist
    return hist, torch.arange(S, device=keep.device) + (hist.shape[1] - S)


def cache_len(cache, layer):
    """Tokens the cache holds for this layer (None when the layer index is unknown)."""
    if layer.layer_idx is None or not hasattr(cache, "get_seq_length"):
        return None
    return int(cache.get_seq_length(layer.layer_idx))
