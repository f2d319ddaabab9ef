"""Expert activations by name: gated ones (``act(gate) * up`` on the [rows, 2*ffn] output of the
fused gate/up projection, gate first as in HF transformers' ``chunk(2)``) and plain ones."""

import torch
import torch.nn.functional as F

from ..ops import gated_activation

__all__ = [
    "ACTIVATIONS",
    "GATED",
    "act_fn",
    "apply_activation",
    "check_activation",
    "fused_activation_name",
]

_FNS = {
    "swiglu": F.silu,
    "geglu": F.gelu,
    "geglu_tanh": lambda g: F.gelu(g, approximate="tanh"),
    "reglu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda g: F.gelu(g, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}
# Gated activations run as one fused op (mixops.ops.gated_activation) on the GEMM output.
_FUSED = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh", "reglu": "relu"}
GATED = frozenset(_FUSED)
ACTIVATIONS = tuple(_FNS)


def act_fn(name: str):
    """The elementwise function of an activation (applied to the gate for gated ones)."""
    return _FNS[name]


def fused_activation_name(name: str) -> str:
    """A gated activation's name for ``mixops.ops.gated_activation`` ("swiglu" -> "silu")."""
    return _FUSED[name]


def check_activation(name: str) -> None:
    if name not in _FNS:
        raise ValueError(
            f"MoE: unknown activation {name!r}; expected one of {', '.join(ACTIVATIONS)}"
        )


def apply_activation(name: str, h: torch.Tensor) -> torch.Tensor:
    """``h`` [rows, 2*ffn] (gated: gate then up) or [rows, ffn] -> [rows, ffn]."""
    if name in _FUSED:
        return gated_activation(h, _FUSED[name])
    return _FNS[name](h)
