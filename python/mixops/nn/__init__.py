"""nn.Modules built from the mixops ops."""
from .activations import ACTIVATIONS
from .moe import MLP, Experts, MoE, TopKRouter

__all__ = ["MoE", "TopKRouter", "Experts", "MLP", "ACTIVATIONS"]
