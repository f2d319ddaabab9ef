"""gated_activation: the expert MLP's gated activation fused over the gate/up GEMM output."""

import torch

from ._check import FLOATS, check

__all__ = ["gated_activation"]

_ACTS = ("silu", "gelu", "gelu_tanh", "relu")


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


# Validation: csrc/activation/check.cpp line by line, with its messages (see _check.py).


def _check_gate_up(gate_up, activation, op):
    check(
        activation in _ACTS,
        op,
        ": activation must be one of 'silu', 'gelu', 'gelu_tanh', 'relu', got '",
        activation,
        "'",
    )
    check(gate_up.dim() >= 1, op, ": gate_up must have at least 1 dimension, got a scalar")
    check(
        gate_up.shape[-1] % 2 == 0,
        op,
        ": gate_up's last dimension must be even ([..., 2*F]: gate then up), got ",
        gate_up.shape,
    )
    check(
        gate_up.dtype in FLOATS,
        op,
        ": gate_up must be float32, bfloat16, float16 or float64, got ",
        gate_up.dtype,
    )


def _gated_activation_backward_check(grad, gate_up, activation):
    op = "gated_activation_backward"
    _check_gate_up(gate_up, activation, op)
    expect = [*gate_up.shape[:-1], gate_up.shape[-1] // 2]
    check(
        list(grad.shape) == expect,
        op,
        ": grad must have shape ",
        expect,
        " (gate_up's with the last dimension halved), got ",
        grad.shape,
    )
    check(
        grad.dtype == gate_up.dtype,
        op,
        ": grad must have gate_up's dtype (",
        gate_up.dtype,
        "), got ",
        grad.dtype,
    )
    check(
        grad.device == gate_up.device,
        op,
        ": grad must be on gate_up's device (",
        gate_up.device,
        "), got ",
        grad.device,
    )


@torch.library.register_fake("mixops::gated_activation")
def _gated_activation_fake(gate_up, activation="silu"):
    _check_gate_up(gate_up, activation, "gated_activation")
    return gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)


@torch.library.register_fake("mixops::gated_activation_backward")
def _gated_activation_backward_fake(grad, gate_up, activation):
    _gated_activation_backward_check(grad, gate_up, activation)
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
        grad.contiguous(), gate_up, ctx.activation
    ), None


torch.library.register_autograd("mixops::gated_activation", _backward, setup_context=_setup)
