"""gated_activation's interleaved form (interleaved=True): gate_up [..., 2F] holds the gate at
columns 0::2 and up at 1::2 (g_0, u_0, g_1, u_1, ...: GPT-OSS's layout). Out is the fused form's on
the de-interleaved torch.cat([gate_up[..., 0::2], gate_up[..., 1::2]], -1), bit for bit, and
d gate_up comes back interleaved as gate_up is (d gate at even columns, d up at odd ones).

The fused form itself is held to the tolerance rule by tests/test_gated_activation.py; here every
result is compared with it bit for bit."""

import pytest
import torch

import mixops
from conftest import DEVICES, requires_cuda
from helpers import assert_bits_equal, opcheck
from test_gated_activation import ACTS, DTYPES

OP = torch.ops.mixops.gated_activation.default
OP_BW = torch.ops.mixops.gated_activation_backward.default


def deinterleave(h):
    """[..., 2F] g_0, u_0, g_1, u_1, ... -> [..., 2F] gate then up (the fused form's layout)."""
    return torch.cat([h[..., 0::2], h[..., 1::2]], dim=-1)


def interleave(dh):
    """[..., 2F] gate then up -> [..., 2F] g_0, u_0, g_1, u_1, ... (deinterleave's inverse)."""
    f = dh.shape[-1] // 2
    return torch.stack([dh[..., :f], dh[..., f:]], dim=-1).flatten(-2)


def _grads(make, base, go, act):
    """(out, d base) through autograd of gated_activation(make(base), interleaved=True): make
    takes a view (rows of a wider tensor, transposed, ...) so that the op sees that layout."""
    base = base.detach().clone().requires_grad_(True)
    y = mixops.ops.gated_activation(make(base), act, interleaved=True)
    (d,) = torch.autograd.grad(y, base, go)
    return y.detach(), d


def _fused_grads(make, base, go, act):
    """The same from the fused form on the de-interleaved input: its d gate_up (autograd)
    interleaved and taken back through make's backward. (Not through deinterleave's backward:
    torch's slicing backward adds into zeros, which turns -0 into +0.)"""
    base = base.detach().clone().requires_grad_(True)
    h = make(base)
    hf = deinterleave(h.detach()).requires_grad_(True)
    y = mixops.ops.gated_activation(hf, act)
    (dhf,) = torch.autograd.grad(y, hf, go)
    (d,) = torch.autograd.grad(h, base, interleave(dhf))
    return y.detach(), d


def assert_same_as_fused(make, base, go, act, what, nan_as_class=False):
    """Autograd (the Python wrapper) and the two ops called directly, against the fused form.
    nan_as_class: any NaN matches any NaN (the CPU kernel's NaN sign depends on whether a column
    ran in a vector loop, so the two forms may differ there)."""
    ours = _grads(make, base, go, act)
    fused = _fused_grads(make, base, go, act)
    h = make(base)
    pairs = {
        "out": (ours[0], fused[0]),
        "d gate_up (autograd)": (ours[1], fused[1]),
        "out (op)": (OP(h, act, None, True), fused[0]),
        "d gate_up (op)": (
            OP_BW(go, h, act, None, True),
            interleave(OP_BW(go, deinterleave(h), act)),
        ),
    }
    for name, (a, b) in pairs.items():
        if nan_as_class:
            a, b = (t.masked_fill(t.isnan(), float("nan")) for t in (a, b))
        assert_bits_equal(a, b, f"{what} {name}")
    return ours


def _input(shape, dtype, device="cpu", scale=3.0):
    h = (torch.randn(shape, device=device) * scale).to(dtype)
    go = torch.randn(*shape[:-1], shape[-1] // 2, device=device).to(dtype)
    return h, go


# Odd F, F = 1, 3-D, 0 rows, F = 0 (2-D and 3-D).
SHAPES = [(37, 2 * 24), (4, 2 * 7), (3, 5, 2 * 129), (1, 2), (0, 16), (3, 0), (2, 3, 0)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bitwise_equals_fused(dtype, act, shape):
    h, go = _input(shape, dtype)
    ours = assert_same_as_fused(lambda t: t, h, go, act, f"{act} {dtype} {shape}")
    assert ours[0].shape == go.shape and ours[1].shape == h.shape


def test_layout_of_grad():
    # Spelled out on one row: d gate_j at column 2j, d up_j at 2j + 1 (without interleave()).
    h = torch.tensor([[1.0, 2.0, 3.0, 4.0]])  # gate (1, 3), up (2, 4)
    go = torch.tensor([[1.0, 1.0]])
    assert OP(h, "relu", None, True).tolist() == [[2.0, 12.0]]
    # d gate = go * up * relu'(gate), d up = go * relu(gate)
    assert OP_BW(go, h, "relu", None, True).tolist() == [[2.0, 1.0, 4.0, 3.0]]


def _r(*shape):
    return torch.randn(*shape) * 3


# (base, view of base): what the op is handed. F = 24 (2F = 48) unless said.
LAYOUTS = {
    # Rows of a wider tensor (row stride 70 > 2F, unit columns): read in place.
    "column slice h[:, :2F]": (lambda: _r(9, 70), lambda b: b[:, :48]),
    "column slice at an odd start": (lambda: _r(9, 70), lambda b: b[:, 3:51]),
    "3-D rows of a wider tensor": (lambda: _r(2, 5, 70), lambda b: b[..., 1:49]),
    # Column stride != 1: copied.
    "column stride 2": (lambda: _r(9, 96), lambda b: b[:, ::2]),
    "transposed": (lambda: _r(48, 9), lambda b: b.t()),
    "3-D, not viewable as rows": (lambda: _r(6, 3, 48), lambda b: b.transpose(0, 1)),
    "rows expanded (row stride 0)": (lambda: _r(1, 48), lambda b: b.expand(9, 48)),
    "odd F, rows of a wider tensor": (lambda: _r(7, 20), lambda b: b[:, 2:16]),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_non_contiguous(dtype, layout):
    new_base, make = LAYOUTS[layout]
    base = new_base().to(dtype)
    h = make(base)
    go = torch.randn(*h.shape[:-1], h.shape[-1] // 2).to(dtype)
    for act in ACTS:
        assert_same_as_fused(make, base, go, act, f"{act} {dtype} {layout}")


def _specials(dtype):
    vals = [0.0, -0.0, 1e-30, 0.5, -3.0, 30.0, -30.0, 100.0, -100.0, 1e30, -1e30]
    vals += [float("inf"), float("-inf"), float("nan")]
    return torch.tensor(vals, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", list(ACTS))
def test_nan_inf_like_fused(dtype, act):
    # Every (gate, up) pair of special values, interleaved, with grad_out special too (row j:
    # grad_out = specials[j]): NaN and inf come out where and as the fused form's do.
    s = _specials(dtype)
    n = s.numel()
    h = torch.stack([s.repeat_interleave(n), s.repeat(n)], dim=-1).flatten()  # [2 n^2]
    h = h.expand(n, 2 * n * n).contiguous()
    go = s[:, None].expand(n, n * n).contiguous()
    what = f"{act} {dtype} specials"
    ours = assert_same_as_fused(lambda t: t, h, go, act, what, nan_as_class=True)
    for t in ours:  # the cases are there: NaN and inf in and out
        assert t.isnan().any() and t.isinf().any()


@pytest.mark.parametrize("act", list(ACTS))
def test_gradcheck_fp64(act):
    h = torch.randn(5, 2 * 7, dtype=torch.float64)
    if act == "relu":  # keep away from the kink at 0
        h = h + h.sign() * 0.1
    assert torch.autograd.gradcheck(
        lambda t: mixops.ops.gated_activation(t, act, interleaved=True), (h.requires_grad_(True),)
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", list(ACTS))
def test_opcheck(device, act):
    h = torch.randn(7, 2 * 5, device=device)
    go = torch.randn(7, 5, device=device)
    opcheck(OP, (h, act, None, True))
    opcheck(OP, (h.clone().requires_grad_(True), act), {"interleaved": True})
    opcheck(OP, (torch.randn(2, 3, 12, device=device).requires_grad_(True), act, None, True))
    opcheck(OP_BW, (go, h, act, None, True))
    opcheck(OP_BW, (go, h, act), {"interleaved": True})


def test_compile_fullgraph_dynamic():
    def fn(t):
        return mixops.ops.gated_activation(t, "silu", interleaved=True) * 2

    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    for rows in (5, 9):
        h, go = _input((rows, 2 * 8), torch.float32)
        outs = []
        for f in (fn, compiled):
            t = h.clone().requires_grad_(True)
            y = f(t)
            y.backward(go)
            outs.append((y.detach(), t.grad))
        for what, a, b in zip(("out", "grad"), *outs):
            assert_bits_equal(b, a, f"rows={rows} compiled {what}")


# name: (op, args, kwargs, message). Both ops, each form of the argument list.
_IL = "interleaved=True reads gate and up from one gate_up [..., 2*F] (g_0, u_0, g_1, u_1, ...); "
_ODD = "gate_up's last dimension must be even ([..., 2*F]: gate and up interleaved), got "
BAD = {
    "up given": (OP, (_r(6, 8), "silu", _r(6, 8), True), {}, f"gated_activation: {_IL}up must be"),
    "up given, kwargs": (OP, (_r(6, 4),), {"up": _r(6, 4), "interleaved": True}, _IL),
    "odd last dim": (OP, (_r(6, 7), "silu", None, True), {}, f"gated_activation: {_ODD}[6, 7]"),
    "1-D odd": (OP, (_r(7),), {"interleaved": True}, f"{_ODD}[7]"),
    "bw up given": (
        OP_BW,
        (_r(6, 4), _r(6, 8), "silu", _r(6, 8), True),
        {},
        f"gated_activation_backward: {_IL}up must be None",
    ),
    "bw odd last dim": (
        OP_BW,
        (_r(6, 4), _r(6, 9), "gelu"),
        {"interleaved": True},
        f"gated_activation_backward: {_ODD}[6, 9]",
    ),
    "bw grad shape": (OP_BW, (_r(6, 8), _r(6, 8), "relu", None, True), {}, "grad must have shape"),
}


def _message(op, args, kwargs):
    with pytest.raises(RuntimeError) as e:
        op(*args, **kwargs)
    return str(e.value)


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs(case):
    # The CPU kernel's message, and the fake's (meta tensors) the same, word for word.
    op, args, kwargs, msg = BAD[case]
    cpu = _message(op, args, kwargs)
    assert msg in cpu, cpu
    to_meta = lambda v: v.to("meta") if isinstance(v, torch.Tensor) else v  # noqa: E731
    meta_args = [to_meta(a) for a in args]
    assert _message(op, meta_args, {k: to_meta(v) for k, v in kwargs.items()}) == cpu


def test_bad_inputs_wrapper():
    with pytest.raises(RuntimeError, match=r"interleaved=True .*up must be None"):
        mixops.ops.gated_activation(_r(6, 8), "silu", up=_r(6, 8), interleaved=True)
    with pytest.raises(RuntimeError, match=r"\(\[\.\.\., 2\*F\]: gate and up interleaved\)"):
        mixops.ops.gated_activation(_r(6, 5), interleaved=True)
    # The fused form's message stays its own.
    with pytest.raises(RuntimeError, match=r"gate then up\), got"):
        mixops.ops.gated_activation(_r(6, 5))


@requires_cuda
@pytest.mark.parametrize("act", ["silu", "relu"])
@pytest.mark.parametrize("offset", [0, 1])  # 1: gate_up 2 bytes past 16-byte alignment (scalar)
def test_cuda_bitwise_equals_cpu(act, offset):
    n = 300 * 512
    base = torch.randn(n + 1, device="cuda").bfloat16()
    make = lambda b: b[offset : offset + n].view(300, 512)  # noqa: E731
    go = torch.randn(300, 256, device="cuda").bfloat16()
    gpu = _grads(make, base, go, act)
    cpu = _grads(make, base.cpu(), go.cpu(), act)
    for a, b in zip(cpu, gpu):
        assert torch.equal(a, b.cpu())
