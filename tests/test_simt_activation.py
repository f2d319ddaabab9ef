"""gated_activation's CUDA kernels on the SIMT harness (tests/simt), against the CPU op.

The driver (tests/simt/drivers/activation.cpp) runs the real launch code of
csrc/activation/activation.cu (gated_activation_launch, gated_activation_backward_launch) on host
buffers; every call runs under the four harness runs (schedules and poison bytes) and must give the
same bits each time (simt_driver.run_all).

What is compared with the CPU op (torch.ops.mixops.gated_activation(_backward) on CPU tensors):
  * silu and relu, every dtype: the same bits (README: "silu and relu give the same bits on CPU
    and CUDA"; both run activation.h with det:: arithmetic and det::exp). NaN is compared as a
    class, not by payload: CUDA's conversions write the canonical 0x7fff NaN to bf16/fp16 where
    torch writes 0x7fc0 / 0x7e00, and a GPU's fp32/fp64 NaN payloads differ from x86's too.
    fp64 silu: det::exp(double) is the platform's exp (det_math.h: "double needs no bitwise
    agreement"), so the bit equality seen here is the host's exp on both sides; on a GPU it is
    CUDA's exp, which may differ in the last bit.
  * gelu and gelu_tanh: the tolerance rule of tests/helpers.py (what holds on a GPU: nvcc
    contracts gelu's a * b + c into FMAs, and CUDA's erff/tanhf are not glibc's). Under the
    harness they are also bit-equal to the CPU op (both sides call glibc's erff/tanhf, both
    compiled with -ffp-contract=off), which the tests assert too, as what the harness shows: a
    difference there would mean the kernel no longer computes what the CPU kernel computes.
"""

import ctypes

import pytest
import torch
import torch.nn.functional as F

import mixops  # noqa: F401  (registers torch.ops.mixops.*)
from helpers import assert_close_to_ref
from simt_driver import SimtRun, call, load_driver, requires_cxx, run_all

pytestmark = requires_cxx

DTYPE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}  # mixops::Dtype
ACT = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}  # mixops::GatedAct
BIT_EQUAL_PROMISED = {"silu", "relu"}
TORCH_ACT = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda g: F.gelu(g, approximate="tanh"),
    "relu": F.relu,
}
DTYPES = list(DTYPE)
INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}

I64, PTR = ctypes.c_int64, ctypes.c_void_p
TAIL = [ctypes.POINTER(SimtRun), ctypes.c_char_p, ctypes.c_int]


@pytest.fixture(scope="module")
def lib():
    lib = load_driver("activation")
    i32 = ctypes.c_int
    lib.simt_gated_activation.argtypes = [i32, i32, I64, I64, PTR, I64, PTR, *TAIL]
    lib.simt_gated_activation_backward.argtypes = [i32, i32, I64, I64, PTR, PTR, I64, PTR, *TAIL]
    return lib


def _poisoned(shape, dtype):
    """An output buffer whose every byte is 0xA5, so an element the kernel skips shows."""
    t = torch.empty(shape, dtype=dtype)
    t.view(torch.uint8).fill_(0xA5)
    return t


def _check_rows(h):
    assert h.dim() == 2 and h.stride(1) == 1 and h.size(1) % 2 == 0
    return h.size(0), h.size(1) // 2


def simt_forward(lib, h, act):
    """out [rows, f] of the CUDA forward launch on gate_up h (a [rows, 2f] view, unit column
    stride, any row stride), under every harness run."""
    rows, f = _check_rows(h)

    def launch(outs, run):
        (out,) = outs
        args = (DTYPE[h.dtype], ACT[act], rows, f, h.data_ptr(), h.stride(0))
        call(lib.simt_gated_activation, *args, out.data_ptr(), run=run)

    return run_all(lambda: [_poisoned((rows, f), h.dtype)], launch)[0]


def simt_backward(lib, go, h, act):
    """grad_gate_up [rows, 2f] of the CUDA backward launch, under every harness run."""
    rows, f = _check_rows(h)
    assert go.shape == (rows, f) and go.is_contiguous()

    def launch(outs, run):
        (dh,) = outs
        args = (DTYPE[h.dtype], ACT[act], rows, f, go.data_ptr(), h.data_ptr(), h.stride(0))
        call(lib.simt_gated_activation_backward, *args, dh.data_ptr(), run=run)

    return run_all(lambda: [_poisoned((rows, 2 * f), h.dtype)], launch)[0]


def assert_same_bits(ours, ref, what):
    """Identical bits, NaN compared as a class (NaN exactly where ref has NaN, any payload)."""
    assert ours.shape == ref.shape and ours.dtype == ref.dtype, what
    nan = ref.isnan()
    assert torch.equal(ours.isnan(), nan), f"{what}: NaN at different places"
    it = INT_OF_SIZE[ours.element_size()]
    a, b = ours[~nan].view(it), ref[~nan].view(it)
    bad = (a != b).nonzero()
    assert bad.numel() == 0, (
        f"{what}: {bad.numel()} of {a.numel()} elements differ in bits from the CPU op, first: "
        f"{ours[~nan][bad[0, 0]].item()!r} vs {ref[~nan][bad[0, 0]].item()!r}"
    )


def _reference(h, act):
    gate, up = h.chunk(2, dim=-1)
    return TORCH_ACT[act](gate) * up


def _torch_grads(h, go, act):
    """(out, grad of gate_up) of the composite torch reference, in h's dtype."""
    h = h.detach().clone().requires_grad_(True)
    y = _reference(h, act)
    (g,) = torch.autograd.grad(y, h, go)
    return y.detach(), g


def _gate_up(rows, f, dtype, pad, scale=3.0):
    """[rows, 2f] gate/up rows; pad > 0 makes them a view of a wider tensor (row stride 2f + pad,
    starting pad // 2 columns in)."""
    base = (torch.randn(rows, 2 * f + pad) * scale).to(dtype)
    return base[:, pad // 2 : pad // 2 + 2 * f]


def check_against_cpu(lib, h, go, act, what):
    ours = simt_forward(lib, h, act)
    ours_dh = simt_backward(lib, go, h, act)
    cpu = torch.ops.mixops.gated_activation(h, act)
    cpu_dh = torch.ops.mixops.gated_activation_backward(go, h, act)
    assert_same_bits(ours, cpu, f"{what} forward")
    assert_same_bits(ours_dh, cpu_dh, f"{what} backward")
    return ours, ours_dh


# (rows, f, pad): rows = 0 and 1, f = 0 and 1, f odd and not a multiple of anything, rows * f past
# one block of 256 threads with a tail, and rows of a wider tensor (pad > 0: row stride > 2f).
SHAPES = [(0, 5, 0), (3, 0, 2), (1, 1, 0), (1, 7, 3), (3, 129, 0), (37, 61, 5)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", list(ACT))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_against_cpu_op(lib, dtype, act, shape):
    rows, f, pad = shape
    h = _gate_up(rows, f, dtype, pad)
    go = torch.randn(rows, f).to(dtype)
    what = f"{act} {dtype} rows={rows} f={f} pad={pad}"
    ours, ours_dh = check_against_cpu(lib, h, go, act, what)
    if act in BIT_EQUAL_PROMISED:
        return  # bit-equal to the CPU op, which test_gated_activation holds to the rule
    # gelu / gelu_tanh: the bound a GPU is held to (bit equality above is the harness's host libm).
    ref = _torch_grads(h.double(), go.double(), act)
    lowp = _torch_grads(h, go, act)
    assert_close_to_ref(ours, ref[0], lowp[0], f"{what} forward")
    assert_close_to_ref(ours_dh, ref[1], lowp[1], f"{what} backward")


def _specials(dtype):
    big = {torch.float16: 65504.0, torch.bfloat16: 3.0e38}.get(dtype, 1e30)
    tiny = {torch.float16: 6e-8, torch.bfloat16: 1e-38}.get(dtype, 1e-40)  # subnormal in fp32
    vals = [0.0, -0.0, tiny, -tiny, 0.5, -3.0, 30.0, -30.0, 100.0, -100.0, big, -big]
    vals += [float("inf"), float("-inf"), float("nan")]
    return torch.tensor(vals, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", list(ACT))
def test_nan_inf_and_extremes(lib, dtype, act):
    # Every (gate, up, grad_out) triple of special values: ±0, subnormals, moderate and large
    # magnitudes, the dtype's largest finite value, ±inf and NaN. Row j holds every (gate, up)
    # pair with grad_out = specials[j]; the rows are a view of a wider tensor.
    s = _specials(dtype)
    n = s.numel()
    pairs = torch.cat([s.repeat_interleave(n), s.repeat(n)])  # gate | up, [2 n^2]
    base = torch.zeros(n, 2 * n * n + 3, dtype=dtype)
    base[:, 1 : 1 + 2 * n * n] = pairs
    h = base[:, 1 : 1 + 2 * n * n]
    go = s[:, None].expand(n, n * n).contiguous()
    # Bits as the CPU op's (which test_gated_activation.py checks against torch's activations).
    check_against_cpu(lib, h, go, act, f"{act} {dtype} specials")


@pytest.mark.large
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", list(ACT))
@pytest.mark.parametrize("seed", range(3))
def test_random_shapes_large(lib, dtype, act, seed):
    g = torch.Generator().manual_seed(seed)
    rows = int(torch.randint(1, 200, (1,), generator=g))
    f = int(torch.randint(1, 1500, (1,), generator=g))
    pad = int(torch.randint(0, 9, (1,), generator=g))
    h = _gate_up(rows, f, dtype, pad, scale=5.0)
    go = torch.randn(rows, f).to(dtype)
    what = f"{act} {dtype} rows={rows} f={f} pad={pad}"
    ours, ours_dh = check_against_cpu(lib, h, go, act, what)
    ref = _torch_grads(h.double(), go.double(), act)
    lowp = _torch_grads(h, go, act)
    assert_close_to_ref(ours, ref[0], lowp[0], f"{what} forward")
    assert_close_to_ref(ours_dh, ref[1], lowp[1], f"{what} backward")
