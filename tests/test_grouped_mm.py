"""grouped_mm values and gradients against the per-expert reference, torch._grouped_mm, edge cases.

Low-precision results follow the shared rule in helpers.assert_close_to_ref.
"""

import pytest
import torch

import mixops
import mixops.reference as ref
from conftest import DEVICES
from grouped_mm_cases import KN, SIZES, make_case, offsets_of
from helpers import assert_close_to_ref, opcheck

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _check_values(a, b, off, what):
    out = mixops.grouped_mm(a, b, off)
    hi = ref.grouped_mm(a.double().cpu(), b.double().cpu(), off.cpu())
    lowp = ref.grouped_mm(a, b, off)
    assert_close_to_ref(out, hi, lowp, what)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["3d", "2d"])
@pytest.mark.parametrize("sizes", list(SIZES))
@pytest.mark.parametrize("kn", list(KN))
def test_values(device, dtype, mode, sizes, kn):
    a, b, off = make_case(
        mode, sizes, kn, dtype, device, a_layout="contiguous" if mode == "3d" else "transposed"
    )
    out = _check_values(a, b, off, f"{mode}/{sizes}/{kn}")
    # Explicit zeros: rows past offsets[-1] (3d) and blocks of empty groups (2d).
    ends = off.tolist()
    if mode == "3d":
        assert torch.all(out[ends[-1] :] == 0) if ends else torch.all(out == 0)
    else:
        starts = [0] + ends[:-1]
        for g, (s, e) in enumerate(zip(starts, ends)):
            if e == s:
                assert torch.all(out[g] == 0), f"empty group {g} is not a zero block"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", ["3d", "2d"])
@pytest.mark.parametrize("a_layout", ["contiguous", "strided", "transposed"])
@pytest.mark.parametrize("b_layout", ["kn", "nk"])
def test_layouts(device, dtype, mode, a_layout, b_layout):
    for kn in KN:
        a, b, off = make_case(mode, "empty_groups", kn, dtype, device, a_layout, b_layout)
        _check_values(a, b, off, f"{mode}/{a_layout}/{b_layout}/{kn}")


def _grads(fn, a, b, off, grad_out):
    a = a.detach().requires_grad_(True)
    b = b.detach().requires_grad_(True)
    fn(a, b, off).backward(grad_out)
    return a.grad, b.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["3d", "2d"])
@pytest.mark.parametrize("b_layout", ["kn", "nk"])
@pytest.mark.parametrize("sizes", ["balanced", "empty_groups", "tail_rows"])
def test_gradients(device, dtype, mode, b_layout, sizes):
    a, b, off = make_case(mode, sizes, "odd", dtype, device, "contiguous", b_layout)
    out_shape = mixops.grouped_mm(a, b, off).shape
    g = torch.randn(out_shape, dtype=dtype, device=device)
    ga, gb = _grads(mixops.grouped_mm, a, b, off, g)
    ga_hi, gb_hi = _grads(
        ref.grouped_mm, a.double().cpu(), b.double().cpu(), off.cpu(), g.double().cpu()
    )
    ga_lo, gb_lo = _grads(ref.grouped_mm, a, b, off, g)
    assert_close_to_ref(ga, ga_hi, ga_lo, "grad a")
    assert_close_to_ref(gb, gb_hi, gb_lo, "grad b")
    if mode == "3d":
        # The weight gradient is produced in the weight's own storage layout (autograd.grad, so
        # AccumulateGrad's restriding cannot hide a transpose copy).
        a_, b_ = a.detach().requires_grad_(), b.detach().requires_grad_()
        (gb_raw,) = torch.autograd.grad(mixops.grouped_mm(a_, b_, off), (b_,), g)
        assert gb_raw.stride() == b.stride()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", ["3d", "2d"])
def test_against_torch_grouped_mm(device, dtype, mode):
    """Same values and gradients as torch._grouped_mm where torch supports the shapes."""
    a, b, off = make_case(mode, "aligned_groups", "aligned", dtype, device)
    out = mixops.grouped_mm(a, b, off)
    theirs = torch._grouped_mm(a, b, offs=off)
    hi = ref.grouped_mm(a.double().cpu(), b.double().cpu(), off.cpu())
    assert_close_to_ref(out, hi, theirs, "vs torch._grouped_mm")
    g = torch.randn_like(out)
    ga, gb = _grads(mixops.grouped_mm, a, b, off, g)
    ta, tb = _grads(lambda x, y, o: torch._grouped_mm(x, y, offs=o), a, b, off, g)
    ha, hb = _grads(ref.grouped_mm, a.double().cpu(), b.double().cpu(), off.cpu(), g.double().cpu())
    assert_close_to_ref(ga, ha, ta, "grad a vs torch._grouped_mm")
    assert_close_to_ref(gb, hb, tb, "grad b vs torch._grouped_mm")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["3d", "2d"])
@pytest.mark.parametrize("b_layout", ["kn", "nk"])
def test_gradcheck_fp64(device, mode, b_layout):
    a, b, off = make_case(
        mode, "empty_groups", "odd", torch.float64, device, "contiguous", b_layout
    )
    a = a[:, :5].contiguous() if mode == "3d" else a[:4].contiguous()
    if mode == "3d":
        b = b[:, :5]
    a.requires_grad_(True)
    b.requires_grad_(True)
    assert torch.autograd.gradcheck(mixops.grouped_mm, (a, b, off))
    assert torch.autograd.gradgradcheck(mixops.grouped_mm, (a, b, off))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["3d", "2d"])
@pytest.mark.parametrize("b_layout", ["kn", "nk"])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, mode, b_layout, requires_grad):
    a, b, off = make_case(
        mode, "empty_groups", "odd", torch.float32, device, "contiguous", b_layout
    )
    a.requires_grad_(requires_grad)
    b.requires_grad_(requires_grad)
    opcheck(torch.ops.mixops.grouped_mm.default, (a, b, off))


@pytest.mark.parametrize("device", DEVICES)
def test_zero_rows_and_empty_k(device):
    # m = 0
    out = mixops.grouped_mm(
        torch.randn(0, 8, device=device),
        torch.randn(3, 8, 4, device=device),
        torch.zeros(3, dtype=torch.int32, device=device),
    )
    assert out.shape == (0, 4)
    # k = 0 in the 3d mode: empty sums are zero
    off = offsets_of([2, 1], device)
    out = mixops.grouped_mm(
        torch.randn(3, 0, device=device), torch.randn(2, 0, 4, device=device), off
    )
    assert out.shape == (3, 4) and torch.all(out == 0)
    # 2d mode, every group empty: all blocks zero
    off = torch.zeros(4, dtype=torch.int32, device=device)
    out = mixops.grouped_mm(torch.randn(3, 0, device=device), torch.randn(0, 5, device=device), off)
    assert out.shape == (4, 3, 5) and torch.all(out == 0)


def test_skewed_groups_cpu_schedule():
    """A group holding most rows (runs with BLAS threading) beside many small ones (LPT)."""
    sizes = [900, 1, 0, 30, 2, 60, 7]
    off = offsets_of(sizes, "cpu")
    a = torch.randn(sum(sizes), 64)
    b = torch.randn(len(sizes), 64, 48)
    _check_values(a, b, off, "skewed")
    a2 = torch.randn(32, sum(sizes))
    b2 = torch.randn(sum(sizes), 24)
    _check_values(a2, b2, off, "skewed 2d")


def test_torch_compile_fullgraph():
    a, b, off = make_case("3d", "empty_groups", "odd", torch.float32, "cpu")
    a.requires_grad_(True)
    b.requires_grad_(True)

    def f(x, w, o):
        return mixops.grouped_mm(x, w, o).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(a, b, off)
    ga, gb = torch.autograd.grad(loss, (a, b))
    a2, b2 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    ref_loss = ref.grouped_mm(a2, b2, off).square().sum()
    ra, rb = torch.autograd.grad(ref_loss, (a2, b2))
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ga.double(), ra, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb.double(), rb, rtol=1e-5, atol=1e-5)


@pytest.mark.large
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("seed", range(8))
def test_random_shapes_large(device, dtype, seed):
    """Random E, group sizes (with empties), k, n, layouts; run with -m large."""
    gen = torch.Generator().manual_seed(seed)
    e = int(torch.randint(1, 80, (1,), generator=gen))
    sizes = (torch.rand(e, generator=gen) ** 2 * 200).long() * (torch.rand(e, generator=gen) > 0.2)
    k, n = (int(v) for v in torch.randint(1, 300, (2,), generator=gen))
    off = offsets_of(sizes.tolist(), device)
    total = int(sizes.sum())
    a = torch.randn(total + 3, k, dtype=dtype, device=device)
    b = (
        torch.randn(e, n, k, dtype=dtype, device=device).transpose(1, 2)
        if seed % 2
        else torch.randn(e, k, n, dtype=dtype, device=device)
    )
    _check_values(a, b, off, f"3d seed={seed}")
    _check_values(
        a[:total].t(), torch.randn(total, n, dtype=dtype, device=device), off, f"2d seed={seed}"
    )
