"""gated_activation: the expert MLP's gated activation fused over the gate/up GEMM output(s)."""

import torch

from ._check import FLOATS, check

__all__ = ["gated_activation"]

_ACTS = ("silu", "gelu", "gelu_tanh", "relu")


def gated_activation(
    gate_up: torch.Tensor,
    activation: str = "silu",
    up: torch.Tensor | None = None,
    interleaved: bool = False,
) -> torch.Tensor:
    """``act(gate) * up`` in one pass, for SwiGLU (``"silu"``), GeGLU (``"gelu"``, ``"gelu_tanh"``)
    and ReGLU (``"relu"``) experts.

    ::

        fused (up=None):
        gate_up [..., 2F]  float32, bfloat16, float16, float64; gate in [..., :F], up in
                           [..., F:] (HF transformers' ``chunk(2)`` layout)
        interleaved (up=None, interleaved=True):
        gate_up [..., 2F]  gate in [..., 0::2], up in [..., 1::2] (g_0, u_0, g_1, u_1, ...:
                           GPT-OSS's layout, and mixops' packed experts')
        split (up given; two GEMM outputs, e.g. torchtitan's w1 and w3, read where they are):
        gate_up [..., F]   the gate; float32, bfloat16, float16, float64
        up      [..., F]   gate_up's shape, dtype and device
        -> out  [..., F]   gate_up's dtype; math in float32 (float64 for float64)

    Any strides: rows of a wider tensor are read in place; a non-unit column stride (and, in the
    split form, gate and up rows with different strides) costs a contiguous copy. The split and
    interleaved forms give the same bits as the fused form on ``torch.cat([gate, up], -1)``.

    Autograd: one op (``gated_activation_backward``) writes d gate_up from d out, recomputing
    act(gate); nothing but the inputs is saved (PyTorch's unfused chain also keeps act(gate)). In
    the split form it writes one [..., 2F] buffer and d gate, d up are its two halves (views); in
    the interleaved form d gate_up is interleaved as gate_up is.
    """
    return torch.ops.mixops.gated_activation.default(gate_up, activation, up, interleaved)


# Validation: csrc/activation/check.cpp line by line, with its messages (see _check.py).


def _check_gate_up(gate_up, activation, up, interleaved, op):
    check(
        activation in _ACTS,
        op,
        ": activation must be one of 'silu', 'gelu', 'gelu_tanh', 'relu', got '",
        activation,
        "'",
    )
    check(gate_up.dim() >= 1, op, ": gate_up must have at least 1 dimension, got a scalar")
    check(
        not (interleaved and up is not None),
        op,
        ": interleaved=True reads gate and up from one gate_up [..., 2*F] (g_0, u_0, g_1, "
        "u_1, ...); up must be None",
    )
    if interleaved:
        check(
            gate_up.shape[-1] % 2 == 0,
            op,
            ": gate_up's last dimension must be even ([..., 2*F]: gate and up interleaved), got ",
            gate_up.shape,
        )
    elif up is None:
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
    if up is not None:  # the split form: gate_up is the gate [..., F]
        check(
            up.shape == gate_up.shape,
            op,
            ": up must have gate_up's shape ",
            gate_up.shape,
            " (gate_up is the gate when up is given), got ",
            up.shape,
        )
        check(
            up.dtype == gate_up.dtype,
            op,
            ": up must have gate_up's dtype (",
            gate_up.dtype,
            "), got ",
            up.dtype,
        )
        check(
            up.device == gate_up.device,
            op,
            ": up must be on gate_up's device (",
            gate_up.device,
            "), got ",
            up.device,
        )


def _gated_activation_backward_check(grad, gate_up, activation, up, interleaved):
    op = "gated_activation_backward"
    _check_gate_up(gate_up, activation, up, interleaved, op)
    expect = [*gate_up.shape[:-1], gate_up.shape[-1] // 2 if up is None else gate_up.shape[-1]]
    check(
        list(grad.shape) == expect,
        op,
        ": grad must have shape ",
        expect,
        " (gate_up's with the last dimension halved), got "
        if up is None
        else " (gate_up's, the gate's, as up is given), got ",
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
def _gated_activation_fake(gate_up, activation="silu", up=None, interleaved=False):
    _check_gate_up(gate_up, activation, up, interleaved, "gated_activation")
    f = gate_up.shape[-1] if up is not None else gate_up.shape[-1] // 2
    return gate_up.new_empty(*gate_up.shape[:-1], f)


@torch.library.register_fake("mixops::gated_activation_backward")
def _gated_activation_backward_fake(grad, gate_up, activation, up=None, interleaved=False):
    _gated_activation_backward_check(grad, gate_up, activation, up, interleaved)
    return gate_up.new_empty(*grad.shape[:-1], 2 * grad.shape[-1])


def _setup(ctx, inputs, output):
    gate_up, activation, up, interleaved = inputs
    ctx.set_materialize_grads(False)
    ctx.activation = activation
    ctx.interleaved = interleaved
    ctx.save_for_backward(gate_up, up)


def _backward(ctx, grad):
    # Inputs in schema order: gate_up, activation, up, interleaved. needs_input_grad covers only
    # the arguments the dispatcher passed: it drops trailing ones equal to their defaults
    # (interleaved=False, up=None, "silu").
    need_gate_up, _, need_up = (*ctx.needs_input_grad, False, False)[:3]
    if grad is None or not (need_gate_up or need_up):
        return None, None, None, None
    gate_up, up = ctx.saved_tensors
    dh = torch.ops.mixops.gated_activation_backward.default(
        grad.contiguous(), gate_up, ctx.activation, up, ctx.interleaved
    )
    if up is None:
        return dh, None, None, None
    f = gate_up.shape[-1]  # d gate and d up: the halves of one buffer, no copy
    return dh[..., :f] if need_gate_up else None, None, dh[..., f:] if need_up else None, None


torch.library.register_autograd("mixops::gated_activation", _backward, setup_context=_setup)
