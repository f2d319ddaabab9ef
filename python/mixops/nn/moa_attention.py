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

Other inputs: a flex-attention ``BlockMask`` (HF's ``flex_attention`` backend) runs
``flex_attention`` with ``enable_gqa`` (query head ``h * k + j`` -> kv head h, as above); document
ids (packed, padding-free batches) restrict attention to each token's own document; with
``output_attentions`` the attention is written out (scores, mask, softmax) to return its weights.
"""

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

__all__ = [
    "attend",
    "rope",
    "rope_tables",
    "padding_token_mask",
    "causal_allowed",
    "document_ids_from_cu_seq_lens",
    "document_ids_from_position_ids",
]


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's rotary embedding on ``x`` [batch, heads, len, d] with ``cos``/``sin`` [batch, len, d]
    (rotate_half convention: the two halves of each head)."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rope_tables(position_embeddings, batch, q_len, head_dim):
    """``position_embeddings`` checked as MoA's RoPE tables: ``(cos, sin)``, each ``[batch or 1,
    q_len, head_dim]`` (HF's rotary output at this call's tokens). Anything else raises a
    ValueError naming the expected shape (not a broadcast error from inside ``rope``)."""
    pe = position_embeddings
    want = f"[batch or 1, q_len, head_dim] = [{batch} or 1, {q_len}, {head_dim}]"
    if not (isinstance(pe, (tuple, list)) and len(pe) == 2 and all(torch.is_tensor(t) for t in pe)):
        got = type(pe).__name__
        if isinstance(pe, (tuple, list)):
            got += "(" + ", ".join(type(t).__name__ for t in pe) + ")"
        raise ValueError(
            f"MoA: position_embeddings must be a pair (cos, sin) of tensors {want}, got {got}"
        )
    for name, t in zip(("cos", "sin"), pe):
        if t.dim() != 3 or t.shape[0] not in (1, batch) or tuple(t.shape[1:]) != (q_len, head_dim):
            raise ValueError(
                f"MoA: position_embeddings' {name} must be {want} (the RoPE table of this "
                f"layer's head_dim {head_dim} at this call's {q_len} tokens), got shape "
                f"{tuple(t.shape)}"
            )
    return pe


def padding_token_mask(attention_mask, batch, q_len) -> Optional[torch.Tensor]:
    """Tokens counted in the losses from a 2-D padding mask (the last q_len columns); None for
    none, 4-D masks or a BlockMask. A 2-D mask of another batch, or with fewer columns than
    q_len, raises."""
    if attention_mask is None or isinstance(attention_mask, BlockMask):
        return None
    if attention_mask.dim() != 2:
        return None
    rows, cols = attention_mask.shape
    if rows != batch:
        raise ValueError(
            f"MoA: attention_mask (a 2-D padding mask [batch, kv_len]) has {rows} rows, but "
            f"hidden_states has batch {batch}"
        )
    if cols < q_len:
        raise ValueError(
            f"MoA: attention_mask (a 2-D padding mask [batch, kv_len]) has {cols} columns, fewer "
            f"than this call's {q_len} tokens (hidden_states' sequence length): it must cover "
            "the cached keys and this call's tokens"
        )
    return attention_mask[:, -q_len:] != 0


def document_ids_from_cu_seq_lens(cu_seq_lens, batch, q_len) -> torch.Tensor:
    """``[batch, q_len]`` document ids from cumulative document lengths ``cu_seq_lens``
    ``[num_docs + 1]`` over the flattened ``batch * q_len`` tokens (HF's / flash-attn's
    ``cu_seq_lens_q``: ``0, len_0, len_0 + len_1, ..., batch * q_len``)."""
    cu = cu_seq_lens
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 2:
        got = tuple(cu.shape) if isinstance(cu, torch.Tensor) else type(cu).__name__
        raise ValueError(f"MoA: cu_seq_lens must be a 1-D tensor [num_docs + 1], got {got}")
    cu = cu.to(torch.int64)
    if not torch.compiler.is_compiling():  # values: one host read, as HF's own packing checks
        bad = (cu[0] != 0) | (cu[-1] != batch * q_len) | (cu.diff() < 0).any()
        if bool(bad):
            raise ValueError(
                f"MoA: cu_seq_lens must rise from 0 to the {batch} x {q_len} = {batch * q_len} "
                f"tokens of this call, got {cu.tolist()}"
            )
    tokens = torch.arange(batch * q_len, device=cu.device)
    return torch.searchsorted(cu[1:], tokens, right=True).view(batch, q_len)


def document_ids_from_position_ids(position_ids, batch) -> Optional[torch.Tensor]:
    """``[batch, q_len]`` document ids of a packed batch: a document starts wherever a position
    does not follow the one before by 1 (HF's ``find_packed_sequence_indices``). None when every
    row holds one document (not checked while compiling: the ids are returned)."""
    pos = position_ids.expand(batch, -1)
    starts = torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1) != 1
    if not torch.compiler.is_compiling() and not bool(starts.any()):
        return None
    return starts.cumsum(-1)


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
                f"MoA: attention_mask (a 2-D padding mask [batch, kv_len]) has "
                f"{m.shape[-1]} columns, but there are {kv_len} keys (the cached keys and this "
                f"call's {q_len} tokens): expected shape {(batch, kv_len)}, got {tuple(m.shape)}"
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


def _with_documents(mask, document_ids, causal, q_len, device):
    """``mask`` (from _mask4) restricted to keys of each query's own document."""
    same = (document_ids[:, :, None] == document_ids[:, None, :])[:, None]  # [B, 1, S, S]
    if mask is None:
        return same & causal_allowed(q_len, q_len, device) if causal else same
    if mask.dtype == torch.bool:
        return mask & same
    return mask.masked_fill(~same, torch.finfo(mask.dtype).min)  # additive: HF's fill value


def _heads5(mask, Hkv, top_k):
    """A [b, 1 | Hq, S, kv] mask as [b, 1 | Hkv, 1 | k, S, kv] (head h * k + j -> (h, j))."""
    b, h, S, kv = mask.shape
    if h == 1:
        return mask.unsqueeze(2)
    if h == Hkv * top_k:
        return mask.reshape(b, Hkv, top_k, S, kv)
    raise ValueError(
        f"MoA: attention_mask's head dimension must be 1 or {Hkv * top_k} (query heads), got {h}"
    )


def _attend_written_out(q, key, value, mask, top_k, causal, scale, dropout_p):
    """Scores, mask, softmax, values (HF's eager attention, without copying K/V): the output
    ``[B, S, Hkv, k, d]`` and the weights ``[B, k * Hkv, S, kv_len]`` in HF JetMoE's head order
    (slot j's head h at ``j * Hkv + h``). A bool mask fills the scores with the dtype's minimum,
    as HF's additive masks do, so a fully masked row gets uniform weights (as in HF's eager)."""
    B, Hq, S, d = q.shape
    Hkv, kv_len = key.shape[1], key.shape[2]
    s = torch.matmul(q.view(B, Hkv, top_k, S, d), key.unsqueeze(2).transpose(-1, -2)) * scale
    if mask is None and causal and S > 1:
        mask = causal_allowed(S, kv_len, q.device)[None, None]
    if mask is not None:
        m5 = _heads5(mask, Hkv, top_k)
        if m5.dtype == torch.bool:
            s = s.masked_fill(~m5, torch.finfo(s.dtype).min)
        else:
            s = s + m5
    softmax_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    p = torch.softmax(s, dim=-1, dtype=softmax_dtype).to(q.dtype)  # [B, Hkv, k, S, kv]
    # The weights returned are the ones the output is made of (after dropout, as HF's), so
    # their .grad (retain_grad) is the gradient the attention receives.
    weights = p.transpose(1, 2).reshape(B, top_k * Hkv, S, kv_len)
    if dropout_p > 0:
        weights = F.dropout(weights, p=dropout_p)
    p = weights.view(B, top_k, Hkv, S, kv_len).transpose(1, 2)
    o = torch.matmul(p, value.unsqueeze(2))  # [B, Hkv, k, S, d]
    return o.permute(0, 3, 1, 2, 4), weights


_compiled_flex = None


def _flex_fn(q):
    """flex_attention, compiled once (as HF does) off the CPU and outside torch.compile. On the
    CPU it runs eagerly (torch's unfused implementation; its warning about that is silenced)."""
    from torch.nn.attention.flex_attention import flex_attention

    global _compiled_flex
    if torch.compiler.is_compiling():
        return flex_attention
    if q.device.type == "cpu":

        def eager(*args, **kwargs):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="flex_attention called without")
                return flex_attention(*args, **kwargs)

        return eager
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex


def _attend_flex(q, key, value, block_mask, document_ids, top_k, scale, dropout_p):
    """flex_attention with a ``BlockMask`` (taken as the whole mask, as a 4-D mask is):
    ``[B, S, Hkv, k, d]``."""
    from torch.nn.attention.flex_attention import and_masks, create_block_mask

    B, Hq, S, d = q.shape
    Hkv, kv_len = key.shape[1], key.shape[2]
    if dropout_p > 0:
        raise ValueError(
            "MoA: flex attention (a BlockMask attention_mask) has no attention dropout: use "
            "attention_dropout=0, eval(), or another attention backend"
        )
    if tuple(block_mask.seq_lengths) != (S, kv_len):
        raise ValueError(
            f"MoA: the BlockMask attention_mask covers (q_len, kv_len) = "
            f"{tuple(block_mask.seq_lengths)}, but there are {S} queries and {kv_len} keys"
        )
    if document_ids is not None:
        doc = document_ids

        def same_document(b, h, q_idx, kv_idx):
            return doc[b, q_idx] == doc[b, kv_idx]

        block_mask = create_block_mask(
            and_masks(block_mask.mask_mod, same_document), B, None, S, kv_len,
            device=q.device, BLOCK_SIZE=block_mask.BLOCK_SIZE,
        )  # fmt: skip
    if Hq & (Hq - 1):  # flex's GQA wants a power-of-two head count (as HF's flex path)
        key = key.repeat_interleave(top_k, dim=1)
        value = value.repeat_interleave(top_k, dim=1)
    o = _flex_fn(q)(
        q, key, value, block_mask=block_mask, scale=scale, enable_gqa=key.shape[1] != Hq
    )
    return o.transpose(1, 2).reshape(B, S, Hkv, top_k, d)


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
    document_ids: Optional[torch.Tensor] = None,
    output_attentions: bool = False,
):
    """Attention of the MoA queries; returns ``[batch, q_len, Hkv, k, head_dim]``, and with
    ``output_attentions`` also the weights ``[batch, k * Hkv, q_len, kv_len]`` (HF JetMoE's head
    order, see _attend_written_out). ``attention_mask``: None, 2-D, 4-D or a ``BlockMask``;
    ``document_ids`` ``[batch, q_len]``: attend only within each token's document (this call's
    tokens must be all the keys)."""
    B, Hq, S, d = q.shape
    Hkv, kv_len = key.shape[1], key.shape[2]
    if document_ids is not None and kv_len != S:
        raise ValueError(
            f"MoA: document_ids (packed documents) need this call's {S} tokens to be all the "
            f"keys, but there are {kv_len} (a cache holds earlier tokens)"
        )
    if isinstance(attention_mask, BlockMask):
        if output_attentions:
            raise ValueError(
                "MoA: output_attentions needs the attention written out; flex attention (a "
                "BlockMask attention_mask) gives no weights: use eager attention"
            )
        return _attend_flex(q, key, value, attention_mask, document_ids, top_k, scale, dropout_p)
    mask = _mask4(attention_mask, B, S, kv_len, causal, q.device)
    if document_ids is not None:
        mask = _with_documents(mask, document_ids, causal, S, q.device)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    if output_attentions:
        return _attend_written_out(q, key, value, mask, top_k, causal, scale, dropout_p)
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
    b = mask.shape[0]
    m5 = _heads5(mask, Hkv, top_k)  # [b, 1 | Hkv, 1 | k, S, kv]
    mf = m5.transpose(2, 3).expand(b, m5.shape[1], S, top_k, kv_len)
    mf = mf.reshape(b, m5.shape[1], S * top_k, kv_len)
    o = F.scaled_dot_product_attention(
        qf, key, value, attn_mask=mf, scale=scale, dropout_p=dropout_p
    )
    return o.view(B, Hkv, S, top_k, d).permute(0, 2, 1, 3, 4)
