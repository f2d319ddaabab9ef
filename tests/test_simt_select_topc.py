"""select_topc's CUDA kernel (csrc/routing/topc_kernel.cuh, launched by the real topc.cu) on the CPU
under the SIMT harness (tests/simt, driver tests/simt/drivers/select_topc.cpp), against the CPU op.

Every call runs under the four harness runs (forward / reversed / shuffled schedules, a different
poison byte for shared memory and the outputs each time) and must give the same bits in all of
them. Then values and indices must be bit-equal to torch.ops.mixops.select_topc on CPU tensors:
the CPU ranks with routing::better directly, the kernel radix-selects on topc::order_key and breaks
ties by index, so this also holds the two formulations of the order equal.
"""

import ctypes

import pytest
import torch

import mixops  # noqa: F401  (registers torch.ops.mixops.*)
from simt_driver import DTYPE_CODE, RUNS, bits_equal, call, load_driver, poisoned, requires_cxx

pytestmark = requires_cxx

_i, _i64, _p = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
FILLS = (0xA5, 0x5A, 0xFF, 0x3C)


@pytest.fixture(scope="module")
def lib():
    lib = load_driver("select_topc")
    lib.simt_select_topc.argtypes = [_i, _i64, _i64, _i64, _p, _p, _p, _p, _p, ctypes.c_char_p, _i]
    return lib


def simt_select_topc(lib, scores, c, mask=None):
    """(values, indices) of the CUDA launch under every harness run (bit-identical across runs)."""
    scores = scores.contiguous()
    mask = None if mask is None else mask.contiguous()
    b, n = scores.shape
    first = None
    for run, fill in zip(RUNS, FILLS):
        values = poisoned(fill, (b, c), scores.dtype)
        indices = poisoned(fill, (b, c), torch.int64)
        call(
            lib.simt_select_topc,
            DTYPE_CODE[scores.dtype],
            b,
            n,
            c,
            _p(scores.data_ptr()),
            None if mask is None else _p(mask.data_ptr()),
            _p(values.data_ptr()),
            _p(indices.data_ptr()),
            run=run,
        )
        if first is None:
            first = (values, indices)
        else:
            bits_equal(values, first[0], f"values, schedule {run.schedule}")
            bits_equal(indices, first[1], f"indices, schedule {run.schedule}")
    return first


def check(lib, scores, c, mask=None, what=""):
    ours = simt_select_topc(lib, scores, c, mask)
    cpu = torch.ops.mixops.select_topc(scores, c, mask)
    bits_equal(ours[1], cpu[1], f"{what} indices")
    bits_equal(ours[0], cpu[0], f"{what} values")


def _scores(b, n, dtype, ties):
    x = torch.randn(b, n, dtype=torch.float64)
    if ties:  # few distinct values: long runs of ties
        x = torch.randint(-3, 4, (b, n)).double()
    return x.to(dtype)


# (batch, n, c): c = 0, c = n, one entry, a row longer than a block with a tail, several rows
CASES = [(1, 1, 1), (3, 5, 0), (2, 7, 7), (4, 33, 5), (2, 300, 1), (3, 300, 257), (5, 61, 30)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_against_cpu_op(lib, dtype, case, ties):
    b, n, c = case
    check(lib, _scores(b, n, dtype, ties), c, what=f"{dtype} {case} ties={ties}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masks_and_short_rows(lib, dtype):
    b, n, c = 6, 40, 9
    x = _scores(b, n, dtype, ties=True)
    mask = torch.rand(b, n) < 0.5
    mask[0] = False  # no eligible entry
    mask[1] = False
    mask[1, [3, 17, 39]] = True  # three eligible: 3 < c
    mask[2, :9] = True
    mask[2, 9:] = False  # exactly c
    check(lib, x, c, mask, f"{dtype} masks")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_inf_and_signed_zero(lib, dtype):
    specials = torch.tensor([float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1.0, -1.0])
    g = torch.Generator().manual_seed(1)
    x = specials[torch.randint(0, len(specials), (8, 70), generator=g)].to(dtype)
    x[0] = float("nan")  # all NaN: the lowest positions
    x[1] = float("-inf")
    mask = torch.rand(8, 70, generator=g) < 0.7
    for c in (0, 1, 20, 69, 70):
        check(lib, x, c, what=f"{dtype} specials c={c}")
        check(lib, x, c, mask, what=f"{dtype} specials masked c={c}")


def test_empty(lib):
    check(lib, torch.randn(0, 5), 3, what="batch 0")
    check(lib, torch.randn(3, 0), 0, what="n 0")


@pytest.mark.large
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", range(3))
def test_random_large(lib, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    b = int(torch.randint(1, 6, (1,), generator=g))
    n = int(torch.randint(1, 3000, (1,), generator=g))
    c = int(torch.randint(0, n + 1, (1,), generator=g))
    x = _scores(b, n, dtype, ties=bool(seed % 2))
    mask = torch.rand(b, n, generator=g) < 0.8
    check(lib, x, c, mask, f"{dtype} {b}x{n} c={c}")
