"""Reference grouped_mm: one torch.matmul per expert (same contract as mixops.ops.grouped_mm)."""

import torch


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    ends = [int(x) for x in offsets.tolist()]
    starts = [0] + ends[:-1]
    if b.dim() == 3:
        out = a.new_zeros(a.shape[0], b.shape[2])
        for g, (s, e) in enumerate(zip(starts, ends)):
            if e > s:
                out[s:e] = a[s:e] @ b[g]
        return out
    out = a.new_zeros(len(ends), a.shape[0], b.shape[1])
    for g, (s, e) in enumerate(zip(starts, ends)):
        if e > s:
            out[g] = a[:, s:e] @ b[s:e]
    return out
