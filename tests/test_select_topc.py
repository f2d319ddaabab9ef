"""select_topc (csrc/routing/topc.h): the c best eligible entries per row in ascending index order,
against an independent plain-PyTorch reference; ties, NaN, ±inf, ±0, masks with short rows, c = 0,
c = n, batch 0; gradients (fp64 gradcheck and the scatter rule), opcheck, torch.compile with
dynamic shapes, and every bad input with its message. CUDA cases run where a GPU is present.
"""

import subprocess
import sys

import pytest
import torch

from conftest import DEVICES
from helpers import opcheck
from mixops.ops import select_topc

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
OP = torch.ops.mixops.select_topc.default


def reference(scores, c, mask=None):
    """Independent of the op: a stable sort by (NaN last, -score) per row in float64, ineligible
    entries removed, the first c positions sorted ascending; short rows padded with -1 / -inf."""
    b, n = scores.shape
    values = torch.full((b, c), float("-inf"), dtype=scores.dtype)
    indices = torch.full((b, c), -1, dtype=torch.int64)
    x = scores.detach().cpu().double()
    for r in range(b):
        pos = torch.arange(n) if mask is None else mask[r].cpu().nonzero().flatten()
        v = x[r, pos]
        nan = v.isnan()
        key = torch.where(nan, torch.zeros_like(v), -v)  # -0.0 + 0 == 0: ±0 tie
        # Stable sorts: by -score (NaN anywhere), then NaN last; equal keys keep index order.
        order = torch.sort(key, stable=True).indices
        order = order[torch.sort(nan[order].to(torch.int8), stable=True).indices]
        chosen = torch.sort(pos[order[:c]]).values
        k = chosen.numel()
        indices[r, :k] = chosen
        values[r, :k] = scores[r, chosen].cpu()
    return values, indices


def check(scores, c, mask=None, what=""):
    values, indices = select_topc(scores, c, mask)
    ref_v, ref_i = reference(scores, c, mask)
    assert values.dtype == scores.dtype and indices.dtype == torch.int64, what
    assert values.device == scores.device and indices.device == scores.device, what
    assert torch.equal(indices.cpu(), ref_i), f"{what}: indices\n{indices}\n{ref_i}"
    # The same bits (NaN as a class: the reference copies them too).
    assert torch.equal(values.cpu().isnan(), ref_v.isnan()), what
    ok = ~ref_v.isnan()
    assert torch.equal(values.cpu()[ok], ref_v[ok]), f"{what}: values"
    return values, indices


def _scores(b, n, dtype, device, ties=False):
    x = torch.randint(-3, 4, (b, n)).double() if ties else torch.randn(b, n, dtype=torch.float64)
    return x.to(dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape", [(1, 1, 1), (3, 8, 0), (4, 9, 9), (5, 40, 7), (3, 50, 16), (3, 50, 17), (2, 300, 123)]
)
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_against_reference(device, dtype, shape, ties):
    b, n, c = shape
    check(_scores(b, n, dtype, device, ties), c, what=f"{dtype} {shape}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masks_with_short_rows(device, dtype):
    b, n, c = 6, 30, 8
    x = _scores(b, n, dtype, device, ties=True)
    mask = torch.rand(b, n) < 0.5
    mask[0] = False  # nothing eligible: all -1 / -inf
    mask[1] = False
    mask[1, [2, 11, 29]] = True  # 3 < c eligible: those three, then padding
    mask[2] = False
    mask[2, 5 : 5 + c] = True  # exactly c
    mask[3] = True
    values, indices = check(x, c, mask.to(device), f"{dtype} masks")
    assert (indices[0] == -1).all() and (values[0] == float("-inf")).all()
    assert indices[1].tolist() == [2, 11, 29] + [-1] * (c - 3)
    assert indices[2].tolist() == list(range(5, 5 + c))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_inf_signed_zero(device, dtype):
    nan, inf = float("nan"), float("inf")
    x = torch.tensor(
        [
            [nan, 1.0, -inf, inf, 0.0, -0.0, nan, 1.0],
            [-0.0, 0.0, -0.0, nan, -inf, -inf, 2.0, nan],
            [nan] * 8,
            [-inf] * 8,
        ]
    ).to(dtype)
    for c in range(9):
        check(x.to(device), c, what=f"{dtype} specials c={c}")
    # Spot checks of the order: inf first, then the tied 1.0s, then ±0 (a tie), -inf, NaN last.
    _, idx = select_topc(x.to(device), 5)
    assert idx[0].tolist() == [1, 3, 4, 5, 7]
    assert idx[1].tolist() == [0, 1, 2, 4, 6]  # 2.0, the three zeros, then -inf over NaN
    assert idx[2].tolist() == [0, 1, 2, 3, 4]  # all NaN: the lowest positions


@pytest.mark.parametrize("device", DEVICES)
def test_edge_shapes(device):
    for b, n, c in [(0, 5, 3), (0, 0, 0), (3, 0, 0), (2, 5, 0)]:
        v, i = select_topc(torch.randn(b, n, device=device), c)
        assert v.shape == (b, c) and i.shape == (b, c)
    x = torch.randn(3, 6, device=device)
    v, i = select_topc(x, 6)  # c = n: every position, in order
    assert torch.equal(i.cpu(), torch.arange(6).expand(3, 6)) and torch.equal(v, x)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    base = torch.randn(12, 7, device=device)
    x = base.t()  # [7, 12], column stride 7
    mask = (torch.rand(12, 7, device=device) < 0.6).t()
    check(x, 5, mask, "transposed")


# ---- gradients -------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    x = torch.randn(4, 9, dtype=torch.float64, device=device, requires_grad=True)
    mask = torch.rand(4, 9, device=device) < 0.6
    mask[0] = False
    mask[0, :2] = True  # a short row: its padding gets no gradient

    def f(s):  # the -inf padding of the short row zeroed, so finite differences are finite
        values, indices = select_topc(s, 3, mask)
        return values.masked_fill(indices < 0, 0.0)

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradient_is_a_scatter(device, dtype):
    x = torch.randn(5, 20, device=device).to(dtype).requires_grad_(True)
    mask = torch.rand(5, 20, device=device) < 0.3
    values, indices = select_topc(x, 6, mask)
    g = torch.randn_like(values)
    (grad,) = torch.autograd.grad(values, x, g)
    want = torch.zeros(5, 20, dtype=dtype)
    for r in range(5):
        for j in range(6):
            if indices[r, j] >= 0:
                want[r, indices[r, j]] = g[r, j].cpu()
    assert torch.equal(grad.cpu(), want)


# ---- opcheck and compile --------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, masked, requires_grad):
    x = torch.randn(4, 10, device=device, requires_grad=requires_grad)
    mask = (torch.rand(4, 10, device=device) < 0.4) if masked else None
    opcheck(OP, (x, 3, mask))
    opcheck(OP, (x, 10, mask))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_dynamic(device):
    def f(x, mask):
        values, indices = select_topc(x, 4, mask)
        return torch.sigmoid(values), indices

    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
    for b, n in [(3, 10), (5, 17), (2, 33)]:
        x = torch.randn(b, n, device=device, requires_grad=True)
        mask = torch.rand(b, n, device=device) < 0.5
        out, idx = compiled(x, mask)
        ref, ref_idx = f(x, mask)
        assert torch.equal(idx, ref_idx) and torch.equal(out, ref)
        (g,) = torch.autograd.grad(out.sum(), x)
        (ref_g,) = torch.autograd.grad(ref.sum(), x)
        assert torch.equal(g, ref_g)


# ---- bad input ------------------------------------------------------------------------------


def _big(*shape, dtype=torch.float32):
    return torch.zeros([1] * len(shape), dtype=dtype).expand(*shape)


BAD = [
    (lambda: OP(torch.randn(8), 2), r"scores must be 2-D \[batch, n\], got shape \[8\]"),
    (lambda: OP(torch.randn(2, 3, 4), 2), r"scores must be 2-D"),
    (lambda: OP(torch.ones(2, 8, dtype=torch.int32), 2), r"float64, got Int"),
    (lambda: OP(torch.ones(2, 8, dtype=torch.bool), 2), r"float64, got Bool"),
    (lambda: OP(torch.randn(2, 8), 9), r"c must be in \[0, n = 8\], got c = 9"),
    (lambda: OP(torch.randn(2, 8), -1), r"c must be in \[0, n = 8\], got c = -1"),
    (lambda: OP(torch.randn(2, 8), 2**31), r"c must be in \[0, n = 8\], got c = 2147483648"),
    (lambda: OP(torch.randn(2, 8), 2, torch.ones(2, 8)), r"mask must be bool, got Float"),
    (
        lambda: OP(torch.randn(2, 8), 2, torch.ones(2, 7, dtype=torch.bool)),
        r"mask must have the shape of scores \[batch, n\] = \[2, 8\], got \[2, 7\]",
    ),
    (lambda: OP(torch.randn(2, 8), 2, torch.ones(8, dtype=torch.bool)), r"got \[8\]"),
    (
        lambda: OP(_big(1, 2**31), 1),
        r"scores must have n <= 2\^31 - 1 columns .*got shape \[1, 2147483648\]",
    ),
]


@pytest.mark.parametrize("make, match", BAD, ids=[b[1][:40] for b in BAD])
def test_bad_input(make, match):
    with pytest.raises(RuntimeError, match="select_topc: .*" + match):
        make()


def test_bad_mask_device():
    with pytest.raises(RuntimeError, match=r"mask must be on the same device as scores \(cpu\)"):
        torch.ops.mixops.select_topc.default.redispatch(
            torch._C.DispatchKeySet(torch._C.DispatchKey.CPU),
            torch.randn(2, 8),
            2,
            torch.ones(2, 8, dtype=torch.bool, device="meta"),
        )


def test_c_near_int32_limit_in_subprocess():
    # n = 2^31 - 1 with c = n: allowed by the checks; the fake gives the shapes without memory.
    code = (
        "import torch, mixops\n"
        "x = torch.empty(2, 2**31 - 1, device='meta')\n"
        "v, i = torch.ops.mixops.select_topc(x, 2**31 - 1)\n"
        "assert v.shape == (2, 2**31 - 1) and i.dtype == torch.int64\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.large
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n, c", [(32768, 1), (32768, 4096), (32768, 32768), (5000, 2500)])
def test_large_rows(device, n, c):
    x = _scores(3, n, torch.float32, device, ties=True)
    mask = torch.rand(3, n, device=device) < 0.9
    check(x, c, mask, f"n={n} c={c}")
