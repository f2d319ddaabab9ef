"""reorder_chunks (expert parallelism's chunk regrouping, csrc/permute/permute.h) against the
plain-loop reference (mixops.reference) and the backward's definition (the inverse reorder):
exact copies in every dtype (the bits, NaN included), zero-size chunks, A or B = 1, empty shapes,
S < N, strided x and counts, gradients, opcheck, compile with dynamic shapes, bad input and
extreme sizes."""

import pytest
import torch

import mixops
import mixops.reference as ref
from conftest import DEVICES, HAS_CUDA, requires_cuda
from helpers import assert_bits_equal, data, opcheck, run_script_ok, strided_variants
from mixops.ops import reorder_chunks

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
OP = torch.ops.mixops.reorder_chunks.default


def make_counts(num_a, num_b, total, zero_frac=0.3, device="cpu"):
    """counts [A, B] int32 summing to `total`: about zero_frac of the chunks empty, the rows
    spread at random over the others."""
    keep = torch.rand(num_a * num_b) >= zero_frac
    if not keep.any():
        keep[torch.randint(num_a * num_b, ())] = True
    idx = keep.nonzero().view(-1)
    pick = idx[torch.randint(idx.numel(), (total,))]
    counts = torch.bincount(pick, minlength=num_a * num_b).view(num_a, num_b)
    return counts.int().to(device)


def inverse_expect(y, counts):
    """The backward's definition: the chunks of y (in (b, a) order, counts.t()'s layout) put
    back in (a, b) order, rows past S zero: the reference with counts transposed."""
    return ref.reorder_chunks(y.detach().cpu(), counts.cpu().t())


# (N, A, B, S): typical, every row used, zero-size chunks (S small), A = 1 and B = 1 (the
# identity order), one chunk, N = 0, S = 0 with N > 0, a tail past S, more chunks than rows.
CASES = [
    (37, 3, 4, 30),
    (24, 4, 2, 24),
    (20, 5, 5, 3),
    (16, 1, 5, 12),
    (16, 5, 1, 16),
    (9, 1, 1, 9),
    (0, 2, 3, 0),
    (7, 2, 3, 0),
    (40, 6, 7, 31),
]


def test_exact_small():
    x = torch.arange(20.0).view(10, 2)
    counts = torch.tensor([[1, 2, 0], [3, 0, 2]], dtype=torch.int32)
    # chunks: (0, 0) rows 0; (0, 1) rows 1-2; (0, 2) none; (1, 0) rows 3-5; (1, 1) none;
    # (1, 2) rows 6-7; rows 8-9 past S. (b, a) order: (0, 0) (1, 0) (0, 1) (1, 1) (0, 2) (1, 2).
    y = reorder_chunks(x, counts)
    order = [0, 3, 4, 5, 1, 2, 6, 7]
    assert y[:8].tolist() == x[order].tolist()
    assert y[8:].tolist() == [[0, 0], [0, 0]], "rows past S are zero"
    assert x.tolist() == torch.arange(20.0).view(10, 2).tolist(), "x is not written"
    back = reorder_chunks(y, counts.t())
    assert back[:8].tolist() == x[:8].tolist() and back[8:].tolist() == [[0, 0], [0, 0]]
    assert torch.equal(reorder_chunks(x, counts.new_tensor([[4, 6]])), x), "A = 1: identity"
    assert torch.equal(reorder_chunks(x, counts.new_tensor([[4], [6]])), x), "B = 1: identity"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [5, 8])  # 8 fp16/bf16: 16-byte units on CUDA
@pytest.mark.parametrize("case", CASES, ids=str)
def test_reorder_chunks(device, dtype, hidden, case):
    n, num_a, num_b, total = case
    counts = make_counts(num_a, num_b, total, device=device)
    x = data(n, hidden, dtype, device)
    before = x.clone()
    y = reorder_chunks(x, counts)
    assert y.shape == (n, hidden) and y.dtype == dtype and y.is_contiguous()
    assert y.device == x.device
    if y.numel():
        assert y.data_ptr() != x.data_ptr(), "a fresh tensor"
    assert_bits_equal(y, ref.reorder_chunks(x.cpu(), counts.cpu()), "y")
    assert_bits_equal(x, before, "x is not written")
    # the inverse reorder gives x back below S, zeros past it
    expect_back = x.cpu().clone()
    expect_back[total:] = 0
    assert_bits_equal(reorder_chunks(y, counts.t()), expect_back, "reorder back")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 2, 2, 4), (6, 2, 3, 0), (0, 1, 1, 0)], ids=str)
def test_empty(device, shape):
    """N = 0, H = 0: right shapes forward and backward, through autograd too."""
    n, num_a, num_b, hidden = shape
    counts = make_counts(num_a, num_b, n, device=device)
    x = torch.randn(n, hidden, device=device, requires_grad=True)
    y = reorder_chunks(x, counts)
    assert y.shape == (n, hidden)
    assert_bits_equal(y, ref.reorder_chunks(x.detach().cpu(), counts.cpu()), "y")
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_strided(device, dtype):
    n, num_a, num_b, h = 29, 3, 4, 8
    c = make_counts(num_a, num_b, 25, device=device)
    counts_all = {
        "contiguous": c,
        "transposed view": c.t().contiguous().t(),
        "strided": torch.stack([torch.full_like(c, 99), c], 2)[:, :, 1],
        "expanded": torch.full((1, num_b), 2, dtype=torch.int32, device=device).expand(num_a, -1),
    }
    assert not counts_all["transposed view"].is_contiguous()
    assert not counts_all["strided"].is_contiguous()
    for xn, x in strided_variants(n, h, dtype, device).items():
        assert not x.is_contiguous(), xn
        for cn, counts in counts_all.items():
            expect = ref.reorder_chunks(x.cpu(), counts.cpu())
            assert_bits_equal(reorder_chunks(x, counts), expect, f"x {xn}, counts {cn}")


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    f64 = dict(dtype=torch.float64, device=device)
    counts = make_counts(3, 4, 13, device=device)
    x = torch.randn(16, 3, **f64, requires_grad=True)
    torch.autograd.gradcheck(lambda x: reorder_chunks(x, counts), (x,))
    torch.autograd.gradcheck(lambda x: reorder_chunks(x, counts.t()), (x,))
    x_t = torch.randn(3, 16, **f64).t().requires_grad_(True)  # strided x
    torch.autograd.gradcheck(lambda x: reorder_chunks(x, counts), (x_t,))


@pytest.mark.parametrize("device", DEVICES)
def test_gradgradcheck(device):
    counts = make_counts(2, 3, 9, device=device)
    x = torch.randn(11, 3, dtype=torch.float64, device=device, requires_grad=True)
    torch.autograd.gradgradcheck(lambda x: reorder_chunks(x, counts), (x,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gradient_is_the_inverse_reorder(device, dtype):
    """x.grad is reorder_chunks(grad, counts.t()) and the reference's autograd gradient, bit for
    bit; counts gets none; double backward reorders forward again."""
    counts = make_counts(4, 3, 26, device=device)
    g = data(30, 8, dtype, device)
    x = data(30, 8, dtype, device).requires_grad_(True)
    reorder_chunks(x, counts).backward(g)
    assert_bits_equal(x.grad, inverse_expect(g, counts), "x.grad")
    rx = x.detach().cpu().requires_grad_(True)
    ref.reorder_chunks(rx, counts.cpu()).backward(g.cpu())
    # the reference's autograd sums one zero-padded gradient per slice (-0 turns +0): values
    torch.testing.assert_close(x.grad.cpu(), rx.grad, rtol=0, atol=0, equal_nan=True)
    x.grad = None
    reorder_chunks(x, counts).backward(g.t().contiguous().t())  # a strided grad
    assert_bits_equal(x.grad, inverse_expect(g, counts), "x.grad, strided grad")
    # double backward: d/d(grad) <gx, v> = reorder_chunks(v, counts)
    gg = g.detach().clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(reorder_chunks(x, counts), x, gg, create_graph=True)
    v = data(30, 8, dtype, device)
    (ggrad,) = torch.autograd.grad(gx, gg, v)
    assert_bits_equal(ggrad, ref.reorder_chunks(v.cpu(), counts.cpu()), "double backward")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, requires_grad):
    def t(*shape):
        return torch.randn(*shape, device=device, requires_grad=requires_grad)

    counts = make_counts(3, 4, 10, device=device)
    opcheck(OP, (t(12, 8), counts))
    opcheck(OP, (t(12, 8), counts.t()))  # transposed counts
    wide = torch.randn(12, 10, device=device)[:, 1:9].requires_grad_(requires_grad)
    opcheck(OP, (wide, counts))  # row-strided x
    opcheck(OP, (t(0, 4), torch.zeros(2, 2, dtype=torch.int32, device=device)))  # N = 0
    opcheck(OP, (t(5, 0), make_counts(1, 3, 5, device=device)))  # H = 0, A = 1


@pytest.mark.parametrize("device", DEVICES)
def test_compile(device):
    """An expert-parallel-shaped chain: regroup by expert, a per-row block, regroup back;
    torch.compile(fullgraph, dynamic) forward and backward give eager's bits for several N, A,
    B."""

    def chain(x, counts):
        h = reorder_chunks(x * 0.5, counts)
        return reorder_chunks(h * 2 + 1, counts.t())

    compiled = torch.compile(chain, fullgraph=True, dynamic=True)
    for n, num_a, num_b, total in ((24, 2, 3, 20), (17, 3, 2, 17), (31, 4, 5, 11)):
        x = torch.randn(n, 8, device=device)
        counts = make_counts(num_a, num_b, total, device=device)
        xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ye, yc = chain(xe, counts), compiled(xc, counts)
        torch.testing.assert_close(yc, ye, rtol=0, atol=0)
        ye.square().sum().backward()
        yc.square().sum().backward()
        torch.testing.assert_close(xc.grad, xe.grad, rtol=0, atol=0)


# ---- bad input -------------------------------------------------------------------------------

X = torch.randn(8, 4)
C = torch.tensor([[1, 2, 0], [3, 0, 2]], dtype=torch.int32)


def cnt(*rows):
    return torch.tensor(rows, dtype=torch.int32)


def big_x(n, h=4):
    return torch.zeros(1, h).expand(n, h)


_FLOATS = r"must be float32, bfloat16 or float16 \(or float64\), got "

BAD = [
    (lambda: reorder_chunks(X[0], C), r"reorder_chunks: x must be 2-D \[num_rows, hidden\], got"),
    (
        lambda: reorder_chunks(X[None], C),
        r"x must be 2-D \[num_rows, hidden\], got shape \[1, 8, 4",
    ),
    (lambda: reorder_chunks(X.int(), C), "reorder_chunks: x " + _FLOATS + "Int"),
    (lambda: reorder_chunks(X.bool(), C), "reorder_chunks: x " + _FLOATS + "Bool"),
    (lambda: reorder_chunks(X.cfloat(), C), "reorder_chunks: x " + _FLOATS + "Complex"),
    (lambda: reorder_chunks(X, C.long()), "reorder_chunks: counts must be int32, got Long"),
    (lambda: reorder_chunks(X, C.float()), "reorder_chunks: counts must be int32, got Float"),
    (
        lambda: reorder_chunks(X, C[0]),
        r"reorder_chunks: counts must be 2-D \[A, B\] \(chunk \(a, b\) has counts\[a, b\] rows\), "
        r"got shape \[3\]",
    ),
    (lambda: reorder_chunks(X, C[None]), r"counts must be 2-D \[A, B\] .*got shape \[1, 2, 3\]"),
    (lambda: reorder_chunks(X, C[0, 0]), r"counts must be 2-D \[A, B\] .*got shape \[\]"),
    (
        lambda: reorder_chunks(X, C[:0]),
        r"reorder_chunks: counts must have A >= 1 and B >= 1, got shape \[0, 3\]",
    ),
    (lambda: reorder_chunks(X, C[:, :0]), r"A >= 1 and B >= 1, got shape \[2, 0\]"),
    (
        lambda: reorder_chunks(X, torch.zeros(1, 1, dtype=torch.int32).expand(2**16, 2**15)),
        r"reorder_chunks: counts must have A \* B < 2\^31 chunks, got shape \[65536, 32768\]",
    ),
    (
        lambda: reorder_chunks(X, C.to("meta")),
        r"reorder_chunks: counts must be on the same device as x \(cpu\), got meta",
    ),
    (
        lambda: reorder_chunks(big_x(2**31), C),
        r"reorder_chunks: x must have fewer than 2\^31 rows \(row offsets are int32\), got "
        r"2147483648",
    ),
    (
        lambda: reorder_chunks(X, cnt([1, -3, 0], [0, 0, 0])),
        r"reorder_chunks: counts\[0, 1\] = -3 must be >= 0",
    ),
    (lambda: reorder_chunks(X, cnt([1, 2, 0], [0, 0, -1])), r"counts\[1, 2\] = -1 must be >= 0"),
    (lambda: reorder_chunks(X, cnt([-(2**31)])), r"counts\[0, 0\] = -2147483648 must be >= 0"),
    (
        lambda: reorder_chunks(X, cnt([4, 2, 0], [3, 0, 0])),
        r"reorder_chunks: counts sum to 9 rows, more than x has \(8\)",
    ),
    (lambda: reorder_chunks(X[:0], cnt([0, 1])), r"counts sum to 1 rows, more than x has \(0\)"),
    (
        lambda: reorder_chunks(X, cnt([2**31 - 1, 2**31 - 1])),
        r"counts sum to 4294967294 rows, more than x has \(8\)",
    ),
    (  # the backward's counts are counts.t(): its entries named as such
        lambda: reorder_chunks(X, cnt([1, 2, 0], [0, -2, 0]).t()),
        r"counts\[1, 1\] = -2 must be >= 0",
    ),
]


@pytest.mark.parametrize("fn,match", BAD, ids=[m for _, m in BAD])
def test_bad_input(fn, match):
    with pytest.raises(RuntimeError, match=match):
        fn()


def test_bad_values_raise_through_autograd():
    x = X.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"counts sum to 9 rows, more than x has \(8\)"):
        reorder_chunks(x, cnt([4, 5]))


def test_counts_of_2_31_chunks_are_refused_from_metadata():
    """Meta tensors (nothing allocated): counts of 2^31 chunks and x of 2^31 rows are refused,
    2^31 - 1 chunks and rows accepted (the output shape is x's)."""
    row = torch.zeros(1, 1, device="meta")
    x = row.expand(4, 1)
    counts = torch.zeros(1, 1, dtype=torch.int32, device="meta")
    for shape in ((2**31, 1), (1, 2**31), (2**16, 2**15), (2**31 + 5, 2**20)):
        with pytest.raises(RuntimeError, match=r"A \* B < 2\^31 chunks"):
            reorder_chunks(x, counts.expand(*shape))
    assert reorder_chunks(x, counts.expand(2**31 - 1, 1)).shape == (4, 1)
    with pytest.raises(RuntimeError, match=r"fewer than 2\^31 rows"):
        reorder_chunks(row.expand(2**31, 1), counts)
    assert reorder_chunks(row.expand(2**31 - 1, 3), counts).shape == (2**31 - 1, 3)


@requires_cuda
def test_cuda_device_mismatch():
    with pytest.raises(RuntimeError, match=r"counts must be on the same device as x \(cuda:0\)"):
        reorder_chunks(X.cuda(), C)
    with pytest.raises(RuntimeError, match=r"counts must be on the same device as x \(cpu\)"):
        reorder_chunks(X, C.cuda())


@requires_cuda
def test_cuda_bad_counts_are_clamped_and_flagged():
    """CUDA cannot raise without a sync: a negative count is 0, the chunks are cut at row N of x,
    and mixops.check_errors() names the op (the CPU raises at once)."""
    mixops.check_errors()
    x = X.cuda()
    y = reorder_chunks(x, cnt([1, -3, 2], [0, 1, 1]).cuda())
    assert torch.equal(y.cpu(), reorder_chunks(X, cnt([1, 0, 2], [0, 1, 1])))
    with pytest.raises(
        RuntimeError, match=r"reorder_chunks: invalid input values: counts values must be >= 0"
    ):
        mixops.check_errors()
    # sum 12 > 8: (0, 0) rows 0-3, (0, 1) rows 4-6, (1, 0) row 7 of its 5, (1, 1) nothing
    y = reorder_chunks(x, cnt([4, 3], [5, 2**31 - 1]).cuda())
    assert torch.equal(y.cpu(), reorder_chunks(X, cnt([4, 3], [1, 0])))
    with pytest.raises(
        RuntimeError, match=r"reorder_chunks: invalid input values: counts sum to more rows"
    ):
        mixops.check_errors()
    mixops.check_errors()  # cleared


@requires_cuda
def test_cuda_graph_capture_follows_new_counts():
    """No host sync: forward and the inverse capture into a CUDA graph, and replays follow new
    counts and new data."""
    n, num_a, num_b, h = 300, 4, 8, 32
    x = torch.randn(n, h, device="cuda")
    counts = make_counts(num_a, num_b, 250, device="cuda")

    def chain():
        y = reorder_chunks(x * 2, counts)
        return y, reorder_chunks(y, counts.t())

    chain()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = chain()
    for total in (300, 17):
        x.copy_(torch.randn_like(x))
        counts.copy_(make_counts(num_a, num_b, total, device="cuda"))
        g.replay()
        torch.cuda.synchronize()
        for o, e in zip(outs, chain()):
            torch.testing.assert_close(o, e, rtol=0, atol=0)


def test_deterministic_and_cpu_equal_on_cuda_shapes():
    """The same call twice gives the same bits; on a GPU, CUDA's bits equal the CPU's for shapes
    with 16-byte units and with 2-byte ones, and for more chunks than one scan tile (1024)."""
    devices = ["cpu"] + (["cuda"] if HAS_CUDA else [])
    for n, num_a, num_b, h in ((700, 8, 16, 512), (700, 8, 16, 7), (3000, 40, 41, 3)):
        counts = make_counts(num_a, num_b, n - 13)
        x = data(n, h, torch.bfloat16)
        outs = []
        for dev in devices:
            for _ in range(2):
                y = reorder_chunks(x.to(dev), counts.to(dev))
                outs.append((y.cpu(), reorder_chunks(y, counts.to(dev).t()).cpu()))
        for got in outs[1:]:
            for o, e, name in zip(got, outs[0], ("y", "back")):
                assert_bits_equal(o, e, f"{name}, hidden {h}")
        assert_bits_equal(outs[0][0], ref.reorder_chunks(x, counts), f"y vs reference, {h}")


@pytest.mark.large
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [1, 3, 64, 4096])
@pytest.mark.parametrize(
    "shape", [(5000, 8, 32, 4900), (4096, 64, 64, 4096), (300, 1, 7, 100)], ids=str
)
def test_large_grid(device, dtype, hidden, shape):
    n, num_a, num_b, total = shape
    counts = make_counts(num_a, num_b, total, device=device)
    x = data(n, hidden, dtype, device)
    y = reorder_chunks(x, counts)
    assert_bits_equal(y, ref.reorder_chunks(x.cpu(), counts.cpu()), "y")
    assert_bits_equal(reorder_chunks(y, counts.t()), inverse_expect(y, counts), "back")


# ---- extreme sizes (a subprocess: a crash fails this test, not the run) ------------------------

_EXTREMES = """
import torch, mixops
from mixops.ops import reorder_chunks
i32 = torch.int32
# The most rows allowed (2^31 - 1) with empty rows: right shapes on CPU and meta, forward and
# backward; the counts may name them all.
n = 2**31 - 1
for dev in ("cpu", "meta"):
    x = torch.zeros(1, 0, device=dev).expand(n, 0).requires_grad_(True)
    counts = torch.tensor([[n - 5, 0], [3, 2]], dtype=i32, device=dev)
    y = reorder_chunks(x, counts)
    assert y.shape == (n, 0), (dev, y.shape)
    (g,) = torch.autograd.grad(y, x, torch.zeros(1, 0, device=dev).expand(n, 0))
    assert g.shape == (n, 0), (dev, g.shape)
# sizes only on meta: a full-width output of 2^31 - 1 rows, 2^31 - 1 chunks
y = reorder_chunks(torch.zeros(1, 8, device="meta").expand(n, 8),
                   torch.zeros(1, 1, dtype=i32, device="meta").expand(1, n))
assert y.shape == (n, 8), y.shape
# a sum past N raises on CPU for a huge (expanded) x too, and counts near 2^31 each do not wrap
try:
    reorder_chunks(torch.zeros(1, 0).expand(n, 0), torch.tensor([[n, 1]], dtype=i32))
    raise AssertionError("a sum of 2^31 was accepted")
except RuntimeError as e:
    assert "counts sum to 2147483648 rows, more than x has (2147483647)" in str(e), e
# 2^31 rows and more: refused from metadata alone (row offsets are int32)
for rows in (2**31, 2**31 + 7, 2**62, 2**63 - 1):
    for dev in ("cpu", "meta"):
        x = torch.zeros(1, 1, device=dev).expand(rows, 1)
        try:
            reorder_chunks(x, torch.zeros(1, 1, dtype=i32, device=dev))
            raise AssertionError(f"{rows} rows on {dev}")
        except RuntimeError as e:
            assert f"fewer than 2^31 rows (row offsets are int32), got {rows}" in str(e), e
# a byte count past 2^63 is torch's "overflowed" error on CPU and meta, never a wrapped size
for h in (2**61, 2**62 - 1):
    for dev in ("cpu", "meta"):
        x = torch.zeros(1, 1, device=dev).expand(2, h)
        try:
            reorder_chunks(x, torch.ones(1, 1, dtype=i32, device=dev))
            raise AssertionError(f"2 x {h} floats on {dev}")
        except RuntimeError as e:
            assert "overflow" in str(e), (h, dev, e)
print("ok")
"""


def test_extreme_sizes():
    run_script_ok(_EXTREMES)
