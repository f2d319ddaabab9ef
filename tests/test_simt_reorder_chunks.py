"""reorder_chunks: our real CUDA launch code and kernels (csrc/permute/chunks.cu, chunks_kernel.cuh)
run on the CPU under the SIMT harness (tests/simt), each call under the four harness runs
(schedules x poison bytes, tests/simt_driver.py), bit-equal with the CPU op on the same inputs
(both are pure copies; the inputs are random bits, NaN payloads included).

Covered: every copy unit (16/8/4/2/1 bytes, chosen by the alignment of x's and y's addresses,
x's row stride and the row length), rows of several unroll steps, strided and expanded x, N = 0,
H = 0, zero-size chunks, A or B = 1, S < N, more chunks than one scan tile (1024: the carry
between tiles), the workspace's offsets in both orders, and bad counts: negative entries (taken
as 0) and sums past N (chunks cut at row N of x), flagged with their bits.
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

KCOUNTS_NEGATIVE, KCOUNTS_PAST_ROWS = 8, 16  # permute.h PermuteError
c_i64, c_int, vp = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
_lib = None


def lib():
    global _lib
    if _lib is None:
        so = load_driver("chunks")
        # dtype, N, H, A, B, x, x_stride, counts, y, src_off, dst_off, error_flag, paths
        so.simt_reorder_chunks.argtypes = [c_int, c_i64, c_i64, c_i64, c_i64, vp, c_i64] + [vp] * 6
        _lib = so
    return _lib


def rows_view(t):
    """cuda.cpp's rows_view: a unit column stride is kept, else a contiguous copy."""
    return t if t.stride(1) == 1 else t.contiguous()


def simt_reorder_chunks(x, counts, misalign=0):
    """reorder_chunks through the driver, as cuda.cpp calls it (x keeps its row stride, at
    `misalign` bytes off 16-byte alignment; counts contiguous; y a fresh contiguous tensor).
    Returns (y, src_off, dst_off, error_flag, paths)."""
    x, counts = rows_view(x), counts.contiguous()
    n, h = x.shape
    num_a, num_b = counts.shape
    src = Bytes(x, misalign)
    fills = itertools.cycle(FILLS)

    def make():
        return [
            poisoned(next(fills), (n, h), x.dtype),
            torch.zeros(num_a * num_b + 1, dtype=torch.int32),
            torch.zeros(num_a * num_b + 1, dtype=torch.int32),
            torch.zeros(1, dtype=torch.int32),
            torch.zeros(2, dtype=torch.int32),
        ]

    def launch(o, run):
        call(
            lib().simt_reorder_chunks,
            DTYPE_CODE[x.dtype],
            n,
            h,
            num_a,
            num_b,
            src.ptr,
            x.stride(0),
            addr(counts),
            *[addr(t) for t in o],
            run=run,
        )

    return run_all(make, launch)


def clamped(counts, n):
    """The definition of chunks.cu's clamping (permute.h): negative counts are 0, the chunks are
    cut at row n of x. Returns (src_off, dst_off, error bits, the chunk sizes as counts [A, B]:
    valid counts the CPU op takes to the same y)."""
    num_a, num_b = counts.shape
    flat = counts.flatten().tolist()
    src, run = [], 0
    for v in flat:
        src.append(min(run, n))
        run += max(v, 0)
    src.append(min(run, n))
    sizes = [src[i + 1] - src[i] for i in range(len(flat))]
    dst, acc = [], 0
    for j in range(num_a * num_b):
        dst.append(acc)
        acc += sizes[(j % num_a) * num_b + j // num_a]
    dst.append(acc)
    flag = (KCOUNTS_NEGATIVE if min(flat) < 0 else 0) | (KCOUNTS_PAST_ROWS if run > n else 0)
    clean = torch.tensor(sizes, dtype=torch.int32).view(num_a, num_b)
    return src, dst, flag, clean


def bits(rows, cols, dtype):
    """Random bits of dtype (every pattern: NaN payloads, infinities, -0, subnormals)."""
    es = torch.empty(0, dtype=dtype).element_size()
    if cols == 0:
        return torch.empty(rows, 0, dtype=dtype)
    return torch.randint(0, 256, (rows, cols * es), dtype=torch.uint8).view(dtype)


def make_counts(num_a, num_b, total, zero_frac=0.3):
    """counts [A, B] int32 summing to `total`, about zero_frac of the chunks empty."""
    keep = torch.rand(num_a * num_b) >= zero_frac
    keep[0] = True
    idx = keep.nonzero().view(-1)
    pick = idx[torch.randint(idx.numel(), (total,))]
    return torch.bincount(pick, minlength=num_a * num_b).view(num_a, num_b).int()


def unit_of(es, hidden, x_stride, misalign=0):
    """The copy unit chunks.cu picks: the widest of 16/8/4/2/1 bytes dividing the row length,
    x's row stride (bytes) and x's address (misaligned by the given bytes); y is aligned."""
    sizes = [hidden * es, x_stride * es, misalign]
    return next(u for u in (16, 8, 4, 2, 1) if all(v % u == 0 for v in sizes))


def check(x, counts, *, flag=0, unit=None, misalign=0):
    y, src_off, dst_off, err, paths = simt_reorder_chunks(x, counts, misalign)
    n, h = x.shape
    expect_src, expect_dst, expect_flag, clean = clamped(counts, n)
    assert expect_flag == flag, "the case's expected flag disagrees with the clamping model"
    assert src_off.tolist() == expect_src, "src_off: (a, b) order prefix sums, clamped to N"
    assert dst_off.tolist() == expect_dst, "dst_off: (b, a) order prefix sums of the chunk sizes"
    if flag == 0:
        assert torch.equal(clean, counts), "valid counts are their own clamping"
    bits_equal(y, torch.ops.mixops.reorder_chunks(x, clean), "y")
    assert err.item() == flag, f"error flag {err.item():#x}, expected {flag:#x}"
    if unit is None:
        unit = unit_of(x.element_size(), h, rows_view(x).stride(0), misalign)
    expect = [1, unit if n > 0 and h > 0 else 0]
    assert paths.tolist() == expect, "paths: [offsets kernel ran, copy unit]"


# (N, A, B, S, H): N = 0, S = 0, every row used, a tail past S, A = 1, B = 1, one chunk, zero-size
# chunks, H = 0, row lengths that are no multiple of 16 bytes (3, 5, 6: narrower units), rows of
# more than 32 * kUnroll units (600; 301 in 2-byte units), more chunks than rows, and more chunks
# than one scan tile (40 x 30 = 1200 > 1024: the carry between tiles, in both orders).
CASES = [
    (0, 2, 3, 0, 8),
    (6, 2, 3, 0, 8),
    (12, 3, 4, 12, 8),
    (15, 3, 2, 9, 4),
    (10, 1, 4, 10, 8),
    (10, 4, 1, 7, 8),
    (7, 1, 1, 7, 8),
    (9, 3, 3, 5, 0),
    (11, 2, 5, 8, 3),
    (13, 4, 2, 13, 5),
    (12, 2, 2, 10, 6),
    (17, 3, 3, 15, 600),
    (9, 2, 3, 9, 301),
    (8, 5, 6, 8, 4),
    (70, 40, 30, 61, 3),
]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", list(DTYPE_CODE), ids=str)
def test_reorder_chunks(case, dtype):
    n, num_a, num_b, total, h = case
    check(bits(n, h, dtype), make_counts(num_a, num_b, total))


def test_counts_transposed_is_the_inverse():
    """The backward's call (counts.t(), non-contiguous: made contiguous as cuda.cpp does) puts
    the chunks back."""
    n, h = 20, 4
    counts = make_counts(3, 5, 17)
    x = bits(n, h, torch.float32)
    y = simt_reorder_chunks(x, counts)[0]
    back = simt_reorder_chunks(y, counts.t())[0]
    bits_equal(back[:17], x[:17], "back")
    assert not back[17:].view(torch.int32).any(), "rows past S are zero"


# (dtype, H, x row stride, bytes x is off 16-byte alignment, unit)
UNIT_CASES = [
    (torch.float32, 8, None, 0, 16),
    (torch.float32, 4, None, 0, 16),
    (torch.float32, 2, None, 0, 8),
    (torch.float32, 8, 10, 0, 8),
    (torch.float32, 3, None, 0, 4),
    (torch.float32, 8, 9, 0, 4),
    (torch.float32, 8, None, 4, 4),
    (torch.float32, 8, None, 8, 8),
    (torch.float32, 4, None, 3, 1),
    (torch.bfloat16, 8, None, 0, 16),
    (torch.bfloat16, 4, None, 0, 8),
    (torch.bfloat16, 2, None, 0, 4),
    (torch.bfloat16, 8, 12, 0, 8),
    (torch.bfloat16, 8, 9, 0, 2),
    (torch.bfloat16, 8, None, 1, 1),
    (torch.float16, 5, None, 0, 2),
    (torch.float16, 8, None, 2, 2),
    (torch.float16, 16, 20, 0, 8),
    (torch.float64, 2, None, 0, 16),
    (torch.float64, 3, None, 0, 8),
    (torch.float64, 4, 5, 0, 8),
    (torch.float64, 4, None, 4, 4),
]


@pytest.mark.parametrize("dtype, h, xs, mis, unit", UNIT_CASES, ids=str)
def test_units(dtype, h, xs, mis, unit):
    n = 15
    x = bits(n, xs or h, dtype)[:, :h]
    check(x, make_counts(3, 2, 13), unit=unit, misalign=mis)


@pytest.mark.parametrize("dtype", list(DTYPE_CODE), ids=str)
def test_strided(dtype):
    """Row strides above H, an expanded x (row stride 0) and a transposed x (column stride not 1:
    cuda.cpp copies it)."""
    n, h = 14, 6
    counts = make_counts(2, 3, 12)
    check(bits(n, h + 3, dtype)[:, 1 : h + 1], counts)
    check(bits(1, h, dtype).expand(n, h), counts)
    check(bits(h, n, dtype).t(), counts)


def cnt(*rows):
    return torch.tensor(rows, dtype=torch.int32)


BIG = 2**31 - 1

# (N, counts, flag): negative entries, sums past N (a chunk across row N truncated, the ones past
# it empty), both, counts of 2^31 - 1 (the int64 sums must not wrap), negatives and a sum past N
# with N = 0, and more chunks than one tile with both kinds of bad values.
BAD_CASES = [
    (10, cnt([1, -3, 2], [0, 4, 1]), KCOUNTS_NEGATIVE),
    (10, cnt([-(2**31), 5], [-1, 5]), KCOUNTS_NEGATIVE),
    (10, cnt([4, 3], [5, 2]), KCOUNTS_PAST_ROWS),
    (10, cnt([11, 3], [5, 2]), KCOUNTS_PAST_ROWS),
    (10, cnt([2, -7, 3], [9, 0, 1]), KCOUNTS_NEGATIVE | KCOUNTS_PAST_ROWS),
    (10, cnt([BIG, BIG], [BIG, BIG]), KCOUNTS_PAST_ROWS),
    (10, cnt([3, -1], [BIG, 0]), KCOUNTS_NEGATIVE | KCOUNTS_PAST_ROWS),
    (0, cnt([0, -1], [0, 0]), KCOUNTS_NEGATIVE),
    (0, cnt([0, 0], [1, 0]), KCOUNTS_PAST_ROWS),
]


@pytest.mark.parametrize("n, counts, flag", BAD_CASES, ids=str)
@pytest.mark.parametrize("h", [5, 0])
def test_bad_counts(n, counts, flag, h):
    """CPU raises; CUDA takes negative counts as 0 and cuts the chunks at row N of x, flagging
    each kind (H = 0: nothing copied, the counts still checked)."""
    x = bits(n, h, torch.float32)
    with pytest.raises(RuntimeError, match="reorder_chunks: counts"):
        torch.ops.mixops.reorder_chunks(x, counts)
    check(x, counts, flag=flag)


def test_bad_counts_past_one_tile():
    n, num_a, num_b = 50, 40, 30
    counts = make_counts(num_a, num_b, 45)
    counts.view(-1)[[3, 700, 1100]] = torch.tensor([-5, 7, -(2**31)], dtype=torch.int32)
    check(bits(n, 2, torch.bfloat16), counts, flag=KCOUNTS_NEGATIVE | KCOUNTS_PAST_ROWS)


@pytest.mark.large
@pytest.mark.parametrize(
    "n, num_a, num_b, total, h",
    [(700, 8, 16, 650, 64), (257, 64, 40, 257, 100), (1500, 3, 5, 1400, 3), (90, 4, 4, 80, 520)],
)
@pytest.mark.parametrize("dtype", list(DTYPE_CODE), ids=str)
def test_large(n, num_a, num_b, total, h, dtype):
    x = bits(n, h + 2, dtype)[:, :h]
    check(x, make_counts(num_a, num_b, total))
