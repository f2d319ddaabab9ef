"""gated_activation's CUDA kernels on the SIMT harness (tests/simt), against the CPU op.

The driver (tests/simt/drivers/activation.cpp) runs the real launch code of
csrc/activation/activation.cu (gated_activation_launch, gated_activation_backward_launch) on host
buffers; every call runs under the four harness runs (schedules and poison bytes) and must give the
same bits each time (simt_driver.run_all). Both input forms: fused gate_up [rows, 2f], and split,
gate and up two [rows, f] buffers (aligned or not: the driver reports the vector width that ran).

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
    width = ctypes.POINTER(i32)
    # dtype, act, rows, f, [grad_out,] gate_up, up, row stride, interleaved, out, width
    lib.simt_gated_activation.argtypes = [i32, i32, I64, I64, PTR, PTR, I64, i32, PTR, width, *TAIL]
    lib.simt_gated_activation_backward.argtypes = [
        *(i32, i32, I64, I64, PTR, PTR, PTR, I64, i32, PTR, width, *TAIL)
    ]
    return lib


def _poisoned(shape, dtype):
    """An output buffer whose every byte is 0xA5, so an element the kernel skips shows."""
    t = torch.empty(shape, dtype=dtype)
    t.view(torch.uint8).fill_(0xA5)
    return t


def _check_rows(h, up):
    """(rows, f) of gate_up h: [rows, 2f] (fused), or the gate [rows, f] beside up; unit column
    strides and, with up, one row stride for both (what the op layer hands the launcher)."""
    assert h.dim() == 2 and h.stride(1) == 1
    if up is None:
        assert h.size(1) % 2 == 0
        return h.size(0), h.size(1) // 2
    assert up.shape == h.shape and up.dtype == h.dtype and up.stride(1) == 1
    assert h.size(0) <= 1 or up.stride(0) == h.stride(0)
    return h.shape


def _up_ptr(up):
    return None if up is None else up.data_ptr()


def simt_forward(lib, h, act, up=None, widths=None, interleaved=False):
    """out [rows, f] of the CUDA forward launch on gate_up h (a [rows, 2f] view, gate then up or
    interleaved, or with up the gate [rows, f]; unit column stride, any row stride), under every
    harness run. widths: a list that receives the vector width each run launched."""
    rows, f = _check_rows(h, up)

    def launch(outs, run):
        (out,) = outs
        w = ctypes.c_int(-1)
        args = (DTYPE[h.dtype], ACT[act], rows, f, h.data_ptr(), _up_ptr(up), h.stride(0))
        args = (*args, int(interleaved), out.data_ptr(), ctypes.byref(w))
        call(lib.simt_gated_activation, *args, run=run)
        if widths is not None:
            widths.append(w.value)

    return run_all(lambda: [_poisoned((rows, f), h.dtype)], launch)[0]


def simt_backward(lib, go, h, act, up=None, widths=None, interleaved=False):
    """grad_gate_up [rows, 2f] of the CUDA backward launch (d gate, then d up, in the fused and
    split forms; interleaved in the interleaved form), under every harness run."""
    rows, f = _check_rows(h, up)
    assert go.shape == (rows, f) and go.is_contiguous()

    def launch(outs, run):
        (dh,) = outs
        w = ctypes.c_int(-1)
        args = (DTYPE[h.dtype], ACT[act], rows, f, go.data_ptr(), h.data_ptr(), _up_ptr(up))
        call(
            lib.simt_gated_activation_backward,
            *args,
            h.stride(0),
            int(interleaved),
            dh.data_ptr(),
            ctypes.byref(w),
            run=run,
        )
        if widths is not None:
            widths.append(w.value)

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


def check_against_cpu(lib, h, go, act, what, up=None, widths=None):
    ours = simt_forward(lib, h, act, up, widths)
    ours_dh = simt_backward(lib, go, h, act, up, widths)
    cpu = torch.ops.mixops.gated_activation(h, act, up)
    cpu_dh = torch.ops.mixops.gated_activation_backward(go, h, act, up)
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


# ---- the split form: gate and up as two [rows, f] buffers with one row stride ---------------


def _aligned(rows, f, dtype, offset=0, pad=0, scale=3.0):
    """[rows, f] with row stride f + pad, starting offset elements past a 16-byte aligned start
    (torch's CPU allocations are 64-byte aligned)."""
    base = (torch.randn(rows * (f + pad) + offset + pad) * scale).to(dtype)
    assert base.data_ptr() % 16 == 0
    return base[offset : offset + rows * (f + pad)].view(rows, f + pad)[:, :f]


# (gate, up) of (rows, f, dtype); "vec": whether the 16-byte path may run (f a multiple of it).
SPLIT_LAYOUTS = {
    # Two separate allocations, both aligned: the 16-byte path.
    "separate": (lambda r, f, t: (_aligned(r, f, t), _aligned(r, f, t)), True),
    # Rows of two wider tensors with the same row stride (f + 8).
    "strided": (lambda r, f, t: (_aligned(r, f, t, pad=8), _aligned(r, f, t, pad=8)), True),
    # gate and up in one [rows, 2f + 8] tensor with up 8 columns past gate's end (not fused).
    "one tensor": (
        lambda r, f, t: (lambda b: (b[:, :f], b[:, f + 8 :]))(_aligned(r, 2 * f + 8, t)),
        True,
    ),
    # One element past an aligned start: N = 1, though every other operand allows 16 bytes.
    "up misaligned": (lambda r, f, t: (_aligned(r, f, t), _aligned(r, f, t, offset=1)), False),
    "gate misaligned": (lambda r, f, t: (_aligned(r, f, t, offset=1), _aligned(r, f, t)), False),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", list(ACT))
@pytest.mark.parametrize("layout", list(SPLIT_LAYOUTS))
def test_split_against_cpu_op(lib, dtype, act, layout):
    rows, f = 9, 64  # f a multiple of every vector width
    make, vec = SPLIT_LAYOUTS[layout]
    gate, up = make(rows, f, dtype)
    go = torch.randn(rows, f).to(dtype)
    what = f"{act} {dtype} split {layout}"
    widths = []
    ours, ours_dh = check_against_cpu(lib, gate, go, act, what, up=up, widths=widths)
    k_vec = 1 if dtype == torch.float64 else 16 // gate.element_size()
    assert set(widths) == {k_vec if vec else 1}, f"{what}: vector widths {widths}"
    # The same bits as the fused launch on torch.cat([gate, up]) (fused: the kernel's own up).
    h = torch.cat([gate, up], dim=1)
    assert_same_bits(ours, simt_forward(lib, h, act), f"{what} vs fused forward")
    assert_same_bits(ours_dh, simt_backward(lib, go, h, act), f"{what} vs fused backward")
    if act not in BIT_EQUAL_PROMISED:
        ref = _torch_grads(h.double(), go.double(), act)
        lowp = _torch_grads(h, go, act)
        assert_close_to_ref(ours, ref[0], lowp[0], f"{what} forward")
        assert_close_to_ref(ours_dh, ref[1], lowp[1], f"{what} backward")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (1, 1), (1, 7), (37, 61), (3, 129)], ids=str)
@pytest.mark.parametrize("layout", ["strided", "up misaligned"])
def test_split_shapes(lib, dtype, shape, layout):
    # Empty, single and odd sizes (N = 1 whatever the alignment) and tails past a block.
    rows, f = shape
    gate, up = SPLIT_LAYOUTS[layout][0](rows, f, dtype)
    go = torch.randn(rows, f).to(dtype)
    for act in BIT_EQUAL_PROMISED:
        check_against_cpu(lib, gate, go, act, f"{act} {dtype} {shape} {layout}", up=up)


# ---- the interleaved form: gate_up [rows, 2f], gate at even columns, up at odd ones ---------


def check_interleaved(lib, h, go, act, what, widths=None):
    """The launches with interleaved=True, bit-equal to the CPU op's (which
    test_gated_activation_interleaved.py holds to the fused form's bits)."""
    ours = simt_forward(lib, h, act, widths=widths, interleaved=True)
    ours_dh = simt_backward(lib, go, h, act, widths=widths, interleaved=True)
    cpu = torch.ops.mixops.gated_activation(h, act, None, True)
    cpu_dh = torch.ops.mixops.gated_activation_backward(go, h, act, None, True)
    assert_same_bits(ours, cpu, f"{what} forward")
    assert_same_bits(ours_dh, cpu_dh, f"{what} backward")
    return ours, ours_dh


# (offset, pad, vec): gate_up [rows, 2f] = _aligned(rows, 2f, dtype, offset, pad), row stride
# 2f + pad; vec: whether the 16-byte path may run (f a multiple of every vector width).
IL_LAYOUTS = {
    "contiguous": (0, 0, True),
    "rows of a wider tensor": (0, 16, True),  # row stride 2f + 16: a multiple of every width
    "row stride odd": (0, 3, False),  # every row but the first starts misaligned: N = 1
    "misaligned start": (1, 0, False),  # one element past an aligned start: N = 1
    "misaligned, rows of a wider tensor": (1, 8, False),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", list(ACT))
@pytest.mark.parametrize("layout", list(IL_LAYOUTS))
def test_interleaved_against_cpu_op(lib, dtype, act, layout):
    rows, f = 9, 64
    offset, pad, vec = IL_LAYOUTS[layout]
    h = _aligned(rows, 2 * f, dtype, offset, pad)
    go = torch.randn(rows, f).to(dtype)
    what = f"{act} {dtype} interleaved {layout}"
    widths = []
    ours, ours_dh = check_interleaved(lib, h, go, act, what, widths)
    k_vec = 1 if dtype == torch.float64 else 16 // h.element_size()
    assert set(widths) == {k_vec if vec else 1}, f"{what}: vector widths {widths}"
    if act not in BIT_EQUAL_PROMISED:  # the bound a GPU is held to, on the de-interleaved input
        hf = torch.cat([h[:, 0::2], h[:, 1::2]], dim=1)
        ref = _torch_grads(hf.double(), go.double(), act)
        lowp = _torch_grads(hf, go, act)
        dh = torch.cat([ours_dh[:, 0::2], ours_dh[:, 1::2]], dim=1)
        assert_close_to_ref(ours, ref[0], lowp[0], f"{what} forward")
        assert_close_to_ref(dh, ref[1], lowp[1], f"{what} backward")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (1, 1), (1, 7), (37, 61), (5, 520)], ids=str)
@pytest.mark.parametrize("layout", ["rows of a wider tensor", "misaligned start"])
def test_interleaved_shapes(lib, dtype, shape, layout):
    # Empty, single and odd sizes (N = 1 whatever the alignment) and tails past a block.
    rows, f = shape
    offset, pad, _ = IL_LAYOUTS[layout]
    h = _aligned(rows, 2 * f, dtype, offset, pad)
    go = torch.randn(rows, f).to(dtype)
    for act in BIT_EQUAL_PROMISED:
        check_interleaved(lib, h, go, act, f"{act} {dtype} {shape} interleaved {layout}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", list(ACT))
def test_interleaved_nan_inf_and_extremes(lib, dtype, act):
    # test_nan_inf_and_extremes's (gate, up) pairs, interleaved: g, u, g, u, ... in each row.
    s = _specials(dtype)
    n = s.numel()
    pairs = torch.stack([s.repeat_interleave(n), s.repeat(n)], dim=1).flatten()  # [2 n^2]
    base = torch.zeros(n, 2 * n * n + 3, dtype=dtype)
    base[:, 1 : 1 + 2 * n * n] = pairs
    go = s[:, None].expand(n, n * n).contiguous()
    check_interleaved(lib, base[:, 1 : 1 + 2 * n * n], go, act, f"{act} {dtype} interleaved")


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
