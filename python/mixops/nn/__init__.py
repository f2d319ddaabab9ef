"""nn.Modules built from the mixops ops: the MoE layer (moe.py), the MoA layer (moa.py), its router and router
configuration (router.py), its experts (experts.py) and the activations by name."""

from .activations import ACTIVATIONS
from .experts import MLP, Experts
from .moa import MoA, MoAExperts, MoAParts
from .moe import MoE, MoEParts
from .router import RouterConfig, TopKRouter

__all__ = [
    "MoA",
    "MoAParts",
    "MoAExperts",
    "MoE",
    "MoEParts",
    "RouterConfig",
    "TopKRouter",
    "Experts",
    "MLP",
    "ACTIVATIONS",
]
