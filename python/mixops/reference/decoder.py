"""A plain pre-norm decoder block (RMSNorm, causal attention with RoPE, SwiGLU MLP) called the way
HF calls its decoder layers: ``block(x, attention_mask=None, position_embeddings=None)`` returning
``x + attn + mlp``; its attention alone (``SelfAttention``: no norm, no residual). For the MoD and
shortcut tests and benchmarks; ``rotary`` gives HF-style ``(cos, sin)``."""

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DecoderBlock", "SelfAttention", "rotary"]


def rotary(position_ids, head_dim, base=10000.0, dtype=torch.float32):
    """``(cos, sin)`` [batch, seq, head_dim] for ``position_ids`` [batch, seq] (HF's layout)."""
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ang = position_ids.to(torch.float64).unsqueeze(-1) * inv.to(position_ids.device)
    emb = torch.cat((ang, ang), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rope(x, cos, sin):
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _attend(qkv, o, heads, x, attention_mask, position_embeddings):
    """Causal multi-head attention of x through the projections ``qkv`` and ``o``."""
    B, S, H = x.shape
    q, k, v = qkv(x).view(B, S, 3, heads, -1).permute(2, 0, 3, 1, 4)
    if position_embeddings is not None:
        cos, sin = position_embeddings
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    m = attention_mask
    if m is not None and m.dim() == 2:  # padding [B, S]: causal, real keys, and itself
        eye = torch.eye(S, dtype=torch.bool, device=x.device)
        m = ((m != 0)[:, None, None, :] & eye.new_ones(S, S).tril()) | eye
    if m is None:
        a = F.scaled_dot_product_attention(q, k, v, is_causal=S > 1)
    else:
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    return o(a.transpose(1, 2).reshape(B, S, H))


class SelfAttention(nn.Module):
    """Causal self-attention ``[batch, seq, hidden] -> [batch, seq, hidden]`` (no norm, no
    residual); attention_mask and position_embeddings as DecoderBlock's."""

    def __init__(self, hidden, heads, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype, bias=False)
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden, **kw)
        self.o = nn.Linear(hidden, hidden, **kw)

    def forward(self, x, attention_mask=None, position_embeddings=None, **unused):
        return _attend(self.qkv, self.o, self.heads, x, attention_mask, position_embeddings)


class DecoderBlock(nn.Module):
    """``[batch, seq, hidden] -> [batch, seq, hidden]``; attention_mask: None (causal), a
    ``[batch, seq]`` padding mask (causal over the real keys; every token sees itself), or a bool
    ``[batch, 1, seq, seq]`` (True = attend) or additive float mask."""

    def __init__(self, hidden, heads, ffn, attention=True, mlp=True, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype, bias=False)
        self.hidden_size, self.heads, self.head_dim = hidden, heads, hidden // heads
        self.attention, self.mlp = attention, mlp
        if attention:
            self.norm1 = nn.RMSNorm(hidden, eps=1e-6, device=device, dtype=dtype)
            self.qkv = nn.Linear(hidden, 3 * hidden, **kw)
            self.o = nn.Linear(hidden, hidden, **kw)
        if mlp:
            self.norm2 = nn.RMSNorm(hidden, eps=1e-6, device=device, dtype=dtype)
            self.gate_up = nn.Linear(hidden, 2 * ffn, **kw)
            self.down = nn.Linear(ffn, hidden, **kw)

    def forward(self, x, attention_mask=None, position_embeddings=None, **unused):
        if self.attention:
            h = self.norm1(x)
            x = x + _attend(self.qkv, self.o, self.heads, h, attention_mask, position_embeddings)
        if self.mlp:
            gate, up = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
            x = x + self.down(F.silu(gate) * up)
        return x
