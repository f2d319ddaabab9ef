"""nn.Modules built from the mixops ops: the MoE layer (moe.py), the MoA layer (moa.py), the MoD
wrapper (mod.py), the router and its configuration (router.py), the experts (experts.py) and the
activations by name."""

from .activations import ACTIVATIONS
from .experts import MLP, Experts
from .moa import MoA, MoAExperts, MoAParts
from .mod import MoD, pmod_capacity_schedule
from .moe import MoE, MoEParts
from .router import RouterConfig, TopKRouter

__all__ = [
    "MoA",
    "MoAParts",
    "MoAExperts",
    "MoD",
    "pmod_capacity_schedule",
    "MoE",
    "MoEParts",
    "RouterConfig",
    "TopKRouter",
    "Experts",
    "MLP",
    "ACTIVATIONS",
]
