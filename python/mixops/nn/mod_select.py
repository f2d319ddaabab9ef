"""Token selection and the block's inputs for mixops.nn.MoD: the capacity, the router projection
(``MoDRouter``), top-C and routable choice, the compacted block's arguments, the causal skip mask
and small mask helpers.

Two ways a sequence's tokens are chosen:
- top-C (training and evaluation without a cache): per sequence the C best router scores among the
  eligible tokens (select_topc: strict total order, ascending positions), static shapes. With a
  mask of routable tokens, the other (non-padding) tokens are always processed and C counts the
  routable ones; see ``routable_choice``.
- a causal rule (generation): each token decides alone from its own router or predictor logit.

Top-C runs the block on the compacted sequence ``[batch, C, hidden]`` (``compact_kwargs`` gathers
positions, rotary tables and masks for it); the causal rule runs the block on the whole sequence
with the skipped tokens hidden as keys (``skip_mask``), which is what a dense KV cache needs.
"""

import math
from fractions import Fraction

import torch
from torch import nn

from .._compat import sym_min
from .moa_attention import causal_allowed

__all__ = [
    "MoDRouter",
    "parse_capacity",
    "TokenCount",
    "pmod_capacity_schedule",
    "capacity_count",
    "routable_choice",
    "compact_kwargs",
    "skip_mask",
    "mask_kind",
]


class TokenCount(int):
    """An explicit token count as MoD's capacity: ``TokenCount(1)`` keeps one token per sequence,
    which a bare ``capacity=1`` cannot say (it is refused as ambiguous). Checkpoints record int
    capacities as counts, so restoring one reads them as TokenCount."""


def parse_capacity(capacity):
    """MoD's capacity as a Fraction (the share of each sequence's tokens, in (0, 1]) or an int
    (a token count, >= 2). A bare int 1 is refused: "capacity 1" means every token, but an int
    is a count (one token per sequence), so it is an error saying to write ``1.0`` (every token)
    or ``Fraction(1)``; floats and Fractions are always ratios, ints >= 2 always counts."""
    if isinstance(capacity, bool) or not isinstance(capacity, (int, float, Fraction)):
        raise TypeError(
            f"MoD: capacity must be a fraction in (0, 1] (float or Fraction) or an int >= 2 "
            f"(tokens per sequence), got {capacity!r}"
        )
    if isinstance(capacity, TokenCount):
        if capacity < 1:
            raise ValueError(f"MoD: TokenCount capacity must be >= 1, got {int(capacity)}")
        return int(capacity)
    if isinstance(capacity, int):
        if capacity == 1:
            raise ValueError(
                "MoD: capacity=1 is ambiguous: an int capacity is a token count (1 would keep "
                "one token per sequence), while capacity 1 as a ratio processes every token. "
                "Write capacity=1.0 (or Fraction(1)) for every token, or TokenCount(1) for one "
                "token; an int capacity counts tokens and must be >= 2"
            )
        if capacity < 1:
            raise ValueError(
                f"MoD: an int capacity (tokens per sequence) must be >= 2, got {capacity}"
            )
        return capacity
    if not (math.isfinite(capacity) and 0 < capacity <= 1):
        raise ValueError(
            f"MoD: capacity must be a fraction in (0, 1] (float or Fraction) or an int >= 2 "
            f"(tokens per sequence), got {capacity!r}"
        )
    if isinstance(capacity, Fraction):
        return capacity  # exact already
    # A float: its nearest simple fraction (0.7 -> 7/10, not 0.6999999999999999555...).
    frac = Fraction(capacity).limit_denominator(1 << 20)
    return frac if frac > 0 else Fraction(capacity)


def pmod_capacity_schedule(num_layers, mean=0.5, max_ratio=0.85, min_ratio=0.15, kind="cos"):
    """p-MoD's progressive ratio decay: the token retention ratio of layer ``l`` (0-based) is
    ``mean + cos(pi * l / (num_layers - 1)) / 2`` (``kind="cos"``, the shifted cosine) or
    ``mean + 1/2 - l / (num_layers - 1)`` (``"linear"``), clamped below at ``min_ratio``; layers whose
    ratio exceeds ``max_ratio`` stay dense (None). Returns one entry per layer: a Fraction capacity
    for ``MoD`` or None. (p-MoD's defaults: mean 0.5, max 0.85, min 0.15.)"""
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(
            f"pmod_capacity_schedule: num_layers must be an int >= 1, got {num_layers!r}"
        )
    if not 0 < min_ratio <= max_ratio <= 1:
        raise ValueError("pmod_capacity_schedule: need 0 < min_ratio <= max_ratio <= 1")
    if kind not in ("cos", "linear"):
        raise ValueError(f"pmod_capacity_schedule: kind must be 'cos' or 'linear', got {kind!r}")
    span = max(num_layers - 1, 1)
    out = []
    for layer in range(num_layers):
        if kind == "cos":
            ratio = mean + math.cos(math.pi * layer / span) / 2
        else:
            ratio = mean + 0.5 - layer / span
        # float(): the ratios are shares of the sequence, never token counts (min_ratio=1).
        out.append(None if ratio > max_ratio else parse_capacity(float(max(ratio, min_ratio))))
    return out


def capacity_count(capacity, n):
    """C for a sequence of ``n`` tokens: ``min(n, ceil(capacity * n))`` in integers from the
    capacity as a Fraction, or ``min(n, capacity)`` for an int capacity (``n`` may be symbolic or a
    tensor)."""
    if isinstance(capacity, int):
        return sym_min(capacity, n) if not torch.is_tensor(n) else n.clamp(max=capacity)
    num, den = capacity.numerator, capacity.denominator
    c = (num * n + den - 1) // den
    return sym_min(c, n) if not torch.is_tensor(c) else torch.minimum(c, n)


def _order_key(r):
    """int64 keys in select_topc's strict order for fp32 scores: higher first, NaN below -inf,
    -0 tying +0."""
    bits = (r.float() + 0.0).view(torch.int32).to(torch.int64)  # + 0.0: -0 -> +0
    key = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # monotone in the float's value
    return torch.where(torch.isnan(r), torch.full_like(key, -(1 << 40)), key)


def routable_choice(r, routable, valid, capacity, length):
    """Positions ``[B, length]`` (ascending, -1 past the end) of the processed tokens when only
    ``routable`` tokens are routed: every valid non-routable token, plus the top
    ``C_b = capacity_count(capacity, R_b)`` routable tokens of each row (R_b: its valid routable
    tokens). Also returns the chosen routable mask ``[B, S]`` (the BCE targets). A row with more
    processed tokens than ``length`` keeps its non-routable tokens first, then its routable tokens
    best first."""
    from ..ops import select_topc

    B, S = r.shape
    routable = routable & valid
    key = _order_key(r)
    key = torch.where(routable, key, torch.full_like(key, -(1 << 41)))
    order = torch.sort(key, dim=1, descending=True, stable=True).indices  # ties: lower position
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(S, device=r.device).expand(B, S))
    c = capacity_count(capacity, routable.sum(1, keepdim=True))
    chosen_routable = routable & (rank < c)
    processed = chosen_routable | (valid & ~routable)
    # Priority for the compaction: non-routable first (key S + 1), then routable by rank.
    prio = torch.where(routable, (S - rank).float(), float(S + 1))
    return select_topc(prio, length, processed).indices, chosen_routable


def mask_kind(block):
    """How the block's attention reads a mask: "float" (additive, HF eager), "bool" (True = attend:
    SDPA and HF sdpa), or None (a mask that cannot hide arbitrary keys: HF flash/flex)."""
    for m in block.modules():
        cfg = getattr(m, "config", None)
        impl = getattr(cfg, "_attn_implementation", None)
        if impl is not None:
            if impl == "eager":
                return "float"
            if impl == "sdpa":
                return "bool"
            return None
    return "bool"


def _to_kind(keep, kind, dtype):
    """A bool keep-mask in the block's format."""
    if kind == "float":
        return torch.where(keep, 0.0, torch.finfo(dtype).min).to(dtype)
    return keep


def _combine(mask, keep):
    """``mask`` (bool True = attend, or additive float) restricted to ``keep`` (bool, broadcast)."""
    if mask.dtype == torch.bool:
        return mask & keep
    return torch.where(keep, mask, torch.finfo(mask.dtype).min)


def compact_kwargs(kwargs, idx, valid, *, causal, need_mask, kind, dtype):
    """The block's keyword arguments for the compacted sequence of ``idx`` [B, C] (positions,
    ascending; ``valid`` [B, C] False for empty slots, which hold position 0).

    ``position_ids`` [1|B, S] and ``position_embeddings`` (cos, sin) [1|B, S, d] are gathered (the
    tokens keep their RoPE positions). ``attention_mask`` [B, S] (padding) is gathered; a 4-D mask
    [B, 1|h, S, S] is gathered on both axes. Empty slots attend only to themselves and are hidden
    from the others; with no mask and ``causal``, empty slots (always last) are invisible already,
    so None stays None unless ``need_mask`` (a non-causal block with empty slots)."""
    out = dict(kwargs)
    B, C = idx.shape
    pid = kwargs.get("position_ids")
    if torch.is_tensor(pid) and pid.dim() == 2:
        out["position_ids"] = pid.expand(B, -1).gather(1, idx)
    pe = kwargs.get("position_embeddings")
    if isinstance(pe, (tuple, list)) and len(pe) == 2 and all(torch.is_tensor(t) for t in pe):
        out["position_embeddings"] = tuple(
            t.expand(B, -1, -1).gather(1, idx.unsqueeze(-1).expand(B, C, t.shape[-1])) for t in pe
        )
    m = kwargs.get("attention_mask")
    if m is None and not need_mask:
        return out
    diag = torch.eye(C, dtype=torch.bool, device=idx.device)
    # keep[b, i, j]: valid query i sees valid key j; an empty slot sees only itself.
    keep = (valid.unsqueeze(1) & valid.unsqueeze(2)) | diag
    if m is None:
        if need_mask:
            base = keep if not causal else keep & causal_allowed(C, C, idx.device)
            out["attention_mask"] = _to_kind(base.unsqueeze(1), kind, dtype)
    elif m.dim() == 2:
        out["attention_mask"] = m.gather(1, idx) * valid.to(m.dtype)
    elif m.dim() == 4:
        h = m.shape[1]
        rows = m.gather(2, idx[:, None, :, None].expand(B, h, C, m.shape[3]))
        m2 = rows.gather(3, idx[:, None, None, :].expand(B, h, C, C))
        # An empty slot's row: itself only (never a fully masked row: SDPA would give NaN).
        own = (~valid).unsqueeze(2) & diag
        m2 = _combine(m2, keep.unsqueeze(1))
        if m2.dtype == torch.bool:
            m2 = m2 | own.unsqueeze(1)
        else:
            m2 = torch.where(own.unsqueeze(1), 0.0, m2).to(m2.dtype)
        out["attention_mask"] = m2
    else:
        raise ValueError(
            f"MoD: attention_mask must be None, [batch, seq] or [batch, 1 or heads, seq, seq], "
            f"got shape {tuple(m.shape)}"
        )
    return out


def skip_mask(mask, key_keep, q_pos, *, kind, dtype):
    """The block's 4-D mask for a dense run where keys with ``key_keep`` [B, kv_len] False are
    hidden from every query except their own. ``q_pos`` [q_len]: each query's key position (the
    last q_len positions for a growing cache, the write positions for a static one).
    ``mask``: HF's mask for the step (None, bool or additive float, [B, 1|h, q_len, kv_len])."""
    B, kv_len = key_keep.shape
    q_len = q_pos.shape[0]
    keys = torch.arange(kv_len, device=key_keep.device).unsqueeze(0)
    own = keys == q_pos.unsqueeze(1)
    keep = (key_keep[:, None, None, :] | own).expand(B, 1, q_len, kv_len)
    if mask is None:
        if kind is None:
            raise ValueError(
                "MoD: routing tokens causally needs an attention that takes a mask hiding any key "
                "(HF 'sdpa' or 'eager'); this block's attention does not"
            )
        return _to_kind(keep & (keys <= q_pos.unsqueeze(1)), kind, dtype)
    if mask.dim() != 4 or mask.shape[-1] != kv_len or mask.shape[-2] != q_len:
        raise ValueError(
            f"MoD: with causal routing attention_mask must be None or [batch, 1 or heads, "
            f"{q_len}, {kv_len}], got shape {tuple(mask.shape)}"
        )
    return _combine(mask, keep)


class MoDRouter(nn.Linear):
    """MoD's router projection ``[hidden] -> [1]``: zeros for the "tanh" gate (every weight
    starts at exactly 1), else N(0, 0.02), bias zero. Its own class so that every initialiser
    (``reset_parameters``, HF's ``init_weights`` through mixops' hook) applies this rule."""

    zero_init = False

    def reset_parameters(self, init=nn.init):
        """``init``: the module of init functions (HF's ``transformers.initialization`` skips
        tensors loaded from a checkpoint)."""
        if self.zero_init:
            init.zeros_(self.weight)
        else:
            init.normal_(self.weight, std=0.02)
        if self.bias is not None:
            init.zeros_(self.bias)


def cast_or_none(t, dtype):
    return None if t is None else t.to(dtype)


def all_true(valid, B, S, device):
    return valid if valid is not None else torch.ones(B, S, dtype=torch.bool, device=device)


def and_masks(a, b):
    if a is None:
        return b
    return a if b is None else a & b


def bool_mask(name, m, B, S, device):
    if m is None:
        return None
    if not torch.is_tensor(m) or tuple(m.shape) != (B, S):
        got = tuple(m.shape) if torch.is_tensor(m) else type(m).__name__
        raise ValueError(f"MoD: {name} must be a [batch, seq] = {(B, S)} tensor, got {got}")
    return (m != 0).to(device)
