"""reorder_chunks: the permute family's chunk regrouping for expert parallelism (the rows a rank
receives from the all-to-all, grouped by source rank, regrouped by local expert, and back).
Validation mirrors csrc/permute/check.cpp (reorder_chunks_check)."""

import torch

from ._check import INT32_MAX, check
from .permute import _check_float, _check_same_device

__all__ = ["reorder_chunks"]


def reorder_chunks(x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The chunks of ``x`` in ``(a, b)`` order regrouped in ``(b, a)`` order, as a fresh tensor.

    ::

        x       [num_rows, hidden]  float32, bfloat16, float16, float64; any row stride (unit
                                    column stride, else copied)
        counts  [A, B] int32        rows of chunk (a, b); A, B >= 1; on x's device, any strides
        -> y    [num_rows, hidden]  contiguous, x's dtype

    ``x`` holds ``A * B`` chunks back to back in row-major ``(a, b)`` order, chunk ``(a, b)``
    being ``counts[a, b]`` consecutive rows; ``y`` holds the same chunks in ``(b, a)`` order (the
    chunk order of ``counts.t()``): ``y = cat([chunk(a, b) for b in range(B) for a in
    range(A)])``. Rows of x past ``S = counts.sum()`` are not read; rows of y past S are zero. The
    shape is static (``num_rows`` rows): no host sync on CUDA, the counts stay on the device.

    Expert parallelism: after the dispatch all-to-all a rank holds the rows of each source rank
    a, grouped by local expert b (``counts[a, b]`` rows); ``reorder_chunks(x, counts)`` groups
    them by expert (grouped_mm's layout, ``offsets = counts.sum(0).cumsum(0)``), and
    ``reorder_chunks(h, counts.t())`` puts the expert outputs back in source-rank order for the
    return all-to-all.

    A pure copy (the bits of every dtype, NaN payloads included), written once in y's row order:
    deterministic, no atomics. CPU: the counts' prefix sums on the host, then one memcpy per piece
    of chunk, the output from mixops' block cache. CUDA: one block takes the prefix sums in both
    orders (block scans over tiles of 1024 chunks, one after another: meant for expert
    parallelism's A * B, ranks x local experts, not for millions of chunks), then one warp per
    row of y finds its chunk by binary search and copies its row of x.

    Bad counts: a negative entry or a sum past ``num_rows`` raises on CPU, naming it. On CUDA a
    negative count is taken as 0 and the chunks are cut at row ``num_rows`` of x (a chunk past it
    is empty, the one across it truncated: y holds the rows of x below num_rows that the clamped
    counts name), and the call is flagged (``mixops.check_errors``, ``MIXOPS_DEBUG=1``). Limits:
    ``A * B < 2^31`` chunks and ``num_rows < 2^31`` (int32 row offsets).

    Autograd: ``grad_x = reorder_chunks(grad_y, counts.t())``, the inverse reorder (rows of x past
    S get zeros); counts gets none. Double backward by the same rule.
    """
    return torch.ops.mixops.reorder_chunks.default(x, counts)


def _reorder_chunks_check(x, counts):
    op = "reorder_chunks"
    check(x.dim() == 2, op, ": x must be 2-D [num_rows, hidden], got shape ", x.shape)
    _check_float(x, op, "x")
    check(counts.dtype == torch.int32, op, ": counts must be int32, got ", counts.dtype)
    check(
        counts.dim() == 2,
        op,
        ": counts must be 2-D [A, B] (chunk (a, b) has counts[a, b] rows), got shape ",
        counts.shape,
    )
    check(
        counts.shape[0] >= 1 and counts.shape[1] >= 1,
        op,
        ": counts must have A >= 1 and B >= 1, got shape ",
        counts.shape,
    )
    check(
        counts.numel() <= INT32_MAX,
        op,
        ": counts must have A * B < 2^31 chunks, got shape ",
        counts.shape,
    )
    _check_same_device(counts, x, op, "counts", "x")
    check(
        x.shape[0] <= INT32_MAX,
        op,
        ": x must have fewer than 2^31 rows (row offsets are int32), got ",
        x.shape[0],
    )


@torch.library.register_fake("mixops::reorder_chunks")
def _reorder_chunks_fake(x, counts):
    _reorder_chunks_check(x, counts)
    return x.new_empty(x.shape)


def _reorder_chunks_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


# The inverse reorder; it is the op itself (counts transposed), so its own backward, with this
# rule again, gives the double backward.
def _reorder_chunks_backward(ctx, grad):
    (counts,) = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None
    return reorder_chunks(grad, counts.t()), None


torch.library.register_autograd(
    "mixops::reorder_chunks", _reorder_chunks_backward, setup_context=_reorder_chunks_setup
)
