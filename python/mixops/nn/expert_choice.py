"""Expert-choice routing (Zhou et al. 2022) for mixops.nn.MoE (``router="expert_choice"``): each
expert takes its top ``C = min(T, ceil(c * T / E))`` tokens by its score, the scores being the
softmax over the experts of each token's logits. A token may be chosen by 0..E experts.

select_topc (one row per expert, over the tokens; padding tokens ineligible) -> the chosen rows of
x, expert-major, C per expert -> grouped_mm -> activation -> grouped_mm -> unpermute with a row map
``[T, E]`` (row ``e * C + j`` for the j-th token of expert e, -1 where e did not choose t) and the
chosen scores as weights: each token sums its own rows, deterministic, no atomics. Static shapes,
no host sync.

It looks across every token of the batch at once (not causal): a token's output depends on the
other tokens, later ones included, and with one token every expert picks it. ``warn_not_causal``
says so, once per layer, where that matters (a causal model, a decoding step). No load-balancing
loss (balanced by construction); the router z-loss applies (MoE's ``router_losses``).
"""

import warnings

import torch

from .._compat import sym_min
from ..ops import select_topc, unpermute
from .experts import expert_mlp
from .router import RouterConfig

__all__ = [
    "expert_capacity",
    "expert_choice_config",
    "expert_choice_routed",
    "warn_not_causal",
]


def expert_choice_config(num_experts, top_k, capacity_factor, aux_loss_coef, options):
    """The RouterConfig behind router="expert_choice" (its projection only; the choice is the
    experts'), after the checks that are expert choice's own."""
    if top_k is not None:
        raise ValueError(
            "MoE: router='expert_choice' lets each expert pick its tokens; give capacity_factor, "
            f"not top_k (got top_k={top_k!r})"
        )
    if capacity_factor is None:
        raise ValueError(
            "MoE: router='expert_choice' needs capacity_factor (each expert takes "
            "ceil(capacity_factor * tokens / num_experts) tokens)"
        )
    if aux_loss_coef:
        raise ValueError(
            "MoE: router='expert_choice' is balanced by construction (every expert takes the "
            "same number of tokens), so it has no load-balancing loss: aux_loss_coef must be 0, "
            f"got {aux_loss_coef!r} (z_loss_coef applies)"
        )
    extra = set(options) - {"router_fp32"}
    if extra:
        raise ValueError(
            f"MoE: router='expert_choice' takes no routing options but router_fp32 "
            f"(got {', '.join(sorted(extra))})"
        )
    if num_experts is None:
        raise ValueError("MoE: router='expert_choice' needs num_experts")
    return RouterConfig(
        num_experts=num_experts, top_k=1, router_fp32=options.pop("router_fp32", False)
    )


_NOT_CAUSAL = (
    "mixops: expert choice is not causal ({why}). Each expert picks its tokens across the whole "
    "batch, so a token's output depends on later tokens (and on the other sequences), and a "
    "decoding step is routed unlike training (one token alone is taken by every expert: a "
    "softmax mix of all of them). For causal decoders and generation use token choice "
    "(MoE(..., top_k=k)); expert choice is for encoders and non-causal training. "
    "MoE(..., causal=False) (or layer.causal = False) silences this warning."
)


def warn_not_causal(moe, x):
    """Warn, once per layer, when expert-choice layer ``moe`` runs where causality matters: it
    was built with ``causal=True``, or (``causal=None``, unknown) ``x`` is ``[batch, 1, hidden]``,
    one token per sequence, which is what an HF decoder layer hands its MLP when decoding with a
    cache. ``causal=False`` never warns. Skipped while torch.compile traces (dynamo cannot trace
    ``warnings.warn``): an eager forward warns."""
    if moe.causal is False or moe.__dict__.get("_warned_not_causal"):
        return
    if torch.compiler.is_compiling():
        return
    if moe.causal:
        why = "the layer was built with causal=True"
    elif x.dim() >= 3 and x.shape[-2] == 1:
        why = "it got one token per sequence, [batch, 1, hidden]: a decoding step with a cache"
    else:
        return
    moe._warned_not_causal = True
    warnings.warn(_NOT_CAUSAL.format(why=why), UserWarning, stacklevel=4)


def expert_capacity(capacity, num_tokens, num_experts):
    """``min(T, ceil(c * T / E))`` in integers from the capacity factor as a Fraction (symbolic
    under torch.compile when T is)."""
    num, den = capacity.numerator, capacity.denominator
    c = (num * num_tokens + den * num_experts - 1) // (den * num_experts)
    return sym_min(c, num_tokens)


def expert_choice_routed(
    logits, x2, w1, w2, activation, capacity, token_mask, adapters=None, packed=None
):
    """The routed output ``[T, H]`` of expert-choice routing. logits ``[T, E]``; x2 ``[T, H]``;
    w1/w2 the experts' weights in HF's ``[E, N, K]`` layout (``experts.expert_mlp``); token_mask
    ``[T]`` bool or None (False: padding, never chosen); adapters: the layer's LoRA adapters
    (``MoE.lora_adapters()``), on the chosen rows as on token choice's; packed: experts of
    different widths (``PackedExperts.spec()``, w1/w2 then 2-D packed)."""
    T, E = logits.shape
    scores = torch.softmax(logits.float() if logits.dtype != torch.float64 else logits, dim=-1)
    C = expert_capacity(capacity, T, E)
    mask = None if token_mask is None else token_mask.unsqueeze(0).expand(E, T)
    sel = select_topc(scores.t(), C, mask)  # values / indices [E, C], tokens ascending
    chosen = sel.indices >= 0  # False only where an expert has fewer than C eligible tokens
    tok = sel.indices.clamp(min=0)
    rows = x2[tok.reshape(-1)] * chosen.reshape(-1, 1).to(x2.dtype)  # [E * C, H]
    offsets = torch.arange(1, E + 1, device=x2.device, dtype=torch.int32) * C
    o = expert_mlp(rows, offsets, w1, w2, activation, adapters, packed=packed)  # [E * C, H]
    # row_map [T, E] and weights [T, E] from the choices; unchosen slots (-1) write to a spare
    # token row T that is dropped.
    expert = torch.arange(E, device=x2.device).unsqueeze(1).expand(E, C)
    row = torch.arange(E * C, device=x2.device, dtype=torch.int32).view(E, C)
    t_or_spare = torch.where(chosen, tok, torch.full_like(tok, T))
    row_map = torch.full((T + 1, E), -1, dtype=torch.int32, device=x2.device)
    row_map = row_map.index_put((t_or_spare, expert), row)[:T]
    w = torch.zeros(T + 1, E, dtype=sel.values.dtype, device=x2.device)
    w = w.index_put((t_or_spare, expert), torch.where(chosen, sel.values, 0))[:T]
    return unpermute(o, row_map.contiguous(), w.contiguous())
