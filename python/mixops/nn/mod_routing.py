"""MoDRouting: Mixture-of-Depths' routing around a block (see mod.py for the method), the part that
``mixops.nn.MoD`` and the HF decoder layers of ``mixops.integrations.mod`` share: the options and
their checks, the router (and the causal rule's predictor), the top-C forward over the compacted
sequence, the causal forward for generation, and the causal rule's BCE loss."""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import select_topc
from .mod_history import cache_len, layer_history
from .mod_rows import gather_rows, write_rows
from .mod_select import (
    MoDRouter,
    all_true,
    and_masks,
    bool_mask,
    capacity_count,
    cast_or_none,
    compact_kwargs,
    mask_kind,
    parse_capacity,
    routable_choice,
    skip_mask,
)

_GATES = ("raw", "sigmoid", "tanh", "one")
_RULES = (None, "router", "predictor")
_CACHE_NAMES = ("cache", "past_key_values", "past_key_value")


class MoDRouting:
    """MoD's routing around a block, shared by ``MoD`` (which holds the block) and the HF decoder
    layers that ``mixops.integrations.mod.add_mod`` turns into MoD layers in place (the block is
    the layer's own forward, so every key of the original layer is kept). A subclass is an
    nn.Module that provides ``_run_block(x, **kwargs)`` and ``_block_root()`` (the module whose
    submodules hold the attention) and calls ``_mod_init`` in its constructor."""

    def __getstate__(self):
        # router_logits, chosen and aux_loss are the last call's results (with their autograd
        # graph), not state: copies and pickles leave them out (copy.deepcopy of a graph's
        # non-leaf tensor raises).
        state = dict(super().__getstate__())
        for k in ("router_logits", "chosen", "aux_loss"):
            if k in state:
                state[k] = None
        return state

    def _mod_init(
        self,
        root,
        hidden_size,
        capacity,
        *,
        gate="raw",
        scale_skipped=False,
        residual=True,
        causal=True,
        causal_rule=None,
        aux_loss_coef=1.0,
        predictor_hidden=None,
        router_bias=False,
        device=None,
        dtype=None,
    ):
        if hidden_size is None:
            hidden_size = getattr(root, "hidden_size", None)
            if hidden_size is None:
                raise ValueError("MoD: give hidden_size (the block has no hidden_size attribute)")
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"MoD: hidden_size must be a positive int, got {hidden_size!r}")
        if gate not in _GATES:
            raise ValueError(f"MoD: gate must be one of {_GATES}, got {gate!r}")
        if causal_rule not in _RULES:
            raise ValueError(f"MoD: causal_rule must be one of {_RULES}, got {causal_rule!r}")
        layer_idx = next(
            (m.layer_idx for m in root.modules() if isinstance(getattr(m, "layer_idx", None), int)),
            None,
        )
        self.hidden_size = hidden_size
        self.capacity = parse_capacity(capacity)
        self.gate, self.scale_skipped = gate, bool(scale_skipped)
        self.residual, self.causal = bool(residual), bool(causal)
        self.causal_rule, self.aux_loss_coef = causal_rule, float(aux_loss_coef)
        self.predictor_hidden, self.router_bias = predictor_hidden, bool(router_bias)
        kw = dict(device=device, dtype=dtype)
        self.router = MoDRouter(hidden_size, 1, bias=router_bias, **kw)
        self.router.zero_init = gate == "tanh"
        self.predictor = None
        if causal_rule == "predictor":
            p = predictor_hidden or max(1, hidden_size // 8)
            self.predictor = nn.Sequential(
                nn.Linear(hidden_size, p, **kw), nn.SiLU(), nn.Linear(p, 1, **kw)
            )
        self.layer_idx = layer_idx
        self.router_logits = self.chosen = self.aux_loss = None
        # [batch, kv_len] padding mask for the next forwards when the caller's attention_mask is
        # 4-D (set by mixops.integrations.mod's hook on HF decoder models).
        self.hf_padding_mask = None
        # (positions [B, C], filled [B, C], seq) while a top-C block runs, for hooks that map
        # the compacted sequence's outputs back to full length (HF's recorded attentions).
        self.mod_compaction = None
        self.reset_mod_parameters()

    def mod_options(self):
        """The constructor options that rebuild this layer's routing (JSON-friendly)."""
        cap = self.capacity
        return {
            "capacity": cap if isinstance(cap, int) else str(cap),
            "gate": self.gate,
            "scale_skipped": self.scale_skipped,
            "residual": self.residual,
            "causal": self.causal,
            "causal_rule": self.causal_rule,
            "aux_loss_coef": self.aux_loss_coef,
            "predictor_hidden": self.predictor_hidden,
            "router_bias": self.router_bias,
        }

    def reset_mod_parameters(self, init=nn.init):
        """The router's init (``MoDRouter.reset_parameters``)."""
        self.router.reset_parameters(init)

    def _gate(self, r):
        if self.gate == "raw":
            return r
        if self.gate == "sigmoid":
            return torch.sigmoid(r)
        if self.gate == "tanh":
            return 0.2 * torch.tanh(r) + 1
        return torch.ones_like(r)

    def _update(self, x, y, g):
        """The chosen tokens' output from the block's output y: ``x + g * f``, one fused op. For
        residual blocks ``torch.lerp(x, y, g) = x + g * (y - x)``, which torch computes as
        ``y - (y - x) * (1 - g)`` for g >= 0.5: g = 1 returns the block's output bit for bit."""
        g = g.unsqueeze(-1).to(y.dtype)
        if not self.residual:
            return torch.addcmul(x, g, y)
        if self.gate == "one":
            return y
        return torch.lerp(x, y, g)

    def mod_forward(
        self,
        hidden_states: torch.Tensor,
        *,
        token_mask: Optional[torch.Tensor] = None,
        routable_mask: Optional[torch.Tensor] = None,
        max_processed: Optional[int] = None,
        routing: Optional[str] = None,
        **kwargs,
    ):
        x = hidden_states
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(
                f"MoD: hidden_states must be [batch, seq, {self.hidden_size}], got {tuple(x.shape)}"
            )
        B, S, _ = x.shape
        self._check_mask(kwargs.get("attention_mask"))
        valid = self._token_mask(token_mask, kwargs.get("attention_mask"), B, S, x.device)
        routable = bool_mask("routable_mask", routable_mask, B, S, x.device)
        cache = next((kwargs[n] for n in _CACHE_NAMES if kwargs.get(n) is not None), None)
        if routing is None:
            routing = "causal" if cache is not None and not self.training else "topc"
        if routing not in ("topc", "causal"):
            raise ValueError(f"MoD: routing must be 'topc' or 'causal', got {routing!r}")
        if routing == "topc" and cache is not None:
            if not self.training:
                raise ValueError(
                    "MoD: top-C routing looks at the whole sequence; with a cache in evaluation "
                    "use routing='causal' (or pass no cache)"
                )
            # Training: the block runs without the cache (HF creates one unless use_cache=False;
            # nothing reads it back in training). Decoding on with that cache is an error.
            skipped = cache.__dict__.setdefault("_mixops_mod_skipped", set())
            if id(self) in skipped or (cache_len(cache, self) or 0) > 0:
                raise ValueError(
                    "MoD: decoding with a cache needs evaluation mode (model.eval()): in training "
                    "MoD routes by top-C and does not write the cache"
                )
            skipped.add(id(self))
            kwargs = {k: (None if k in _CACHE_NAMES else v) for k, v in kwargs.items()}
        # Top-C needs the router's gradient only on the chosen rows (computed again on them,
        # ``_topc_forward``), unless the skipped tokens are scaled or the router's logits feed the
        # BCE loss: then every token's logit keeps its graph.
        self._rows_only = routing == "topc" and not self.scale_skipped
        self._rows_only = self._rows_only and self.causal_rule != "router"
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self._rows_only):
            r = self._router(x)
        self.router_logits = r.float() if r.dtype != torch.float64 else r
        g = self._gate(r)
        if B == 0 or S == 0:  # nothing to process (a static shape: a guard under compile)
            self.chosen, self.aux_loss = torch.zeros(B, S, dtype=torch.bool, device=x.device), None
            return self._skipped(x, g) + 0
        if routing == "causal":
            return self._causal_forward(x, r, g, valid, routable, cache, kwargs)
        return self._topc_forward(x, r, g, valid, routable, max_processed, kwargs)

    def _block_output(self, y, x):
        """The block's output tensor (a tuple's first element) in x's dtype: under autocast a
        block may return a lower precision (cast back, as the residual stream is x's); otherwise
        another dtype is an error."""
        if isinstance(y, (tuple, list)):
            y = y[0]
        if not torch.is_tensor(y) or y.shape[-1] != x.shape[-1]:
            got = tuple(y.shape) if torch.is_tensor(y) else type(y).__name__
            raise ValueError(f"MoD: the block must return [batch, seq, {x.shape[-1]}], got {got}")
        if y.dtype != x.dtype:
            if not torch.is_autocast_enabled(x.device.type):
                raise ValueError(
                    f"MoD: the block returned {y.dtype} for a {x.dtype} input; MoD mixes the "
                    f"block's output into its input, so it must return the input's dtype"
                )
            y = y.to(x.dtype)
        return y

    def _check_mask(self, m):
        if m is not None and not torch.is_tensor(m):
            raise ValueError(
                f"MoD: attention_mask must be a tensor or None, got {type(m).__name__} (HF's "
                f"flex_attention passes a BlockMask, which MoD cannot compact or use to hide "
                f"skipped keys); use attn_implementation 'sdpa' or 'eager'"
            )

    def _router(self, x):
        """Router logits [..., seq] in x's dtype."""
        w = self.router.weight.to(x.dtype)
        return F.linear(x, w, cast_or_none(self.router.bias, x.dtype)).squeeze(-1)

    def _token_mask(self, token_mask, attention_mask, B, S, device):
        if token_mask is None:
            m = attention_mask
            if not (torch.is_tensor(m) and m.dim() == 2):
                m = self.hf_padding_mask
            if m is not None:
                token_mask = m[:, -S:]
        return bool_mask("token_mask", token_mask, B, S, device)

    def _skipped(self, x, g):
        return g.unsqueeze(-1).to(x.dtype) * x if self.scale_skipped else x

    def _topc_forward(self, x, r, g, valid, routable, max_processed, kwargs):
        B, S, H = x.shape
        rf = self.router_logits
        if routable is None:
            C = capacity_count(self.capacity, S)
            idx = select_topc(rf, C, valid).indices  # [B, C] ascending; -1: empty slot
            chosen_routed = None
        else:
            L = S if max_processed is None else max_processed
            if isinstance(L, bool) or not isinstance(L, int) or not 1 <= L <= S:
                raise ValueError(f"MoD: max_processed must be an int in [1, seq={S}], got {L!r}")
            idx, chosen_routed = routable_choice(
                rf, routable, all_true(valid, B, S, x.device), self.capacity, L
            )
        slot_ok = idx >= 0
        may_be_empty = valid is not None or routable is not None
        pos = idx.clamp(min=0)
        flat = pos + torch.arange(B, device=x.device).unsqueeze(1) * S
        rows = flat.reshape(-1).to(torch.int32)  # flat rows (the op checks B * S < 2^31)
        dest = torch.where(slot_ok.reshape(-1), rows, -1) if may_be_empty else rows
        x2 = x.reshape(B * S, H)
        # Eager: the gather/write-back pair of mod_rows (one full-size pass in the backward);
        # under torch.compile and for p-MoD's scaled skipped tokens, index_select + scatter_rows.
        fused = not self.scale_skipped and not torch.compiler.is_compiling()
        xc, base, link = gather_rows(x2, rows, dest, fused, may_be_empty)
        xc = xc.view(B, -1, H)
        bkw = compact_kwargs(
            kwargs,
            pos,
            slot_ok,
            causal=self.causal,
            need_mask=may_be_empty and not self.causal,
            kind=mask_kind(self._block_root()) if may_be_empty and not self.causal else "bool",
            dtype=x.dtype,
        )
        self.mod_compaction = (pos, slot_ok, S)
        try:
            y = self._run_block(xc, **bkw)
        finally:
            self.mod_compaction = None
        y = self._block_output(y, x)
        # The chosen tokens' gates: from their own logits again when only they need a gradient.
        gc = self._gate(self._router(xc)) if self._rows_only else g.gather(1, pos)
        out_c = self._update(xc, y, gc).reshape(-1, H)
        if not fused:
            base = self._skipped(x, g).reshape(B * S, H)
        out = write_rows(base, out_c, dest, link).view(B, S, H)
        chosen = torch.zeros(B, S + 1, dtype=torch.bool, device=x.device)
        chosen = chosen.scatter(1, torch.where(slot_ok, idx, S), True)[:, :S]
        self.chosen = chosen
        self.aux_loss = self._aux_loss(x, chosen if chosen_routed is None else chosen_routed,
                                       valid if routable is None else and_masks(valid, routable))  # fmt: skip
        return out

    def _rule_logits(self, x):
        if self.causal_rule == "predictor":
            p = self.predictor(x.detach().to(self.predictor[0].weight.dtype)).squeeze(-1)
            return p.float() if p.dtype != torch.float64 else p
        return self.router_logits

    def _aux_loss(self, x, target, eligible):
        """BCE of the causal rule's logits against top-C membership, over the eligible tokens."""
        if self.causal_rule is None:
            return None
        logits = self._rule_logits(x)
        loss = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none")
        if eligible is None:
            return self.aux_loss_coef * loss.mean()
        w = eligible.to(loss.dtype)
        return self.aux_loss_coef * (loss * w).sum() / w.sum().clamp(min=1)

    def _process_all(self, S):
        return (
            capacity_count(self.capacity, S) >= S
            if isinstance(self.capacity, int)
            else (self.capacity == 1)
        )

    def _causal_forward(self, x, r, g, valid, routable, cache, kwargs):
        B, S, H = x.shape
        if self._process_all(S) and routable is None:
            keep = torch.ones(B, S, dtype=torch.bool, device=x.device)
        else:
            if self.causal_rule is None:
                raise ValueError(
                    "MoD: generation (a cache, or routing='causal') needs causal_rule='router' or "
                    "'predictor' unless every token is processed (capacity 1.0)"
                )
            keep = self._rule_logits(x) > 0  # sigmoid(logit) > 0.5
            if routable is not None:
                keep = keep | ~routable
        keep = and_masks(keep, valid)
        history, q_pos = layer_history(cache, self, keep)
        m = kwargs.get("attention_mask")
        if m is not None and m.dim() == 2:
            m = None  # padding is in key_keep already (history holds the padding mask's zeros)
        kv_len = m.shape[-1] if m is not None else history.shape[1]
        if history.shape[1] < kv_len:
            raise ValueError(
                f"MoD: attention_mask covers {kv_len} keys but this layer has seen "
                f"{history.shape[1]} tokens (a cache filled without MoD?)"
            )
        bkw = dict(kwargs)
        bkw["attention_mask"] = skip_mask(
            m,
            history[:, history.shape[1] - kv_len :],
            q_pos - (history.shape[1] - kv_len),
            kind=mask_kind(self._block_root()),
            dtype=x.dtype,
        )
        y = self._block_output(self._run_block(x, **bkw), x)
        self.chosen, self.aux_loss = keep, None
        return torch.where(keep.unsqueeze(-1), self._update(x, y, g), self._skipped(x, g))

    def extra_repr(self):
        return (
            f"hidden={self.hidden_size}, capacity={self.capacity}, gate={self.gate!r}, "
            f"scale_skipped={self.scale_skipped}, residual={self.residual}, "
            f"causal_rule={self.causal_rule!r}"
        )
