"""The attention step of mixops.nn.MoA: masks, RoPE and the SDPA call, with K/V never repeated.

Queries arrive as SDPA's ``[batch, Hkv * k, q_len, head_dim]`` with head ``h * k + j`` for kv head
h and slot j (a view of the slot layout ``[batch, q_len, Hkv, k, head_dim]``); keys and values as
``[batch, Hkv, kv_len, head_dim]``. The result goes back in the slot layout.

Without a mask SDPA runs with ``enable_gqa`` (``is_causal`` for causal attention): the flash and
memory-efficient kernels take it. With a mask (padding, or a cache with more keys than queries),
SDPA's fused kernels do not combine ``enable_gqa`` with ``attn_mask``, so the k slots are folded
into the query length instead: ``[batch, Hkv, q_len * k, head_dim]`` queries against the same K/V
(no GQA needed), the mask repeated over the k slots of each query row (the queries and the mask
are copied, never keys and values). The memory-efficient kernel takes that.
"""

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["attend", "rope", "padding_token_mask", "causal_allowed"]


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's rotary embedding on ``x`` [batch, heads, len, d] with ``cos``/``sin`` [batch, len, d]
    (rotate_half convention: the two halves of each head)."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def padding_token_mask(attention_mask, batch, q_len) -> Optional[torch.Tensor]:
    """Tokens counted in the losses from a 2-D padding mask (the last q_len columns); None for
    none or 4-D masks."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    return attention_mask[:, -q_len:].reshape(batch, q_len) != 0


def causal_allowed(q_len, kv_len, device):
    """[q_len, kv_len] bool, True where query i (the last q_len of kv_len positions) may attend."""
    i = torch.arange(q_len, device=device).unsqueeze(1)
    j = torch.arange(kv_len, device=device).unsqueeze(0)
    return j <= i + (kv_len - q_len)


def _mask4(attention_mask, batch, q_len, kv_len, causal, device):
    """A 4-D mask ``[b, 1 | heads, q_len, kv_len]`` (bool: True = attend; or additive float), or
    None when plain ``is_causal`` (or nothing) is exact."""
    m = attention_mask
    if m is None:
        if causal and q_len > 1 and kv_len != q_len:
            return causal_allowed(q_len, kv_len, device)[None, None]
        return None
    if m.dim() == 2:
        if tuple(m.shape) != (batch, kv_len):
            raise ValueError(
                f"MoA: a 2-D attention_mask must be [batch, kv_len] = {(batch, kv_len)}, "
                f"got {tuple(m.shape)}"
            )
        m = (m != 0)[:, None, None, :]
        if causal:
            m = m & causal_allowed(q_len, kv_len, device)
        return m
    if m.dim() != 4 or m.shape[-2:] != (q_len, kv_len):
        raise ValueError(
            f"MoA: attention_mask must be [batch, kv_len] or [batch, 1 or heads, q_len, kv_len] "
            f"= [.., .., {q_len}, {kv_len}], got shape {tuple(m.shape)}"
        )
    return m


def attend(
    q: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    top_k: int,
    *,
    causal: bool,
    scale: float,
    dropout_p: float,
) -> torch.Tensor:
    """Attention of the MoA queries; returns ``[batch, q_len, Hkv, k, head_dim]``."""
    B, Hq, S, d = q.shape
    Hkv, kv_len = key.shape[1], key.shape[2]
    mask = _mask4(attention_mask, B, S, kv_len, causal, q.device)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    if mask is None:
        is_causal = False
        if causal and S > 1:  # a branch (a shape guard), so SDPA gets a bool, not a SymBool
            is_causal = True
        o = F.scaled_dot_product_attention(
            q,
            key,
            value,
            is_causal=is_causal,
            scale=scale,
            dropout_p=dropout_p,
            enable_gqa=Hq != Hkv,
        )
        return o.transpose(1, 2).view(B, S, Hkv, top_k, d)
    # Fold the slots into the query rows: row s * k + j of kv head h is query head h * k + j at s.
    qf = q.reshape(B, Hkv, top_k, S, d).transpose(2, 3).reshape(B, Hkv, S * top_k, d)
    b, h = mask.shape[0], mask.shape[1]
    if h == 1:
        mf = mask.unsqueeze(3).expand(b, 1, S, top_k, kv_len).reshape(b, 1, S * top_k, kv_len)
    elif h == Hq:
        mf = mask.reshape(b, Hkv, top_k, S, kv_len).transpose(2, 3)
        mf = mf.reshape(b, Hkv, S * top_k, kv_len)
    else:
        raise ValueError(
            f"MoA: attention_mask's head dimension must be 1 or {Hq} (query heads), got {h}"
        )
    o = F.scaled_dot_product_attention(
        qf, key, value, attn_mask=mf, scale=scale, dropout_p=dropout_p
    )
    return o.view(B, Hkv, S, top_k, d).permute(0, 2, 1, 3, 4)
