"""scatter_rows: the permute family's row write-back (MoD writes its chosen tokens' outputs over
the skipped ones), with its backward op ``scatter_rows_backward``. Validation mirrors
csrc/permute/check.cpp (scatter_rows_check)."""

import torch

from ._check import INT32_MAX, check
from .permute import _check_float, _check_same_device

__all__ = ["scatter_rows"]


def scatter_rows(base: torch.Tensor, rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``base`` with row ``index[i]`` replaced by ``rows[i]``, as a fresh tensor.

    ::

        base   [num_rows, hidden]  float32, bfloat16, float16, float64; any row stride (unit
                                   column stride, else copied)
        rows   [n, hidden]         base's dtype and device
        index  [n] int32           rows of base, distinct, or -1 (rows[i] is not written)
        -> out [num_rows, hidden]  contiguous, base's dtype

    Both backends write the output once in row order through the inverse map (each row a copy
    of its rows[i] or of base): deterministic, no atomics, no host sync. CPU outputs come from
    mixops' block cache (no page faults for a repeated shape). A value outside [-1, num_rows) or
    a row twice raises on CPU; on CUDA values out of range count as -1, and for a repeated row one
    of its entries is written (its backward then matches no single one of them); either way the
    call is flagged (``mixops.check_errors``, ``MIXOPS_DEBUG=1``).

    Autograd: ``(grad_base, grad_rows) = scatter_rows_backward(grad, index)``: grad with the
    written rows zeroed, and ``grad[index]`` (zeros for -1).
    """
    return torch.ops.mixops.scatter_rows.default(base, rows, index)


def _check_index(index, n, data, op):
    check(index.dtype == torch.int32, op, ": index must be int32, got ", index.dtype)
    if n >= 0:
        check(
            index.dim() == 1 and index.shape[0] == n,
            op,
            ": index must be 1-D [n] with n = rows.size(0) = ",
            n,
            ", got shape ",
            index.shape,
        )
    else:
        check(index.dim() == 1, op, ": index must be 1-D [n], got shape ", index.shape)
    check(
        index.shape[0] < INT32_MAX,
        op,
        ": index must have < 2^31 - 1 entries, got ",
        index.shape[0],
    )
    _check_same_device(index, data, op, "index", "the data")
    check(
        data.shape[0] < INT32_MAX,
        op,
        ": the number of rows (",
        data.shape[0],
        ") must be < 2^31 - 1 (index is int32)",
    )


def _scatter_rows_check(base, rows, index):
    op = "scatter_rows"
    check(base.dim() == 2, op, ": base must be 2-D [num_rows, hidden], got shape ", base.shape)
    _check_float(base, op, "base")
    check(
        rows.dim() == 2 and rows.shape[1] == base.shape[1],
        op,
        ": rows must be 2-D [n, hidden = base.size(1) = ",
        base.shape[1],
        "], got shape ",
        rows.shape,
    )
    check(
        rows.dtype == base.dtype,
        op,
        ": rows must have base's dtype ",
        base.dtype,
        ", got ",
        rows.dtype,
    )
    _check_same_device(rows, base, op, "rows", "base")
    _check_index(index, rows.shape[0], base, op)


def _scatter_rows_backward_check(grad, index):
    op = "scatter_rows_backward"
    check(grad.dim() == 2, op, ": grad must be 2-D [num_rows, hidden], got shape ", grad.shape)
    _check_float(grad, op, "grad")
    _check_index(index, index.shape[0] if index.dim() == 1 else -1, grad, op)


@torch.library.register_fake("mixops::scatter_rows")
def _scatter_rows_fake(base, rows, index):
    _scatter_rows_check(base, rows, index)
    return base.new_empty(base.shape)


@torch.library.register_fake("mixops::scatter_rows_backward")
def _scatter_rows_backward_fake(grad, index):
    _scatter_rows_backward_check(grad, index)
    return grad.new_empty(grad.shape), grad.new_empty(index.shape[0], grad.shape[1])


def _scatter_rows_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[2])


def _scatter_rows_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    grad_base, grad_rows = torch.ops.mixops.scatter_rows_backward.default(grad, index)
    return (
        grad_base if ctx.needs_input_grad[0] else None,
        grad_rows if ctx.needs_input_grad[1] else None,
        None,
    )


torch.library.register_autograd(
    "mixops::scatter_rows", _scatter_rows_backward, setup_context=_scatter_rows_setup
)


# The backward is linear in grad: its own backward writes gg_rows over gg_base (double backward).
def _scatter_rows_backward_backward(ctx, gg_base, gg_rows):
    (index,) = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None
    shape, opts = ctx.grad_shape, ctx.grad_options
    gg_base = torch.zeros(shape, **opts) if gg_base is None else gg_base
    if gg_rows is None:
        gg_rows = torch.zeros(index.shape[0], shape[1], **opts)
    return scatter_rows(gg_base, gg_rows, index), None


def _scatter_rows_backward_setup(ctx, inputs, output):
    grad, index = inputs
    ctx.save_for_backward(index)
    ctx.grad_shape, ctx.grad_options = grad.shape, dict(dtype=grad.dtype, device=grad.device)
    ctx.set_materialize_grads(False)


torch.library.register_autograd(
    "mixops::scatter_rows_backward",
    _scatter_rows_backward_backward,
    setup_context=_scatter_rows_backward_setup,
)
