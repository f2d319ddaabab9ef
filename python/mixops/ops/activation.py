"""gated_activation: the expert MLP's gated activation fused over the gate/up GEMM output."""
import torch

__all__ = ["gated_activation"]

_ACTS = ("silu", "gelu", "gelu_tanh", "relu")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def gated_activation(gate_up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """``act(gate) * up`` in one pass, for SwiGLU (``"silu"``), GeGLU (``"gelu"``, ``"gelu_tanh"``)
    and ReGLU (``"relu"``) experts.

    ::

        gate_up [..., 2F]  float32, bfloat16, float16, float64; gate in [..., :F], up in
                           [..., F:] (HF transformers' ``chunk(2)`` layout)
        -> out  [..., F]   gate_up's dtype; math in float32 (float64 for float64)

    Autograd: one op (``gated_activation_backward``) writes d gate_up from d out, recomputing
    act(gate); nothing but gate_up is saved (PyTorch's unfused chain also keeps act(gate)).
    """
    return torch.ops.mixops.gated_activation.default(gate_up, activation)


def _check(gate_up, activation, op="gated_activation"):
    # The same checks and messages as csrc/activation_check.cpp.
    torch._check(activation in _ACTS, lambda: f"{op}: activation must be one of 'silu', 'gelu', "
                 f"'gelu_tanh', 'relu', got '{activation}'")
    torch._check(gate_up.dim() >= 1,
                 lambda: f"{op}: gate_up must have at least 1 dimension, got a scalar")
    torch._check(gate_up.shape[-1] % 2 == 0, lambda: f"{op}: gate_up's last dimension must be "
                 f"even ([..., 2*F]: gate then up), got {list(gate_up.shape)}")
    torch._check(gate_up.dtype in _DTYPES, lambda: f"{op}: gate_up must be float32, bfloat16, "
                 f"float16 or float64, got {gate_up.dtype}")


@torch.library.register_fake("mixops::gated_activation")
def _gated_activation_fake(gate_up, activation="silu"):
    _check(gate_up, activation)
    return gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)


@torch.library.register_fake("mixops::gated_activation_backward")
def _gated_activation_backward_fake(grad, gate_up, activation):
    op = "gated_activation_backward"
    _check(gate_up, activation, op)
    expect = [*gate_up.shape[:-1], gate_up.shape[-1] // 2]
    torch._check(list(grad.shape) == expect,
                 lambda: f"{op}: grad must have shape {expect} (gate_up's with the last dimension "
                 f"halved), got {list(grad.shape)}")
    torch._check(grad.dtype == gate_up.dtype,
                 lambda: f"{op}: grad must have gate_up's dtype ({gate_up.dtype}), got {grad.dtype}")
    return torch.empty_like(gate_up, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    gate_up, activation = inputs
    ctx.set_materialize_grads(False)
    ctx.activation = activation
    ctx.save_for_backward(gate_up)


def _backward(ctx, grad):
    if not ctx.needs_input_grad[0] or grad is None:
        return None, None
    (gate_up,) = ctx.saved_tensors
    return torch.ops.mixops.gated_activation_backward.default(
        grad.contiguous(), gate_up, ctx.activation), None


torch.library.register_autograd("mixops::gated_activation", _backward, setup_context=_setup)
