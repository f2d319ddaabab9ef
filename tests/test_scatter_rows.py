"""scatter_rows / scatter_rows_backward (MoD's row write-back, csrc/permute/permute.h) against the
plain-torch reference (mixops.reference) and the backward's definition: exact copies in every
dtype (the bits, NaN included), strided and expanded inputs, empty shapes, gradients, opcheck,
compile with dynamic shapes, bad input and extreme sizes."""

import pytest
import torch

import mixops
import mixops.reference as ref
from conftest import DEVICES, HAS_CUDA, requires_cuda
from helpers import assert_bits_equal, data, opcheck, run_script_ok, strided_variants
from mixops.ops import scatter_rows

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
BACKWARD = torch.ops.mixops.scatter_rows_backward.default


def make_index(num_rows, written, none, device="cpu"):
    """index [written + none] int32: `written` distinct rows of [0, num_rows) and `none` -1
    entries, in random order."""
    idx = torch.cat([torch.randperm(num_rows)[:written], torch.full((none,), -1)])
    return idx[torch.randperm(idx.numel())].int().to(device)


def backward_expect(grad, index):
    """The backward's definition: grad with the written rows zeroed, and grad[index[i]] (zeros
    for -1)."""
    g, idx = grad.detach().cpu(), index.cpu()
    has = idx >= 0
    grad_base = g.clone(memory_format=torch.contiguous_format)
    grad_base[idx[has].long()] = 0
    grad_rows = g.new_zeros(idx.numel(), g.shape[1])
    grad_rows[has] = g[idx[has].long()]
    return grad_base, grad_rows


# (num_rows, written, none): typical, every row written (a permutation), more entries than rows,
# n = 0, only -1 entries, T = 0 (with and without -1 entries), one row.
CASES = [
    (37, 12, 4),
    (20, 20, 0),
    (9, 9, 5),
    (16, 0, 0),
    (16, 0, 3),
    (0, 0, 0),
    (0, 0, 2),
    (1, 1, 0),
]


def test_exact_small():
    base = torch.arange(12.0).view(4, 3)
    rows = -torch.arange(1.0, 7.0).view(2, 3)
    out = scatter_rows(base, rows, torch.tensor([2, 0], dtype=torch.int32))
    assert out.tolist() == [[-4, -5, -6], [3, 4, 5], [-1, -2, -3], [9, 10, 11]]
    out = scatter_rows(base, rows, torch.tensor([-1, 3], dtype=torch.int32))
    assert out.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [-4, -5, -6]]
    assert base.tolist() == torch.arange(12.0).view(4, 3).tolist(), "base is not written"
    gb, gr = BACKWARD(base, torch.tensor([2, -1, 0], dtype=torch.int32))
    assert gb.tolist() == [[0, 0, 0], [3, 4, 5], [0, 0, 0], [9, 10, 11]]
    assert gr.tolist() == [[6, 7, 8], [0, 0, 0], [0, 1, 2]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [5, 8])  # 8 fp16/bf16: 16-byte units on CUDA
@pytest.mark.parametrize("case", CASES, ids=str)
def test_scatter_rows(device, dtype, hidden, case):
    t, written, none = case
    index = make_index(t, written, none, device)
    base = data(t, hidden, dtype, device)
    rows = data(written + none, hidden, dtype, device).flip(0).contiguous()
    before = base.clone()
    out = scatter_rows(base, rows, index)
    assert out.shape == (t, hidden) and out.dtype == dtype and out.is_contiguous()
    assert out.device == base.device
    if out.numel():
        assert out.data_ptr() != base.data_ptr(), "a fresh tensor"
    assert_bits_equal(out, ref.scatter_rows(base.cpu(), rows.cpu(), index.cpu()), "out")
    assert_bits_equal(base, before, "base is not written")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_backward_op(device, dtype, case):
    t, written, none = case
    index = make_index(t, written, none, device)
    grad = data(t, 6, dtype, device)
    grad_base, grad_rows = BACKWARD(grad, index)
    assert grad_base.is_contiguous() and grad_rows.is_contiguous()
    expect_base, expect_rows = backward_expect(grad, index)
    assert_bits_equal(grad_base, expect_base, "grad_base")
    assert_bits_equal(grad_rows, expect_rows, "grad_rows")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 0, 0, 4), (0, 0, 3, 4), (5, 0, 0, 4), (5, 2, 1, 0)], ids=str)
def test_empty(device, shape):
    """T = 0, n = 0, H = 0: right shapes forward and backward, through autograd too."""
    t, written, none, hidden = shape
    index = make_index(t, written, none, device)
    base = torch.randn(t, hidden, device=device, requires_grad=True)
    rows = torch.randn(written + none, hidden, device=device, requires_grad=True)
    out = scatter_rows(base, rows, index)
    assert out.shape == (t, hidden)
    assert_bits_equal(out, ref.scatter_rows(base.cpu(), rows.cpu(), index.cpu()), "out")
    out.sum().backward()
    assert base.grad.shape == base.shape and rows.grad.shape == rows.shape
    grad_base, grad_rows = BACKWARD(torch.randn(t, hidden, device=device), index)
    assert grad_base.shape == (t, hidden) and grad_rows.shape == (written + none, hidden)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_strided(device, dtype):
    t, written, none, h = 23, 9, 3, 8
    idx = make_index(t, written, none, device)
    indexes = {
        "contiguous": idx,
        "strided": torch.stack([torch.full_like(idx, 99), idx], 1)[:, 1],  # stride 2, a view
        "expanded -1": torch.full((1,), -1, dtype=torch.int32, device=device).expand(idx.numel()),
    }
    assert not indexes["strided"].is_contiguous()
    bases = strided_variants(t, h, dtype, device)
    rows_all = strided_variants(written + none, h, dtype, device)
    for bn, base in bases.items():
        assert not base.is_contiguous(), bn
        for rn, rows in rows_all.items():
            for iname, index in indexes.items():
                what = f"base {bn}, rows {rn}, index {iname}"
                expect = ref.scatter_rows(base.cpu(), rows.cpu(), index.cpu())
                assert_bits_equal(scatter_rows(base, rows, index), expect, what)
        for iname, index in indexes.items():  # the backward op on strided grads
            got = BACKWARD(base, index)
            for o, e, name in zip(got, backward_expect(base, index), ("grad_base", "grad_rows")):
                assert_bits_equal(o, e, f"{name}: grad {bn}, index {iname}")


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    f64 = dict(dtype=torch.float64, device=device)
    index = make_index(11, 5, 2, device)
    base = torch.randn(11, 3, **f64, requires_grad=True)
    rows = torch.randn(7, 3, **f64, requires_grad=True)
    torch.autograd.gradcheck(lambda b, r: scatter_rows(b, r, index), (base, rows))
    torch.autograd.gradcheck(lambda r: scatter_rows(base.detach(), r, index), (rows,))
    torch.autograd.gradcheck(lambda b: scatter_rows(b, rows.detach(), index), (base,))
    # strided inputs: a transposed base, row-strided rows
    base_t = torch.randn(3, 11, **f64).t().requires_grad_(True)
    rows_s = torch.randn(7, 5, **f64)[:, 1:4].requires_grad_(True)
    torch.autograd.gradcheck(lambda b, r: scatter_rows(b, r, index), (base_t, rows_s))


def test_gradgradcheck():
    index = make_index(9, 4, 2)
    base = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    rows = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradgradcheck(lambda b, r: scatter_rows(b, r, index), (base, rows))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gradients_are_the_backward_op(device, dtype):
    """base.grad and rows.grad are scatter_rows_backward's outputs, the reference's autograd
    gradients, and only what is asked for is computed."""
    index = make_index(30, 10, 4, device)
    g = data(30, 8, dtype, device)
    base = data(30, 8, dtype, device).requires_grad_(True)
    rows = data(14, 8, dtype, device).requires_grad_(True)
    scatter_rows(base, rows, index).backward(g)
    expect_base, expect_rows = BACKWARD(g, index)
    assert_bits_equal(base.grad, expect_base, "base.grad")
    assert_bits_equal(rows.grad, expect_rows, "rows.grad")
    rb, rr = base.detach().cpu().requires_grad_(True), rows.detach().cpu().requires_grad_(True)
    ref.scatter_rows(rb, rr, index.cpu()).backward(g.cpu())
    assert_bits_equal(base.grad, rb.grad, "base.grad vs the reference")
    assert_bits_equal(rows.grad, rr.grad, "rows.grad vs the reference")
    only_rows = rows.detach().requires_grad_(True)
    scatter_rows(base.detach(), only_rows, index).backward(g)
    assert_bits_equal(only_rows.grad, expect_rows, "rows.grad alone")
    only_base = base.detach().requires_grad_(True)
    scatter_rows(only_base, rows.detach(), index).backward(g.t().contiguous().t())  # strided grad
    assert_bits_equal(only_base.grad, expect_base, "base.grad alone")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, requires_grad):
    def t(*shape):
        return torch.randn(*shape, device=device, requires_grad=requires_grad)

    op = torch.ops.mixops.scatter_rows.default
    index = make_index(12, 5, 2, device)
    opcheck(op, (t(12, 8), t(7, 8), index))
    opcheck(op, (t(12, 8), t(0, 8), index[:0]))  # n = 0
    wide = torch.randn(12, 10, device=device)[:, 1:9].requires_grad_(requires_grad)
    strided_rows = torch.randn(7, 10, device=device)[:, 2:].requires_grad_(requires_grad)
    opcheck(op, (wide, strided_rows, index))  # row-strided base and rows
    opcheck(op, (t(0, 4), t(3, 4), torch.full((3,), -1, dtype=torch.int32, device=device)))
    if not requires_grad:  # the backward op has no autograd of its own
        opcheck(BACKWARD, (torch.randn(12, 8, device=device), index))
        opcheck(BACKWARD, (torch.randn(8, 12, device=device).t(), index))
        opcheck(BACKWARD, (torch.randn(12, 0, device=device), index[:0]))


@pytest.mark.parametrize("device", DEVICES)
def test_compile(device):
    """A MoD-shaped chain: top-C rows of a score, a block on them, written back over a scaled
    base (-1 for rows whose score is not positive); torch.compile(fullgraph, dynamic) forward and
    backward give eager's bits."""

    def chain(x, score):
        top = torch.topk(score, x.shape[0] // 2).indices
        dest = torch.where(score[top] > 0, top, -1).int()
        rows = x[top] * 2 + 1
        return scatter_rows(x * 0.5, rows, dest)

    compiled = torch.compile(chain, fullgraph=True, dynamic=True)
    for n in (24, 17):
        x = torch.randn(n, 8, device=device)
        score = torch.randn(n, device=device)
        xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ye, yc = chain(xe, score), compiled(xc, score)
        torch.testing.assert_close(yc, ye, rtol=0, atol=0)
        ye.square().sum().backward()
        yc.square().sum().backward()
        torch.testing.assert_close(xc.grad, xe.grad, rtol=0, atol=0)


# ---- bad input -------------------------------------------------------------------------------

B = torch.randn(6, 4)
R = torch.randn(3, 4)
I = torch.tensor([4, -1, 0], dtype=torch.int32)  # noqa: E741


def idx(*values):
    return torch.tensor(values, dtype=torch.int32)


def big_base(t):
    return torch.zeros(1, 4).expand(t, 4)


_FLOATS = r"must be float32, bfloat16 or float16 \(or float64\), got "

BAD = [
    (lambda: scatter_rows(B[0], R, I), r"scatter_rows: base must be 2-D \[num_rows, hidden\], got"),
    (
        lambda: scatter_rows(B[None], R, I),
        r"base must be 2-D \[num_rows, hidden\], got shape \[1, ",
    ),
    (lambda: scatter_rows(B.int(), R.int(), I), "scatter_rows: base " + _FLOATS + "Int"),
    (lambda: scatter_rows(B.bool(), R.bool(), I), "scatter_rows: base " + _FLOATS + "Bool"),
    (lambda: scatter_rows(B.cfloat(), R.cfloat(), I), "scatter_rows: base " + _FLOATS + "Complex"),
    (
        lambda: scatter_rows(B, R[:, :3], I),
        r"scatter_rows: rows must be 2-D \[n, hidden = base.size\(1\) = 4\], got shape \[3, 3\]",
    ),
    (lambda: scatter_rows(B, R[0], I), r"rows must be 2-D \[n, hidden = .*got shape \[4\]"),
    (
        lambda: scatter_rows(B, R[None], I),
        r"rows must be 2-D \[n, hidden = .*got shape \[1, 3, 4\]",
    ),
    (
        lambda: scatter_rows(B, R.double(), I),
        "scatter_rows: rows must have base's dtype Float, got",
    ),
    (lambda: scatter_rows(B.half(), R, I), "rows must have base's dtype Half, got Float"),
    (
        lambda: scatter_rows(B, R.to("meta"), I),
        r"scatter_rows: rows must be on the same device as base \(cpu\), got meta",
    ),
    (lambda: scatter_rows(B, R, I.long()), "scatter_rows: index must be int32, got Long"),
    (lambda: scatter_rows(B, R, I.float()), "scatter_rows: index must be int32, got Float"),
    (
        lambda: scatter_rows(B, R, I[:2]),
        r"scatter_rows: index must be 1-D \[n\] with n = rows.size\(0\) = 3, got shape \[2\]",
    ),
    (lambda: scatter_rows(B, R, I[None]), r"index must be 1-D \[n\] .* got shape \[1, 3\]"),
    (lambda: scatter_rows(B, R, I[0]), r"index must be 1-D \[n\] .* got shape \[\]"),
    (
        lambda: scatter_rows(B, R, I.to("meta")),
        r"scatter_rows: index must be on the same device as the data \(cpu\), got meta",
    ),
    (
        lambda: scatter_rows(big_base(2**31 - 1), R, I),
        r"scatter_rows: the number of rows \(2147483647\) must be < 2\^31 - 1 \(index is int32\)",
    ),
    (
        lambda: scatter_rows(B, R, idx(6, -1, 0)),
        r"scatter_rows: index values must be in \[-1, num_rows = 6\), got index\[0\] = 6; index "
        r"must hold distinct rows of base, or -1",
    ),
    (lambda: scatter_rows(B, R, idx(4, -2, 0)), r"got index\[1\] = -2"),
    (lambda: scatter_rows(B, R, idx(4, -1, -(2**31))), r"got index\[2\] = -2147483648"),
    (lambda: scatter_rows(B[:0], R, idx(-1, 0, -1)), r"\[-1, num_rows = 0\), got index\[1\] = 0"),
    (
        lambda: scatter_rows(B, R, idx(4, -1, 4)),
        r"scatter_rows: index maps two entries to row 4 \(at index\[2\]\); index must hold",
    ),
    (lambda: BACKWARD(B[0], I), r"scatter_rows_backward: grad must be 2-D \[num_rows, hidden\]"),
    (lambda: BACKWARD(B.int(), I), "scatter_rows_backward: grad " + _FLOATS + "Int"),
    (lambda: BACKWARD(B, I.long()), "scatter_rows_backward: index must be int32, got Long"),
    (lambda: BACKWARD(B, I[None]), r"scatter_rows_backward: index must be 1-D \[n\]"),
    (
        lambda: BACKWARD(B, I.to("meta")),
        r"scatter_rows_backward: index must be on the same device as the data \(cpu\), got meta",
    ),
    (
        lambda: BACKWARD(big_base(2**31 - 1), I),
        r"scatter_rows_backward: the number of rows \(2147483647\) must be < 2\^31 - 1",
    ),
    (
        lambda: BACKWARD(B, idx(4, 6)),
        r"scatter_rows_backward: index values must be in \[-1, num_rows = 6\), got index\[1\] = 6",
    ),
    (lambda: BACKWARD(B, idx(0, 0)), r"scatter_rows_backward: index maps two entries to row 0"),
]


@pytest.mark.parametrize("fn,match", BAD, ids=[m for _, m in BAD])
def test_bad_input(fn, match):
    with pytest.raises(RuntimeError, match=match):
        fn()


def test_bad_values_raise_through_autograd():
    base, rows = B.clone().requires_grad_(True), R.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="scatter_rows: index maps two entries to row 4"):
        scatter_rows(base, rows, idx(4, 4, -1))


@pytest.mark.parametrize("op", ["scatter_rows", "scatter_rows_backward"])
def test_index_of_2_31_entries_is_refused(op):
    """Metadata alone (meta tensors: nothing allocated) must refuse an index of 2^31 + 7 entries,
    as permute refuses num_tokens * k >= 2^31 - 1."""
    n = 2**31 + 7
    base = torch.zeros(4, 1, device="meta")
    index = torch.full((1,), -1, dtype=torch.int32, device="meta").expand(n)
    with pytest.raises(RuntimeError, match=r"2\^31"):
        if op == "scatter_rows":
            scatter_rows(base, torch.zeros(1, 1, device="meta").expand(n, 1), index)
        else:
            BACKWARD(base, index)


@requires_cuda
def test_cuda_device_mismatch():
    with pytest.raises(RuntimeError, match="rows must be on the same device as base"):
        scatter_rows(B.cuda(), R, I.cuda())
    with pytest.raises(RuntimeError, match="index must be on the same device as the data"):
        scatter_rows(B.cuda(), R.cuda(), I)
    with pytest.raises(RuntimeError, match="index must be on the same device as the data"):
        BACKWARD(B.cuda(), I)


@requires_cuda
def test_cuda_bad_values_are_flagged():
    """CUDA cannot raise without a sync: out-of-range values count as -1, a row written twice
    takes one of its rows, and mixops.check_errors() names the op (the CPU raises at once)."""
    mixops.check_errors()
    base, rows = B.cuda(), R.cuda()
    out = scatter_rows(base, rows, idx(4, 77, -5).cuda())
    assert torch.equal(out.cpu(), scatter_rows(B, R, idx(4, -1, -1)))
    with pytest.raises(
        RuntimeError,
        match=r"scatter_rows: invalid input values: index values must be in \[-1, num_rows = 6\)",
    ):
        mixops.check_errors()
    out = scatter_rows(base, rows, idx(4, -1, 4).cuda()).cpu()
    firsts = [scatter_rows(B, R, idx(4, -1, -1)), scatter_rows(B, R, idx(-1, -1, 4))]
    assert any(torch.equal(out, f) for f in firsts), "row 4 is one of its rows"
    with pytest.raises(RuntimeError, match="scatter_rows: invalid input values: index holds a row"):
        mixops.check_errors()
    grad_base, grad_rows = BACKWARD(base, idx(4, 77, 0).cuda())
    expect = BACKWARD(B, idx(4, -1, 0))
    assert torch.equal(grad_base.cpu(), expect[0]) and torch.equal(grad_rows.cpu(), expect[1])
    with pytest.raises(RuntimeError, match=r"scatter_rows_backward: invalid input values: index"):
        mixops.check_errors()
    mixops.check_errors()  # cleared


@requires_cuda
def test_cuda_graph_capture_follows_new_index():
    """No host sync: forward and backward op capture into a CUDA graph, and replays follow a new
    index and new data."""
    t, n, h = 64, 24, 32
    base = torch.randn(t, h, device="cuda")
    rows = torch.randn(n, h, device="cuda")
    index = make_index(t, n - 4, 4, "cuda")

    def chain():
        out = scatter_rows(base, rows * 2, index)
        return (out, *BACKWARD(out, index))

    chain()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = chain()
    for _ in range(2):
        base.copy_(torch.randn_like(base))
        rows.copy_(torch.randn_like(rows))
        index.copy_(make_index(t, n - 4, 4, "cuda"))
        g.replay()
        torch.cuda.synchronize()
        for o, e in zip(outs, chain()):
            torch.testing.assert_close(o, e, rtol=0, atol=0)


def test_deterministic_and_cpu_equal_on_cuda_shapes():
    """The same call twice gives the same bits; on a GPU, CUDA's bits equal the CPU's for shapes
    with 16-byte units and with 2-byte ones."""
    index = make_index(700, 300, 40)
    devices = ["cpu"] + (["cuda"] if HAS_CUDA else [])
    for h in (512, 7):
        base, rows = data(700, h, torch.bfloat16), data(340, h, torch.bfloat16)
        outs = []
        for dev in devices:
            for _ in range(2):
                out = scatter_rows(base.to(dev), rows.to(dev), index.to(dev))
                outs.append((out.cpu(), *[o.cpu() for o in BACKWARD(out, index.to(dev))]))
        for got in outs[1:]:
            for o, e, name in zip(got, outs[0], ("out", "grad_base", "grad_rows")):
                assert_bits_equal(o, e, f"{name}, hidden {h}")


@pytest.mark.large
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [1, 3, 64, 4096])
@pytest.mark.parametrize("shape", [(5000, 2500, 500), (4096, 4096, 0), (300, 0, 300)], ids=str)
def test_large_grid(device, dtype, hidden, shape):
    t, written, none = shape
    index = make_index(t, written, none, device)
    base = data(t, hidden, dtype, device)
    rows = data(written + none, hidden, dtype, device)
    expect = ref.scatter_rows(base.cpu(), rows.cpu(), index.cpu())
    assert_bits_equal(scatter_rows(base, rows, index), expect, "out")
    for o, e, name in zip(
        BACKWARD(base, index), backward_expect(base, index), ("grad_base", "grad_rows")
    ):
        assert_bits_equal(o, e, name)


# ---- extreme sizes (a subprocess: a crash fails this test, not the run) ------------------------

_EXTREMES = """
import torch, mixops
from mixops.ops import scatter_rows
bw = torch.ops.mixops.scatter_rows_backward.default
i32 = torch.int32
# The most rows allowed (2^31 - 2) with empty rows: right shapes on CPU and meta, forward and
# backward (on the CPU the index names small rows: its inverse map has 1 + max(index) entries).
t = 2**31 - 2
for dev, values in (("cpu", [5, -1, 0]), ("meta", [t - 1, -1, 0])):
    base = torch.zeros(1, 0, device=dev).expand(t, 0)
    index = torch.tensor(values, dtype=i32, device=dev)
    out = scatter_rows(base, torch.zeros(3, 0, device=dev), index)
    assert out.shape == (t, 0), (dev, out.shape)
    gb, gr = bw(base, index)
    assert gb.shape == (t, 0) and gr.shape == (3, 0), (dev, gb.shape, gr.shape)
# sizes only on meta: a full-width output of 2^31 - 2 rows
index = torch.tensor([t - 1, -1, 0], dtype=i32, device="meta")
out = scatter_rows(torch.zeros(1, 8, device="meta").expand(t, 8), torch.zeros(3, 8, device="meta"),
                   index)
assert out.shape == (t, 8), out.shape
# a bad value raises on CPU for a huge (expanded) base too (a negative one: a value near 2^31
# would size the CPU's inverse map, 4 bytes a row, before the range check)
try:
    bad = torch.tensor([0, -2], dtype=i32)
    scatter_rows(torch.zeros(1, 0).expand(t, 0), torch.zeros(2, 0), bad)
    raise AssertionError("index -2 was accepted")
except RuntimeError as e:
    assert "index values must be in [-1, num_rows = 2147483646), got index[1] = -2" in str(e), e
# 2^31 - 1 rows and more: refused from metadata alone (index is int32), forward and backward
for n in (2**31 - 1, 2**31 + 7, 2**62, 2**63 - 1):
    for dev in ("cpu", "meta"):
        base = torch.zeros(1, 1, device=dev).expand(n, 1)
        index = torch.tensor([0, -1], dtype=i32, device=dev)
        for name, call in (
            ("fwd", lambda: scatter_rows(base, torch.zeros(2, 1, device=dev), index)),
            ("bwd", lambda: bw(base, index)),
        ):
            try:
                call()
                raise AssertionError(f"{name}: {n} rows on {dev}")
            except RuntimeError as e:
                assert f"the number of rows ({n}) must be < 2^31 - 1" in str(e), (name, n, dev, e)
# a byte count past 2^63 is torch's "overflowed" error on CPU and meta, never a wrapped size
for h in (2**61, 2**62 - 1):
    for dev in ("cpu", "meta"):
        base = torch.zeros(1, 1, device=dev).expand(2, h)
        index = torch.tensor([0], dtype=i32, device=dev)
        for name, call in (
            ("fwd", lambda: scatter_rows(base, torch.zeros(1, 1, device=dev).expand(1, h), index)),
            ("bwd", lambda: bw(base, index)),
        ):
            try:
                call()
                raise AssertionError(f"{name}: 2 x {h} floats on {dev}")
            except RuntimeError as e:
                assert "overflow" in str(e), (name, h, dev, e)
print("ok")
"""


def test_extreme_sizes():
    run_script_ok(_EXTREMES)
