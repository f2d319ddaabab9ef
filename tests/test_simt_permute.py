"""permute / unpermute / their backward ops: our real CUDA launch code and kernels
(csrc/permute/permute.cu, unpermute.cu) run on the CPU under the SIMT harness (tests/simt), each
call under the four harness runs (schedules x poison bytes, tests/simt_driver.py), against the CPU
op on the same inputs.

Bit-equal with the CPU op: permute's four outputs, unpermute (both sum j = 0..k-1 in fp32, fp64
for fp64, separately rounded products and adds), unpermute_backward (one rounded product per
element). unpermute_weights_backward is a dot product whose order differs by design (the CPU adds
64-column blocks, the CUDA kernel lane-strided partials and a butterfly): the tolerance rule of
helpers.py. The drivers also report which kernel paths a call took (shared or global histogram
and rank counters, the gather's vector width, the 16-byte row path), and the grid asserts it hits
each.
"""

import ctypes
import itertools
import math
import re
import shutil
import subprocess

import pytest
import torch

from helpers import assert_close_to_ref
from simt_driver import (
    DTYPE_CODE,
    FILLS,
    ROOT,
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

KIDS_OUT_OF_RANGE, KROW_MAP_OUT_OF_RANGE, KROW_MAP_DUPLICATE = 1, 2, 4  # permute.h PermuteError
CHUNK = 2048  # permute::kChunkSlots
HIST_SHARED_MAX_E, RANK_SHARED_MAX_E = 8192, 1024  # permute_kernel.cuh

c_i64, c_i32, c_int, vp = ctypes.c_int64, ctypes.c_int32, ctypes.c_int, ctypes.c_void_p


# ---------------------------------------------------------------------------------------------
# Drivers


_libs = {}


def lib(name):
    if name not in _libs:
        so = load_driver(name)
        # The op's own parameters (int64 ones must not go as C int); the trailing run, error
        # buffer and its length convert by default.
        if name == "permute":
            so.simt_permute_num_rows.restype = c_i64
            so.simt_permute_num_rows.argtypes = [c_i64, c_i32, c_i32, c_i64]
            ints = [c_int, c_i64, c_i32, c_i32, c_i64, c_i64]  # dtype, T, k, E, H, capacity
            x_ids = [vp, c_i64, vp, c_int]  # x, x_stride, ids, ids_int64
            outs = [vp] * 6  # priority, x_sorted, offsets, row_map, dropped, error_flag
            so.simt_permute.argtypes = ints + x_ids + outs + [c_int, vp]  # radix_bits, paths
        else:
            head = [c_int, c_int, c_i64, c_i32, c_i64, c_i64]
            so.simt_unpermute.argtypes = head + [vp, c_i64] + [vp] * 5
            so.simt_unpermute_backward.argtypes = head + [vp] * 6
            so.simt_unpermute_weights_backward.argtypes = head + [vp, vp, c_i64] + [vp] * 4
        _libs[name] = so
    return _libs[name]


# ---------------------------------------------------------------------------------------------
# permute


def sort_passes(k, radix_bits):
    """Digit passes of the CUB shim for permute's priority sort (permute.cu make_plan:
    end_bit = 32 + ceil(log2 k)); an odd count leaves the DoubleBuffer selector flipped."""
    end_bit = 32 + (k - 1).bit_length()
    return -(-end_bit // radix_bits)


def radix_bits_for(k, flipped):
    """A digit width near CUB's 8 whose pass count leaves the selector flipped or not."""
    for bits in (8, 7, 9, 6, 10, 11, 5, 12, 13, 16, 17):
        if sort_passes(k, bits) % 2 == int(flipped):
            return bits
    raise AssertionError(f"no digit width flips the selector {flipped} for k = {k}")


def simt_permute(x, ids, num_experts, capacity=None, priority=None, *, radix_bits=0, misalign=0):
    """permute through the SIMT driver, filled as csrc/permute/cuda.cpp fills PermuteParams.
    Returns (x_sorted, offsets, row_map, dropped, error_flag, paths)."""
    so = lib("permute")
    xx = x if x.stride(1) == 1 else x.contiguous()  # cuda.cpp: keeps a row stride
    ids_c = ids.contiguous()
    pr = priority.to(torch.float32).contiguous() if priority is not None else None
    t, h = xx.shape
    k = ids_c.shape[1]
    cap = -1 if capacity is None else capacity
    num_rows = so.simt_permute_num_rows(t, k, num_experts, cap)
    xb = Bytes(xx, misalign)
    fills = itertools.cycle(FILLS)

    def make():
        f = next(fills)
        return [
            poisoned(f, (num_rows, h), x.dtype),
            poisoned(f, (num_experts,), torch.int32),
            poisoned(f, (t, k), torch.int32),
            poisoned(f, (num_experts,), torch.int32),
            torch.zeros(1, dtype=torch.int32),  # the op's device error slot, clear
            torch.zeros(5, dtype=torch.int32),
        ]

    def launch(o, run):
        call(
            so.simt_permute,
            DTYPE_CODE[x.dtype],
            t,
            k,
            num_experts,
            h,
            cap,
            xb.ptr,
            xx.stride(0),
            addr(ids_c),
            int(ids_c.dtype == torch.int64),
            addr(pr),
            *(addr(v) for v in o[:5]),
            radix_bits,
            addr(o[5]),
            run=run,
        )

    return run_all(make, launch)


PATH_NAMES = ("hist_global", "rank_global", "gather_bytes", "sorted", "rank_pass")


def check_permute(x, ids, num_experts, capacity=None, priority=None, *, cpu_ids=None, flag=0, **kw):
    """SIMT permute == CPU permute bit for bit (on cpu_ids: the sanitised ids for bad ones);
    returns the driver's paths as a dict."""
    xs, off, rm, dr, err, paths = simt_permute(x, ids, num_experts, capacity, priority, **kw)
    ref = torch.ops.mixops.permute(
        x, ids if cpu_ids is None else cpu_ids, num_experts, capacity, priority
    )
    for ours, theirs, name in zip(
        (xs, off, rm, dr), ref, ("x_sorted", "offsets", "row_map", "dropped")
    ):
        bits_equal(ours, theirs, name)
    assert err.item() == flag, f"error flag {err.item():#x}, expected {flag:#x}"
    return dict(zip(PATH_NAMES, paths.tolist()))


def make_x(t, h, dtype, stride=None, specials=True):
    """x [t, h] (row stride `stride` when given) with distinct rows, and NaN / +-inf / -0 in
    the floats (permute copies bits)."""
    full = torch.randn(t, stride or h, dtype=torch.float64) * 3
    if specials and t and h:
        flat = full.view(-1)
        for i, v in enumerate([math.nan, math.inf, -math.inf, -0.0]):
            flat[(7 * i + 3) % flat.numel()] = v
    full = full.to(dtype)
    return full[:, :h] if stride else full


def make_ids(t, k, e, pattern="random", none_frac=0.1, dtype=torch.int32):
    if pattern == "one_expert":
        ids = torch.full((t, k), e // 2, dtype=torch.int64)
    elif pattern == "few_experts":  # most experts get no token
        pool = torch.tensor([0, e // 3, e - 1])
        ids = pool[torch.randint(0, len(pool), (t, k))]
    else:  # with replacement: a token may name one expert twice
        ids = torch.randint(0, e, (t, k))
    if none_frac:
        ids[torch.rand(t, k) < none_frac] = -1
    return ids.to(dtype)


# (T, k, E, H): T = 0, 1, odd; E not a multiple of 32; k = 1 and k = 40 > 32; T * k around the
# 2048-slot chunks (one rank warp per chunk, four per block: 5 chunks = 2 rank blocks).
PERMUTE_SHAPES = [
    (0, 2, 8, 16),
    (1, 1, 1, 8),
    (1, 3, 5, 7),
    (37, 2, 8, 16),
    (129, 4, 65, 24),
    (64, 40, 100, 8),
    (CHUNK - 1, 1, 33, 4),
    (CHUNK, 1, 33, 4),
    (CHUNK // 2, 2, 77, 4),
    (CHUNK // 2 + 1, 2, 77, 4),
    (683, 3, 64, 4),  # CHUNK + 1 slots
    (5 * CHUNK // 8, 8, 96, 2),  # 5 chunks: two rank blocks
    (20, 5, 3, 0),  # hidden 0: no gather
]


@pytest.mark.parametrize("shape", PERMUTE_SHAPES, ids=str)
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64], ids=str)
def test_permute_dropless(shape, ids_dtype):
    t, k, e, h = shape
    x = make_x(t, h, torch.float32)
    paths = check_permute(x, make_ids(t, k, e, dtype=ids_dtype), e)
    assert not paths["rank_pass"] and not paths["hist_global"] and not paths["rank_global"]


# (dtype, hidden, x row stride, bytes x is off 16-byte alignment) -> the gather's unit: the
# widest of 16/8/4/2/1 bytes dividing x's and x_sorted's addresses, row bytes and stride bytes.
GATHER_CASES = [
    (torch.float32, 64, None, 0, 16),
    (torch.float16, 8, None, 0, 16),
    (torch.float64, 2, None, 0, 16),
    (torch.bfloat16, 40, 48, 0, 16),
    (torch.float32, 6, None, 0, 8),
    (torch.float64, 3, None, 0, 8),
    (torch.float16, 12, None, 0, 8),
    (torch.float32, 5, None, 0, 4),
    (torch.bfloat16, 6, None, 0, 4),
    (torch.float32, 8, 9, 0, 4),
    (torch.float64, 2, None, 4, 4),
    (torch.bfloat16, 5, None, 0, 2),
    (torch.float16, 8, 11, 0, 2),
    (torch.float32, 8, None, 2, 2),
    (torch.bfloat16, 8, None, 1, 1),
    (torch.float64, 4, 6, 3, 1),
]


@pytest.mark.parametrize("dtype, hidden, stride, misalign, width", GATHER_CASES, ids=str)
def test_permute_gather_widths(dtype, hidden, stride, misalign, width):
    """Every vector width of the gather (uint4, uint2, uint32, uint16, uint8) and every dtype."""
    t, k, e = 45, 3, 13
    x = make_x(t, hidden, dtype, stride)
    paths = check_permute(x, make_ids(t, k, e), e, misalign=misalign)
    assert paths["gather_bytes"] == width


@pytest.mark.parametrize("pattern", ["one_expert", "few_experts"])
@pytest.mark.parametrize("capacity", [None, 5])
def test_permute_routing_patterns(pattern, capacity):
    t, k, e, h = 300, 2, 50, 8
    x = make_x(t, h, torch.bfloat16)
    ids = make_ids(t, k, e, pattern, none_frac=0.05)
    paths = check_permute(x, ids, e, capacity)
    assert paths["rank_pass"] == (capacity is not None)


# (T, k, E): capacities from 0 to past T * k.
@pytest.mark.parametrize("shape", [(1, 1, 1), (37, 3, 7), (700, 3, 5), (40, 40, 33)], ids=str)
@pytest.mark.parametrize("cap", ["zero", "one", "tight", "slots", "huge"])
def test_permute_capacity(shape, cap):
    t, k, e = shape
    slots = t * k
    capacity = {
        "zero": 0,
        "one": 1,
        "tight": max(1, slots // (2 * e)),
        "slots": slots,
        "huge": 2**62 + 100,
    }[cap]
    x = make_x(t, 12, torch.float16)
    paths = check_permute(x, make_ids(t, k, e, dtype=torch.int64), e, capacity)
    assert paths["rank_pass"] == (capacity < slots) and not paths["sorted"]


def priority_with_ties(t, k, dtype):
    """Few distinct values (many ties), NaN, +-0 and +-inf; in fp64, values that tie only once
    the op layer rounds them to fp32."""
    p = torch.randint(-2, 3, (t, k)).to(torch.float64) / 2
    p.view(-1)[::11] = math.nan
    p.view(-1)[5::13] = -0.0
    p.view(-1)[7::17] = math.inf
    p.view(-1)[9::19] = -math.inf
    if dtype == torch.float64:
        p.view(-1)[3::7] = 0.5 + 1e-12  # 0.5 in fp32: a tie with the 0.5s
    return p.to(dtype)


@pytest.mark.parametrize("flipped", [False, True], ids=["selector_kept", "selector_flipped"])
@pytest.mark.parametrize(
    "shape, capacity",
    [
        ((1, 1, 1), 0),
        ((50, 1, 4), 6),
        ((97, 2, 9), 8),
        ((60, 3, 5), 20),
        ((30, 40, 33), 9),
        ((1100, 2, 7), 150),  # 2200 slots: the sorted sequence spans two chunks
    ],
    ids=str,
)
@pytest.mark.parametrize("pr_dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_permute_priority_capacity(flipped, shape, capacity, pr_dtype):
    """Priority capacity: a radix sort by (choice, priority key) whose DoubleBuffer result ends
    in either buffer (the CUB shim poisons the other one)."""
    t, k, e = shape
    bits = radix_bits_for(k, flipped)
    assert sort_passes(k, bits) % 2 == int(flipped)
    x = make_x(t, 10, torch.float32)
    pr = priority_with_ties(t, k, pr_dtype)
    paths = check_permute(x, make_ids(t, k, e), e, capacity, pr, radix_bits=bits)
    assert paths["sorted"] == (capacity < t * k)


@pytest.mark.parametrize(
    "t, k, e, capacity",
    [
        (40, 4, RANK_SHARED_MAX_E, None),
        (40, 4, RANK_SHARED_MAX_E + 1, None),
        (40, 4, 3000, 1),
        pytest.param(30, 3, HIST_SHARED_MAX_E, None, marks=pytest.mark.large),
        (30, 3, HIST_SHARED_MAX_E + 1, None),
        (30, 3, HIST_SHARED_MAX_E + 5, 0),
    ],
    ids=str,
)
def test_permute_large_expert_counts(t, k, e, capacity):
    """E > 1024: rank counters in global memory; E > 8192: the histogram too."""
    x = make_x(t, 8, torch.float32)
    ids = make_ids(t, k, e)
    ids[0, 0] = e - 1  # the last expert has a token
    paths = check_permute(x, ids, e, capacity)
    assert paths["rank_global"] == (e > RANK_SHARED_MAX_E)
    assert paths["hist_global"] == (e > HIST_SHARED_MAX_E)


def test_permute_large_expert_count_priority():
    t, k, e = 40, 3, HIST_SHARED_MAX_E + 3
    x = make_x(t, 4, torch.float32)
    ids = torch.randint(0, 4, (t, k)) * 2731  # few experts, spread over the range
    pr = priority_with_ties(t, k, torch.float32)
    paths = check_permute(x, ids, e, 7, pr, radix_bits=radix_bits_for(k, True))
    assert paths["hist_global"] and paths["rank_global"] and paths["sorted"]


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("capacity", [None, 3])
def test_permute_bad_ids(ids_dtype, capacity):
    """ids outside [-1, E): the error bit, and the slot treated as -1 (the CPU op, which raises,
    runs on the sanitised ids)."""
    t, k, e = 50, 3, 6
    ids = make_ids(t, k, e, dtype=torch.int64)
    bad = [(0, 0, e), (3, 1, -2), (10, 2, 1000)]
    if ids_dtype == torch.int64:
        bad += [(20, 0, 2**32 + 1), (21, 1, -(2**40))]  # fine if truncated to 32 bits
    for i, j, v in bad:
        ids[i, j] = v
    clean = ids.clone()
    for i, j, _ in bad:
        clean[i, j] = -1
    ids, clean = ids.to(ids_dtype), clean.to(ids_dtype)
    with pytest.raises(RuntimeError, match="ids values must be in"):
        torch.ops.mixops.permute(make_x(t, 4, torch.float32), ids, e, capacity, None)
    x = make_x(t, 4, torch.float32)
    check_permute(x, ids, e, capacity, cpu_ids=clean, flag=KIDS_OUT_OF_RANGE)
    check_permute(x, clean, e, capacity)  # no flag for the clean ones


# ---------------------------------------------------------------------------------------------
# unpermute and its backward ops


def wdtype_of(weights):
    """cuda.cpp: the weights' dtype, fp32 without weights."""
    return DTYPE_CODE[weights.dtype if weights is not None else torch.float32]


def simt_unpermute(y_sorted, row_map, weights):
    """unpermute through the SIMT driver (cuda.cpp: a row stride kept, the rest contiguous)."""
    so = lib("unpermute")
    ys = y_sorted if y_sorted.stride(1) == 1 else y_sorted.contiguous()
    rm = row_map.contiguous()
    w = weights.contiguous() if weights is not None else None
    t, k = rm.shape
    num_rows, h = ys.shape
    fills = itertools.cycle(FILLS)

    def make():
        return [
            poisoned(next(fills), (t, h), ys.dtype),
            torch.zeros(1, dtype=torch.int32),
            torch.zeros(2, dtype=torch.int32),
        ]

    def launch(o, run):
        call(
            so.simt_unpermute,
            DTYPE_CODE[ys.dtype],
            wdtype_of(w),
            t,
            k,
            h,
            num_rows,
            addr(ys),
            ys.stride(0),
            addr(rm),
            addr(w),
            *(addr(v) for v in o),
            run=run,
        )

    return run_all(make, launch)


def simt_unpermute_backward(grad_y, row_map, weights, num_rows):
    so = lib("unpermute")
    g = grad_y.contiguous()
    rm = row_map.contiguous()
    w = weights.contiguous() if weights is not None else None
    t, k = rm.shape
    h = g.shape[1]
    fills = itertools.cycle(FILLS)

    def make():
        return [
            poisoned(next(fills), (num_rows, h), g.dtype),
            torch.zeros(1, dtype=torch.int32),
            torch.zeros(2, dtype=torch.int32),
        ]

    def launch(o, run):
        call(
            so.simt_unpermute_backward,
            DTYPE_CODE[g.dtype],
            wdtype_of(w),
            t,
            k,
            h,
            num_rows,
            addr(g),
            addr(rm),
            addr(w),
            *(addr(v) for v in o),
            run=run,
        )

    return run_all(make, launch)


def simt_unpermute_weights_backward(grad_y, y_sorted, row_map, weights):
    so = lib("unpermute")
    g = grad_y.contiguous()
    ys = y_sorted if y_sorted.stride(1) == 1 else y_sorted.contiguous()
    rm = row_map.contiguous()
    t, k = rm.shape
    h = g.shape[1]
    fills = itertools.cycle(FILLS)

    def make():
        return [
            poisoned(next(fills), (t, k), weights.dtype),
            torch.zeros(1, dtype=torch.int32),
            torch.zeros(2, dtype=torch.int32),
        ]

    def launch(o, run):
        call(
            so.simt_unpermute_weights_backward,
            DTYPE_CODE[g.dtype],
            DTYPE_CODE[weights.dtype],
            t,
            k,
            h,
            ys.shape[0],
            addr(g),
            addr(ys),
            ys.stride(0),
            addr(rm),
            *(addr(v) for v in o),
            run=run,
        )

    return run_all(make, launch)


def routed(t, k, e, capacity=None, extra_rows=0):
    """A row_map from the CPU permute (with -1 slots, and dropped ones under a capacity) and its
    number of rows (plus extra_rows no slot maps to)."""
    ids = make_ids(t, k, e)
    xs, _, row_map, _ = torch.ops.mixops.permute(torch.zeros(t, 1), ids, e, capacity, None)
    return row_map, xs.shape[0] + extra_rows


def make_weights(kind, t, k, dtype):
    if kind is None:
        return None
    w = torch.rand(t, k, dtype=torch.float64) * 2 - 0.5
    return w.to({"fp32": torch.float32, "fp64": torch.float64, "same": dtype}[kind])


def data(rows, h, dtype, stride=None):
    full = (torch.randn(rows, stride or h, dtype=torch.float64) * 2).to(dtype)
    return full[:, :h] if stride else full


# (T, k, E, H, y_sorted row stride, capacity): vector rows (16 bytes) and element rows, k = 1 and
# k = 40 (two batches of 32 slots), hidden past one 32 x 4-vector tile, T = 0 / 1, H = 0.
UNPERMUTE_CASES = [
    (0, 2, 4, 16, None, None),
    (1, 1, 1, 8, None, None),
    (37, 2, 8, 64, None, None),
    (37, 2, 8, 6, None, None),
    (25, 3, 7, 520, None, 3),
    (21, 40, 50, 24, None, None),
    (19, 4, 9, 32, 36, None),
    (19, 4, 9, 32, 33, 2),
    (13, 3, 5, 1, None, None),
    (9, 2, 3, 0, None, None),
]


@pytest.mark.parametrize("case", UNPERMUTE_CASES, ids=str)
@pytest.mark.parametrize("dtype", list(DTYPE_CODE), ids=str)
@pytest.mark.parametrize("wkind", [None, "fp32", "fp64", "same"])
def test_unpermute(case, dtype, wkind):
    t, k, e, h, stride, capacity = case
    row_map, num_rows = routed(t, k, e, capacity, extra_rows=2)
    ys = data(num_rows, h, dtype, stride)
    w = make_weights(wkind, t, k, dtype)
    y, err, paths = simt_unpermute(ys, row_map, w)
    bits_equal(y, torch.ops.mixops.unpermute(ys, row_map, w), "y")
    assert err.item() == 0
    es = ys.element_size()
    vec = (h * es) % 16 == 0 and (ys.stride(0) * es) % 16 == 0
    assert paths[0].item() == (0 if t == 0 or h == 0 else 16 if vec else 1)


@pytest.mark.parametrize("case", UNPERMUTE_CASES, ids=str)
@pytest.mark.parametrize("dtype", list(DTYPE_CODE), ids=str)
@pytest.mark.parametrize("wkind", [None, "fp32", "fp64", "same"])
def test_unpermute_backward(case, dtype, wkind):
    t, k, e, h, _, capacity = case
    row_map, num_rows = routed(t, k, e, capacity, extra_rows=3)
    g = data(t, h, dtype)
    w = make_weights(wkind, t, k, dtype)
    out, err, paths = simt_unpermute_backward(g, row_map, w, num_rows)
    bits_equal(out, torch.ops.mixops.unpermute_backward(g, row_map, w, num_rows), "grad_y_sorted")
    assert err.item() == 0
    assert paths[1].item() == int(t * k > 0)
    vec = (h * g.element_size()) % 16 == 0
    assert paths[0].item() == (0 if h == 0 else 16 if vec else 1)


def weights_grad_ref(g, ys, row_map, wdtype):
    """(fp64 reference, PyTorch's own result in the data dtype) of <grad_y[t], y_sorted[row]>."""
    rm = row_map.long()
    has = rm >= 0
    rows = ys[rm.clamp(min=0)]  # [T, k, H]
    hi = (g.double()[:, None, :] * rows.double()).sum(-1) * has
    low = (g[:, None, :] * rows).sum(-1) * has.to(g.dtype)
    return hi, low.to(wdtype)


@pytest.mark.parametrize("case", UNPERMUTE_CASES, ids=str)
@pytest.mark.parametrize("dtype", list(DTYPE_CODE), ids=str)
@pytest.mark.parametrize("wkind", ["fp32", "same"])
def test_unpermute_weights_backward(case, dtype, wkind):
    """Not bit-equal by design (a different summation order, see the module docstring): both
    backends within the tolerance rule of the fp64 reference."""
    t, k, e, h, stride, capacity = case
    row_map, num_rows = routed(t, k, e, capacity, extra_rows=1)
    g = data(t, h, dtype)
    ys = data(num_rows, h, dtype, stride)
    w = make_weights(wkind, t, k, dtype)
    gw, err, paths = simt_unpermute_weights_backward(g, ys, row_map, w)
    assert err.item() == 0
    hi, low = weights_grad_ref(g, ys, row_map, w.dtype)
    assert_close_to_ref(gw, hi, low, "grad_weights (SIMT)")
    cpu = torch.ops.mixops.unpermute_weights_backward(g, ys, row_map, w)
    assert_close_to_ref(cpu, hi, low, "grad_weights (CPU)")
    assert torch.equal(gw[row_map < 0], torch.zeros_like(gw[row_map < 0])), "slots without a row"
    if h == 1:  # one product per slot: no summation order to differ in
        bits_equal(gw, cpu, "grad_weights")
    es = g.element_size()
    vec = (h * es) % 16 == 0 and (ys.stride(0) * es) % 16 == 0
    assert paths[0].item() == (0 if t == 0 else 16 if vec else 1)


def test_unpermute_inf_nan_bits():
    """+-inf and NaN in fp32/fp64 data propagate alike (inf - inf makes the same NaN)."""
    t, k, e, h = 16, 3, 4, 8
    for dtype in (torch.float32, torch.float64):
        row_map, num_rows = routed(t, k, e)
        ys = data(num_rows, h, dtype)
        ys[0, 0], ys[1, 1], ys[2, 2], ys[3, 0] = math.inf, -math.inf, math.nan, math.inf
        ys[4] = -math.inf
        w = make_weights("fp32", t, k, dtype)
        y, err, _ = simt_unpermute(ys, row_map, w)
        bits_equal(y, torch.ops.mixops.unpermute(ys, row_map, w), f"y {dtype}")
        assert err.item() == 0


# Bad row_map values (CPU raises; CUDA flags and treats the slot as -1, or for a duplicated row
# in unpermute_backward keeps the last slot).


def bad_row_map(t, k, e):
    row_map, num_rows = routed(t, k, e, extra_rows=2)
    bad = row_map.clone()
    bad[0, 0], bad[2, 1], bad[5, 0] = num_rows, -7, 2**30
    clean = bad.clone()
    clean[0, 0], clean[2, 1], clean[5, 0] = -1, -1, -1
    return bad, clean, num_rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_unpermute_row_map_out_of_range(dtype):
    t, k, e, h = 30, 2, 5, 16
    bad, clean, num_rows = bad_row_map(t, k, e)
    ys = data(num_rows, h, dtype)
    w = make_weights("fp32", t, k, dtype)
    with pytest.raises(RuntimeError, match="row_map values must be in"):
        torch.ops.mixops.unpermute(ys, bad, w)
    y, err, _ = simt_unpermute(ys, bad, w)
    assert err.item() == KROW_MAP_OUT_OF_RANGE
    bits_equal(y, torch.ops.mixops.unpermute(ys, clean, w), "y")


def test_unpermute_weights_backward_row_map_out_of_range():
    t, k, e, h = 30, 2, 5, 16
    bad, clean, num_rows = bad_row_map(t, k, e)
    g, ys = data(t, h, torch.float32), data(num_rows, h, torch.float32)
    w = make_weights("fp32", t, k, torch.float32)
    gw, err, _ = simt_unpermute_weights_backward(g, ys, bad, w)
    assert err.item() == KROW_MAP_OUT_OF_RANGE
    hi, low = weights_grad_ref(g, ys, clean, w.dtype)
    assert_close_to_ref(gw, hi, low, "grad_weights")
    assert gw[0, 0].item() == 0 and gw[2, 1].item() == 0 and gw[5, 0].item() == 0


@pytest.mark.parametrize("kind", ["out_of_range", "duplicate", "both", "num_rows_0"])
def test_unpermute_backward_bad_row_map(kind):
    t, k, e, h = 40, 3, 6, 24
    row_map, num_rows = routed(t, k, e, extra_rows=2)
    bad, clean, flag = row_map.clone(), row_map.clone(), 0
    if kind in ("out_of_range", "both"):
        bad[0, 0], bad[2, 1], bad[5, 0] = num_rows, -7, 2**30
        clean[0, 0], clean[2, 1], clean[5, 0] = -1, -1, -1
        flag |= KROW_MAP_OUT_OF_RANGE
    if kind in ("duplicate", "both"):
        # slots (1, 0) and (30, 2) share a row, as do (7, 1) and (39, 1) (and whichever slot
        # held the row before). CUDA keeps the last slot on each row (atomicMax); on the CPU the
        # others are as if they had no row.
        bad[30, 2] = bad[1, 0] = max(int(row_map[1, 0]), 0)
        bad[39, 1] = bad[7, 1] = max(int(row_map[7, 1]), 1)
        clean[30, 2], clean[39, 1] = bad[30, 2], bad[39, 1]
        clean[1, 0] = clean[7, 1] = -1
        for r in (int(bad[30, 2]), int(bad[39, 1])):
            owners = (clean.view(-1) == r).nonzero().view(-1).tolist()
            for i in owners[:-1]:
                clean.view(-1)[i] = -1
        flag |= KROW_MAP_DUPLICATE
    if kind == "num_rows_0":  # every row is out of range: flagged, output empty
        num_rows, clean = 0, torch.full_like(row_map, -1)
        flag = KROW_MAP_OUT_OF_RANGE if bool((row_map >= 0).any()) else 0
    g = data(t, h, torch.float32)
    w = make_weights("fp32", t, k, torch.float32)
    if flag:
        with pytest.raises(RuntimeError, match="row_map"):
            torch.ops.mixops.unpermute_backward(g, bad, w, num_rows)
    out, err, _ = simt_unpermute_backward(g, bad, w, num_rows)
    assert err.item() == flag, f"error flag {err.item():#x}, expected {flag:#x}"
    bits_equal(out, torch.ops.mixops.unpermute_backward(g, clean, w, num_rows), "grad_y_sorted")


# ---------------------------------------------------------------------------------------------
# Bigger grids (pytest -m large): more chunks, more experts, every option crossed.


@pytest.mark.large
@pytest.mark.parametrize("t, k", [(3001, 2), (1100, 8), (257, 64)], ids=str)
@pytest.mark.parametrize("e", [3, 64, 1500, 9000])
@pytest.mark.parametrize("capacity", [None, "tight", "priority"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)
def test_permute_large(t, k, e, capacity, dtype):
    ids = make_ids(t, k, e, dtype=torch.int64 if e > 1000 else torch.int32)
    x = make_x(t, 24, dtype, stride=29)
    cap = None if capacity is None else max(1, t * k // (2 * min(e, 64)))
    pr = priority_with_ties(t, k, torch.float32) if capacity == "priority" else None
    for flipped in (False, True) if pr is not None else (False,):
        paths = check_permute(x, ids, e, cap, pr, radix_bits=radix_bits_for(k, flipped))
        assert paths["rank_global"] == (e > RANK_SHARED_MAX_E)
        assert paths["hist_global"] == (e > HIST_SHARED_MAX_E)


@pytest.mark.large
@pytest.mark.parametrize("t, k, e, h", [(600, 8, 64, 1000), (300, 33, 40, 72), (4100, 1, 7, 36)])
@pytest.mark.parametrize("dtype", list(DTYPE_CODE), ids=str)
@pytest.mark.parametrize("wkind", [None, "fp32", "fp64", "same"])
def test_unpermute_large(t, k, e, h, dtype, wkind):
    row_map, num_rows = routed(t, k, e, capacity=max(1, t * k // e), extra_rows=5)
    ys, g = data(num_rows, h, dtype), data(t, h, dtype)
    w = make_weights(wkind, t, k, dtype)
    bits_equal(simt_unpermute(ys, row_map, w)[0], torch.ops.mixops.unpermute(ys, row_map, w), "y")
    out = simt_unpermute_backward(g, row_map, w, num_rows)[0]
    bits_equal(out, torch.ops.mixops.unpermute_backward(g, row_map, w, num_rows), "grad_y_sorted")
    if w is not None:
        gw = simt_unpermute_weights_backward(g, ys, row_map, w)[0]
        hi, low = weights_grad_ref(g, ys, row_map, w.dtype)
        assert_close_to_ref(gw, hi, low, "grad_weights")


# ---------------------------------------------------------------------------------------------
# What the harness cannot see: nvcc contracting a * b + c into one FMA (the harness builds with
# -ffp-contract=off, as the CPU ops are). unpermute's contract is a rounded product and a rounded
# add per choice (tests/test_permute.py, sequential_unpermute); an FMA there changes the bits of
# every weighted sum on the GPU.

NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="needs nvcc")
def test_unpermute_kernel_has_no_fma(tmp_path):
    ptx = tmp_path / "unpermute.ptx"
    subprocess.run(
        [
            NVCC,
            "-std=c++20",
            "-O3",
            "--expt-relaxed-constexpr",
            "-ptx",
            "-gencode=arch=compute_80,code=compute_80",
            f"-I{ROOT / 'csrc'}",
            str(ROOT / "csrc" / "permute" / "unpermute.cu"),
            "-o",
            str(ptx),
        ],
        check=True,
        capture_output=True,
    )
    text = ptx.read_text()
    entries = {}  # kernel name -> its PTX, up to the next entry
    for part in text.split(".entry")[1:]:
        name = re.match(r"\s*(\S+?)\(", part).group(1)
        if "16unpermute_kernel" in name:  # the mangled unpermute_kernel<T, N>
            entries[name] = part
    assert len(entries) == 8, f"unpermute_kernel: 4 dtypes x 2 row widths, got {list(entries)}"
    fused = [name for name, body in entries.items() if re.search(r"\bfma\.rn", body)]
    assert not fused, f"unpermute_kernel contracts w * y + acc into an FMA in {fused}"
