"""grouped_mm_packed (experts of different widths): values against a per-group loop written from
the op's definition, explicit zeros, layouts, gradients (gradcheck, both operands, the weight's
storage layout), opcheck, compile, and extremes. Bad input: tests/test_grouped_mm_packed_errors.py.

Low-precision results follow the shared rule in helpers.assert_close_to_ref.
"""

import itertools

import pytest
import torch

import mixops  # noqa: F401
from helpers import assert_close_to_ref, opcheck, run_script_ok
from mixops.ops import grouped_mm_packed
from packed_reference import packed_shapes

MODES = ["mn", "mk", "km", "kn"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
FIXED = 6  # the dimension no group changes: k (mn), n (mk, km), m (kn)

# name -> (widths w_g, rows r_g, rows past offsets[-1], packed past ends[-1], width - max w_g)
CASES = {
    "mixed": ([3, 0, 1, 5, 2], [4, 3, 0, 2, 5], 2, 1, 1),  # width 0 with rows, width 1 no rows
    "equal": ([4, 4, 4], [3, 3, 3], 0, 0, 0),
    "one_expert": ([7], [5], 0, 0, 0),
    "zero_width": ([0, 0], [2, 3], 1, 0, 0),  # width = 0
    "no_rows": ([2, 3, 1], [0, 0, 0], 0, 2, 0),
    "no_experts": ([], [], 3, 2, 2),  # E = 0: all zeros
}


def cumsum32(xs):
    return torch.tensor(list(itertools.accumulate(xs)), dtype=torch.int32)


def ref_gmp(a, b, offsets, ends, mode, width, total):
    """The op from its definition (the docstring's table), a plain loop in a's dtype."""
    r_end, p_end = offsets.tolist(), ends.tolist()
    shape = {
        "mn": (a.shape[0], width),
        "mk": (a.shape[0], b.shape[1]),
        "km": (total, b.shape[1]),
        "kn": (a.shape[0], total),
    }[mode]
    out = a.new_zeros(shape)
    for r0, r1, p0, p1 in zip([0] + r_end[:-1], r_end, [0] + p_end[:-1], p_end):
        w = p1 - p0
        if mode == "mn":
            out[r0:r1, :w] = a[r0:r1] @ b[:, p0:p1]
        elif mode == "mk":
            out[r0:r1] = a[r0:r1, :w] @ b[p0:p1]
        elif mode == "km":
            out[p0:p1] = a[:w, r0:r1] @ b[r0:r1]
        else:
            out[:, p0:p1] = a[:, r0:r1] @ b[r0:r1, :w]
    return out


def make(rows, cols, dtype, layout="contiguous"):
    if layout == "contiguous":
        return torch.randn(rows, cols, dtype=dtype)
    if layout == "strided":  # a column slice of a wider tensor
        return torch.randn(rows, cols + 5, dtype=dtype)[:, 2 : cols + 2]
    if layout == "transposed":
        return torch.randn(cols, rows, dtype=dtype).t()
    raise ValueError(layout)


def spec(widths, rows, tail_rows, tail_packed, pad):
    """(offsets, ends, ragged size, width, total)."""
    width = max(widths, default=0) + pad
    return (
        cumsum32(rows),
        cumsum32(widths),
        sum(rows) + tail_rows,
        width,
        sum(widths) + tail_packed,
    )


def operands(mode, ragged, width, total, dtype, a_layout="contiguous", b_layout="contiguous"):
    shapes = packed_shapes(mode, FIXED, width, total, ragged)
    return make(*shapes[0], dtype, a_layout), make(*shapes[1], dtype, b_layout)


def make_case(mode, case, dtype, a_layout="contiguous", b_layout="contiguous"):
    off, ends, ragged, width, total = spec(*CASES[case])
    a, b = operands(mode, ragged, width, total, dtype, a_layout, b_layout)
    return a, b, off, ends, width, total


def check_values(a, b, off, ends, mode, width, total, what):
    out = grouped_mm_packed(a, b, off, ends, mode, width, total)
    hi = ref_gmp(a.double(), b.double(), off, ends, mode, width, total)
    lowp = ref_gmp(a, b, off, ends, mode, width, total)
    assert_close_to_ref(out, hi, lowp, what)
    # What no group writes (padding, empty sums, tails) is exactly zero, never garbage.
    assert torch.all(out[hi == 0] == 0), f"{what}: non-zero where no group writes"
    return out


def poison(shape, dtype):
    """Leave NaN in freed memory of this size, which the next allocation may reuse."""
    t = torch.full(shape, float("nan"), dtype=dtype)
    del t


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_values(mode, dtype, case):
    a, b, off, ends, width, total = make_case(mode, case, dtype)
    poison(ref_gmp(a, b, off, ends, mode, width, total).shape, dtype)
    check_values(a, b, off, ends, mode, width, total, f"{mode}/{case}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("a_layout", ["contiguous", "strided", "transposed"])
@pytest.mark.parametrize("b_layout", ["contiguous", "strided", "transposed"])
def test_layouts(mode, dtype, a_layout, b_layout):
    a, b, off, ends, width, total = make_case(mode, "mixed", dtype, a_layout, b_layout)
    check_values(a, b, off, ends, mode, width, total, f"{mode}/{a_layout}/{b_layout}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", range(4))
def test_random_widths(mode, seed):
    """Random E, widths (0 and 1 always among them), rows (some groups empty), tails."""
    gen = torch.Generator().manual_seed(seed)

    def ints(n, hi):
        return torch.randint(0, hi, (n,), generator=gen).tolist()

    e = 2 + ints(1, 30)[0]
    widths = [0, 1] + ints(e - 2, 40)
    rows = [r * (r % 3 != 0) for r in ints(e, 20)]
    tails = ints(3, 4)
    off, ends, ragged, width, total = spec(widths, rows, *tails)
    for dtype in (torch.float64, torch.float32):
        a, b = operands(mode, ragged, width, total, dtype, "contiguous", "transposed")
        check_values(a, b, off, ends, mode, width, total, f"{mode} seed={seed} {dtype}")


@pytest.mark.parametrize("mode", MODES)
def test_zero_fill_over_reused_memory(mode):
    """Outputs of >= 4 MiB come from csrc/core/cpu_alloc.h's cache: a first call leaves NaN in
    the block (every width the maximum, a full of NaN), the second (narrow widths) reuses it, so
    every zero it owes must be written."""
    e, fixed, rows, width = 8, 16, 256, 512
    off = cumsum32([rows] * e)
    full, narrow = [width] * e, [width // 2 - 3 * g for g in range(e)]
    shapes = {"mn": (e * rows, width), "mk": (e * rows, width), "km": (width, e * rows)}
    for widths in (full, narrow):
        ends, total = cumsum32(widths), e * width
        if mode == "mn":
            a, b = torch.randn(e * rows, fixed), torch.randn(fixed, total)
        elif mode == "mk":
            a, b = torch.randn(*shapes["mk"]), torch.randn(total, 2048)
        elif mode == "km":
            a, b = torch.randn(*shapes["km"]), torch.randn(e * rows, 256)
        else:
            a, b = torch.randn(256, e * rows), torch.randn(e * rows, width)
        if widths is full:
            a = torch.full_like(a, float("nan"))
            out = grouped_mm_packed(a, b, off, ends, mode, width, total)
            assert out.numel() * 4 >= 4 << 20 and out.isnan().any()
            del out
        else:
            check_values(a, b, off, ends, mode, width, total, f"{mode} reused")


def _grads(fn, a, b, off, ends, mode, width, total, g):
    a = a.detach().requires_grad_(True)
    b = b.detach().requires_grad_(True)
    fn(a, b, off, ends, mode, width, total).backward(g)
    return a.grad, b.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("b_layout", ["contiguous", "transposed"])
def test_gradients(mode, dtype, b_layout):
    a, b, off, ends, width, total = make_case(mode, "mixed", dtype, "contiguous", b_layout)
    args = (off, ends, mode, width, total)
    g = torch.randn(ref_gmp(a, b, *args).shape, dtype=dtype)
    ga, gb = _grads(grouped_mm_packed, a, b, *args, g)
    ha, hb = _grads(ref_gmp, a.double(), b.double(), *args, g.double())
    la, lb = _grads(ref_gmp, a, b, *args, g)
    assert_close_to_ref(ga, ha, la, f"{mode} grad a")
    assert_close_to_ref(gb, hb, lb, f"{mode} grad b")
    # The gradient of a transposed weight view is written in the weight's storage layout
    # (autograd.grad, so AccumulateGrad's restriding cannot hide a transpose copy).
    a_, b_ = a.detach(), b.detach().requires_grad_()
    (gb_raw,) = torch.autograd.grad(grouped_mm_packed(a_, b_, *args), (b_,), g)
    if mode in ("mn", "mk"):
        assert gb_raw.stride() == b.stride() or b.shape[0] * b.shape[1] <= 1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("b_layout", ["contiguous", "transposed"])
def test_gradcheck_fp64(mode, b_layout):
    off, ends, ragged, width, total = spec([2, 0, 1, 3], [2, 1, 0, 2], 1, 1, 1)
    a, b = operands(mode, ragged, width, total, torch.float64, "contiguous", b_layout)
    a.requires_grad_(True)
    b.requires_grad_(True)

    def f(x, y):
        return grouped_mm_packed(x, y, off, ends, mode, width, total)

    assert torch.autograd.gradcheck(f, (a, b))
    assert torch.autograd.gradgradcheck(f, (a, b))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("case", ["mixed", "no_experts"])
def test_opcheck(mode, requires_grad, case):
    a, b, off, ends, width, total = make_case(mode, case, torch.float32, "contiguous", "transposed")
    a.requires_grad_(requires_grad)
    b.requires_grad_(requires_grad)
    opcheck(torch.ops.mixops.grouped_mm_packed.default, (a, b, off, ends, mode, width, total))


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph(dynamic):
    """An MoE-style pair (up projection "mn", down projection "mk") on packed weights."""
    widths, rows = [3, 0, 5, 2], [4, 3, 0, 5]
    off, ends, n_rows, fm, s = spec(widths, rows, 2, 0, 0)
    hidden = 6
    x = torch.randn(n_rows, hidden, requires_grad=True)
    w1 = torch.randn(s, hidden, requires_grad=True)  # [S, H], HF-style rows per expert
    w2 = torch.randn(hidden, s, requires_grad=True)  # [H, S]

    def f(x, w1, w2, op):
        h = op(x, w1.t(), off, ends, "mn", fm, s).relu()
        return op(h, w2.t(), off, ends, "mk", fm, s).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    loss = compiled(x, w1, w2, grouped_mm_packed)
    grads = torch.autograd.grad(loss, (x, w1, w2))
    leaves = [t.detach().double().requires_grad_() for t in (x, w1, w2)]
    ref_loss = f(*leaves, ref_gmp)
    ref_grads = torch.autograd.grad(ref_loss, leaves)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(grads, ref_grads):
        torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_empty_sizes(mode):
    """m = 0, r = 0, k/n = 0, width = 0, total = 0 and E = 0 give the right shape, all zeros."""
    for widths, rows, tails in [
        ([0, 0], [0, 0], (0, 0, 0)),  # everything 0
        ([], [], (4, 3, 2)),  # E = 0
        ([2, 1], [0, 0], (0, 0, 0)),  # no rows at all
    ]:
        off, ends, ragged, width, total = spec(widths, rows, *tails)
        a, b = operands(mode, ragged, width, total, torch.float32)
        out = grouped_mm_packed(a, b, off, ends, mode, width, total)
        assert out.shape == ref_gmp(a, b, off, ends, mode, width, total).shape
        assert torch.all(out == 0)
    # the fixed dimension 0 (k = 0 in mn: empty sums; n = 0 or m = 0 elsewhere)
    off, ends, ragged, width, total = spec([2, 1], [1, 2], 1, 1, 0)
    a, b = operands(mode, ragged, width, total, torch.float32)
    a, b = (a[:, :0], b[:0]) if mode == "mn" else (a, b[:, :0]) if mode != "kn" else (a[:0], b)
    out = grouped_mm_packed(a, b, off, ends, mode, width, total)
    assert out.shape == ref_gmp(a, b, off, ends, mode, width, total).shape
    assert torch.all(out == 0)


EXTREMES = r"""
import torch, mixops
from mixops.ops import grouped_mm_packed as gmp
big = 2**31 - 1
# mk: a [m, width] with width = 2^31 - 1 and b [total, n] with total > 2^31 (stride-0 views):
# group 0 has no rows and the largest width, group 1 starts at 2^31 - 10 (64-bit offsets).
a = torch.randn(3, 1).expand(3, big)
b = torch.randn(1, 4).expand(2**31 + 5, 4)
ends = torch.tensor([big - 10, big - 7], dtype=torch.int32)
off = torch.tensor([0, 2], dtype=torch.int32)
out = gmp(a, b, off, ends, "mk", big, 2**31 + 5)
want = a[:2, :3] @ b[big - 10 : big - 7]
assert torch.equal(out[:2], want) and torch.all(out[2] == 0), out
# mn: 32767 groups of width 2^16 with no rows, then one of width 5 starting near 2^31.
w = 2**16
e = 32768
widths = [w] * (e - 1) + [5]
ends = torch.tensor(widths, dtype=torch.int64).cumsum(0).to(torch.int32)
off = torch.zeros(e, dtype=torch.int32)
off[-1] = 2
total = int(ends[-1]) + 3
a = torch.randn(3, 4)
b = torch.randn(4, 1).expand(4, total)
out = gmp(a, b, off, ends, "mn", w, total)
assert out.shape == (3, w)
p = int(ends[-2])
torch.testing.assert_close(out[:2, :5], a[:2] @ b[:, p : p + 5])
assert torch.all(out[:2, 5:] == 0) and torch.all(out[2] == 0)
# a huge E with every group empty, in each mode; width = 0 and total = 0.
e = 100000
z = torch.zeros(e, dtype=torch.int32)
for mode, (sa, sb) in {"mn": ((3, 2), (2, 0)), "mk": ((3, 0), (0, 2)),
                       "km": ((0, 3), (3, 2)), "kn": ((2, 3), (3, 0))}.items():
    out = gmp(torch.randn(sa), torch.randn(sb), z, z, mode, 0, 0)
    assert torch.all(out == 0)
print("ok")
"""


def test_extremes_in_a_subprocess():
    run_script_ok(EXTREMES)
