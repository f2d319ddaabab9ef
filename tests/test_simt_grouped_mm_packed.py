"""grouped_mm_packed's CUDA kernels under the SIMT harness (tests/simt): the real launch code of
the zero fill (csrc/grouped_mm/zero.cu, zero_fill_packed_kernel) and of the fallback GEMM
(fallback.cu) on params filled as csrc/grouped_mm/cuda.cpp's grouped_mm_packed_cuda fills them:

  * zero fill + fallback (every group) against the CPU op, over a 0xA5-poisoned output, for every
    mode, dtype and canonical layout pair, widths 0 and 1, groups with no rows, tails;
  * zero fill alone: zeros exactly where no group writes, every other byte untouched;
  * bad offsets / ends: the exact error bits (GroupedMmError), clamped bounds, nothing out of
    bounds;
  * the rescue launch (kTma, kCutlass2) computes exactly the groups that break the rule.
"""

import ctypes
import itertools

import pytest
import torch

from helpers import assert_close_to_ref
from mixops.ops import grouped_mm_packed
from packed_reference import layout_randn, packed_shapes
from simt_driver import SimtRun, call, load_driver, requires_cxx, run_all
from test_simt_grouped_mm import DTYPE, ROW, SimtGroupedMm, _fix, _layout_of

pytestmark = requires_cxx

I64, PTR = ctypes.c_int64, ctypes.c_void_p
PACKED = {"mn": (0, 1), "mk": (0, 2), "km": (1, 3), "kn": (1, 1)}  # (ragged_k, PackedDim)
ANY, TMA, CUTLASS2 = 0, 1, 2
NUM_SMS = 1
ENDS_SHIFT, WIDTH_PAST_MAX = 3, 64


class SimtGroupedMmPacked(ctypes.Structure):
    _fields_ = [
        ("base", SimtGroupedMm),
        ("packed", ctypes.c_int32),
        ("pad", ctypes.c_int32),
        ("ends", PTR),
        ("width", I64),
        ("total", I64),
    ]


TAIL = [ctypes.POINTER(SimtRun), ctypes.c_char_p, ctypes.c_int]
PARAMS = ctypes.POINTER(SimtGroupedMmPacked)


def _load(name, fn, types):
    lib = load_driver(name)
    lib.simt_grouped_mm_packed_params_size.restype = ctypes.c_size_t
    assert lib.simt_grouped_mm_packed_params_size() == ctypes.sizeof(SimtGroupedMmPacked)
    getattr(lib, fn).argtypes = [*types, *TAIL]
    return lib


@pytest.fixture(scope="module")
def zero_lib():
    return _load("grouped_mm_packed_zero", "simt_grouped_mm_packed_zero", [PARAMS, ctypes.c_int])


@pytest.fixture(scope="module")
def fallback_lib():
    return _load(
        "grouped_mm_packed_fallback",
        "simt_grouped_mm_packed_fallback",
        [PARAMS, ctypes.c_int, ctypes.c_int],
    )


class PackedCall:
    """One call's operands and params, canonicalised as cuda.cpp's grouped_mm_packed_cuda."""

    def __init__(self, a, b, offsets, ends, mode, width, total):
        assert offsets.numel() > 0, "cuda.cpp answers E == 0 itself"
        self.args = (a, b, offsets, ends, mode, width, total)
        self.out_shape = grouped_mm_packed(*self.args).shape  # the CPU op (checks shapes)
        la = _layout_of(*a.shape, *a.stride())
        if la is None:
            a, la = a.contiguous(), ROW
        lb = _layout_of(*b.shape, *b.stride())
        if lb is None or (la != ROW and lb != ROW):
            b, lb = b.contiguous(), ROW
        self.a, self.b, self.la, self.lb = a, b, la, lb
        self.offsets, self.ends = offsets.contiguous(), ends.contiguous()
        self.mode, self.width, self.total, self.dtype = mode, width, total, a.dtype
        ragged_k, packed = PACKED[mode]
        self.ragged_k, self.packed = ragged_k, packed
        self.m = width if mode == "km" else a.shape[0]
        self.k = width if mode == "mk" else a.shape[1]
        self.n = width if mode in ("mn", "kn") else b.shape[1]

    def out(self):
        t = torch.empty(self.out_shape, dtype=self.dtype)
        t.view(torch.uint8).fill_(0xA5)
        return t

    def params(self, out, flag):
        s = SimtGroupedMmPacked()
        p = s.base
        p.dtype, p.ragged_k, p.num_groups = DTYPE[self.dtype], self.ragged_k, self.offsets.numel()
        p.m, p.n, p.k = self.m, self.n, self.k
        p.a, p.a_layout = self.a.data_ptr(), self.la
        p.a_stride_m, p.a_stride_k = _fix(self.la, *self.a.shape, *self.a.stride())
        p.b, p.b_layout = self.b.data_ptr(), self.lb
        p.b_stride_k, p.b_stride_n = _fix(self.lb, *self.b.shape, *self.b.stride())
        p.out, p.out_stride_m = out.data_ptr(), max(out.stride(0), out.shape[1], 1)
        p.offsets, p.error_flag = self.offsets.data_ptr(), flag.data_ptr()
        s.packed, s.ends, s.width, s.total = (
            self.packed,
            self.ends.data_ptr(),
            self.width,
            self.total,
        )
        return s

    def gemm_is_empty(self):
        return self.m <= 0 or self.n <= 0 or self.k <= 0


def simt_run(zero_lib, fallback_lib, c, rule=ANY, gemm=True):
    def launch(outs, run):
        out, flag = outs
        s = c.params(out, flag)
        call(zero_lib.simt_grouped_mm_packed_zero, ctypes.byref(s), NUM_SMS, run=run)
        if gemm and not c.gemm_is_empty():
            call(
                fallback_lib.simt_grouped_mm_packed_fallback,
                ctypes.byref(s),
                rule,
                NUM_SMS,
                run=run,
            )

    out, flag = run_all(lambda: [c.out(), torch.zeros(1, dtype=torch.int32)], launch)
    return out, int(flag.item())


def cumsum32(xs):
    return torch.tensor(list(itertools.accumulate(xs)), dtype=torch.int32)


def make_call(mode, widths, rows, tails, dtype, a_layout="row", b_layout="row", fixed=5, pad=1):
    width = max(widths) + pad
    ragged, total = sum(rows) + tails[0], sum(widths) + tails[1]
    shapes = packed_shapes(mode, fixed, width, total, ragged)
    a, b = (layout_randn(sh, lay, dtype) for sh, lay in zip(shapes, (a_layout, b_layout)))
    return PackedCall(a, b, cumsum32(rows), cumsum32(widths), mode, width, total)


CASES = {
    "mixed": ([3, 0, 1, 5, 2], [4, 3, 0, 2, 5], (2, 1)),
    "wide": ([9, 17, 1, 0, 24], [7, 0, 19, 3, 1], (3, 0)),
}
LAYOUTS = [("row", "row"), ("row", "col"), ("col", "row")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", list(PACKED))
@pytest.mark.parametrize("layouts", LAYOUTS, ids=lambda x: "".join(v[0] for v in x))
@pytest.mark.parametrize("case", list(CASES))
def test_zero_and_fallback_against_cpu_op(zero_lib, fallback_lib, dtype, mode, layouts, case):
    widths, rows, tails = CASES[case]
    c = make_call(mode, widths, rows, tails, dtype, *layouts)
    out, flag = simt_run(zero_lib, fallback_lib, c)
    assert flag == 0
    ours_cpu = grouped_mm_packed(*c.args)
    a, b, *rest = c.args
    hi = grouped_mm_packed(a.double(), b.double(), *rest)
    assert_close_to_ref(out, hi, ours_cpu, f"{mode}/{case}")
    assert torch.equal(out[hi == 0], torch.zeros_like(out[hi == 0])), "zeros where none write"


def expected_zero(c):
    """Where no group writes (from the definition): the CPU op on all-ones operands is 0 there
    exactly (every written element is a sum of >= 1 ones), except empty sums, which are zero too."""
    a, b, *rest = c.args
    return (
        grouped_mm_packed(
            torch.ones_like(a, dtype=torch.float64), torch.ones_like(b, dtype=torch.float64), *rest
        )
        == 0
    )


@pytest.mark.parametrize("mode", list(PACKED))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_zero_fill_alone(zero_lib, fallback_lib, mode, dtype):
    widths, rows, tails = CASES["mixed"]
    c = make_call(mode, widths, rows, tails, dtype)
    out, flag = simt_run(zero_lib, fallback_lib, c, gemm=False)
    assert flag == 0
    raw = out.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[out.element_size()])
    poison = torch.empty(1, dtype=dtype)
    poison.view(torch.uint8).fill_(0xA5)
    poison_raw = poison.view(raw.dtype)[0]
    want = expected_zero(c)
    assert torch.equal(raw == 0, want), f"{mode}: zeros not exactly where no group writes"
    assert torch.all(raw[~want] == poison_raw), f"{mode}: touched what a group writes"


# (offsets, ends, expected bits): offsets bits 1/2/4, ends bits 8/16/32, width 64. As in
# test_simt_grouped_mm.py, no case makes two groups overlap (decreasing values only last): then two
# blocks would write the same elements, a race on output the error flag already marks invalid.
BAD = [
    ([4, 7, 14, 10], [2, 2, 4, 6], 2),
    ([4, 7, 14, 16], [2, 2, 4, 6], 4),
    ([4, 7, 14, 14], [2, 2, 4, -1], 8 | 16),
    ([4, 7, 14, 14], [2, 2, 4, 3], 16),
    ([4, 7, 14, 14], [2, 2, 4, 9], 32 | 64),  # clamped to total = 8: width 4 > 3
    ([4, 7, 14, 14], [2, 2, 7, 7], 64),
    ([-1, 7, 14, 20], [5, 6, 6, 99], 1 | 2 | 4 | 32 | 64),
]


@pytest.mark.parametrize("mode", list(PACKED))
@pytest.mark.parametrize("offsets, ends, bits", BAD)
def test_bad_offsets_and_ends(zero_lib, fallback_lib, mode, offsets, ends, bits):
    """Invalid values set exactly their bits; clamped bounds keep every access in bounds."""
    good = make_call(mode, [2, 0, 2, 2], [4, 3, 7, 0], (0, 2), torch.float32, pad=1)  # width 3
    c = PackedCall(
        good.a,
        good.b,
        good.offsets,
        good.ends,
        mode,
        good.width,
        good.total,
    )
    c.offsets = torch.tensor(offsets, dtype=torch.int32)
    c.ends = torch.tensor(ends, dtype=torch.int32)
    out, flag = simt_run(zero_lib, fallback_lib, c)
    assert flag == bits
    assert not torch.any(out.view(torch.int32) == -1515870811), "a byte no kernel wrote"


@pytest.mark.parametrize("mode", list(PACKED))
@pytest.mark.parametrize("rule", [TMA, CUTLASS2])
def test_rescue_computes_exactly_the_skipped_groups(zero_lib, fallback_lib, mode, rule):
    """The rescue launch (the fallback restricted to the groups breaking a rule, after the CUTLASS
    GEMM) writes kAny's values for those groups and nothing for the others. bf16, 8-element
    vectors: group 0 (rows/packed range [0, 8)) is aligned under every rule; group 1 (width 9)
    breaks kCutlass2 only; group 2 starts at packed offset 17, which breaks kTma where the packed
    dimension is unit-stride in an operand or out at that offset (mn: b's columns; km: a's
    columns start at row offset 11; kn: out's columns), but not in mk (b rows, a and out rows)."""
    c = make_call(mode, [8, 9, 16], [8, 3, 16], (0, 0), torch.bfloat16, fixed=8, pad=0)
    out, _ = simt_run(zero_lib, fallback_lib, c, rule=rule)
    full, _ = simt_run(zero_lib, fallback_lib, c, rule=ANY)
    raw, full_raw = out.view(torch.int16), full.view(torch.int16)
    written = raw != -23131  # 0xA5A5: not written
    assert torch.equal(raw[written], full_raw[written]), "rescued values differ from kAny's"
    zeros = int(expected_zero(c).sum())
    assert int(written.sum()) < raw.numel(), "group 0 (aligned) must be left to CUTLASS"
    if rule == TMA and mode == "mk":
        assert int(written.sum()) == zeros, "no group breaks kTma in mode mk"
    else:
        assert int(written.sum()) > zeros, "no group was rescued"
