"""Argument validation of the permute ops (permute, unpermute and its two backward ops,
rows_to_slots, slots_to_rows): csrc/permute/check.cpp line by line, with its messages (see
_check.py). Each fake in permute.py runs its op's validator, so meta and FakeTensor calls raise
what the CPU and CUDA ops raise. The shared pieces (_check_float, _check_same_device) serve the
family's other modules too (permute_rows.py, permute_chunks.py)."""

import torch

from ._check import FLOATS, INT32_MAX, check


def _check_float(t, op, name):
    check(
        t.dtype in FLOATS,
        op,
        ": ",
        name,
        " must be float32, bfloat16 or float16 (or float64), got ",
        t.dtype,
    )


def _check_same_device(t, ref, op, name, ref_name):
    check(
        t.device == ref.device,
        op,
        ": ",
        name,
        " must be on the same device as ",
        ref_name,
        " (",
        ref.device,
        "), got ",
        t.device,
    )


def _check_row_map(row_map, num_tokens, op, tokens_from):
    check(
        row_map.dtype == torch.int32,
        op,
        ": row_map must be int32 (from permute), got ",
        row_map.dtype,
    )
    check(
        row_map.dim() == 2 and row_map.shape[0] == num_tokens,
        op,
        ": row_map must have shape [num_tokens, k] with num_tokens = ",
        tokens_from,
        " = ",
        num_tokens,
        ", got ",
        row_map.shape,
        "; is it from a permute call of another shape?",
    )
    check(row_map.shape[1] >= 1, op, ": row_map must have k >= 1 columns, got ", row_map.shape)
    check(
        row_map.numel() < INT32_MAX,
        op,
        ": row_map must have num_tokens * k < 2^31 - 1 slots (as permute gives), got shape ",
        row_map.shape,
    )


def _check_weights(weights, row_map, data, op):
    if weights is None:
        return
    check(
        weights.shape == row_map.shape,
        op,
        ": weights must have the shape of row_map ",
        row_map.shape,
        " [num_tokens, k], got ",
        weights.shape,
    )
    check(
        weights.dtype in (torch.float32, torch.float64, data.dtype),
        op,
        ": weights must be float32, float64 or the data's dtype (",
        data.dtype,
        "), got ",
        weights.dtype,
    )
    _check_same_device(weights, data, op, "weights", "the data")


def _permute_check(x, ids, num_experts, capacity, priority):
    """permute_check: returns num_rows, min(T * k, E * capacity) (a SymInt under dynamic shapes)."""
    check(x.dim() == 2, "permute: x must be 2-D [num_tokens, hidden], got shape ", x.shape)
    _check_float(x, "permute", "x")
    check(
        ids.dtype in (torch.int32, torch.int64),
        "permute: ids must be int32 or int64, got ",
        ids.dtype,
    )
    check(
        ids.dim() == 2 and ids.shape[0] == x.shape[0],
        "permute: ids must have shape [num_tokens, k] with num_tokens = x.size(0) = ",
        x.shape[0],
        ", got ",
        ids.shape,
    )
    check(ids.shape[1] >= 1, "permute: ids must have k >= 1 columns, got ", ids.shape)
    _check_same_device(ids, x, "permute", "ids", "x")
    check(
        num_experts >= 1 and num_experts <= INT32_MAX,
        "permute: num_experts must be in [1, 2^31), got ",
        num_experts,
    )
    slots = ids.shape[0] * ids.shape[1]
    check(
        slots < INT32_MAX,
        "permute: num_tokens * k must be < 2^31 - 1 (row_map is int32), got ids of shape ",
        ids.shape,
    )
    if capacity is not None:
        check(capacity >= 0, "permute: capacity must be >= 0, got ", capacity)
    if priority is not None:
        check(
            capacity is not None,
            "permute: priority only orders slots competing for capacity; give capacity too",
        )
        check(
            priority.shape == ids.shape,
            "permute: priority must have the shape of ids ",
            ids.shape,
            ", got ",
            priority.shape,
        )
        check(
            priority.dtype.is_floating_point,
            "permute: priority must be a floating point tensor, got ",
            priority.dtype,
        )
        _check_same_device(priority, x, "permute", "priority", "x")
    if capacity is None:
        return slots
    # min(T * k, E * capacity) with the product bounded by E * T * k < 2^62 (permute::num_rows)
    return torch.sym_min(slots, num_experts * torch.sym_min(capacity, slots))


def _unpermute_check(y_sorted, row_map, weights):
    check(
        y_sorted.dim() == 2,
        "unpermute: y_sorted must be 2-D [num_rows, hidden], got shape ",
        y_sorted.shape,
    )
    _check_float(y_sorted, "unpermute", "y_sorted")
    check(
        row_map.dim() == 2,
        "unpermute: row_map must be 2-D [num_tokens, k], got shape ",
        row_map.shape,
    )
    _check_row_map(row_map, row_map.shape[0], "unpermute", "row_map.size(0)")
    _check_same_device(row_map, y_sorted, "unpermute", "row_map", "y_sorted")
    _check_weights(weights, row_map, y_sorted, "unpermute")


def _unpermute_backward_check(grad_y, row_map, weights, num_rows):
    check(
        grad_y.dim() == 2,
        "unpermute_backward: grad_y must be 2-D [num_tokens, hidden], got shape ",
        grad_y.shape,
    )
    _check_float(grad_y, "unpermute_backward", "grad_y")
    _check_row_map(row_map, grad_y.shape[0], "unpermute_backward", "grad_y.size(0)")
    _check_same_device(row_map, grad_y, "unpermute_backward", "row_map", "grad_y")
    _check_weights(weights, row_map, grad_y, "unpermute_backward")
    check(num_rows >= 0, "unpermute_backward: num_rows must be >= 0, got ", num_rows)


def _unpermute_weights_backward_check(grad_y, y_sorted, row_map, weights):
    op = "unpermute_weights_backward"
    check(
        grad_y.dim() == 2 and y_sorted.dim() == 2,
        op,
        ": grad_y [num_tokens, hidden] and y_sorted [num_rows, hidden] must be 2-D, got ",
        grad_y.shape,
        " and ",
        y_sorted.shape,
    )
    _check_float(grad_y, op, "grad_y")
    check(
        y_sorted.dtype == grad_y.dtype and y_sorted.shape[1] == grad_y.shape[1],
        op,
        ": y_sorted must match grad_y in dtype and hidden size, got ",
        y_sorted.dtype,
        " ",
        y_sorted.shape,
        " and ",
        grad_y.dtype,
        " ",
        grad_y.shape,
    )
    _check_same_device(y_sorted, grad_y, op, "y_sorted", "grad_y")
    _check_row_map(row_map, grad_y.shape[0], op, "grad_y.size(0)")
    _check_same_device(row_map, grad_y, op, "row_map", "grad_y")
    _check_weights(weights, row_map, grad_y, op)


def _rows_to_slots_check(rows, row_map, num_heads):
    op = "rows_to_slots"
    check(rows.dim() == 2, op, ": rows must be 2-D [num_rows, hidden], got shape ", rows.shape)
    _check_float(rows, op, "rows")
    check(
        row_map.dim() == 2,
        op,
        ": row_map must be 2-D [num_tokens, k], got shape ",
        row_map.shape,
    )
    _check_row_map(row_map, row_map.shape[0], op, "row_map.size(0)")
    _check_same_device(row_map, rows, op, "row_map", "rows")
    check(num_heads >= 1, op, ": num_heads must be >= 1, got ", num_heads)
    check(
        rows.shape[1] % num_heads == 0,
        op,
        ": rows.size(1) = ",
        rows.shape[1],
        " must be divisible by num_heads = ",
        num_heads,
        " (hidden = num_heads * head_dim)",
    )


def _slots_to_rows_check(slots, row_map, num_rows):
    op = "slots_to_rows"
    check(
        slots.dim() == 4,
        op,
        ": slots must be 4-D [num_tokens, num_heads, k, head_dim], got shape ",
        slots.shape,
    )
    _check_float(slots, op, "slots")
    _check_row_map(row_map, slots.shape[0], op, "slots.size(0)")
    check(
        row_map.shape[1] == slots.shape[2],
        op,
        ": row_map must have k = slots.size(2) = ",
        slots.shape[2],
        " columns, got shape ",
        row_map.shape,
    )
    _check_same_device(row_map, slots, op, "row_map", "slots")
    check(
        slots.shape[1] >= 1,
        op,
        ": slots must have num_heads = slots.size(1) >= 1, got shape ",
        slots.shape,
    )
    check(num_rows >= 0, op, ": num_rows must be >= 0, got ", num_rows)
