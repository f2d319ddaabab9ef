"""Input builders for the grouped_mm tests: group sizes, operand layouts, both modes."""

import itertools

import torch

# name -> (group sizes, extra rows past offsets[-1])
SIZES = {
    "balanced": ([5, 5, 5, 5], 0),
    "empty_groups": ([0, 7, 0, 3, 0], 0),
    "all_in_one": ([0, 0, 12, 0], 0),
    "one_expert": ([9], 0),
    "no_rows": ([0, 0, 0], 0),
    "tail_rows": ([3, 4], 5),
    "aligned_groups": ([8, 16, 8, 8], 0),  # 16-byte aligned strides for torch._grouped_mm
}
KN = {"aligned": (16, 24), "odd": (13, 7)}


def offsets_of(sizes, device):
    return torch.tensor(list(itertools.accumulate(sizes)), dtype=torch.int32, device=device)


def make_a(rows, cols, dtype, device, layout):
    """[rows, cols] in the given layout: contiguous, strided (a column slice), or transposed."""
    if layout == "contiguous":
        return torch.randn(rows, cols, dtype=dtype, device=device)
    if layout == "strided":
        return torch.randn(rows, cols + 5, dtype=dtype, device=device)[:, 2 : cols + 2]
    if layout == "transposed":
        return torch.randn(cols, rows, dtype=dtype, device=device).t()
    raise ValueError(layout)


def make_b3(e, k, n, dtype, device, layout):
    """[E, k, n]: contiguous ("kn") or the transposed view of a contiguous [E, n, k] ("nk")."""
    if layout == "kn":
        return torch.randn(e, k, n, dtype=dtype, device=device)
    return torch.randn(e, n, k, dtype=dtype, device=device).transpose(1, 2)


def make_case(mode, sizes_name, kn_name, dtype, device, a_layout="contiguous", b_layout="kn"):
    """Returns (a, b, offsets) for mode "3d" (2-D x 3-D) or "2d" (2-D x 2-D)."""
    sizes, tail = SIZES[sizes_name]
    k, n = KN[kn_name]
    off = offsets_of(sizes, device)
    total = sum(sizes) + tail
    if mode == "3d":
        a = make_a(total, k, dtype, device, a_layout)
        b = make_b3(len(sizes), k, n, dtype, device, b_layout)
    else:  # a [m, r] with r grouped; weight-gradient style a is a transposed activation
        a = make_a(k, total, dtype, device, a_layout)
        b = make_a(total, n, dtype, device, "contiguous" if b_layout == "kn" else "transposed")
    return a, b, off
