"""gated_activation's split form: gate and up as two tensors (``up=``), e.g. the two grouped GEMM
outputs of torchtitan's w1 and w3, read where they are (no torch.cat)."""

import pytest
import torch
import torch.nn.functional as F

import mixops
from conftest import DEVICES, requires_cuda
from helpers import assert_bits_equal, assert_close_to_ref, opcheck

ACTS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda g: F.gelu(g, approximate="tanh"),
    "relu": F.relu,
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
OP = torch.ops.mixops.gated_activation.default
OP_BW = torch.ops.mixops.gated_activation_backward.default


def reference(gate, up, act):
    """The independent torch composite."""
    return ACTS[act](gate) * up


def _grads(fn, gate, up, go):
    """(out, d gate, d up) of fn(gate, up) for d out = go."""
    gate = gate.detach().clone().requires_grad_(True)
    up = up.detach().clone().requires_grad_(True)
    y = fn(gate, up)
    dg, du = torch.autograd.grad(y, (gate, up), go)
    return y.detach(), dg, du


def _split(act):
    return lambda g, u: mixops.ops.gated_activation(g, act, up=u)


def _inputs(shape, dtype, device="cpu", scale=3.0):
    gate = (torch.randn(shape, device=device) * scale).to(dtype)
    up = (torch.randn(shape, device=device) * scale).to(dtype)
    go = torch.randn(shape, device=device).to(dtype)
    return gate, up, go


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("shape", [(37, 24), (3, 5, 129), (1, 1), (0, 16), (4, 0), (2, 3, 0)])
def test_forward_backward_against_reference(device, dtype, act, shape):
    gate, up, go = _inputs(shape, dtype, device)
    ours = _grads(_split(act), gate, up, go)
    ref = _grads(lambda g, u: reference(g, u, act), gate.double(), up.double(), go.double())
    lowp = _grads(lambda g, u: reference(g, u, act), gate, up, go)
    for what, a, r, t in zip(("out", "d gate", "d up"), ours, ref, lowp):
        assert_close_to_ref(a, r, t, f"{act} {dtype} {shape} {what}")


def _fused_grads(act, gate, up, go):
    """(out, d gate, d up) of the fused op on torch.cat([gate, up], -1)."""
    h = torch.cat([gate, up], dim=-1).requires_grad_(True)
    y = mixops.ops.gated_activation(h, act)
    (dh,) = torch.autograd.grad(y, h, go)
    f = gate.shape[-1]
    return y.detach(), dh[..., :f], dh[..., f:]


def assert_same_as_fused(gate, up, go, act, what):
    ours = _grads(_split(act), gate, up, go)
    fused = _fused_grads(act, gate, up, go)
    for name, a, b in zip(("out", "d gate", "d up"), ours, fused):
        assert_bits_equal(a, b.contiguous(), f"{what} {name}")
    return ours


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", list(ACTS))
def test_bitwise_equals_fused(device, dtype, act):
    # The same values through both forms: one kernel, one per-element formula, the same bits.
    gate, up, go = _inputs((33, 2, 40), dtype, device)
    assert_same_as_fused(gate, up, go, act, f"{act} {dtype}")


def _r(device, *shape):
    return torch.randn(*shape, device=device)


# (gate, up) on a device, with strides of every kind.
LAYOUTS = {
    # Rows of a wider tensor (row stride 70, unit columns): read in place.
    "gate column slice": lambda d: (_r(d, 9, 70)[:, 3:27], _r(d, 9, 24)),
    "up column slice": lambda d: (_r(d, 9, 24), _r(d, 9, 70)[:, 3:27]),
    "gate and up slices of one tensor": lambda d: (lambda w: (w[:, 3:27], w[:, 40:64]))(
        _r(d, 9, 70)
    ),
    # Row strides 70 and 40: both made contiguous, so that one row stride serves both.
    "slices with different row strides": lambda d: (_r(d, 9, 70)[:, 3:27], _r(d, 9, 40)[:, 1:25]),
    # Column stride 9: copied.
    "gate transposed": lambda d: (_r(d, 24, 9).t(), _r(d, 9, 24)),
    "up transposed": lambda d: (_r(d, 9, 70)[:, 3:27], _r(d, 24, 9).t()),
    "both transposed": lambda d: (_r(d, 24, 9).t(), _r(d, 24, 9).t()),
    "up rows expanded (row stride 0)": lambda d: (_r(d, 9, 24), _r(d, 1, 24).expand(9, 24)),
    "3-D, not viewable as rows": lambda d: (_r(d, 6, 3, 24).transpose(0, 1), _r(d, 3, 6, 24)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_non_contiguous(device, layout):
    gate, up = LAYOUTS[layout](device)
    go = torch.randn(gate.shape, device=device)
    ours = assert_same_as_fused(gate, up, go, "silu", layout)
    ref = _grads(lambda g, u: reference(g, u, "silu"), gate.double(), up.double(), go.double())
    lowp = _grads(lambda g, u: reference(g, u, "silu"), gate, up, go)
    for what, a, r, t in zip(("out", "d gate", "d up"), ours, ref, lowp):
        assert_close_to_ref(a, r, t, f"{layout} {what}")


def test_grads_are_halves_of_one_buffer():
    # d gate and d up are views of the backward op's [..., 2F] output: no copy.
    gate, up, go = _inputs((6, 10), torch.float32)
    _, dg, du = _grads(_split("silu"), gate, up, go)
    assert dg._base is not None and dg._base is du._base
    assert dg._base.shape == (6, 20)
    assert du.data_ptr() == dg.data_ptr() + 10 * dg.element_size()


def test_needs_input_grad():
    gate, up, go = _inputs((5, 8), torch.float32)
    ref = _grads(lambda g, u: reference(g, u, "gelu"), gate, up, go)
    for need_gate, need_up in ((True, False), (False, True)):
        g = gate.clone().requires_grad_(need_gate)
        u = up.clone().requires_grad_(need_up)
        mixops.ops.gated_activation(g, "gelu", up=u).backward(go)
        assert (g.grad is not None) == need_gate and (u.grad is not None) == need_up
        for t, r in ((g, ref[1]), (u, ref[2])):
            if t.grad is not None:
                torch.testing.assert_close(t.grad, r, rtol=1e-5, atol=1e-6)
    # Neither needs a grad: no graph at all.
    assert not mixops.ops.gated_activation(gate, "gelu", up=up).requires_grad


@pytest.mark.parametrize("act", list(ACTS))
def test_gradcheck_fp64(act):
    gate = torch.randn(5, 6, dtype=torch.float64)
    if act == "relu":  # keep away from the kink at 0
        gate = gate + gate.sign() * 0.1
    up = torch.randn(5, 6, dtype=torch.float64)
    args = (gate.requires_grad_(True), up.requires_grad_(True))
    assert torch.autograd.gradcheck(lambda g, u: mixops.ops.gated_activation(g, act, up=u), args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", list(ACTS))
def test_opcheck(device, act):
    gate, up = torch.randn(7, 10, device=device), torch.randn(7, 10, device=device)
    opcheck(OP, (gate, act, up))
    opcheck(OP, (gate.requires_grad_(True), act, up.requires_grad_(True)))
    opcheck(OP, (gate.detach(), act), {"up": up.detach().requires_grad_(True)})
    opcheck(OP_BW, (torch.randn(7, 10, device=device), gate.detach(), act, up.detach()))
    opcheck(OP_BW, (torch.randn(7, 10, device=device), gate.detach(), act), {"up": up.detach()})


def test_bad_inputs():
    ga = mixops.ops.gated_activation
    g = torch.randn(4, 6)
    with pytest.raises(RuntimeError, match=r"gated_activation: up must have gate_up's shape"):
        ga(g, "silu", up=torch.randn(4, 5))
    with pytest.raises(RuntimeError, match=r"gated_activation: up must have gate_up's shape"):
        ga(g, "silu", up=torch.randn(4, 12))  # the fused width is not the split form's
    with pytest.raises(RuntimeError, match=r"gated_activation: up must have gate_up's dtype"):
        ga(g, "silu", up=torch.randn(4, 6, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"gate_up must be float32"):
        ga(g.int(), "silu", up=torch.randn(4, 6).int())
    # (A device mismatch is a fake-parity case: tests/test_fake_parity.py, with meta tensors.)
    bwd = torch.ops.mixops.gated_activation_backward
    with pytest.raises(RuntimeError, match=r"backward: grad must have shape \[4, 6\] \(gate_up's"):
        bwd(torch.randn(4, 3), g, "silu", torch.randn(4, 6))  # the fused form's grad shape
    with pytest.raises(RuntimeError, match=r"gated_activation_backward: up must have gate_up's"):
        bwd(torch.randn(4, 6), g, "silu", torch.randn(4, 7))
    with pytest.raises(RuntimeError, match=r"gated_activation_backward: up must have gate_up's d"):
        bwd(torch.randn(4, 6), g, "silu", torch.randn(4, 6, dtype=torch.float16))
    # An odd F is fine in the split form (the fused form needs an even last dimension).
    assert ga(torch.randn(4, 7), "silu", up=torch.randn(4, 7)).shape == (4, 7)


def test_compile_fullgraph_dynamic():
    f = torch.compile(
        lambda g, u: mixops.ops.gated_activation(g, "silu", up=u).sum(),
        fullgraph=True,
        dynamic=True,
    )
    for rows in (5, 9):
        gate, up = (
            torch.randn(rows, 8, requires_grad=True),
            torch.randn(rows, 8, requires_grad=True),
        )
        f(gate, up).backward()
        rg, ru = gate.detach().requires_grad_(True), up.detach().requires_grad_(True)
        reference(rg, ru, "silu").sum().backward()
        torch.testing.assert_close(gate.grad, rg.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(up.grad, ru.grad, rtol=1e-5, atol=1e-6)


@requires_cuda
@pytest.mark.parametrize("act", ["silu", "relu"])
@pytest.mark.parametrize("offset", [0, 1])  # 1: up 2 bytes past a 16-byte boundary (scalar path)
def test_cuda_bitwise_equals_cpu(act, offset):
    n = 300 * 256
    gate = torch.randn(300, 256, device="cuda").bfloat16()
    up = torch.randn(n + 1, device="cuda").bfloat16()[offset : offset + n].view(300, 256)
    go = torch.randn(300, 256, device="cuda").bfloat16()
    gpu = _grads(_split(act), gate, up, go)
    cpu = _grads(_split(act), gate.cpu(), up.cpu(), go.cpu())
    for a, b in zip(cpu, gpu):
        assert torch.equal(a, b.cpu())
