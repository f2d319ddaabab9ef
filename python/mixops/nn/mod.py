"""mixops.nn.MoD: Mixture-of-Depths (Raposo et al. 2024) around any block, with p-MoD's gate and
skipped-token scaling, and causal routing for generation.

Per sequence a scalar router ``r = w . x`` scores every token; the top ``C`` tokens run through the
block as a compacted sequence in causal order (their own RoPE positions, the matching mask), the
others pass through unchanged. A chosen token gets ``x + g(r) * f`` with ``f = block(x) - x`` for
blocks that return the residual sum (HF decoder layers) or ``f = block(x)`` otherwise.

Top-C looks at the whole sequence, so generation routes each token by a causal rule instead: the
router's own logit (``causal_rule="router"``: trained by a BCE loss against top-C membership, rule
``sigmoid(r) > 0.5``) or a small predictor MLP on the stop-gradient input (``"predictor"``, the
same loss and rule). Under the causal rule the block runs on the whole sequence and a skipped
token's key is hidden from every later query of this layer (its cache entry is written but never
seen); each sequence of a batch decides for itself. The skipped/kept history of the cached tokens
lives on the cache object, per MoD layer.

The routing itself is ``MoDRouting`` (mod_routing.py), which the HF decoder layers of
``mixops.integrations.mod`` share; ``MoD`` holds the block.
"""

from fractions import Fraction
from typing import Optional, Union

import torch
from torch import nn

from .mod_routing import MoDRouting
from .mod_select import MoDRouter, TokenCount, pmod_capacity_schedule

__all__ = ["MoD", "MoDRouter", "MoDRouting", "TokenCount", "pmod_capacity_schedule"]


class MoD(MoDRouting, nn.Module):
    """Mixture-of-Depths around ``block``: ``[batch, seq, hidden] -> [batch, seq, hidden]``.

    Args:
        block: the module to route around (attention + MLP, or either). It is called as
            ``block(x, **kwargs)`` with the forward's extra keyword arguments, adjusted to the
            compacted sequence (``position_ids``, ``position_embeddings``, ``attention_mask``); a
            tuple result's first element is used.
        hidden_size: the model width (default: ``block.hidden_size``).
        capacity: tokens processed per sequence, ``C = ceil(capacity * seq)`` computed exactly from
            the capacity as a fraction (float or Fraction in (0, 1]; 1.0 is every token), or an int
            C >= 2 (at most seq); a bare int 1 raises as ambiguous (write 1.0 for every token).
        gate: g(r) for the chosen tokens' update: "raw" (the router output, the paper), "sigmoid",
            "tanh" (p-MoD's ``0.2 * tanh(r) + 1``, the router initialised to zero so every weight
            starts at exactly 1) or "one" (g = 1: the router only selects).
        scale_skipped: p-MoD's symmetric reweighting: skipped tokens become ``g(r) * x``.
        residual: the block returns ``x + f`` (HF decoder layers); False: it returns ``f``.
        causal: the block's attention is causal (HF decoder layers); masks built by MoD follow it.
        causal_rule: None, "router" or "predictor" (see the module docstring); needed for
            generation with a cache unless every token is processed (capacity 1.0).
        aux_loss_coef: weight of the causal rule's BCE loss (``self.aux_loss`` after a top-C
            forward). predictor_hidden: the predictor's width (default hidden // 8).
        router_bias: a bias in the router projection.

    forward(hidden_states, *, attention_mask=None, token_mask=None, routable_mask=None,
    max_processed=None, routing=None, **block_kwargs):
        token_mask [batch, seq]: False for padding (never chosen); default from a 2-D
        ``attention_mask``, else every token. routable_mask [batch, seq]: tokens subject to routing
        (the others are always processed; C counts routable tokens per sequence, and the compacted
        length is ``max_processed``, default seq). routing: "topc" or "causal" (default: causal
        when a cache is passed in evaluation, else top-C; in training a cache is not handed to the
        block). A cache goes in under the block's name for it (``cache``, ``past_key_values`` or
        ``past_key_value``).
    After a forward: ``router_logits`` [batch, seq] (fp32), ``chosen`` [batch, seq] bool (the
    processed tokens), ``aux_loss`` (0-dim after a top-C forward with a causal_rule; None without
    one, and after a causal-routing forward).
    """

    def __init__(
        self,
        block: nn.Module,
        hidden_size: Optional[int] = None,
        capacity: Union[float, Fraction, int] = 0.125,
        *,
        gate: str = "raw",
        scale_skipped: bool = False,
        residual: bool = True,
        causal: bool = True,
        causal_rule: Optional[str] = None,
        aux_loss_coef: float = 1.0,
        predictor_hidden: Optional[int] = None,
        router_bias: bool = False,
        device=None,
        dtype=None,
    ):
        nn.Module.__init__(self)
        if not isinstance(block, nn.Module):
            raise TypeError(f"MoD: block must be an nn.Module, got {type(block).__name__}")
        self.block = block
        self._mod_init(
            block, hidden_size, capacity, gate=gate, scale_skipped=scale_skipped,
            residual=residual, causal=causal, causal_rule=causal_rule,
            aux_loss_coef=aux_loss_coef, predictor_hidden=predictor_hidden,
            router_bias=router_bias, device=device, dtype=dtype,
        )  # fmt: skip

    def reset_parameters(self):
        self.reset_mod_parameters()

    def forward(self, hidden_states: torch.Tensor, **kwargs):
        return self.mod_forward(hidden_states, **kwargs)

    def _run_block(self, x, **kwargs):
        return self.block(x, **kwargs)

    def _block_root(self):
        return self.block
