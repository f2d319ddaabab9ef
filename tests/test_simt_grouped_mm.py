"""grouped_mm's own CUDA kernels on the SIMT harness (tests/simt), against the CPU op.

Four drivers (tests/simt/drivers/grouped_mm_*.cpp), one per translation unit:
  * zero fill: the real launch code of csrc/grouped_mm/zero.cu (detail::launch_grouped_mm_zero),
    which grouped_mm_launch enqueues before every GEMM path;
  * fallback GEMM: the real launch code of csrc/grouped_mm/fallback.cu
    (detail::launch_grouped_mm_fallback); the tests run the zero fill first, then the GEMM unless
    launch.cu's gemm_is_empty, on one output, as grouped_mm_launch does on the fallback path;
  * the CUTLASS paths' argument builder (args_kernel.cuh, build_group_args), launched the way
    sm80.cuh / sm90.cuh launch it under each alignment rule (GroupAlignRule), and the fallback
    kernel for the groups a rule skips (launch_grouped_mm_fallback(..., rule), as dispatch_sm90.cu
    launches it with kTma and launch.cu with kCutlass2). The builder's launch files need CUTLASS,
    so it runs under simt::launch_checked as they launch it.
Every call runs under the four harness runs (schedules, poison bytes) and must give the same bits.
The params are filled as csrc/grouped_mm/cuda.cpp fills them (Call below: layouts and their
canonicalisation, strides, an int32 error flag), from the same tensors the CPU op takes.

What is compared:
  * fallback GEMM: the CPU op by the tolerance rule of tests/helpers.py (its BLAS sums in another
    order), and, for fp32/bf16/fp16, the exact bits of the kernel's arithmetic: per output, one
    fp32 fused multiply-add per k in increasing k (fallback_kernel.cuh calls fma() explicitly,
    which the harness runs as std::fma and a GPU as fma.rn: the same correctly rounded operation,
    so these bits are the GPU's too; nothing is left for nvcc to contract), rounded once to the
    dtype. fp64 accumulates with fp64 FMAs, which this file cannot emulate exactly: tolerance only.
  * zero fill: exactly the rows (2-D x 3-D) or blocks (2-D x 2-D) no group writes become zero,
    nothing else is touched, and bad offsets set GroupedMmError's bits.
  * argument builder: every array equals what grouped_mm_group_problem gives, computed here.
  * skipped groups (SM90's kTma, SM80's kCutlass2): exactly those groups, with the fp32 FMA
    chain's bits (as the fallback), within the rule of the CPU op; everything else untouched; the
    builder and the fallback together compute every non-empty group exactly once.
"""

import ctypes
import itertools

import pytest
import torch

import mixops  # noqa: F401  (registers torch.ops.mixops.*)
from helpers import assert_close_to_ref
from simt_driver import RUNS, SimtRun, call, load_driver, requires_cxx, run_all

pytestmark = requires_cxx

DTYPE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}  # mixops::Dtype
DTYPES = list(DTYPE)
ROW, COL = 0, 1  # mixops::Layout
# GroupedMmError (grouped_mm.h)
NEGATIVE, DECREASING, PAST_END = 1, 2, 4
ANY, TMA, CUTLASS2 = 0, 1, 2  # GroupAlignRule
RULE_NAME = {ANY: "any", TMA: "tma", CUTLASS2: "cutlass2"}
NUM_SMS = 1  # LaunchConfig::num_sms: small, so the zero fill's grid strides on small outputs
I64, PTR = ctypes.c_int64, ctypes.c_void_p


class SimtGroupedMm(ctypes.Structure):
    """tests/simt/drivers/grouped_mm_params.h's SimtGroupedMm (same layout, size checked)."""

    _fields_ = [
        ("dtype", ctypes.c_int32),
        ("ragged_k", ctypes.c_int32),
        ("num_groups", ctypes.c_int32),
        ("a_layout", ctypes.c_int32),
        ("b_layout", ctypes.c_int32),
        ("pad", ctypes.c_int32),
        ("m", I64),
        ("n", I64),
        ("k", I64),
        ("a", PTR),
        ("a_stride_m", I64),
        ("a_stride_k", I64),
        ("b", PTR),
        ("b_stride_e", I64),
        ("b_stride_k", I64),
        ("b_stride_n", I64),
        ("out", PTR),
        ("out_stride_e", I64),
        ("out_stride_m", I64),
        ("offsets", PTR),
        ("error_flag", PTR),
    ]


TAIL = [ctypes.POINTER(SimtRun), ctypes.c_char_p, ctypes.c_int]
PARAMS = ctypes.POINTER(SimtGroupedMm)


def _load(name, **argtypes):
    lib = load_driver(name)
    lib.simt_grouped_mm_params_size.restype = ctypes.c_size_t
    assert lib.simt_grouped_mm_params_size() == ctypes.sizeof(SimtGroupedMm), name
    for fn, types in argtypes.items():
        getattr(lib, fn).argtypes = [*types, *TAIL]
    return lib


@pytest.fixture(scope="module")
def zero_lib():
    return _load("grouped_mm_zero", simt_grouped_mm_zero=[PARAMS, ctypes.c_int])


@pytest.fixture(scope="module")
def fallback_lib():
    return _load("grouped_mm_fallback", simt_grouped_mm_fallback=[PARAMS, ctypes.c_int])


@pytest.fixture(scope="module")
def args_lib():
    return _load(
        "grouped_mm_args",
        simt_build_group_args=[PARAMS, ctypes.c_int, PTR, PTR, PTR, PTR, PTR, PTR, PTR],
    )


@pytest.fixture(scope="module")
def rescue_lib():
    # The groups a CUTLASS path's argument builder skipped: the fallback kernel restricted to them.
    return _load(
        "grouped_mm_fallback", simt_grouped_mm_fallback_skipped=[PARAMS, ctypes.c_int, ctypes.c_int]
    )


# ---- params, as csrc/grouped_mm/cuda.cpp fills them ----------------------------------------------


def _layout_of(rows, cols, s_row, s_col):
    """cuda.cpp's layout_of."""
    if s_col == 1 and (s_row >= cols or rows <= 1):
        return ROW
    if s_row == 1 and (s_col >= rows or cols <= 1):
        return COL
    return None


def _fix(layout, rows, cols, s_row, s_col):
    """cuda.cpp's fix: strides matching the chosen layout for single-row/column views."""
    if layout == ROW:
        return max(s_row, max(cols, 1)), 1
    return 1, max(s_col, max(rows, 1))


class Call:
    """One grouped_mm call's operands and params, canonicalised as cuda.cpp does; keeps every
    tensor the params point into alive. out(): a fresh output, every byte 0xA5."""

    def __init__(self, a, b, offsets):
        assert a.dim() == 2 and b.dim() in (2, 3) and offsets.dtype == torch.int32
        self.ragged_k = b.dim() == 2
        self.m, self.k = a.shape
        self.n = b.shape[-1]
        self.num_groups = offsets.numel()
        assert self.num_groups > 0, "cuda.cpp answers E == 0 itself (out.zero_())"
        la = _layout_of(self.m, self.k, a.stride(0), a.stride(1))
        if la is None:
            a, la = a.contiguous(), ROW
        lb = _layout_of(self.k, self.n, b.stride(-2), b.stride(-1))
        if lb is None or (la == COL and lb == COL):
            b, lb = b.contiguous(), ROW
        self.a, self.b, self.a_layout, self.b_layout = a, b, la, lb
        self.offsets = offsets.contiguous()
        self.dtype = a.dtype
        self.out_shape = (self.num_groups, self.m, self.n) if self.ragged_k else (self.m, self.n)

    def out(self):
        t = torch.empty(self.out_shape, dtype=self.dtype)
        t.view(torch.uint8).fill_(0xA5)
        return t

    def params(self, out, error_flag=None):
        a, b = self.a, self.b
        p = SimtGroupedMm()
        p.dtype = DTYPE[self.dtype]
        p.ragged_k = int(self.ragged_k)
        p.num_groups = self.num_groups
        p.m, p.n, p.k = self.m, self.n, self.k
        p.a = a.data_ptr()
        p.a_layout = self.a_layout
        p.a_stride_m, p.a_stride_k = _fix(self.a_layout, self.m, self.k, *a.stride())
        p.b = b.data_ptr()
        p.b_stride_e = 0 if self.ragged_k else b.stride(0)
        p.b_layout = self.b_layout
        p.b_stride_k, p.b_stride_n = _fix(self.b_layout, self.k, self.n, *b.stride()[-2:])
        assert out.shape == self.out_shape and out.is_contiguous()
        p.out = out.data_ptr()
        p.out_stride_e = out.stride(0) if self.ragged_k else 0
        p.out_stride_m = out.stride(-2)
        p.offsets = self.offsets.data_ptr()
        p.error_flag = None if error_flag is None else error_flag.data_ptr()
        return p

    def gemm_is_empty(self):
        """launch.cu's gemm_is_empty: only the zero fill runs."""
        return self.num_groups <= 0 or self.m <= 0 or self.n <= 0 or self.k <= 0


def bounds(offsets, total):
    """grouped_mm_group_bounds for every group: [(begin, end, error bits)]."""
    out, prev = [], 0
    for cur in offsets:
        err = (NEGATIVE if cur < 0 else 0) | (DECREASING if cur < prev else 0)
        err |= PAST_END if cur > total else 0
        b, e = min(max(prev, 0), total), min(max(cur, 0), total)
        out.append((b, max(e, b), err))
        prev = cur
    return out


def error_bits(offsets, total):
    bits = 0
    for _, _, err in bounds(offsets, total):
        bits |= err
    return bits


# ---- the kernels under every harness run ---------------------------------------------------------


def simt_grouped_mm(zero_lib, fallback_lib, c, num_sms=NUM_SMS):
    """(out, error flag) of the fallback path: zero fill, then the GEMM unless gemm_is_empty."""

    def launch(outs, run):
        out, flag = outs
        p = c.params(out, flag)
        call(zero_lib.simt_grouped_mm_zero, ctypes.byref(p), num_sms, run=run)
        if not c.gemm_is_empty():
            call(fallback_lib.simt_grouped_mm_fallback, ctypes.byref(p), num_sms, run=run)

    out, flag = run_all(lambda: [c.out(), torch.zeros(1, dtype=torch.int32)], launch)
    return out, int(flag.item())


def simt_zero_fill(zero_lib, c, num_sms=NUM_SMS):
    def launch(outs, run):
        out, flag = outs
        call(zero_lib.simt_grouped_mm_zero, ctypes.byref(c.params(out, flag)), num_sms, run=run)

    out, flag = run_all(lambda: [c.out(), torch.zeros(1, dtype=torch.int32)], launch)
    return out, int(flag.item())


# ---- references ----------------------------------------------------------------------------------


def _fma32(x, y, acc):
    """fp32 fma(x, y, acc), correctly rounded, elementwise with broadcasting: x * y is exact in
    fp64, the sum is rounded to odd in fp64 (TwoSum's error term decides), and a round-to-odd
    value with 53 >= 24 + 2 bits rounds to fp32 exactly as the exact sum would."""
    p = x.double() * y.double()
    c = acc.double().expand_as(p)
    s = p + c
    bp = s - c
    e = (p - bp) + (c - (s - bp))  # s + e == p + c exactly
    even = (s.view(torch.int64) & 1) == 0
    toward = torch.where(e > 0, torch.full_like(s, float("inf")), torch.full_like(s, -float("inf")))
    s = torch.where((e != 0) & even, torch.nextafter(s, toward), s)
    return s.float()


def fma_chain(a, b):
    """[m, n] of fp32 fma over k in increasing order from 0, each operand widened to fp32, then
    rounded once to a's dtype: the arithmetic of the fallback and rescue kernels."""
    acc = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float32)
    a32, b32 = a.float(), b.float()
    for kk in range(a.shape[1]):
        acc = _fma32(a32[:, kk : kk + 1], b32[kk : kk + 1, :], acc)
    return acc.to(a.dtype)


def _group_operands(c, g, begin, end):
    """(a_g, b_g, index of out_g) of group g over the clamped range [begin, end)."""
    a, b = c.a, c.b
    if c.ragged_k:
        return a[:, begin:end], b[begin:end], (g,)
    return a[begin:end], b[g], (slice(begin, end),)


def fma_model(c):
    """The whole output under the kernels' arithmetic (zeros where no group writes)."""
    out = torch.zeros(c.out_shape, dtype=c.dtype)
    total = c.k if c.ragged_k else c.m
    for g, (begin, end, _) in enumerate(bounds(c.offsets.tolist(), total)):
        a_g, b_g, idx = _group_operands(c, g, begin, end)
        if a_g.shape[0] and b_g.shape[1] and a_g.shape[1]:
            out[idx] = fma_chain(a_g, b_g)
    return out


def assert_same_bits(ours, ref, what):
    assert ours.shape == ref.shape and ours.dtype == ref.dtype, what
    it = {2: torch.int16, 4: torch.int32, 8: torch.int64}[ours.element_size()]
    bad = (ours.view(it) != ref.view(it)).nonzero()
    assert bad.numel() == 0, (
        f"{what}: {bad.shape[0]} of {ours.numel()} elements differ, first at "
        f"{tuple(bad[0].tolist())}: {ours[tuple(bad[0])].item()!r} vs {ref[tuple(bad[0])].item()!r}"
    )


def check_gemm(c, out, what):
    """out against the CPU op (tolerance rule) and the FMA model (bits; not for fp64)."""
    cpu = torch.ops.mixops.grouped_mm(c.a, c.b, c.offsets)
    hi = torch.ops.mixops.grouped_mm(c.a.double(), c.b.double(), c.offsets)
    assert_close_to_ref(out, hi, cpu, what)
    if c.dtype != torch.float64:
        assert_same_bits(out, fma_model(c), f"{what} vs the fp32 FMA chain")


# ---- cases ---------------------------------------------------------------------------------------


def _matrix(rows, cols, dtype, layout):
    """[rows, cols]: "row" contiguous, "strided" a column slice of a wider tensor (row-major,
    ld > cols), "col" the transpose of a contiguous [cols, rows] (column-major)."""
    if layout == "row":
        return torch.randn(rows, cols).to(dtype)
    if layout == "strided":
        return torch.randn(rows, cols + 5).to(dtype)[:, 2 : cols + 2]
    return torch.randn(cols, rows).to(dtype).t()


def make_call(mode, sizes, tail, k, n, dtype, a_layout="row", b_layout="row"):
    """mode "3d": a [sum + tail, k] @ b [E, k, n] (b_layout "col": a transposed [E, n, k]);
    mode "2d": a [k, sum + tail] @ b [sum + tail, n], groups along the shared dimension."""
    offsets = torch.tensor(list(itertools.accumulate(sizes)), dtype=torch.int32)
    total = sum(sizes) + tail
    if mode == "3d":
        a = _matrix(total, k, dtype, a_layout)
        e = len(sizes)
        b = torch.randn(e, k, n) if b_layout == "row" else torch.randn(e, n, k).transpose(1, 2)
        b = b.to(dtype)
    else:
        a = _matrix(k, total, dtype, a_layout)
        b = _matrix(total, n, dtype, b_layout)
    return Call(a, b, offsets)


# (group sizes, rows past offsets[-1], k, n): empty groups, a group over one 64-row tile, m/n/k
# not multiples of the 64 x 64 x 16 tile, k = 1. In the 2-D x 2-D mode the sizes split k and
# "k" is the output rows.
GEMM_CASES = {
    "empty_groups_tail": ([0, 7, 0, 3, 0], 4, 13, 11),
    "tiles_and_tails": ([70, 1, 0, 9], 3, 70, 67),
    "k1": ([2, 0, 3], 1, 1, 5),
}
# A: "row", "strided" (row-major, ld > k), "col" (a transposed view); B: "row", "col" (col x col
# reaches the kernels with B made contiguous, as cuda.cpp does).
LAYOUTS = list(itertools.product(["row", "strided", "col"], ["row", "col"]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["3d", "2d"])
@pytest.mark.parametrize("layouts", LAYOUTS, ids="-".join)
@pytest.mark.parametrize("case", list(GEMM_CASES))
def test_fallback_against_cpu_op(zero_lib, fallback_lib, dtype, mode, layouts, case):
    sizes, tail, k, n = GEMM_CASES[case]
    c = make_call(mode, sizes, tail, k, n, dtype, *layouts)
    out, flag = simt_grouped_mm(zero_lib, fallback_lib, c)
    assert flag == 0
    check_gemm(c, out, f"{mode} {case} {layouts} {dtype}")
    if mode == "3d":
        assert torch.all(out[sum(sizes) :] == 0), "rows past offsets[-1] are not zero"


def groupwise(c, dtype):
    """The output from torch.mm per group over the clamped bounds, computed in dtype (what the
    CPU op computes for valid offsets; it rejects bad ones, whose clamped groups this follows)."""
    out = torch.zeros(c.out_shape, dtype=dtype)
    total = c.k if c.ragged_k else c.m
    for g, (begin, end, _) in enumerate(bounds(c.offsets.tolist(), total)):
        a_g, b_g, idx = _group_operands(c, g, begin, end)
        if a_g.shape[0] and b_g.shape[1] and a_g.shape[1]:
            out[idx] = a_g.to(dtype) @ b_g.to(dtype)
    return out


# Gemm-empty calls: only the zero fill runs (launch.cu's gemm_is_empty).
EMPTY_CASES = {
    "3d_k0": ("3d", [2, 0, 1], 2, 0, 5),  # every product an empty sum: all rows zero
    "2d_k0": ("2d", [0, 0, 0], 0, 3, 5),  # the shared dimension is empty: all blocks zero
    "3d_m0": ("3d", [0, 0], 0, 4, 3),
    "2d_m0": ("2d", [2, 1], 0, 0, 3),
    "3d_n0": ("3d", [2, 3], 1, 4, 0),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(EMPTY_CASES))
def test_gemm_empty_calls(zero_lib, fallback_lib, dtype, case):
    mode, sizes, tail, k, n = EMPTY_CASES[case]
    c = make_call(mode, sizes, tail, k, n, dtype)
    assert c.gemm_is_empty()
    out, flag = simt_grouped_mm(zero_lib, fallback_lib, c)
    assert flag == 0
    assert_same_bits(out, torch.ops.mixops.grouped_mm(c.a, c.b, c.offsets), case)
    assert_same_bits(out, torch.zeros(c.out_shape, dtype=dtype), case)


# Bad offsets (the CPU op raises; CUDA clamps, flags and computes the clamped groups). No case
# makes two 2-D x 3-D groups share rows: with decreasing offsets they can, and then two blocks
# write the same rows (a race on output the error flag already marks as invalid).
BAD_OFFSETS = {
    "3d_past_end": ("3d", [3, 20], 10, PAST_END),
    "3d_negative": ("3d", [-2, 4, 6], 8, NEGATIVE | DECREASING),
    "3d_decreasing_last": ("3d", [4, 6, 2], 8, DECREASING),
    "2d_decreasing": ("2d", [3, 2, 7], 9, DECREASING),
    "2d_past_end_negative": ("2d", [4, 50, -1], 9, PAST_END | NEGATIVE | DECREASING),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("case", list(BAD_OFFSETS))
def test_fallback_bad_offsets(zero_lib, fallback_lib, dtype, case):
    mode, offsets, total, bits = BAD_OFFSETS[case]
    k, n = 11, 9
    if mode == "3d":
        a, b = torch.randn(total, k).to(dtype), torch.randn(len(offsets), k, n).to(dtype)
    else:
        a, b = torch.randn(k, total).to(dtype), torch.randn(total, n).to(dtype)
    c = Call(a, b, torch.tensor(offsets, dtype=torch.int32))
    assert error_bits(offsets, total) == bits
    with pytest.raises(RuntimeError, match="offsets"):
        torch.ops.mixops.grouped_mm(c.a, c.b, c.offsets)
    out, flag = simt_grouped_mm(zero_lib, fallback_lib, c)
    assert flag == bits
    assert_close_to_ref(out, groupwise(c, torch.float64), groupwise(c, dtype), case)
    if dtype != torch.float64:
        assert_same_bits(out, fma_model(c), f"{case} vs the fp32 FMA chain")


# ---- zero fill alone -----------------------------------------------------------------------------


def _untouched(out):
    """Bytes still 0xA5, per element (all bytes)."""
    b = out.view(torch.uint8).view(*out.shape, out.element_size())
    return (b == 0xA5).all(-1)


def assert_zero_fill(c, out, what):
    """Exactly the rows / blocks no group writes are zero; every other byte untouched."""
    total = c.k if c.ragged_k else c.m
    bnds = bounds(c.offsets.tolist(), total)
    expect_zero = torch.zeros(c.out_shape, dtype=torch.bool)
    if c.ragged_k:
        for g, (begin, end, _) in enumerate(bnds):
            expect_zero[g] = begin == end
    else:
        first = bnds[-1][1] if c.k > 0 else 0
        expect_zero[first:] = True
    is_zero = out.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[out.element_size()]) == 0
    assert torch.equal(is_zero, expect_zero), f"{what}: zeros (+0.0) not exactly where expected"
    assert torch.equal(_untouched(out), ~expect_zero), f"{what}: touched what a group writes"


# (mode, offsets, total, other, n): total is the ragged extent (m in 2-D x 3-D, k in 2-D x 2-D),
# other a's remaining dimension (k, resp. m). n picks the store unit: n * element size a multiple
# of 16 bytes gives 16-byte stores, else one element per store. "grid_stride": more stores than
# the grid (NUM_SMS * 8 blocks of 256 threads in 2-D x 3-D, 32 per group in 2-D x 2-D) has threads.
ZERO_CASES = {
    "3d_tail": ("3d", [3, 3, 9], 14, 4, 8),
    "3d_tail_odd_n": ("3d", [0, 5], 9, 4, 5),
    "3d_no_tail": ("3d", [2, 6], 6, 3, 16),
    "3d_all_empty": ("3d", [0, 0, 0], 7, 2, 3),
    "3d_k0": ("3d", [2, 5], 9, 0, 8),
    "3d_grid_stride": ("3d", [1, 2], 330, 1, 21),
    "3d_grid_stride_16b": ("3d", [1, 2], 330, 1, 32),
    "2d_empty_groups": ("2d", [0, 4, 4, 9, 9], 9, 6, 8),
    "2d_odd_n": ("2d", [3, 3, 5], 6, 5, 7),
    "2d_k0": ("2d", [0, 0], 0, 3, 4),
    "2d_grid_stride": ("2d", [0, 1], 1, 97, 90),
    # bad offsets: clamped bounds decide what is zero
    "3d_bad": ("3d", [4, -1, 12, 30], 10, 2, 8),
    "3d_decreasing": ("3d", [6, 2], 10, 2, 3),
    "2d_bad": ("2d", [-3, 2, 2, 1, 40], 6, 3, 8),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(ZERO_CASES))
def test_zero_fill(zero_lib, dtype, case):
    mode, offsets, total, other, n = ZERO_CASES[case]
    if mode == "3d":
        a, b = torch.randn(total, other).to(dtype), torch.randn(len(offsets), other, n).to(dtype)
    else:
        a, b = torch.randn(other, total).to(dtype), torch.randn(total, n).to(dtype)
    c = Call(a, b, torch.tensor(offsets, dtype=torch.int32))
    out, flag = simt_zero_fill(zero_lib, c)
    assert flag == error_bits(offsets, total), case
    assert_zero_fill(c, out, f"{case} {dtype}")


# Offsets that set each GroupedMmError bit alone and together, in gemm-empty calls too (m == 0,
# k == 0: the zero fill checks offsets whatever the sizes, as the CPU op does).
FLAG_CASES = [
    ("3d", [2, -1, 3], 5, 4, NEGATIVE | DECREASING),
    ("3d", [3, 1, 4], 5, 4, DECREASING),
    ("3d", [2, 6], 5, 4, PAST_END),
    ("3d", [-1], 5, 4, NEGATIVE | DECREASING),
    ("3d", [0, 3], 0, 4, PAST_END),  # m == 0
    ("3d", [2, 9], 5, 0, PAST_END),  # k == 0
    ("2d", [1, 0, 7], 6, 3, DECREASING | PAST_END),
    ("2d", [0, 2], 0, 3, PAST_END),  # k == 0 (the ragged dimension)
    ("2d", [-5, -5, 2], 4, 0, NEGATIVE | DECREASING),  # m == 0
    ("2d", [1, 2, 3], 3, 2, 0),
]


@pytest.mark.parametrize("case", FLAG_CASES, ids=str)
def test_zero_fill_error_bits(zero_lib, case):
    mode, offsets, total, other, bits = case
    assert error_bits(offsets, total) == bits
    if mode == "3d":
        a, b = torch.randn(total, other), torch.randn(len(offsets), other, 3)
    else:
        a, b = torch.randn(other, total), torch.randn(total, 3)
    c = Call(a, b, torch.tensor(offsets, dtype=torch.int32))
    out, flag = simt_zero_fill(zero_lib, c)
    assert flag == bits
    assert_zero_fill(c, out, str(case))


# ---- argument builder ----------------------------------------------------------------------------


def _pattern(shape, dtype):
    t = torch.empty(shape, dtype=dtype)
    t.view(torch.uint8).fill_(0xA5)
    return t


def simt_build_args(args_lib, c, rule):
    """The builder's arrays for c as {name: tensor} (pointers as int64), and the error flag.
    launch_checked in the driver runs the launch under the four harness runs."""
    e = c.num_groups
    out, flag = c.out(), torch.zeros(1, dtype=torch.int32)
    p = c.params(out, flag)
    arrays = {"shapes": _pattern((e, 3), torch.int32)}
    for name in ("ptr_a", "ptr_b", "ptr_d", "ld_a", "ld_b", "ld_d"):
        arrays[name] = _pattern((e,), torch.int64)
    call(
        args_lib.simt_build_group_args,
        ctypes.byref(p),
        rule,
        *(t.data_ptr() for t in arrays.values()),
        run=RUNS[0],
    )
    return arrays, int(flag.item()), p


def may_misalign(c):
    """grouped_mm_may_misalign."""
    if c.ragged_k:
        return c.a_layout == ROW or c.b_layout == COL
    return c.a_layout == COL


def group_problem(c, p, g, begin, end):
    """grouped_mm_group_problem: (gm, gn, gk, a_offset, b_offset, out_offset) in elements."""
    if c.ragged_k:
        ao, bo, oo = begin * p.a_stride_k, begin * p.b_stride_k, g * p.out_stride_e
        return c.m, c.n, end - begin, ao, bo, oo
    ao, bo, oo = begin * p.a_stride_m, g * p.b_stride_e, begin * p.out_stride_m
    return end - begin, c.n, c.k, ao, bo, oo


def group_aligned(c, offsets, length, rule):
    """grouped_mm_group_aligned, written out: 16-byte vectors."""
    if rule == ANY:
        return True
    v = 16 // c.a.element_size()
    if any(o % v for o in offsets):
        return False
    return rule == TMA or not may_misalign(c) or length % v == 0


def expected_args(c, p, rule):
    """grouped_mm_group_problem and the builder's rules, from the offsets, in Python."""
    es = c.a.element_size()
    total = c.k if c.ragged_k else c.m
    shapes, ptr_a, ptr_b, ptr_d = [], [], [], []
    for g, (begin, end, _) in enumerate(bounds(c.offsets.tolist(), total)):
        gm, gn, gk, ao, bo, oo = group_problem(c, p, g, begin, end)
        skip = (
            gm == 0 or gn == 0 or gk == 0 or not group_aligned(c, (ao, bo, oo), end - begin, rule)
        )
        shapes.append([0 if skip else gm, gn, gk])
        ptr_a.append(p.a + ao * es)
        ptr_b.append(p.b + bo * es)
        ptr_d.append(p.out + oo * es)
    e = c.num_groups
    ld_a = p.a_stride_m if p.a_layout == ROW else p.a_stride_k
    ld_b = p.b_stride_k if p.b_layout == ROW else p.b_stride_n
    return {
        "shapes": torch.tensor(shapes, dtype=torch.int32).view(e, 3),
        "ptr_a": torch.tensor(ptr_a, dtype=torch.int64),
        "ptr_b": torch.tensor(ptr_b, dtype=torch.int64),
        "ptr_d": torch.tensor(ptr_d, dtype=torch.int64),
        "ld_a": torch.full((e,), ld_a, dtype=torch.int64),
        "ld_b": torch.full((e,), ld_b, dtype=torch.int64),
        "ld_d": torch.full((e,), p.out_stride_m, dtype=torch.int64),
    }


def random_sizes(e, seed, zero_frac=0.3, high=13):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, high, (e,), generator=g)
    sizes[torch.rand(e, generator=g) < zero_frac] = 0
    return sizes.tolist()


# (mode, a layout, b layout): every canonical layout pair of both modes; "A col" (2-D x 3-D) and
# "A row" / "B col" (2-D x 2-D) start groups at arbitrary elements (grouped_mm_may_misalign).
ARGS_LAYOUTS = [
    ("3d", "row", "row"),
    ("3d", "col", "row"),
    ("3d", "row", "col"),
    ("2d", "row", "row"),
    ("2d", "row", "col"),
    ("2d", "col", "row"),
]
# (dtype, rule): as the launchers instantiate the builder: sm80.cuh with kAny (fp32 SIMT) and
# kCutlass2 (bf16/fp16 tensor ops, fp32 TF32), sm90.cuh with kTma (bf16/fp16).
BUILDERS = [
    (torch.float32, ANY),
    (torch.float32, CUTLASS2),
    (torch.bfloat16, CUTLASS2),
    (torch.float16, CUTLASS2),
    (torch.bfloat16, TMA),
    (torch.float16, TMA),
]


def _builder_id(b):
    return f"{b[0]}-{RULE_NAME[b[1]]}"


@pytest.mark.parametrize("builder", BUILDERS, ids=_builder_id)
@pytest.mark.parametrize("layouts", ARGS_LAYOUTS, ids="-".join)
def test_build_group_args(args_lib, builder, layouts):
    # E = 200: two blocks of kBuildArgsThreads, the second partial; empty groups; k and n
    # multiples of 8 as the vector paths require, so only the ragged dimension can misalign.
    dtype, rule = builder
    mode, la, lb = layouts
    sizes = random_sizes(200, seed=ARGS_LAYOUTS.index(layouts))
    c = make_call(mode, sizes, 5, 16, 24, dtype, la, lb)
    assert (c.a_layout, c.b_layout) == (ROW if la == "row" else COL, ROW if lb == "row" else COL)
    got, flag, p = simt_build_args(args_lib, c, rule)
    assert flag == 0
    want = expected_args(c, p, rule)
    for name, t in want.items():
        assert torch.equal(got[name], t), f"{name} differs at {(got[name] != t).nonzero()[:4]}"
    # The case exercises what it should: some non-empty group skipped for its alignment exactly
    # when the rule is a vector rule and the layout can misalign.
    nonempty = torch.tensor(
        [end > begin for begin, end, _ in bounds(c.offsets.tolist(), c.k if c.ragged_k else c.m)]
    )
    skipped = bool((nonempty & (got["shapes"][:, 0] == 0)).any())
    assert skipped == (rule != ANY and may_misalign(c))


def test_cutlass2_rule_skips_partial_vectors(args_lib):
    # kCutlass2 also skips an aligned start whose extent is not whole vectors (CUTLASS 2 would read
    # the next group's elements); kTma takes it (TMA zero-fills partial tiles).
    a, b = torch.randn(16, 40).bfloat16(), torch.randn(40, 8).bfloat16()  # ragged_k, A row-major
    c = Call(a, b, torch.tensor([8, 13, 16, 24, 40], dtype=torch.int32))
    want = {CUTLASS2: [16, 0, 0, 16, 16], TMA: [16, 16, 0, 16, 16]}  # [8,13) [13,16) misaligned
    for rule, rows in want.items():
        got, _, p = simt_build_args(args_lib, c, rule)
        assert got["shapes"][:, 0].tolist() == rows, RULE_NAME[rule]


BAD_ARGS_OFFSETS = [
    ("3d", [3, -2, 9, 40], 12, NEGATIVE | DECREASING | PAST_END),
    ("2d", [5, 5, 2, 8], 8, DECREASING),
    ("2d", [0, 30], 16, PAST_END),
]


@pytest.mark.parametrize("case", BAD_ARGS_OFFSETS, ids=str)
@pytest.mark.parametrize("rule", [CUTLASS2, TMA], ids=RULE_NAME.get)
def test_build_group_args_bad_offsets(args_lib, case, rule):
    mode, offsets, total, bits = case
    assert error_bits(offsets, total) == bits
    if mode == "3d":  # A column-major: group starts can misalign
        a, b = torch.randn(8, total).t(), torch.randn(len(offsets), 8, 16)
    else:
        a, b = torch.randn(16, total), torch.randn(total, 8)
    c = Call(a.bfloat16(), b.bfloat16(), torch.tensor(offsets, dtype=torch.int32))
    got, flag, p = simt_build_args(args_lib, c, rule)
    assert flag == bits
    for name, t in expected_args(c, p, rule).items():
        assert torch.equal(got[name], t), f"{name}: {got[name]} != {t}"


# ---- the groups a CUTLASS path skipped: the fallback kernel for those only -----------------------


def simt_rescue(rescue_lib, c, out, rule):
    """Runs the fallback kernel for the groups `rule` skips on out (in place) under every harness
    run, each on a copy of out, requiring the same bits."""
    p = c.params(out)
    start, result = out.clone(), None
    for run in RUNS:
        out.copy_(start)
        call(rescue_lib.simt_grouped_mm_fallback_skipped, ctypes.byref(p), rule, NUM_SMS, run=run)
        if result is None:
            result = out.clone()
        else:
            assert torch.equal(out.view(torch.uint8), result.view(torch.uint8)), (
                f"schedule {run.schedule} (poison {run.poison:#x}) wrote different bits"
            )
    return p


def skipped_groups(c, p, rule):
    """Non-empty groups that break `rule` (group_aligned on grouped_mm_group_problem's offsets)."""
    total = c.k if c.ragged_k else c.m
    groups = []
    for g, (begin, end, _) in enumerate(bounds(c.offsets.tolist(), total)):
        gm, gn, gk, *offs = group_problem(c, p, g, begin, end)
        if gm and gn and gk and not group_aligned(c, offs, end - begin, rule):
            groups.append((g, begin, end))
    return groups


def check_rescue(rescue_lib, c, rule, what):
    out = c.out()
    p = simt_rescue(rescue_lib, c, out, rule)
    v = 16 // c.a.element_size()
    for ld in (p.a_stride_m if c.a_layout == ROW else p.a_stride_k,
               p.b_stride_k if c.b_layout == ROW else p.b_stride_n, p.out_stride_m):  # fmt: skip
        assert ld % v == 0, "not a call the vector paths take (path.h)"
    groups = skipped_groups(c, p, rule)
    written = torch.zeros(c.out_shape, dtype=torch.bool)
    for g, begin, end in groups:
        written[(g,) if c.ragged_k else (slice(begin, end),)] = True
    assert torch.equal(_untouched(out), ~written), f"{what}: wrote outside the skipped groups"
    model, cpu = fma_model(c), torch.ops.mixops.grouped_mm(c.a, c.b, c.offsets)
    hi = torch.ops.mixops.grouped_mm(c.a.double(), c.b.double(), c.offsets)
    assert_same_bits(out[written], model[written], f"{what} vs the fp32 FMA chain")
    assert_close_to_ref(out[written], hi[written], cpu[written], what)
    return groups


# (mode, a layout, b layout): the layouts that can misalign, and one that cannot (nothing to do).
RESCUE_LAYOUTS = [
    ("3d", "col", "row"),
    ("2d", "row", "row"),
    ("2d", "row", "col"),
    ("2d", "col", "row"),
]
# Group starts 0, 8, 13, 13, 29, 40, 43 (+ 8 rows past the end): misaligned, empty, aligned
# again after misaligned ones, aligned starts with partial vectors (8 + 5, 40 + 3); the 45-element
# group has more outputs than the grid has threads.
RESCUE_SIZES = [8, 5, 0, 16, 11, 3, 45]
# (dtype, rule) of the paths that skip groups.
RESCUERS = [
    (torch.bfloat16, TMA),
    (torch.float16, TMA),
    (torch.bfloat16, CUTLASS2),
    (torch.float16, CUTLASS2),
    (torch.float32, CUTLASS2),
]


@pytest.mark.parametrize("rescuer", RESCUERS, ids=_builder_id)
@pytest.mark.parametrize("layouts", RESCUE_LAYOUTS, ids="-".join)
def test_rescue_skipped_groups(rescue_lib, rescuer, layouts):
    dtype, rule = rescuer
    mode, la, lb = layouts
    c = make_call(mode, RESCUE_SIZES, 8, 48, 24, dtype, la, lb)
    groups = check_rescue(rescue_lib, c, rule, f"{layouts} {dtype} {RULE_NAME[rule]}")
    # group 2 is empty; TMA takes 0 and 5 (aligned starts), CUTLASS 2 only 0 (5 has 3 elements).
    want = [3, 4, 6] if rule == TMA else [1, 3, 4, 5, 6]
    assert [g for g, _, _ in groups] == (want if may_misalign(c) else [])


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("rescuer", [RESCUERS[0], RESCUERS[2], RESCUERS[4]], ids=_builder_id)
@pytest.mark.parametrize("layouts", RESCUE_LAYOUTS[:3], ids="-".join)
def test_builder_and_rescue_cover_each_group_once(args_lib, rescue_lib, seed, rescuer, layouts):
    # A vector path: CUTLASS computes the groups the builder gives m > 0, the fallback kernel the
    # others. Together: every non-empty group exactly once.
    dtype, rule = rescuer
    mode, la, lb = layouts
    sizes = random_sizes(24, seed=100 + seed, high=20)
    c = make_call(mode, sizes, 3, 16, 8, dtype, la, lb)
    got, _, p = simt_build_args(args_lib, c, rule)
    out = c.out()
    simt_rescue(rescue_lib, c, out, rule)
    total = c.k if c.ragged_k else c.m
    for g, (begin, end, _) in enumerate(bounds(c.offsets.tolist(), total)):
        by_cutlass = int(got["shapes"][g, 0]) > 0
        block = out[g] if c.ragged_k else out[begin:end]
        by_rescue = bool((~_untouched(block)).any())
        if end > begin:
            assert by_cutlass != by_rescue, f"group {g} [{begin}, {end}): cutlass {by_cutlass}"
        else:
            assert not by_cutlass and not by_rescue, f"empty group {g}"


# ---- bigger grids (pytest -m large) --------------------------------------------------------------


def _rand(g, lo, hi):
    return int(torch.randint(lo, hi, (1,), generator=g))


@pytest.mark.large
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["3d", "2d"])
@pytest.mark.parametrize("seed", range(4))
def test_fallback_random_large(zero_lib, fallback_lib, dtype, mode, seed):
    g = torch.Generator().manual_seed(seed)
    e = _rand(g, 1, 10)
    sizes = random_sizes(e, seed, high=150)
    k, n, tail = _rand(g, 1, 140), _rand(g, 1, 150), _rand(g, 0, 20)
    layouts = LAYOUTS[_rand(g, 0, len(LAYOUTS))]
    c = make_call(mode, sizes, tail, k, n, dtype, *layouts)
    out, flag = simt_grouped_mm(zero_lib, fallback_lib, c)
    assert flag == 0
    check_gemm(c, out, f"{mode} sizes={sizes} tail={tail} k={k} n={n} {layouts} {dtype}")


@pytest.mark.large
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["3d", "2d"])
@pytest.mark.parametrize("seed", range(4))
def test_zero_fill_random_large(zero_lib, dtype, mode, seed):
    # Random offsets, a quarter of them bad (negative, decreasing, past the end).
    g = torch.Generator().manual_seed(seed)
    e, total = _rand(g, 1, 40), _rand(g, 0, 400)
    offsets = sorted(_rand(g, 0, total + 1) for _ in range(e))
    for i in range(e):
        if _rand(g, 0, 4) == 0:
            offsets[i] = _rand(g, -5, total + 10)
    k, n = _rand(g, 0, 5), _rand(g, 1, 70)
    if mode == "3d":
        a, b = torch.randn(total, k).to(dtype), torch.randn(e, k, n).to(dtype)
    else:
        a, b = torch.randn(k, total).to(dtype), torch.randn(total, n).to(dtype)
    c = Call(a, b, torch.tensor(offsets, dtype=torch.int32))
    out, flag = simt_zero_fill(zero_lib, c)
    assert flag == error_bits(offsets, total)
    assert_zero_fill(c, out, f"{mode} offsets={offsets} total={total} k={k} n={n}")


@pytest.mark.large
@pytest.mark.parametrize("builder", BUILDERS, ids=_builder_id)
@pytest.mark.parametrize("layouts", ARGS_LAYOUTS, ids="-".join)
def test_build_group_args_large(args_lib, builder, layouts):
    # E = 1000 (8 blocks), every tenth offset bad.
    dtype, rule = builder
    mode, la, lb = layouts
    sizes = random_sizes(1000, seed=ARGS_LAYOUTS.index(layouts), high=9)
    c = make_call(mode, sizes, 5, 16, 24, dtype, la, lb)
    offsets = c.offsets.clone()
    offsets[::10] = torch.randint(-50, c.offsets[-1].item() + 50, (100,), dtype=torch.int32)
    c.offsets = offsets
    total = c.k if c.ragged_k else c.m
    got, flag, p = simt_build_args(args_lib, c, rule)
    assert flag == error_bits(offsets.tolist(), total)
    for name, t in expected_args(c, p, rule).items():
        assert torch.equal(got[name], t), f"{name} differs at {(got[name] != t).nonzero()[:4]}"


@pytest.mark.large
@pytest.mark.parametrize("rescuer", RESCUERS, ids=_builder_id)
@pytest.mark.parametrize("layouts", RESCUE_LAYOUTS, ids="-".join)
@pytest.mark.parametrize("seed", range(3))
def test_rescue_random_large(rescue_lib, rescuer, layouts, seed):
    dtype, rule = rescuer
    mode, la, lb = layouts
    g = torch.Generator().manual_seed(seed)
    sizes = random_sizes(_rand(g, 1, 12), seed, high=90)
    tail = (-sum(sizes)) % 8 + 8 * _rand(g, 0, 3)  # the ragged extent a multiple of 8 (its ld)
    k, n = 8 * _rand(g, 1, 12), 8 * _rand(g, 1, 12)
    c = make_call(mode, sizes, tail, k, n, dtype, la, lb)
    groups = check_rescue(rescue_lib, c, rule, f"{layouts} sizes={sizes} k={k} n={n} {dtype}")
    total = c.k if c.ragged_k else c.m
    v = 16 // c.a.element_size()
    spans = [(b, e) for b, e, _ in bounds(c.offsets.tolist(), total) if e > b]
    partial = rule == CUTLASS2 and any((e - b) % v for b, e in spans)
    assert bool(groups) == (may_misalign(c) and (any(b % v for b, _ in spans) or partial))
