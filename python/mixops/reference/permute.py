"""Reference permute / unpermute in plain PyTorch, from the definitions in mixops.ops.permute's
docstring: a stable sort of the slots by expert, capacity by explicit priority ranking."""

import torch


def permute(x, ids, num_experts, *, capacity=None, priority=None):
    num_tokens, k = ids.shape
    slots = num_tokens * k
    e = ids.long().flatten().clone()
    dropped = torch.zeros(num_experts, dtype=torch.int64)
    if capacity is not None:
        # priority order: choice rank j, then (priority desc, NaN last) or token order
        token = torch.arange(num_tokens)
        taken = [0] * num_experts
        for j in range(k):
            order = token
            if priority is not None:
                p = priority[:, j].double().cpu()
                p = torch.where(torch.isnan(p), torch.full_like(p, -torch.inf), p)
                order = torch.sort(p, descending=True, stable=True).indices
                nan_last = torch.isnan(priority[order, j].double().cpu()).long()
                order = order[torch.sort(nan_last, stable=True).indices]
            for t in order.tolist():
                ex = int(e[t * k + j])
                if ex < 0:
                    continue
                if taken[ex] >= capacity:
                    e[t * k + j] = -1
                    dropped[ex] += 1
                taken[ex] += 1
    num_rows = slots if capacity is None else min(slots, num_experts * capacity)
    key = torch.where(e >= 0, e, torch.full_like(e, num_experts))
    order = torch.sort(key, stable=True).indices
    used = int((e >= 0).sum())
    x_sorted = x.new_zeros(num_rows, x.shape[1])
    x_sorted[:used] = x[order[:used] // k]
    counts = torch.bincount(e[e >= 0], minlength=num_experts)
    offsets = torch.cumsum(counts, 0).to(torch.int32)
    row_map = torch.full((slots,), -1, dtype=torch.int64)
    row_map[order[:used]] = torch.arange(used)
    return (x_sorted, offsets, row_map.view(num_tokens, k).to(torch.int32), dropped.to(torch.int32))


def unpermute(y_sorted, row_map, weights=None):
    rm = row_map.long()
    has = (rm >= 0).unsqueeze(-1)
    rows = y_sorted[rm.clamp(min=0)] * has  # [T, k, H]
    if weights is not None:
        rows = rows * weights.unsqueeze(-1)
    return rows.sum(1)


def rows_to_slots(rows, row_map, num_heads=1):
    """slots [T, num_heads, k, d]: slots[t, h, j] = head h of rows[row_map[t, j]], zeros for -1."""
    num_tokens, k = row_map.shape
    d = rows.shape[1] // num_heads
    # an extra zero row stands for -1, so every slot is a plain index (bits copied exactly)
    padded = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])
    rm = row_map.long()
    idx = torch.where(rm >= 0, rm, torch.full_like(rm, rows.shape[0]))
    return padded[idx].view(num_tokens, k, num_heads, d).permute(0, 2, 1, 3).contiguous()


def slots_to_rows(slots, row_map, num_rows):
    """rows [num_rows, num_heads * d]: rows[row_map[t, j]] = the heads of slots[t, :, j]; zeros
    where no slot maps."""
    num_tokens, num_heads, k, d = slots.shape
    out = slots.new_zeros(num_rows + 1, num_heads * d)  # the last row takes the -1 slots
    rm = row_map.long().flatten()
    idx = torch.where(rm >= 0, rm, torch.full_like(rm, num_rows))
    out[idx] = slots.permute(0, 2, 1, 3).reshape(num_tokens * k, num_heads * d)
    return out[:num_rows]


def scatter_rows(base, rows, index):
    """out [T, H]: base with out[index[i]] = rows[i] for index[i] >= 0 (distinct rows); rows with
    index -1 are not written. A fresh contiguous tensor (bits copied exactly); differentiable."""
    out = base.clone(memory_format=torch.contiguous_format)
    has = index >= 0
    out[index[has].long()] = rows[has]
    return out


def reorder_chunks(x, counts):
    """y [N, H]: the chunks of x (chunk (a, b) = counts[a, b] consecutive rows, in (a, b) order)
    in (b, a) order, rows past sum(counts) zero; a fresh contiguous tensor (bits copied exactly),
    differentiable. Plain loops over the chunks; counts must be valid (>= 0, sum <= N)."""
    c = counts.cpu().tolist()
    num_a, num_b = len(c), len(c[0])
    start, src = 0, {}
    for a in range(num_a):
        for b in range(num_b):
            src[a, b] = start
            start += c[a][b]
    pieces = [x[src[a, b] : src[a, b] + c[a][b]] for b in range(num_b) for a in range(num_a)]
    pieces.append(x.new_zeros(x.shape[0] - start, x.shape[1]))
    return torch.cat(pieces)
