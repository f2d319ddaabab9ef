"""rows_to_slots / slots_to_rows: our real CUDA launch code and kernels (csrc/permute/slots.cu,
slots_kernel.cuh, and the row -> slot scatter of unpermute.cu) run on the CPU under the SIMT
harness (tests/simt), each call under the four harness runs (schedules x poison bytes,
tests/simt_driver.py), bit-equal with the CPU op on the same inputs (both are pure copies).

Covered: every copy unit (16/8/4/2/1 bytes, chosen by the alignment of every address, stride and
head length), strided rows and slots (SDPA's transposed output), T = 0, k = 1, one and several
heads, empty heads, rows no slot maps to, and the device error bits: out-of-range row_map values
(treated as -1) and, in slots_to_rows, rows two slots map to (the last slot kept).
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
c_i64, c_i32, c_int, vp = ctypes.c_int64, ctypes.c_int32, ctypes.c_int, ctypes.c_void_p
_HEAD = [c_int, c_i64, c_i32, c_i64, c_i64, c_i64]  # dtype, T, k, heads, d, num_rows
_lib = None


def lib():
    global _lib
    if _lib is None:
        so = load_driver("slots")
        # rows, rows_stride, row_map, slots, slot_strides, error_flag, paths
        so.simt_rows_to_slots.argtypes = _HEAD + [vp, c_i64, vp, vp, vp, vp, vp]
        # slots, slot_strides, row_map, rows, rows_stride, error_flag, paths
        so.simt_slots_to_rows.argtypes = _HEAD + [vp, vp, vp, vp, c_i64, vp, vp]
        _lib = so
    return _lib


def strides_arg(strides):
    return (ctypes.c_int64 * 3)(*strides[:3])


def simt_rows_to_slots(rows, row_map, num_heads, misalign=0):
    """rows_to_slots through the driver, as cuda.cpp calls it (rows keep a row stride; slots are
    a fresh contiguous tensor). Returns (slots, error_flag, paths)."""
    rows = rows if rows.stride(1) == 1 else rows.contiguous()
    rm = row_map.contiguous()
    t, k = rm.shape
    d = rows.shape[1] // num_heads
    src = Bytes(rows, misalign)
    fills = itertools.cycle(FILLS)

    def make():
        return [
            poisoned(next(fills), (t, num_heads, k, d), rows.dtype),
            torch.zeros(1, dtype=torch.int32),
            torch.zeros(2, dtype=torch.int32),
        ]

    def launch(o, run):
        st = strides_arg(o[0].stride())
        call(
            lib().simt_rows_to_slots,
            DTYPE_CODE[rows.dtype],
            t,
            k,
            num_heads,
            d,
            rows.shape[0],
            src.ptr,
            rows.stride(0),
            addr(rm),
            addr(o[0]),
            st,
            addr(o[1]),
            addr(o[2]),
            run=run,
        )

    return run_all(make, launch)


def simt_slots_to_rows(slots, row_map, num_rows, misalign=0):
    """slots_to_rows through the driver (slots keep their strides when the last is 1)."""
    slots = slots if slots.stride(3) == 1 else slots.contiguous()
    rm = row_map.contiguous()
    t, num_heads, k, d = slots.shape
    src = Bytes(slots, misalign)
    fills = itertools.cycle(FILLS)

    def make():
        return [
            poisoned(next(fills), (num_rows, num_heads * d), slots.dtype),
            torch.zeros(1, dtype=torch.int32),
            torch.zeros(2, dtype=torch.int32),
        ]

    def launch(o, run):
        call(
            lib().simt_slots_to_rows,
            DTYPE_CODE[slots.dtype],
            t,
            k,
            num_heads,
            d,
            num_rows,
            src.ptr,
            strides_arg(slots.stride()),
            addr(rm),
            addr(o[0]),
            o[0].stride(0),
            addr(o[1]),
            addr(o[2]),
            run=run,
        )

    return run_all(make, launch)


def routed(t, k, e, capacity=None, extra_rows=0):
    """A row_map from the CPU permute (-1 slots; dropped ones under a capacity) and its number of
    rows (plus extra_rows no slot maps to)."""
    ids = torch.randint(0, e, (t, k))
    ids[torch.rand(t, k) < 0.1] = -1
    xs, _, row_map, _ = torch.ops.mixops.permute(torch.zeros(t, 1), ids.int(), e, capacity, None)
    return row_map, xs.shape[0] + extra_rows


def data(*shape, dtype):
    t = (torch.randn(*shape, dtype=torch.float64) * 3).to(dtype)
    if t.numel() > 8:  # specials: the kernels copy bits
        t.view(-1)[3], t.view(-1)[5], t.view(-1)[7] = float("nan"), float("-inf"), -0.0
    return t


def check_rows_to_slots(rows, row_map, num_heads, *, flag=0, clean=None, **kw):
    slots, err, paths = simt_rows_to_slots(rows, row_map, num_heads, **kw)
    expect = torch.ops.mixops.rows_to_slots(rows, row_map if clean is None else clean, num_heads)
    bits_equal(slots, expect, "slots")
    assert err.item() == flag, f"error flag {err.item():#x}, expected {flag:#x}"
    return paths.tolist()


def check_slots_to_rows(slots, row_map, num_rows, *, flag=0, clean=None, **kw):
    rows, err, paths = simt_slots_to_rows(slots, row_map, num_rows, **kw)
    expect = torch.ops.mixops.slots_to_rows(slots, row_map if clean is None else clean, num_rows)
    bits_equal(rows, expect, "rows")
    assert err.item() == flag, f"error flag {err.item():#x}, expected {flag:#x}"
    return paths.tolist()


def widest_unit(head_bytes):
    """The copy unit of contiguous, aligned operands: every stride is a multiple of d."""
    return max(u for u in (16, 8, 4, 2) if head_bytes % u == 0)


# (T, k, E, capacity, heads): T = 0, k = 1, a capacity that drops slots, heads of fewer units than
# a warp has lanes and, with 16 heads, rows of more than 32 * kUnroll units whose head length
# (3, 5 or 10 units for d = 3 or 40) does not divide 32: lanes step across heads mid-row.
CASES = [
    (0, 2, 4, None, 2),
    (1, 1, 1, None, 1),
    (23, 2, 5, None, 4),
    (19, 1, 3, None, 3),
    (30, 3, 6, 8, 2),
    (9, 2, 3, None, 16),
]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", list(DTYPE_CODE), ids=str)
@pytest.mark.parametrize("d", [8, 3, 40])
def test_rows_to_slots(case, dtype, d):
    t, k, e, capacity, heads = case
    row_map, num_rows = routed(t, k, e, capacity, extra_rows=2)
    rows = data(num_rows, heads * d, dtype=dtype)
    paths = check_rows_to_slots(rows, row_map, heads)
    assert paths == [0 if t == 0 else widest_unit(d * rows.element_size()), 0]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", list(DTYPE_CODE), ids=str)
@pytest.mark.parametrize("d", [8, 3, 40])
def test_slots_to_rows(case, dtype, d):
    t, k, e, capacity, heads = case
    row_map, num_rows = routed(t, k, e, capacity, extra_rows=3)
    slots = data(t, heads, k, d, dtype=dtype)
    paths = check_slots_to_rows(slots, row_map, num_rows)
    assert paths == [widest_unit(d * slots.element_size()), int(t * k > 0)]


# (dtype, head_dim, rows' row stride, bytes the input is off 16-byte alignment) -> the unit.
UNIT_CASES = [
    (torch.float32, 4, None, 0, 16),
    (torch.float32, 2, None, 0, 8),
    (torch.float32, 4, 10, 0, 8),
    (torch.float32, 3, None, 0, 4),
    (torch.float32, 4, None, 4, 4),
    (torch.bfloat16, 8, None, 0, 16),
    (torch.bfloat16, 4, 12, 0, 8),
    (torch.bfloat16, 2, None, 0, 4),
    (torch.float16, 5, None, 0, 2),
    (torch.float16, 8, None, 2, 2),
    (torch.float64, 2, None, 0, 16),
    (torch.float64, 3, None, 0, 8),
    (torch.bfloat16, 8, None, 1, 1),
]


@pytest.mark.parametrize("dtype, d, stride, misalign, unit", UNIT_CASES, ids=str)
def test_rows_to_slots_units(dtype, d, stride, misalign, unit):
    heads = 2
    row_map, num_rows = routed(17, 2, 4)
    full = data(num_rows, stride or heads * d, dtype=dtype)
    rows = full[:, : heads * d]
    assert check_rows_to_slots(rows, row_map, heads, misalign=misalign) == [unit, 0]


def sdpa_output_slots(batch, seq, heads, k, d, dtype):
    """SDPA's output [B, heads * k, S, d] (contiguous) as slots [B * S, heads, k, d]: a view with
    token stride d, head stride k * S * d, slot stride S * d when B == 1 (reshape copies else)."""
    o = data(batch, heads * k, seq, d, dtype=dtype)
    return o.transpose(1, 2).reshape(batch * seq, heads, k, d)


@pytest.mark.parametrize("dtype", list(DTYPE_CODE), ids=str)
@pytest.mark.parametrize("d", [8, 6])
def test_slots_to_rows_strided(dtype, d):
    heads, k, seq = 3, 2, 13
    row_map, num_rows = routed(seq, k, 4, extra_rows=1)
    slots = sdpa_output_slots(1, seq, heads, k, d, dtype)
    assert not slots.is_contiguous() and slots.stride(1) == k * seq * d
    check_slots_to_rows(slots, row_map, num_rows)
    # expanded heads (stride 0) and slots with every stride odd
    base = data(seq * k * 3 + 1, d + 1, dtype=dtype)
    expanded = base[: seq * k, :d].view(seq, 1, k, d).expand(seq, heads, k, d)
    check_slots_to_rows(expanded, row_map, num_rows)
    odd = torch.as_strided(base, (seq, heads, k, d), (2 * d + 1, 1, d + 1, 1))
    check_slots_to_rows(odd, row_map, num_rows)


@pytest.mark.parametrize("misalign, unit", [(0, 16), (8, 8), (4, 4), (2, 2), (1, 1)])
def test_slots_to_rows_units(misalign, unit):
    row_map, num_rows = routed(15, 2, 4)
    slots = data(15, 2, 2, 8, dtype=torch.float16)
    assert check_slots_to_rows(slots, row_map, num_rows, misalign=misalign) == [unit, 1]


def test_empty_heads_and_rows():
    """head_dim 0: nothing copied, row_map values still checked; num_rows 0: the scatter only."""
    row_map, num_rows = routed(9, 2, 3)
    bad = row_map.clone()
    bad[4, 1] = num_rows + 3
    clean = bad.clone()
    clean[4, 1] = -1
    rows = torch.zeros(num_rows, 0)
    assert check_rows_to_slots(rows, bad, 2, flag=KROW_MAP_OUT_OF_RANGE, clean=clean)[1] == 0
    assert check_rows_to_slots(rows, row_map, 2)[0] > 0  # ran, to check the values
    slots = torch.zeros(9, 2, 2, 0)
    assert check_slots_to_rows(slots, row_map, num_rows) == [0, 1]
    none_mapped = torch.full_like(row_map, -1)
    flag = KROW_MAP_OUT_OF_RANGE if bool((row_map >= 0).any()) else 0
    check_slots_to_rows(
        data(9, 2, 2, 4, dtype=torch.float32), row_map, 0, flag=flag, clean=none_mapped
    )


def bad_values(row_map, num_rows):
    bad = row_map.clone()
    bad[0, 0], bad[2, 1], bad[5, 0] = num_rows, -7, 2**30
    clean = bad.clone()
    clean[0, 0], clean[2, 1], clean[5, 0] = -1, -1, -1
    return bad, clean


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_to_slots_out_of_range(dtype):
    row_map, num_rows = routed(20, 2, 5)
    bad, clean = bad_values(row_map, num_rows)
    rows = data(num_rows, 16, dtype=dtype)
    with pytest.raises(RuntimeError, match="row_map values must be in"):
        torch.ops.mixops.rows_to_slots(rows, bad, 2)
    check_rows_to_slots(rows, bad, 2, flag=KROW_MAP_OUT_OF_RANGE, clean=clean)


@pytest.mark.parametrize("kind", ["out_of_range", "duplicate", "both"])
def test_slots_to_rows_bad_values(kind):
    """CPU raises; CUDA counts out-of-range values as -1 and keeps the last of the slots that
    share a row (atomicMax in the scatter), flagging each."""
    t, k, heads, d = 30, 3, 2, 4
    row_map, num_rows = routed(t, k, 6, extra_rows=2)
    bad, clean, flag = row_map.clone(), row_map.clone(), 0
    if kind in ("out_of_range", "both"):
        bad, clean = bad_values(row_map, num_rows)
        flag |= KROW_MAP_OUT_OF_RANGE
    if kind in ("duplicate", "both"):
        r = max(int(row_map[1, 0]), 0)
        bad[1, 0] = bad[20, 2] = r  # and whichever slot held row r before
        clean[1, 0], clean[20, 2] = -1, r
        owners = (clean.view(-1) == r).nonzero().view(-1).tolist()
        for i in owners[:-1]:
            clean.view(-1)[i] = -1
        flag |= KROW_MAP_DUPLICATE
    slots = data(t, heads, k, d, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="row_map"):
        torch.ops.mixops.slots_to_rows(slots, bad, num_rows)
    check_slots_to_rows(slots, bad, num_rows, flag=flag, clean=clean)


@pytest.mark.large
@pytest.mark.parametrize(
    "t, k, heads, d", [(700, 4, 8, 64), (257, 40, 2, 24), (1500, 1, 1, 3), (300, 3, 24, 20)]
)
@pytest.mark.parametrize("dtype", list(DTYPE_CODE), ids=str)
def test_large(t, k, heads, d, dtype):
    row_map, num_rows = routed(t, k, 37, capacity=max(1, t * k // 40), extra_rows=5)
    check_rows_to_slots(data(num_rows, heads * d, dtype=dtype), row_map, heads)
    slots = sdpa_output_slots(1, t, heads, k, d, dtype)
    check_slots_to_rows(slots, row_map, num_rows)
