"""Independent references for mixops.nn.MoD: top-C by sorting in Python (the strict order: higher
first, ties to the lower position, NaN last) and the masked-dense oracle (the block over the whole
sequence with the unchosen tokens hidden as keys, then x + g * f on the chosen tokens)."""

import math

import torch


def topc_mask(r, c, eligible=None):
    """[B, S] bool: the c best eligible entries of each row of r (per-row c: an int or a list)."""
    B, S = r.shape
    out = torch.zeros(B, S, dtype=torch.bool)
    for b in range(B):
        vals = r[b].tolist()
        cand = [i for i in range(S) if eligible is None or bool(eligible[b, i])]
        cand.sort(
            key=lambda i: (math.isnan(vals[i]), -vals[i] if not math.isnan(vals[i]) else 0, i)
        )
        cb = c if isinstance(c, int) else c[b]
        for i in cand[:cb]:
            out[b, i] = True
    return out


def gate(r, kind):
    return {
        "raw": lambda: r,
        "sigmoid": lambda: torch.sigmoid(r),
        "tanh": lambda: 0.2 * torch.tanh(r) + 1,
        "one": lambda: torch.ones_like(r),
    }[kind]()


def dense_mod(block, x, r, chosen, gate_kind, *, scale_skipped=False, residual=True, **kwargs):
    """The masked-dense oracle: ``block`` over all of x with key j visible to query i iff
    ``j <= i`` and (j chosen or j == i); chosen tokens get ``x + g * f``, the others x (or g * x)."""
    B, S, _ = x.shape
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    keep = (chosen[:, None, None, :] | torch.eye(S, dtype=torch.bool)) & causal
    y = block(x, attention_mask=keep, **kwargs)
    g = gate(r, gate_kind).unsqueeze(-1).to(x.dtype)
    f = y - x if residual else y
    skipped = g * x if scale_skipped else x
    return torch.where(chosen.unsqueeze(-1), x + g * f, skipped)
