"""Independent references for mixops.nn.MoA, in plain torch (no mixops op):

* ``dense_moa``: the dense-mask oracle. Every expert's queries, attention and output projection are
  computed for every token; the gates are zero outside each token's top k. Attention is written out
  (scores, mask, softmax, values), keys and values per kv head.
* ``gqa_equivalent``: with E = k and a constant router, MoA is grouped-query attention with
  ``num_kv_heads * k`` query heads whose output projection is the experts' output projections
  concatenated and divided by k.
"""

import torch


def rope_ref(x, cos, sin):
    """x [B, S, heads, d], cos/sin [B, S, d]."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, :, None] + rot * sin[:, :, None]


def gates_ref(logits, k, mode):
    """[T, E] gates, zero outside the top k. mode "jetmoe": softmax over the top-k logits;
    "paper": softmax over all E, top k, no renormalisation; "renorm": softmax, top k, renormalised."""
    logits = logits.double()
    top, ids = logits.topk(k, dim=-1)
    if mode == "jetmoe":
        w = torch.softmax(top, dim=-1)
    else:
        w = torch.softmax(logits, dim=-1).gather(-1, ids)
        if mode == "renorm":
            w = w / w.sum(-1, keepdim=True)
    return torch.zeros_like(logits).scatter(-1, ids, w)


def attention_ref(q, key, value, allowed, scale):
    """q [B, S, Hkv, d] (one query head per kv head), key/value [B, Skv, Hkv, d],
    allowed [B, S, Skv] bool or None -> [B, S, Hkv, d]. Fully masked rows give zeros."""
    s = torch.einsum("bshd,bthd->bhst", q, key) * scale
    if allowed is not None:
        s = s.masked_fill(~allowed[:, None], float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)
    return torch.einsum("bhst,bthd->bshd", p, value)


def dense_moa(x, wq, wo, bias, wkv, w_router, k, num_kv_heads, *, mode="jetmoe", allowed=None,
              cos=None, sin=None, scale=None, gates=None):  # fmt: skip
    """x [B, S, H]; wq [E, Hkv*d, H]; wo [E, H, Hkv*d]; wkv [2*Hkv*d, H]; w_router [E, H];
    allowed [B, S, S] (True = attend) or None (no mask) -> [B, S, H]. gates: a function of the
    router logits [T, E] giving the [T, E] gates (zero where not chosen) instead of ``mode``."""
    B, S, H = x.shape
    E = wq.shape[0]
    d = wq.shape[1] // num_kv_heads
    scale = d**-0.5 if scale is None else scale
    logits = x.reshape(-1, H) @ w_router.T
    gates = (gates_ref(logits, k, mode) if gates is None else gates(logits)).to(x.dtype)
    gates = gates.view(B, S, E)
    kv = (x @ wkv.T).view(B, S, 2, num_kv_heads, d)
    key, value = kv[:, :, 0], kv[:, :, 1]
    if cos is not None:
        key = rope_ref(key, cos, sin)
    y = torch.zeros_like(x)
    for e in range(E):
        q = (x @ wq[e].T).view(B, S, num_kv_heads, d)
        if cos is not None:
            q = rope_ref(q, cos, sin)
        o = attention_ref(q, key, value, allowed, scale).reshape(B, S, -1)
        y = y + gates[..., e : e + 1] * (o @ wo[e].T)
    return y + (0 if bias is None else bias)


def causal_allowed(B, S, pad=None):
    """[B, S, S] causal, and keys with pad == 0 ([B, S]) masked."""
    m = torch.ones(S, S, dtype=torch.bool).tril().expand(B, S, S)
    if pad is not None:
        m = m & (pad != 0)[:, None, :]
    return m
