"""grouped_mm_packed's CUTLASS argument builder on the SIMT harness (csrc/grouped_mm/args_kernel.cuh,
build_group_args, launched as sm80.cuh / sm90.cuh launch it: tests/simt/drivers/grouped_mm_args.cpp,
simt_build_group_args_packed, under the four harness runs of simt::launch_checked).

Every array it writes (shapes m, n, k; pointers of a, b, d; leading dimensions) is compared with a
model of each group's problem written here from the op's table (python/mixops/ops/
grouped_mm_packed.py), for each mode x canonical layout pair x builder (dtype, GroupAlignRule):
E = 200 (two blocks of the builder, the second partial), random widths including 0, widths that
are no multiple of 8 and packed starts that are not; and the skip rule (a group the rule rejects
gets m = 0, to be computed by the rescue launch):
  * kAny (fp32 SIMT): no group skipped for alignment;
  * kTma (SM90): a group whose first element of a, b or d is not 16-byte aligned;
  * kCutlass2 (SM80, TF32): that, or a width that is no whole number of vectors, or (where the
    ragged dimension is unit-stride in a) a ragged extent that is none.
Bad offsets / ends set exactly their bits and give the clamped problem; offsets past 2^31
elements keep 64 bits (fake base pointers: the builder never dereferences them).
"""

import ctypes

import pytest
import torch

from simt_driver import RUNS, call, load_driver, requires_cxx
from test_simt_grouped_mm import BUILDERS, COL, ROW, _builder_id, bounds
from test_simt_grouped_mm_packed import (
    ANY,
    BAD,
    CUTLASS2,
    PACKED,
    PARAMS,
    TAIL,
    TMA,
    PackedCall,
    SimtGroupedMmPacked,
    make_call,
)

pytestmark = requires_cxx

PTR = ctypes.c_void_p
ESIZE = {0: 4, 1: 2, 2: 2, 3: 8}  # mixops::Dtype -> bytes
ARRAYS = ("ptr_a", "ptr_b", "ptr_d", "ld_a", "ld_b", "ld_d")


@pytest.fixture(scope="module")
def args_lib():
    lib = load_driver("grouped_mm_args")
    lib.simt_grouped_mm_packed_params_size.restype = ctypes.c_size_t
    assert lib.simt_grouped_mm_packed_params_size() == ctypes.sizeof(SimtGroupedMmPacked)
    lib.simt_build_group_args_packed.argtypes = [PARAMS, ctypes.c_int, *[PTR] * 7, *TAIL]
    return lib


def build_args(args_lib, s, e, rule):
    """The builder's arrays for params s ({name: tensor}, pointers as int64) over 0xA5 bytes."""
    arrays = {"shapes": torch.empty(e, 3, dtype=torch.int32)}
    for name in ARRAYS:
        arrays[name] = torch.empty(e, dtype=torch.int64)
    for t in arrays.values():
        t.view(torch.uint8).fill_(0xA5)
    fn = args_lib.simt_build_group_args_packed
    call(fn, ctypes.byref(s), rule, *(t.data_ptr() for t in arrays.values()), run=RUNS[0])
    return arrays


def model(s, offsets, ends, rule):
    """Each group's problem from the op's table, and the builder's rules: (arrays, error bits)."""
    p, mode = s.base, {v: k for k, v in PACKED.items()}[(s.base.ragged_k, s.packed)]
    es, v = ESIZE[p.dtype], 16 // ESIZE[p.dtype]
    ragged_total = p.k if p.ragged_k else p.m
    rows, packed = bounds(offsets, ragged_total), bounds(ends, s.total)
    shapes, ptrs, bits = [], {"ptr_a": [], "ptr_b": [], "ptr_d": []}, 0
    for (r0, r1, err_r), (p0, p1, err_p) in zip(rows, packed):
        w, n_rows = min(p1 - p0, s.width), r1 - r0
        bits |= err_r | err_p << 3 | (64 if p1 - p0 > s.width else 0)
        if mode == "mn":  # out[r, :w] = a[r] @ b[:, P:P+w]
            gm, gn, gk = n_rows, w, p.k
            ao, bo, oo = r0 * p.a_stride_m, p0 * p.b_stride_n, r0 * p.out_stride_m
        elif mode == "mk":  # out[r] = a[r, :w] @ b[P:P+w]
            gm, gn, gk = n_rows, p.n, w
            ao, bo, oo = r0 * p.a_stride_m, p0 * p.b_stride_k, r0 * p.out_stride_m
        elif mode == "km":  # out[P:P+w] = a[:w, r] @ b[r]
            gm, gn, gk = w, p.n, n_rows
            ao, bo, oo = r0 * p.a_stride_k, r0 * p.b_stride_k, p0 * p.out_stride_m
        else:  # kn: out[:, P:P+w] = a[:, r] @ b[r, :w]
            gm, gn, gk = p.m, w, n_rows
            ao, bo, oo = r0 * p.a_stride_k, r0 * p.b_stride_k, p0
        aligned = rule == ANY or all(o % v == 0 for o in (ao, bo, oo))
        if rule == CUTLASS2 and aligned:
            ragged_unit = (
                (p.a_layout == ROW or p.b_layout == COL) if p.ragged_k else p.a_layout == COL
            )
            aligned = w % v == 0 and (not ragged_unit or n_rows % v == 0)
        skip = gm == 0 or gn == 0 or gk == 0 or not aligned
        shapes.append([0 if skip else gm, gn, gk])
        for name, base, off in (("ptr_a", p.a, ao), ("ptr_b", p.b, bo), ("ptr_d", p.out, oo)):
            ptrs[name].append(base + off * es)
    e = len(shapes)
    lds = {
        "ld_a": p.a_stride_m if p.a_layout == ROW else p.a_stride_k,
        "ld_b": p.b_stride_k if p.b_layout == ROW else p.b_stride_n,
        "ld_d": p.out_stride_m,
    }
    want = {"shapes": torch.tensor(shapes, dtype=torch.int32).view(e, 3)}
    want.update({k: torch.tensor(x, dtype=torch.int64) for k, x in ptrs.items()})
    want.update({k: torch.full((e,), x, dtype=torch.int64) for k, x in lds.items()})
    return want, bits


def assert_arrays(got, want, what):
    for name, t in want.items():
        bad = (got[name] != t).nonzero()[:4].tolist()
        assert torch.equal(got[name], t), f"{what}: {name} differs at {bad}"


def run_builder(args_lib, c, rule):
    """(got, want, flag, want_bits) for PackedCall c under rule."""
    out, flag = c.out(), torch.zeros(1, dtype=torch.int32)
    s = c.params(out, flag)
    got = build_args(args_lib, s, c.offsets.numel(), rule)
    want, bits = model(s, c.offsets.tolist(), c.ends.tolist(), rule)
    return got, want, int(flag.item()), bits


def random_widths(e, seed, high=40):
    """Widths and row counts: ~25% zero, the rest any size (most no multiple of 8), ~40% of them
    multiples of 8; the first two groups aligned under every rule."""
    g = torch.Generator().manual_seed(seed)
    widths = torch.randint(1, high, (e,), generator=g)
    widths[torch.rand(e, generator=g) < 0.4] *= 8
    widths[torch.rand(e, generator=g) < 0.25] = 0
    rows = torch.randint(0, 13, (e,), generator=g)
    rows[torch.rand(e, generator=g) < 0.4] *= 8
    rows[torch.rand(e, generator=g) < 0.25] = 0
    widths[:2], rows[:2] = torch.tensor([8, 16]), torch.tensor([16, 8])  # aligned under any rule
    return widths.tolist(), rows.tolist()


LAYOUTS = [("row", "row"), ("row", "col"), ("col", "row")]  # the canonical combos


@pytest.mark.parametrize("builder", BUILDERS, ids=_builder_id)
@pytest.mark.parametrize("layouts", LAYOUTS, ids="".join)
@pytest.mark.parametrize("mode", list(PACKED))
def test_build_group_args_packed(args_lib, mode, layouts, builder):
    dtype, rule = builder
    seed = list(PACKED).index(mode) * 10 + LAYOUTS.index(layouts)
    widths, rows = random_widths(200, seed)
    # Fixed extents and the padded width multiples of 8, the ragged and packed totals too (via
    # tails past the last group): the call's leading dimensions suit every path, so only the
    # groups' own starts and extents decide (path.h rejects the call otherwise).
    pad = 8 + (-max(widths)) % 8
    tails = ((-sum(rows)) % 8 + 8, (-sum(widths)) % 8 + 8)
    c = make_call(mode, widths, rows, tails, dtype, *layouts, fixed=24, pad=pad)
    assert (c.la, c.lb) == tuple(ROW if x == "row" else COL for x in layouts)
    got, want, flag, bits = run_builder(args_lib, c, rule)
    assert flag == 0 and bits == 0
    assert_arrays(got, want, f"{mode} {layouts} {_builder_id(builder)}")
    # The case exercises the rule: non-empty groups skipped for alignment under the vector rules
    # (kCutlass2 always, kTma where a packed or ragged start is unit-stride in some operand), and
    # non-empty groups taken under every rule.
    nonempty = torch.tensor([w > 0 and r > 0 for w, r in zip(widths, rows)])
    taken = got["shapes"][:, 0] != 0
    assert bool((nonempty & taken).any()), "no group left to CUTLASS"
    skipped = bool((nonempty & ~taken).any())
    if rule == ANY:
        assert not skipped
    elif rule == CUTLASS2:
        assert skipped


def test_tma_skips_only_misaligned_starts(args_lib):
    """kTma takes any width (TMA clips partial tiles) but no start off 16 bytes; kCutlass2 takes
    neither. Mode mn, B row-major (packed starts unit-stride in b): widths 8, 9, 7, 16 start at
    0, 8, 17, 24."""
    want = {
        (TMA, torch.bfloat16): [8, 8, 0, 8],
        (CUTLASS2, torch.bfloat16): [8, 0, 0, 8],
        (ANY, torch.float32): [8, 8, 8, 8],
    }
    for (rule, dtype), m in want.items():
        c = make_call("mn", [8, 9, 7, 16], [8, 8, 8, 8], (0, 0), dtype, fixed=16, pad=0)
        got, model_want, _, _ = run_builder(args_lib, c, rule)
        assert got["shapes"][:, 0].tolist() == m, rule
        assert_arrays(got, model_want, f"rule {rule}")


@pytest.mark.parametrize("mode", list(PACKED))
@pytest.mark.parametrize("offsets, ends, bits", BAD)
@pytest.mark.parametrize("rule", [TMA, CUTLASS2])
def test_bad_offsets_and_ends(args_lib, mode, offsets, ends, bits, rule):
    """Invalid values set exactly their bits; the arrays are those of the clamped bounds."""
    good = make_call(mode, [2, 0, 2, 2], [4, 3, 7, 0], (0, 2), torch.bfloat16, pad=1)
    c = PackedCall(good.a, good.b, good.offsets, good.ends, mode, good.width, good.total)
    c.offsets = torch.tensor(offsets, dtype=torch.int32)
    c.ends = torch.tensor(ends, dtype=torch.int32)
    got, want, flag, model_bits = run_builder(args_lib, c, rule)
    assert model_bits == bits and flag == bits
    assert_arrays(got, want, f"{mode} {offsets} {ends}")


@pytest.mark.parametrize("mode", list(PACKED))
def test_offsets_past_2_31_elements(args_lib, mode):
    """Element offsets of 2^32 and more (rows x width, packed starts x ld) stay 64-bit: fake
    base pointers and sizes, nothing allocated or read."""
    big, fixed = 1 << 20, 4096
    offsets = torch.tensor([big // 2, big], dtype=torch.int32)
    ends = torch.tensor([big // 2, big], dtype=torch.int32)
    ragged_k, packed = PACKED[mode]
    s = SimtGroupedMmPacked()
    p = s.base
    p.dtype, p.ragged_k, p.num_groups = 1, ragged_k, 2
    p.a_layout = p.b_layout = ROW
    p.a, p.b, p.out = 1 << 44, 1 << 45, 1 << 46
    s.packed, s.width, s.total, s.ends = packed, big // 2, big, ends.data_ptr()
    p.offsets = offsets.data_ptr()
    # m, n, k and row-major strides of the table's shapes (ragged size big, fixed 4096).
    p.m, p.k, p.n = {
        "mn": (big, fixed, big // 2),
        "mk": (big, big // 2, fixed),
        "km": (big // 2, big, fixed),
        "kn": (fixed, big, big // 2),
    }[mode]
    b_cols = {"mn": big, "mk": fixed, "km": fixed, "kn": big // 2}[mode]
    out_cols = {"mn": big // 2, "mk": fixed, "km": fixed, "kn": big}[mode]
    p.a_stride_m, p.a_stride_k = p.k, 1
    p.b_stride_k, p.b_stride_n = b_cols, 1
    p.out_stride_m = out_cols
    for rule in (TMA, CUTLASS2):
        got = build_args(args_lib, s, 2, rule)
        want, bits = model(s, offsets.tolist(), ends.tolist(), rule)
        assert bits == 0
        assert_arrays(got, want, mode)
        offs = [(got[x][1] - base).item() // 2 for x, base in zip(ARRAYS, (p.a, p.b, p.out))]
        assert max(offs) >= 1 << 31, offs
