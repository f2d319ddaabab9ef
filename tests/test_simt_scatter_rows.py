"""scatter_rows / scatter_rows_backward: our real CUDA launch code and kernels (csrc/permute/rows.cu,
rows_kernel.cuh, and the row -> i scatter of unpermute.cu) run on the CPU under the SIMT harness
(tests/simt), each call under the four harness runs (schedules x poison bytes,
tests/simt_driver.py), bit-equal with the CPU op on the same inputs (both are pure copies; the
inputs are random bits, NaN payloads included).

Covered: every copy unit (16/8/4/2/1 bytes, chosen by the alignment of every address, row stride
and row length), rows of several unroll steps, strided and expanded base / rows / grad, T = 0,
n = 0, H = 0, n > T (with -1 entries), every row written, and the device error bits: out-of-range
index values (treated as -1) and rows two entries of index name (the forward keeps the last entry,
the scatter's atomicMax; grad_rows gives every such entry its row's gradient).
"""

import ctypes
import itertools

import pytest
import torch

from simt_driver import (
    DTYPE_CODE,
    FILLS,
    Bytes,
    addr,
    bits_equal,
    call,
    load_driver,
    poisoned,
    requires_cxx,
    run_all,
)

pytestmark = requires_cxx

KROW_MAP_OUT_OF_RANGE, KROW_MAP_DUPLICATE = 2, 4  # permute.h PermuteError
c_i64, c_int, vp = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
_HEAD = [c_int, c_i64, c_i64, c_i64]  # dtype, T, n, H
_lib = None


def lib():
    global _lib
    if _lib is None:
        so = load_driver("rows")
        # base, base_stride, rows, rows_stride, index, out, error_flag, paths
        so.simt_scatter_rows.argtypes = _HEAD + [vp, c_i64, vp, c_i64, vp, vp, vp, vp]
        # grad, grad_stride, index, grad_base, grad_rows, error_flag, paths
        so.simt_scatter_rows_backward.argtypes = _HEAD + [vp, c_i64, vp, vp, vp, vp, vp]
        # a, a_stride, b, b_stride, map, dst, error_flag, paths (dtype, dst_rows, a_rows, H)
        so.simt_select_rows.argtypes = _HEAD + [vp, c_i64, vp, c_i64, vp, vp, vp, vp]
        _lib = so
    return _lib


def rows_view(t):
    """cuda.cpp's rows_view: a unit column stride is kept, else a contiguous copy."""
    return t if t.stride(1) == 1 else t.contiguous()


def simt_scatter_rows(base, rows, index, misalign=(0, 0)):
    """scatter_rows through the driver, as cuda.cpp calls it (base and rows keep their row
    strides, at misalign[0] / misalign[1] bytes off 16-byte alignment; out is a fresh contiguous
    tensor). Returns (out, error_flag, paths)."""
    base, rows, index = rows_view(base), rows_view(rows), index.contiguous()
    t, h = base.shape
    n = index.shape[0]
    src_base, src_rows = Bytes(base, misalign[0]), Bytes(rows, misalign[1])
    fills = itertools.cycle(FILLS)

    def make():
        return [
            poisoned(next(fills), (t, h), base.dtype),
            torch.zeros(1, dtype=torch.int32),
            torch.zeros(2, dtype=torch.int32),
        ]

    def launch(o, run):
        call(
            lib().simt_scatter_rows,
            DTYPE_CODE[base.dtype],
            t,
            n,
            h,
            src_base.ptr,
            base.stride(0),
            src_rows.ptr,
            rows.stride(0),
            addr(index),
            addr(o[0]),
            addr(o[1]),
            addr(o[2]),
            run=run,
        )

    return run_all(make, launch)


def simt_scatter_rows_backward(grad, index, misalign=0):
    """scatter_rows_backward through the driver (grad keeps its row stride). Returns
    (grad_base, grad_rows, error_flag, paths)."""
    grad, index = rows_view(grad), index.contiguous()
    t, h = grad.shape
    n = index.shape[0]
    src = Bytes(grad, misalign)
    fills = itertools.cycle(FILLS)

    def make():
        fill = next(fills)
        return [
            poisoned(fill, (t, h), grad.dtype),
            poisoned(fill, (n, h), grad.dtype),
            torch.zeros(1, dtype=torch.int32),
            torch.zeros(3, dtype=torch.int32),
        ]

    def launch(o, run):
        call(
            lib().simt_scatter_rows_backward,
            DTYPE_CODE[grad.dtype],
            t,
            n,
            h,
            src.ptr,
            grad.stride(0),
            addr(index),
            addr(o[0]),
            addr(o[1]),
            addr(o[2]),
            addr(o[3]),
            run=run,
        )

    return run_all(make, launch)


def bits(rows, cols, dtype):
    """Random bits of dtype (every pattern: NaN payloads, infinities, -0, subnormals)."""
    es = torch.empty(0, dtype=dtype).element_size()
    if cols == 0:
        return torch.empty(rows, 0, dtype=dtype)
    return torch.randint(0, 256, (rows, cols * es), dtype=torch.uint8).view(dtype)


def make_index(t, n, none_frac=0.3):
    """index [n]: distinct rows of [0, t) and -1 (about none_frac of the entries, and every entry
    past the t-th)."""
    vals = torch.full((n,), -1, dtype=torch.int32)
    m = min(n, t)
    vals[:m] = torch.randperm(t)[:m].int()
    vals[:m][torch.rand(m) < none_frac] = -1
    return vals[torch.randperm(n)]


def unit_of(es, hidden, strides, misaligns=()):
    """The copy unit rows.cu picks: the widest of 16/8/4/2/1 bytes dividing the row length, every
    row stride (bytes) and every address (misaligned by the given bytes)."""
    sizes = [hidden * es] + [s * es for s in strides] + list(misaligns)
    return next(u for u in (16, 8, 4, 2, 1) if all(x % u == 0 for x in sizes))


def check_forward(base, rows, index, *, flag=0, clean=None, unit=None, **kw):
    out, err, paths = simt_scatter_rows(base, rows, index, **kw)
    expect = torch.ops.mixops.scatter_rows(base, rows, index if clean is None else clean)
    bits_equal(out, expect, "out")
    assert err.item() == flag, f"error flag {err.item():#x}, expected {flag:#x}"
    t, n = base.shape[0], index.shape[0]
    if unit is None:
        strides = [rows_view(base).stride(0), rows_view(rows).stride(0)]
        unit = unit_of(base.element_size(), base.shape[1], strides, kw.get("misalign", ()))
    assert paths.tolist() == [unit if t > 0 else 0, int(n > 0)], "paths: [unit, scatter ran]"


def check_backward(grad, index, *, flag=0, clean=None, dup_rows=(), unit=None, **kw):
    """dup_rows: entries of index that repeat a row a later entry names (clean has -1 there):
    grad_rows gives them the row's gradient all the same (select_rows reads index itself)."""
    grad_base, grad_rows, err, paths = simt_scatter_rows_backward(grad, index, **kw)
    eb, er = torch.ops.mixops.scatter_rows_backward(grad, index if clean is None else clean)
    for i in dup_rows:
        er[i] = grad[index[i]]
    bits_equal(grad_base, eb, "grad_base")
    bits_equal(grad_rows, er, "grad_rows")
    assert err.item() == flag, f"error flag {err.item():#x}, expected {flag:#x}"
    t, n = grad.shape[0], index.shape[0]
    if unit is None:
        strides = [rows_view(grad).stride(0)]
        unit = unit_of(grad.element_size(), grad.shape[1], strides, [kw.get("misalign", 0)])
    expect = [unit if t > 0 else 0, int(n > 0), unit if n > 0 else 0]
    assert paths.tolist() == expect, "paths: [grad_base's unit, scatter ran, grad_rows' unit]"


# (T, n, H, fraction of -1 entries): T = 0 (n = 0, and n > 0 all -1), n = 0, every row written,
# n > T, H = 0, row lengths that are no multiple of 16 bytes (3, 5, 6: narrower units), and rows
# of more than 32 * kUnroll units (600; 301 in 2-byte units).
CASES = [
    (0, 0, 8, 0.0),
    (0, 3, 8, 0.0),
    (5, 0, 8, 0.0),
    (7, 7, 8, 0.0),
    (13, 6, 8, 0.3),
    (6, 10, 4, 0.2),
    (9, 4, 0, 0.2),
    (11, 5, 3, 0.3),
    (10, 4, 5, 0.0),
    (12, 12, 6, 0.3),
    (17, 9, 600, 0.2),
    (9, 5, 301, 0.2),
]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", list(DTYPE_CODE), ids=str)
def test_scatter_rows(case, dtype):
    t, n, h, none_frac = case
    check_forward(bits(t, h, dtype), bits(n, h, dtype), make_index(t, n, none_frac))


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", list(DTYPE_CODE), ids=str)
def test_scatter_rows_backward(case, dtype):
    t, n, h, none_frac = case
    check_backward(bits(t, h, dtype), make_index(t, n, none_frac))


def test_every_row_written_is_rows_permuted():
    """n = T, no -1: out is rows permuted (nothing of base left) and grad_base is zero."""
    t, h = 9, 4
    index = torch.randperm(t).int()
    base, rows = bits(t, h, torch.float32), bits(t, h, torch.float32)
    out, err, _ = simt_scatter_rows(base, rows, index)
    bits_equal(out[index.long()], rows, "out")
    grad_base, grad_rows, err, _ = simt_scatter_rows_backward(base, index)
    assert not grad_base.view(torch.int32).any() and err.item() == 0
    bits_equal(grad_rows, base[index.long()], "grad_rows")


# (dtype, H, base row stride, rows row stride, bytes base / rows are off 16-byte alignment, unit)
UNIT_CASES = [
    (torch.float32, 8, None, None, 0, 0, 16),
    (torch.float32, 4, None, None, 0, 0, 16),
    (torch.float32, 2, None, None, 0, 0, 8),
    (torch.float32, 8, 10, None, 0, 0, 8),
    (torch.float32, 8, None, 14, 0, 0, 8),
    (torch.float32, 3, None, None, 0, 0, 4),
    (torch.float32, 8, None, 9, 0, 0, 4),
    (torch.float32, 8, None, None, 4, 0, 4),
    (torch.float32, 8, None, None, 0, 8, 8),
    (torch.float32, 4, None, None, 0, 3, 1),
    (torch.bfloat16, 8, None, None, 0, 0, 16),
    (torch.bfloat16, 4, None, None, 0, 0, 8),
    (torch.bfloat16, 2, None, None, 0, 0, 4),
    (torch.bfloat16, 8, 12, None, 0, 0, 8),
    (torch.bfloat16, 8, None, 9, 0, 0, 2),
    (torch.bfloat16, 8, None, None, 1, 0, 1),
    (torch.float16, 5, None, None, 0, 0, 2),
    (torch.float16, 8, None, None, 2, 0, 2),
    (torch.float16, 16, 24, 20, 0, 0, 8),
    (torch.float64, 2, None, None, 0, 0, 16),
    (torch.float64, 3, None, None, 0, 0, 8),
    (torch.float64, 4, None, 5, 0, 0, 8),
    (torch.float64, 4, None, None, 0, 4, 4),
]


@pytest.mark.parametrize("dtype, h, bs, rs, mb, mr, unit", UNIT_CASES, ids=str)
def test_scatter_rows_units(dtype, h, bs, rs, mb, mr, unit):
    t, n = 15, 7
    base = bits(t, bs or h, dtype)[:, :h]
    rows = bits(n, rs or h, dtype)[:, :h]
    check_forward(base, rows, make_index(t, n), unit=unit, misalign=(mb, mr))


# (dtype, H, grad row stride, bytes grad is off 16-byte alignment, unit)
BACKWARD_UNIT_CASES = [
    (torch.float32, 8, None, 0, 16),
    (torch.float32, 6, None, 0, 8),
    (torch.float32, 8, 9, 0, 4),
    (torch.float32, 8, None, 8, 8),
    (torch.bfloat16, 8, 12, 0, 8),
    (torch.bfloat16, 3, None, 0, 2),
    (torch.float16, 8, None, 1, 1),
    (torch.float64, 1, None, 0, 8),
    (torch.float64, 4, None, 0, 16),
]


@pytest.mark.parametrize("dtype, h, gs, mis, unit", BACKWARD_UNIT_CASES, ids=str)
def test_scatter_rows_backward_units(dtype, h, gs, mis, unit):
    t, n = 14, 8
    grad = bits(t, gs or h, dtype)[:, :h]
    check_backward(grad, make_index(t, n), unit=unit, misalign=mis)


@pytest.mark.parametrize("dtype", list(DTYPE_CODE), ids=str)
def test_strided(dtype):
    """Row strides above H, an expanded rows (row stride 0), a transposed operand (column stride
    not 1: cuda.cpp copies it) and an expanded grad."""
    t, n, h = 14, 6, 6
    index = make_index(t, n)
    base = bits(t, h + 3, dtype)[:, 1 : h + 1]
    rows = bits(n, 2 * h + 1, dtype)[:, h + 1 :]
    check_forward(base, rows, index)
    check_forward(base, bits(1, h, dtype).expand(n, h), index)
    check_forward(bits(h, t, dtype).t(), rows, index)
    check_backward(base, index)
    check_backward(bits(1, h, dtype).expand(t, h), index)
    check_backward(bits(h, t, dtype).t(), index)


def corrupt(index, t, *, out_of_range=False, duplicate=False):
    """index with bad entries, the index the CUDA result matches on the CPU (bad entries -1: an
    out-of-range value, and each entry a later one repeats), the repeated entries, and the
    error flag expected."""
    bad, clean, dups, flag = index.clone(), index.clone(), [], 0
    if out_of_range:
        for i, v in [(0, t), (2, -7), (5, 2**30), (7, -(2**31))]:
            bad[i], clean[i] = v, -1
        flag |= KROW_MAP_OUT_OF_RANGE
    if duplicate:
        # three entries name row r (one of them held r before, if any did); the last is kept
        r = int(index[1]) if int(index[1]) >= 0 else 0
        for i in (1, 4, 9):
            bad[i] = clean[i] = r
        owners = (clean == r).nonzero().view(-1).tolist()
        for i in owners[:-1]:
            clean[i] = -1
        dups = owners[:-1]
        flag |= KROW_MAP_DUPLICATE
    return bad, clean, dups, flag


@pytest.mark.parametrize("kind", ["out_of_range", "duplicate", "both"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bad_values(kind, dtype):
    """CPU raises; CUDA counts out-of-range values as -1 and keeps the last entry of those that
    repeat a row (atomicMax in the scatter), flagging each kind."""
    t, n, h = 16, 12, 5
    bad, clean, dups, flag = corrupt(
        make_index(t, n, 0.2),
        t,
        out_of_range=kind in ("out_of_range", "both"),
        duplicate=kind in ("duplicate", "both"),
    )
    base, rows = bits(t, h, dtype), bits(n, h, dtype)
    with pytest.raises(RuntimeError, match="index"):
        torch.ops.mixops.scatter_rows(base, rows, bad)
    with pytest.raises(RuntimeError, match="index"):
        torch.ops.mixops.scatter_rows_backward(base, bad)
    check_forward(base, rows, bad, flag=flag, clean=clean)
    check_backward(base, bad, flag=flag, clean=clean, dup_rows=dups)


def test_bad_values_edges():
    """T = 0: every value >= 0 is out of range (flagged by the scatter alone); H = 0: nothing
    copied, the values still checked; the same row out of range twice is no duplicate."""
    none = torch.full((4,), -1, dtype=torch.int32)
    index = torch.tensor([-1, 0, 3, -1], dtype=torch.int32)
    empty = torch.zeros(0, 4)
    check_forward(empty, bits(4, 4, torch.float32), index, flag=KROW_MAP_OUT_OF_RANGE, clean=none)
    check_backward(empty, index, flag=KROW_MAP_OUT_OF_RANGE, clean=none)
    t = 6
    bad = torch.tensor([2, 9, 2, -1, -3], dtype=torch.int32)
    clean = torch.tensor([-1, -1, 2, -1, -1], dtype=torch.int32)
    flag = KROW_MAP_OUT_OF_RANGE | KROW_MAP_DUPLICATE
    check_forward(torch.zeros(t, 0), torch.zeros(5, 0), bad, flag=flag, clean=clean)
    check_backward(torch.zeros(t, 0), bad, flag=flag, clean=clean, dup_rows=[0])
    twice = torch.tensor([t, 1, t], dtype=torch.int32)
    clean = torch.tensor([-1, 1, -1], dtype=torch.int32)
    base = bits(t, 4, torch.float16)
    check_forward(base, bits(3, 4, torch.float16), twice, flag=KROW_MAP_OUT_OF_RANGE, clean=clean)
    check_backward(base, twice, flag=KROW_MAP_OUT_OF_RANGE, clean=clean)


def simt_select_rows(a, b, row_map, a_rows, hidden, dtype):
    """select_rows_launch alone (a, b nullable, any row strides). Returns (dst, flag, paths)."""
    dst_rows = row_map.shape[0]
    src_a = None if a is None else Bytes(a)
    src_b = None if b is None else Bytes(b)
    fills = itertools.cycle(FILLS)

    def make():
        return [
            poisoned(next(fills), (dst_rows, hidden), dtype),
            torch.zeros(1, dtype=torch.int32),
            torch.zeros(1, dtype=torch.int32),
        ]

    def launch(o, run):
        call(
            lib().simt_select_rows,
            DTYPE_CODE[dtype],
            dst_rows,
            a_rows,
            hidden,
            None if a is None else src_a.ptr,
            0 if a is None else a.stride(0),
            None if b is None else src_b.ptr,
            0 if b is None else b.stride(0),
            addr(row_map),
            addr(o[0]),
            addr(o[1]),
            addr(o[2]),
            run=run,
        )

    return run_all(make, launch)


@pytest.mark.parametrize(
    "has_a, has_b", [(True, True), (True, False), (False, True), (False, False)]
)
def test_select_rows_contract(has_a, has_b):
    """launch.h's select_rows_launch on its own: dst[r] = a[map[r]] for map[r] in [0, a_rows),
    else b[r] (zeros for a null a or b); repeated map values are a plain gather; values outside
    [-1, a_rows) count as -1 and set kRowMapOutOfRange, by this kernel alone."""
    dtype, a_rows, h, dst_rows = torch.bfloat16, 7, 12, 11
    a = bits(a_rows, h + 4, dtype)[:, 2 : h + 2] if has_a else None
    b = bits(dst_rows, h, dtype) if has_b else None
    row_map = torch.tensor([3, -1, 3, 0, 6, 7, -2, 2**31 - 1, 6, -1, 1], dtype=torch.int32)
    dst, err, paths = simt_select_rows(a, b, row_map, a_rows, h, dtype)
    expect = torch.zeros(dst_rows, h, dtype=dtype)
    for r, m in enumerate(row_map.tolist()):
        if 0 <= m < a_rows:
            expect[r] = a[m] if has_a else 0
        elif has_b:
            expect[r] = b[r]
    bits_equal(dst, expect, "dst")
    assert err.item() == KROW_MAP_OUT_OF_RANGE
    assert paths.item() == 8  # rows of 24 bytes, a's row stride 32 bytes
    ok = row_map.clone()
    ok[(row_map < -1) | (row_map >= a_rows)] = -1
    _, err, _ = simt_select_rows(a, b, ok, a_rows, h, dtype)
    assert err.item() == 0


@pytest.mark.large
@pytest.mark.parametrize(
    "t, n, h", [(700, 300, 64), (257, 257, 100), (1500, 40, 3), (90, 200, 520)]
)
@pytest.mark.parametrize("dtype", list(DTYPE_CODE), ids=str)
def test_large(t, n, h, dtype):
    index = make_index(t, n, 0.1)
    base = bits(t, h + 2, dtype)[:, :h]
    check_forward(base, bits(n, h, dtype), index)
    check_backward(base, index)
