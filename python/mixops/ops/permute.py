"""permute / unpermute: token dispatch to experts and the weighted combine back; rows_to_slots /
slots_to_rows: permute's rows in the slot layout of Mixture of Attention heads (MoA)."""

from typing import NamedTuple, Optional

import torch

# _check_float and _check_same_device: permute_rows.py and permute_chunks.py import them from here.
from .permute_checks import _check_float as _check_float
from .permute_checks import _check_same_device as _check_same_device
from .permute_checks import (
    _permute_check,
    _rows_to_slots_check,
    _slots_to_rows_check,
    _unpermute_backward_check,
    _unpermute_check,
    _unpermute_weights_backward_check,
)

__all__ = ["permute", "unpermute", "PermuteOutput", "rows_to_slots", "slots_to_rows"]


class PermuteOutput(NamedTuple):
    x_sorted: torch.Tensor  # [num_rows, hidden] rows grouped by expert
    offsets: torch.Tensor  # [num_experts] int32 cumulative row ends (what grouped_mm takes)
    row_map: torch.Tensor  # [num_tokens, topk] int32 row of each slot, -1 if none/dropped
    dropped: torch.Tensor  # [num_experts] int32 slots dropped by capacity


def permute(
    x: torch.Tensor,
    ids: torch.Tensor,
    num_experts: int,
    *,
    capacity: Optional[int] = None,
    priority: Optional[torch.Tensor] = None,
) -> PermuteOutput:
    """Group tokens by expert: one row per (token, choice) with an expert.

    ::

        x        [num_tokens, hidden]          float32, bfloat16, float16, float64
        ids      [num_tokens, topk] int32/int64 expert of each choice; -1 = no expert (no row)
        priority [num_tokens, topk] float       optional, only with capacity: slot (t, j) competes
                                                with priority[t, j] (any floating dtype, x's
                                                device; higher first, ties in token order, NaN
                                                last)
        -> PermuteOutput(x_sorted [num_rows, hidden], offsets [E] int32, row_map [T, k] int32,
                         dropped [E] int32)

    Rows of expert e are ``offsets[e-1]:offsets[e]`` of ``x_sorted``, in token order (stable);
    rows past ``offsets[-1]`` are zero. ``num_rows`` is static: ``T * k``, or with a capacity
    ``min(T * k, E * capacity)``; it never depends on the routing.

    **Row map** (reused by MoA and expert parallelism): ``row_map[t, j]`` is the row of
    ``x_sorted`` holding token t's j-th choice, or -1 when that choice has no expert or was
    dropped. ``unpermute`` takes it back.

    **Capacity**: each expert keeps at most ``capacity`` slots. Slots compete in GShard/Switch
    priority order: every token's first choice before any token's second choice, and so on;
    inside one choice rank token order, or with ``priority`` higher priority first (ties: token
    order; NaN last). Dropped slots are counted per expert in ``dropped``.

    Invalid ids (outside [-1, E)) raise on CPU; on CUDA they are treated as -1 and flagged, and
    ``MIXOPS_DEBUG=1`` raises the CPU's error.

    Autograd: the gradient of x is ``unpermute(grad_x_sorted, row_map)`` (unweighted).
    """
    return PermuteOutput(*torch.ops.mixops.permute.default(x, ids, num_experts, capacity, priority))


def unpermute(
    y_sorted: torch.Tensor, row_map: torch.Tensor, weights: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Combine each token's expert outputs: ``y[t] = sum_j weights[t, j] * y_sorted[row_map[t, j]]``.

    ::

        y_sorted [num_rows, hidden]            expert outputs in permute's row order
        row_map  [num_tokens, topk] int32       from permute (-1: the slot contributes nothing)
        weights  [num_tokens, topk] or None     float32/float64 or y_sorted's dtype; None = 1
        -> y     [num_tokens, hidden]           y_sorted's dtype

    The sum runs over j = 0..k-1 in float32 (float64 for float64), each token gathering its own
    rows: deterministic, no atomics. Autograd: gradients of y_sorted (``unpermute_backward``)
    and of weights (``unpermute_weights_backward``), each only when needed.
    """
    return torch.ops.mixops.unpermute.default(y_sorted, row_map, weights)


def rows_to_slots(rows: torch.Tensor, row_map: torch.Tensor, num_heads: int = 1) -> torch.Tensor:
    """Gather permute's rows into the MoA slot layout: ``slots[t, h, j] = rows[row_map[t, j]]``'s
    head h (columns ``h*d : (h+1)*d``), zeros where ``row_map[t, j] == -1``.

    ::

        rows     [num_rows, num_heads * d]      float32, bfloat16, float16, float64; any row
                                                stride (unit column stride, else copied)
        row_map  [num_tokens, k] int32           from permute (-1: no row)
        -> slots [num_tokens, num_heads, k, d]   contiguous, rows' dtype

    MoA: the queries of each token's k attention experts (grouped_mm on permute's rows), as
    attention wants them. With num_tokens = B * S, ``slots.view(B, S, num_heads * k, d)
    .transpose(1, 2)`` is ``scaled_dot_product_attention``'s query ``[B, Hq, S, d]`` with
    ``enable_gqa=True`` and ``num_heads`` kv heads (query head ``h * k + j`` reads kv head h), with
    no copy. The inverse is ``slots_to_rows``.

    Bad row_map values (outside [-1, num_rows), or a row twice) raise on CPU; on CUDA values out
    of range count as -1 and are flagged (``mixops.check_errors``, ``MIXOPS_DEBUG=1``); a row
    twice is not looked for there (the gather is still defined; the backward, slots_to_rows,
    flags it). Autograd: ``grad_rows = slots_to_rows(grad_slots, row_map, num_rows)``.
    """
    return torch.ops.mixops.rows_to_slots.default(rows, row_map, num_heads)


def slots_to_rows(slots: torch.Tensor, row_map: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Scatter the MoA slot layout back to permute's rows (the inverse of ``rows_to_slots``):
    ``rows[row_map[t, j], h*d : (h+1)*d] = slots[t, h, j]``; rows no slot maps to are zero.

    ::

        slots    [num_tokens, num_heads, k, d]   float32, bfloat16, float16, float64; any strides
                                                 but a unit last one (else copied), e.g. SDPA's
                                                 output [B, Hq, S, d].transpose(1, 2)
                                                 .reshape(B * S, num_heads, k, d)
        row_map  [num_tokens, k] int32            from permute (-1: the slot is not written)
        num_rows int                              rows of the result (permute's x_sorted rows)
        -> rows  [num_rows, num_heads * d]        contiguous, slots' dtype

    Each row takes its one slot: deterministic, no atomics, no host sync (the output shape
    depends on num_rows only). Two slots on one row raise on CPU; on CUDA the last slot is kept
    and the call is flagged, as are values out of range, which count as -1
    (``mixops.check_errors``, ``MIXOPS_DEBUG=1``).
    Autograd: ``grad_slots = rows_to_slots(grad_rows, row_map, num_heads)``.
    """
    return torch.ops.mixops.slots_to_rows.default(slots, row_map, num_rows)


# Validation: permute_checks.py (csrc/permute/check.cpp line by line). Each fake runs its op's
# validator, so meta and FakeTensor calls raise what the CPU and CUDA ops raise.


@torch.library.register_fake("mixops::permute")
def _permute_fake(x, ids, num_experts, capacity=None, priority=None):
    num_rows = _permute_check(x, ids, num_experts, capacity, priority)
    num_tokens, k = ids.shape
    return (
        x.new_empty(num_rows, x.shape[1]),
        x.new_empty(num_experts, dtype=torch.int32),
        x.new_empty(num_tokens, k, dtype=torch.int32),
        x.new_empty(num_experts, dtype=torch.int32),
    )


@torch.library.register_fake("mixops::unpermute")
def _unpermute_fake(y_sorted, row_map, weights=None):
    _unpermute_check(y_sorted, row_map, weights)
    return y_sorted.new_empty(row_map.shape[0], y_sorted.shape[1])


@torch.library.register_fake("mixops::unpermute_backward")
def _unpermute_backward_fake(grad_y, row_map, weights, num_rows):
    _unpermute_backward_check(grad_y, row_map, weights, num_rows)
    return grad_y.new_empty(num_rows, grad_y.shape[1])


@torch.library.register_fake("mixops::unpermute_weights_backward")
def _unpermute_weights_backward_fake(grad_y, y_sorted, row_map, weights):
    _unpermute_weights_backward_check(grad_y, y_sorted, row_map, weights)
    return weights.new_empty(row_map.shape)


@torch.library.register_fake("mixops::rows_to_slots")
def _rows_to_slots_fake(rows, row_map, num_heads=1):
    _rows_to_slots_check(rows, row_map, num_heads)
    num_tokens, k = row_map.shape
    return rows.new_empty(num_tokens, num_heads, k, rows.shape[1] // num_heads)


@torch.library.register_fake("mixops::slots_to_rows")
def _slots_to_rows_fake(slots, row_map, num_rows):
    _slots_to_rows_check(slots, row_map, num_rows)
    return slots.new_empty(num_rows, slots.shape[1] * slots.shape[3])


def _permute_setup(ctx, inputs, output):
    ctx.save_for_backward(output[2])
    ctx.set_materialize_grads(False)


def _permute_backward(ctx, grad_x_sorted, *_int_grads):
    (row_map,) = ctx.saved_tensors
    grads = [None] * len(ctx.needs_input_grad)
    if ctx.needs_input_grad[0] and grad_x_sorted is not None:
        grads[0] = unpermute(grad_x_sorted, row_map)
    return tuple(grads)


def _unpermute_setup(ctx, inputs, output):
    y_sorted, row_map = inputs[:2]
    weights = inputs[2] if len(inputs) > 2 else None
    need_w = weights is not None and ctx.needs_input_grad[2]
    ctx.save_for_backward(y_sorted if need_w else None, row_map, weights)
    ctx.num_rows = y_sorted.shape[0]


def _unpermute_backward(ctx, grad_y):
    y_sorted, row_map, weights = ctx.saved_tensors
    grads = [None] * len(ctx.needs_input_grad)
    if ctx.needs_input_grad[0]:
        grads[0] = torch.ops.mixops.unpermute_backward.default(
            grad_y, row_map, weights, ctx.num_rows
        )
    if len(grads) > 2 and ctx.needs_input_grad[2] and weights is not None:
        grads[2] = torch.ops.mixops.unpermute_weights_backward.default(
            grad_y, y_sorted, row_map, weights
        )
    return tuple(grads)


torch.library.register_autograd("mixops::permute", _permute_backward, setup_context=_permute_setup)
torch.library.register_autograd(
    "mixops::unpermute", _unpermute_backward, setup_context=_unpermute_setup
)


# rows_to_slots and slots_to_rows are each other's adjoint (row_map is one-to-one).
def _rows_to_slots_setup(ctx, inputs, output):
    rows, row_map = inputs[:2]
    ctx.save_for_backward(row_map)
    ctx.num_rows = rows.shape[0]


def _rows_to_slots_backward(ctx, grad_slots):
    (row_map,) = ctx.saved_tensors
    grads = [None] * len(ctx.needs_input_grad)
    if ctx.needs_input_grad[0]:
        grads[0] = slots_to_rows(grad_slots, row_map, ctx.num_rows)
    return tuple(grads)


def _slots_to_rows_setup(ctx, inputs, output):
    slots, row_map = inputs[:2]
    ctx.save_for_backward(row_map)
    ctx.num_heads = slots.shape[1]


def _slots_to_rows_backward(ctx, grad_rows):
    (row_map,) = ctx.saved_tensors
    grads = [None] * len(ctx.needs_input_grad)
    if ctx.needs_input_grad[0]:
        grads[0] = rows_to_slots(grad_rows, row_map, ctx.num_heads)
    return tuple(grads)


torch.library.register_autograd(
    "mixops::rows_to_slots", _rows_to_slots_backward, setup_context=_rows_to_slots_setup
)
torch.library.register_autograd(
    "mixops::slots_to_rows", _slots_to_rows_backward, setup_context=_slots_to_rows_setup
)
