"""grouped_mm_packed: a grouped matrix product whose groups differ in N or K as well (experts of
different widths, stored packed without padding). CPU: per-group BLAS; CUDA: the grouped_mm
kernels with per-group problem sizes."""

import torch

from ._check import FLOATS, check

__all__ = ["grouped_mm_packed", "MODES"]

MODES = ("mn", "mk", "km", "kn")

# The operands' shapes per mode, as the messages print them (csrc/grouped_mm/check.cpp).
_A_DOC = {"mn": "[m, k]", "mk": "[m, width]", "km": "[width, r]", "kn": "[m, r]"}
_B_DOC = {"mn": "[k, total]", "mk": "[total, n]", "km": "[r, n]", "kn": "[r, width]"}


def grouped_mm_packed(
    a: torch.Tensor,
    b: torch.Tensor,
    offsets: torch.Tensor,
    ends: torch.Tensor,
    mode: str,
    width: int,
    total: int,
) -> torch.Tensor:
    """Grouped matrix product, one group per expert, experts of different widths.

    ``offsets`` (int32 [E], cumulative) groups the *ragged* dimension as in
    :func:`~mixops.ops.grouped_mm` (rows r_g = offsets[g-1]:offsets[g]); ``ends`` (int32 [E],
    cumulative) gives group g the range P_g:P_g+w_g = ends[g-1]:ends[g] of the *packed*
    dimension of size ``total`` (so ends[-1] <= total), each w_g <= ``width``. The packed operand
    holds the experts' blocks one after another, no padding; the padded operand is ``width``
    wide and group g uses its first w_g columns/rows::

        mode  a              b               out             group g
        mn    [m, k]         [k, total]      [m, width]      out[r_g, :w_g] = a[r_g] @ b[:, P_g:+w_g]
        mk    [m, width]     [total, n]      [m, n]          out[r_g] = a[r_g, :w_g] @ b[P_g:+w_g]
        km    [width, r]     [r, n]          [total, n]      out[P_g:+w_g] = a[:w_g, r_g] @ b[r_g]
        kn    [m, r]         [r, width]      [m, total]      out[:, P_g:+w_g] = a[:, r_g] @ b[r_g, :w_g]

    Everything no group writes is zero: mn's padding columns out[r_g, w_g:], the rows past
    offsets[-1] (mn, mk), the rows of a group with w_g = 0 (mk), the block of a group with no
    rows (km, kn) and the rows/columns past ends[-1] (km, kn). E = 0 gives a zero output.

    In an MoE layer (``W1`` [2S, H] or [S, H] and ``W2`` [H, S] packed, S = sum of the widths):
    "mn" is the up projection (x @ W1.t()), "mk" the down projection (h @ W2.t()); "km" and "kn"
    are the weight gradients. The four modes are closed under autograd (each gradient is one of
    them), so double backward works too.

    dtypes: float32, bfloat16, float16 (and float64, for gradcheck), a and b alike; accumulation
    in float32 (float64 for float64). Invalid offsets/ends *values* raise on CPU; on CUDA the
    kernels clamp them and set a device-side error flag (``MIXOPS_DEBUG=1`` raises, as for
    grouped_mm).

    Autograd: the gradient of the packed weight is written in its storage layout when it is a
    transposed view (``W.t()`` of a row-major [total, k] or [n, total] parameter), as grouped_mm
    does for HF's layout.
    """
    return torch.ops.mixops.grouped_mm_packed.default(a, b, offsets, ends, mode, width, total)


def _grouped_mm_packed_check(a, b, offsets, ends, mode, width, total):
    """csrc/grouped_mm/check.cpp (grouped_mm_packed_check) line by line, with its messages (see
    _check.py); returns the output shape."""
    op = "grouped_mm_packed"
    check(mode in MODES, op, ": mode must be one of 'mn', 'mk', 'km', 'kn', got '", mode, "'")
    a_doc, b_doc = _A_DOC[mode], _B_DOC[mode]
    check(
        a.dim() == 2,
        op,
        ": a must be 2-D ",
        a_doc,
        " in mode '",
        mode,
        "', got a ",
        a.dim(),
        "-D tensor of shape ",
        a.shape,
    )
    check(
        b.dim() == 2,
        op,
        ": b must be 2-D ",
        b_doc,
        " in mode '",
        mode,
        "', got a ",
        b.dim(),
        "-D tensor of shape ",
        b.shape,
    )
    check(
        a.dtype == b.dtype,
        op,
        ": a and b must have the same dtype, got a ",
        a.dtype,
        " and b ",
        b.dtype,
    )
    check(
        a.dtype in FLOATS,
        op,
        ": a must be float32, bfloat16, float16 or float64, got ",
        a.dtype,
    )
    check(
        a.device == b.device,
        op,
        ": a and b must be on the same device, got a on ",
        a.device,
        " and b on ",
        b.device,
    )
    for t, name in ((offsets, "offsets"), (ends, "ends")):
        check(t.dtype == torch.int32, op, ": ", name, " must be int32, got ", t.dtype)
        check(t.dim() == 1, op, ": ", name, " must be 1-D [num_experts], got shape ", t.shape)
        check(
            t.device == a.device,
            op,
            ": ",
            name,
            " must be on the same device as a (",
            a.device,
            "), got ",
            t.device,
        )
    check(
        ends.shape[0] == offsets.shape[0],
        op,
        ": ends must have the length of offsets (num_experts = ",
        offsets.shape[0],
        "), got ",
        ends.shape[0],
    )
    check(width >= 0, op, ": width must be >= 0, got ", width)
    check(total >= 0, op, ": total must be >= 0, got ", total)

    def equal(x, x_name, y, y_name):
        check(
            x == y,
            op,
            ": mode '",
            mode,
            "': ",
            x_name,
            " must equal ",
            y_name,
            " = ",
            y,
            ", got ",
            x,
            " (a is ",
            a_doc,
            " = ",
            a.shape,
            ", b is ",
            b_doc,
            " = ",
            b.shape,
            ")",
        )

    (a0, a1), (b0, b1) = a.shape, b.shape
    if mode == "mn":
        equal(b0, "b.size(0)", a1, "a.size(1)")
        equal(b1, "b.size(1)", total, "total")
        return (a0, width)
    if mode == "mk":
        equal(a1, "a.size(1)", width, "width")
        equal(b0, "b.size(0)", total, "total")
        return (a0, b1)
    if mode == "km":
        equal(a0, "a.size(0)", width, "width")
        equal(b0, "b.size(0)", a1, "a.size(1)")
        return (total, b1)
    equal(b0, "b.size(0)", a1, "a.size(1)")
    equal(b1, "b.size(1)", width, "width")
    return (a0, total)


@torch.library.register_fake("mixops::grouped_mm_packed")
def _grouped_mm_packed_fake(a, b, offsets, ends, mode, width, total):
    return a.new_empty(_grouped_mm_packed_check(a, b, offsets, ends, mode, width, total))


def _is_transposed_view(t):
    """A 2-D view whose storage is its transpose's row-major layout (W.t() of a parameter)."""
    return t.stride(0) == 1 and t.stride(1) != 1


def _setup_context(ctx, inputs, output):
    a, b, offsets, ends, mode, width, total = inputs
    ctx.save_for_backward(
        a if ctx.needs_input_grad[1] else None,
        b if ctx.needs_input_grad[0] else None,
        offsets,
        ends,
    )
    ctx.mode, ctx.width, ctx.total = mode, width, total
    ctx.b_transposed = _is_transposed_view(b)


def _backward(ctx, grad):
    a, b, offsets, ends = ctx.saved_tensors
    mode = ctx.mode

    def gmp(x, y, m):
        return grouped_mm_packed(x, y, offsets, ends, m, ctx.width, ctx.total)

    grad_a = grad_b = None
    if ctx.needs_input_grad[0]:
        if mode == "mn":  # d a[r_g] = g[r_g, :w_g] @ b[:, P_g:+w_g]^T
            grad_a = gmp(grad, b.t(), "mk")
        elif mode == "mk":  # d a[r_g, :w_g] = g[r_g] @ b[P_g:+w_g]^T, zero padding
            grad_a = gmp(grad, b.t(), "mn")
        elif mode == "km":  # d a[:w_g, r_g]^T = b[r_g] @ g[P_g:+w_g]^T
            grad_a = gmp(b, grad.t(), "mn").t()
        else:  # kn: d a[:, r_g]^T = b[r_g, :w_g] @ g[:, P_g:+w_g]^T
            grad_a = gmp(b, grad.t(), "mk").t()
    if ctx.needs_input_grad[1]:
        if mode == "mn":  # d b[:, P_g:+w_g] = a[r_g]^T @ g[r_g, :w_g]
            if ctx.b_transposed:  # d(b^T)[P_g:+w_g] = g[r_g, :w_g]^T @ a[r_g], in b's storage
                grad_b = gmp(grad.t(), a, "km").t()
            else:
                grad_b = gmp(a.t(), grad, "kn")
        elif mode == "mk":  # d b[P_g:+w_g] = a[r_g, :w_g]^T @ g[r_g]
            if ctx.b_transposed:  # d(b^T)[:, P_g:+w_g] = g[r_g]^T @ a[r_g, :w_g]
                grad_b = gmp(grad.t(), a, "kn").t()
            else:
                grad_b = gmp(a.t(), grad, "km")
        elif mode == "km":  # d b[r_g] = a[:w_g, r_g]^T @ g[P_g:+w_g]
            grad_b = gmp(a.t(), grad, "mk")
        else:  # kn: d b[r_g, :w_g] = a[:, r_g]^T @ g[:, P_g:+w_g]
            grad_b = gmp(a.t(), grad, "mn")
    return grad_a, grad_b, None, None, None, None, None


torch.library.register_autograd(
    "mixops::grouped_mm_packed", _backward, setup_context=_setup_context
)
