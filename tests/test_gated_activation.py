"""gated_activation: act(gate) * up over the fused gate/up GEMM output, and its backward."""

import pytest
import torch
import torch.nn.functional as F

import mixops
from conftest import DEVICES, requires_cuda
from helpers import assert_close_to_ref, opcheck

ACTS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda g: F.gelu(g, approximate="tanh"),
    "relu": F.relu,
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def reference(h, act):
    gate, up = h.chunk(2, dim=-1)
    return ACTS[act](gate) * up


def _grads(fn, h, go):
    h = h.detach().clone().requires_grad_(True)
    y = fn(h)
    (g,) = torch.autograd.grad(y, h, go)
    return y.detach(), g


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("shape", [(37, 2 * 24), (3, 5, 2 * 129), (1, 2), (0, 16), (2, 3, 0)])
def test_forward_backward_against_reference(device, dtype, act, shape):
    h = (torch.randn(shape, device=device) * 3).to(dtype)
    go = torch.randn(*shape[:-1], shape[-1] // 2, device=device).to(dtype)
    ours = _grads(lambda t: mixops.ops.gated_activation(t, act), h, go)
    ref = _grads(lambda t: reference(t, act), h.double(), go.double())
    lowp = _grads(lambda t: reference(t, act), h, go)
    for what, a, r, t in zip(("out", "grad"), ours, ref, lowp):
        assert_close_to_ref(a, r, t, f"{act} {dtype} {shape} {what}")


@pytest.mark.parametrize("act", list(ACTS))
def test_special_values(act):
    # 0, large magnitudes, inf and NaN go through as torch's own activations take them.
    g = torch.tensor([0.0, -0.0, 1e-30, 30.0, -30.0, 100.0, -100.0, float("inf"), float("nan")])
    up = torch.full_like(g, 2.0)
    ours = mixops.ops.gated_activation(torch.cat([g, up]), act)
    ref = reference(torch.cat([g, up]).double(), act)
    finite = ref.isfinite()
    assert torch.equal(ours.isnan(), ref.isnan())
    assert torch.equal(ours[~finite & ~ref.isnan()], ref[~finite & ~ref.isnan()].float())
    torch.testing.assert_close(ours[finite].double(), ref[finite], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_rows(device):
    # Rows of a wider buffer (a view with row stride > 2F) and a non-contiguous last dim.
    base = torch.randn(9, 70, device=device)
    h = base[:, 3 : 3 + 48]
    torch.testing.assert_close(
        mixops.ops.gated_activation(h), reference(h, "silu"), rtol=1e-6, atol=1e-6
    )
    ht = torch.randn(48, 9, device=device).t()
    torch.testing.assert_close(
        mixops.ops.gated_activation(ht, "gelu"), reference(ht, "gelu"), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("act", list(ACTS))
def test_gradcheck_fp64(act):
    h = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    if act == "relu":  # keep away from the kink at 0
        h = (h.detach() + h.detach().sign() * 0.1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: mixops.ops.gated_activation(t, act), (h,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", list(ACTS))
def test_opcheck(device, act):
    h = torch.randn(7, 20, device=device)
    opcheck(torch.ops.mixops.gated_activation.default, (h, act))
    opcheck(torch.ops.mixops.gated_activation.default, (h.requires_grad_(True), act))
    opcheck(
        torch.ops.mixops.gated_activation_backward.default,
        (torch.randn(7, 10, device=device), h.detach(), act),
    )


def test_bad_inputs():
    ga = mixops.ops.gated_activation
    with pytest.raises(RuntimeError, match="activation must be one of"):
        ga(torch.randn(4, 8), "swish")
    with pytest.raises(RuntimeError, match="last dimension must be even"):
        ga(torch.randn(4, 7))
    with pytest.raises(RuntimeError, match="gate_up must be float32"):
        ga(torch.ones(4, 8, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="at least 1 dimension"):
        ga(torch.tensor(1.0))
    bwd = torch.ops.mixops.gated_activation_backward
    with pytest.raises(RuntimeError, match="grad must have shape"):
        bwd(torch.randn(4, 8), torch.randn(4, 8), "silu")
    with pytest.raises(RuntimeError, match="grad must have gate_up's dtype"):
        bwd(torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 8), "silu")
    with pytest.raises(RuntimeError, match="gated_activation_backward: activation must be one of"):
        bwd(torch.randn(4, 4), torch.randn(4, 8), "tanh")


def test_compile_fullgraph_dynamic():
    f = torch.compile(
        lambda t: mixops.ops.gated_activation(t, "silu").sum(), fullgraph=True, dynamic=True
    )
    for rows in (5, 9):
        h = torch.randn(rows, 16, requires_grad=True)
        y = f(h)
        y.backward()
        ref_h = h.detach().clone().requires_grad_(True)
        reference(ref_h, "silu").sum().backward()
        torch.testing.assert_close(h.grad, ref_h.grad, rtol=1e-5, atol=1e-6)


@requires_cuda
@pytest.mark.parametrize("act", ["silu", "relu"])
def test_cuda_bitwise_equals_cpu(act):
    # silu and relu share exactly the same float operations on both backends.
    h = torch.randn(300, 2 * 257)
    go = torch.randn(300, 257)
    cpu = _grads(lambda t: mixops.ops.gated_activation(t, act), h, go)
    gpu = _grads(lambda t: mixops.ops.gated_activation(t, act), h.cuda(), go.cuda())
    for a, b in zip(cpu, gpu):
        assert torch.equal(a, b.cpu())
