"""Expert activations by name: gated ones (``act(gate) * up`` on the [rows, 2*ffn] output of the
fused gate/up projection, gate first as in HF transformers' ``chunk(2)``) and plain ones."""
import torch
import torch.nn.functional as F

__all__ = ["ACTIVATIONS", "GATED", "apply_activation", "check_activation"]

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
GATED = frozenset({"swiglu", "geglu", "geglu_tanh", "reglu"})
ACTIVATIONS = tuple(_FNS)


def check_activation(name: str) -> None:
    if name not in _FNS:
        raise ValueError(f"MoE: unknown activation {name!r}; expected one of {', '.join(ACTIVATIONS)}")


def apply_activation(name: str, h: torch.Tensor) -> torch.Tensor:
    """``h`` [rows, 2*ffn] (gated: gate then up) or [rows, ffn] -> [rows, ffn]."""
    fn = _FNS[name]
    if name in GATED:
        gate, up = h.chunk(2, dim=-1)
        return fn(gate) * up
    return fn(h)
