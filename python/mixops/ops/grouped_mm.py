"""grouped_mm: all experts' matrix products in one op (CUTLASS on CUDA, per-group BLAS on CPU)."""

import torch

from ._check import FLOATS, check

__all__ = ["grouped_mm"]


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Grouped matrix product, one group per expert. The mode follows the operands' ranks.

    **2-D x 3-D** (forward pass, input gradient)::

        a       [m, k]            rows grouped by expert (group g is rows offsets[g-1]:offsets[g])
        b       [E, k, n]         b[g] is expert g's weight; a transposed view of a contiguous
                                  [E, n, k] tensor (HF transformers' layout) is used in place
        offsets [E] int32         cumulative group ends, offsets[-1] <= m
        ->      [m, n]            out[rows of g] = a[rows of g] @ b[g]; rows >= offsets[-1] are 0

    **2-D x 2-D** (weight gradient)::

        a       [m, r]            the shared dimension r is grouped
        b       [r, n]
        offsets [E] int32         cumulative group ends over r, offsets[-1] <= r
        ->      [E, m, n]         out[g] = a[:, r of g] @ b[r of g, :]; an empty group gives zeros

    dtypes: float32, bfloat16, float16 (and float64, for gradcheck), a and b alike; accumulation
    in float32 (float64 for float64).
    float32 on CUDA is exact (SIMT) unless ``torch.backends.cuda.matmul.allow_tf32`` is set.
    Any k and n work; on CUDA, leading dimensions that are multiples of 8 (16 bytes) take the
    tensor-core kernels, others a slower exact fallback.

    Invalid offset *values* (negative, decreasing, past the end) raise on CPU. On CUDA, checking
    them would need a host synchronisation, so kernels clamp them to the valid range and set a
    device-side error flag; with the environment variable ``MIXOPS_DEBUG=1`` the op synchronises
    and raises the same error as on CPU (except while captured into a CUDA graph: then the flag
    waits for ``mixops.check_errors()`` after replay).

    Autograd: the input gradient is the 2-D x 3-D mode with b transposed, the weight gradient the
    2-D x 2-D mode (written directly in b's storage layout); each only when it is needed.
    """
    return torch.ops.mixops.grouped_mm.default(a, b, offsets)


def _grouped_mm_check(a, b, offsets):
    """csrc/grouped_mm/check.cpp line by line, with its messages (see _check.py); returns the
    output shape."""
    check(
        a.dim() == 2,
        "grouped_mm: a must be 2-D [m, k], got a ",
        a.dim(),
        "-D tensor of shape ",
        a.shape,
    )
    check(
        b.dim() == 2 or b.dim() == 3,
        "grouped_mm: b must be 3-D [num_experts, k, n] (2-D x 3-D "
        "mode) or 2-D [k, n] (2-D x 2-D mode), got a ",
        b.dim(),
        "-D tensor of shape ",
        b.shape,
    )
    check(
        a.dtype == b.dtype,
        "grouped_mm: a and b must have the same dtype, got a ",
        a.dtype,
        " and b ",
        b.dtype,
    )
    check(
        a.dtype in FLOATS,
        "grouped_mm: a must be float32, bfloat16 or float16 (or float64, for gradcheck), got ",
        a.dtype,
    )
    check(
        a.device == b.device,
        "grouped_mm: a and b must be on the same device, got a on ",
        a.device,
        " and b on ",
        b.device,
    )
    check(offsets.dtype == torch.int32, "grouped_mm: offsets must be int32, got ", offsets.dtype)
    check(
        offsets.dim() == 1,
        "grouped_mm: offsets must be 1-D [num_experts], got shape ",
        offsets.shape,
    )
    check(
        offsets.device == a.device,
        "grouped_mm: offsets must be on the same device as a (",
        a.device,
        "), got ",
        offsets.device,
    )
    m, k = a.shape
    if b.dim() == 3:
        check(
            b.shape[1] == k,
            "grouped_mm: K mismatch: a is [m, k] = ",
            a.shape,
            " but b is [num_experts, k, n] = ",
            b.shape,
        )
        check(
            offsets.shape[0] == b.shape[0],
            "grouped_mm: offsets must have length num_experts = b.size(0) = ",
            b.shape[0],
            ", got ",
            offsets.shape[0],
        )
        return (m, b.shape[2])
    check(
        b.shape[0] == k,
        "grouped_mm: K mismatch: a is [m, r] = ",
        a.shape,
        " but b is [r, n] = ",
        b.shape,
    )
    check(
        offsets.shape[0] >= 1,
        "grouped_mm: offsets must have length num_experts >= 1 in the 2-D x 2-D mode, got 0",
    )
    return (offsets.shape[0], m, b.shape[1])


@torch.library.register_fake("mixops::grouped_mm")
def _grouped_mm_fake(a, b, offsets):
    return a.new_empty(_grouped_mm_check(a, b, offsets))


def _is_transposed_view(b):
    """b [E, k, n] stored as a contiguous [E, n, k] (HF transformers v5 expert weights)."""
    return b.stride(-2) == 1 and b.stride(-1) != 1


def _setup_context(ctx, inputs, output):
    a, b, offsets = inputs
    ctx.save_for_backward(
        a if ctx.needs_input_grad[1] else None, b if ctx.needs_input_grad[0] else None, offsets
    )
    ctx.b_is_3d = b.dim() == 3
    ctx.b_transposed = b.dim() == 3 and _is_transposed_view(b)


def _backward(ctx, grad):
    a, b, offsets = ctx.saved_tensors
    grad_a = grad_b = None
    if ctx.b_is_3d:
        # out = a[rows g] @ b[g]
        if ctx.needs_input_grad[0]:
            grad_a = grouped_mm(grad, b.transpose(-1, -2), offsets)
        if ctx.needs_input_grad[1]:
            if ctx.b_transposed:  # write d(b^T) = grad^T a directly as [E, n, k]
                grad_b = grouped_mm(grad.t(), a, offsets).transpose(-1, -2)
            else:
                grad_b = grouped_mm(a.t(), grad, offsets)
    else:
        # out[g] = a[:, r of g] @ b[r of g]; grad: [E, m, n]
        if ctx.needs_input_grad[0]:  # grad_a[:, r of g] = grad[g] @ b[r of g]^T, built as its T
            grad_a = grouped_mm(b, grad.transpose(-1, -2), offsets).t()
        if ctx.needs_input_grad[1]:  # grad_b[r of g] = a[:, r of g]^T @ grad[g]
            grad_b = grouped_mm(a.t(), grad, offsets)
    return grad_a, grad_b, None


torch.library.register_autograd("mixops::grouped_mm", _backward, setup_context=_setup_context)
