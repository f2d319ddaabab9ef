"""nn.Modules built from the mixops ops: the MoE layer (moe.py), the MoA layer (moa.py), the MoD
wrapper (mod.py), the shortcut-connected blocks (shortcut.py), the router and its configuration
(router.py; the variable-count rules' losses and counters: dynamic_routing.py), the experts
(experts.py; of different widths: packed_experts.py) and the activations by name."""

from .activations import ACTIVATIONS
from .dynamic_routing import BoundHitCounter, ReMoEController, TopPEntropyLoss, bound_hits
from .dynmoe import DynMoE, DynMoEGate
from .experts import MLP, Experts
from .lora_moe import LoRAMoE
from .moa import MoA, MoAExperts, MoAParts
from .mod import MoD, MoDRouter, MoDRouting, TokenCount, pmod_capacity_schedule
from .moe import MoE, MoEParts
from .packed_experts import PackedExperts
from .router import RouterConfig, TopKRouter
from .shortcut import ScMoEBlock, ShortcutDecoderLayer

__all__ = [
    "LoRAMoE",
    "MoA",
    "MoAParts",
    "MoAExperts",
    "MoD",
    "MoDRouter",
    "MoDRouting",
    "pmod_capacity_schedule",
    "TokenCount",
    "MoE",
    "MoEParts",
    "ScMoEBlock",
    "ShortcutDecoderLayer",
    "RouterConfig",
    "TopKRouter",
    "Experts",
    "PackedExperts",
    "MLP",
    "ACTIVATIONS",
    "BoundHitCounter",
    "DynMoE",
    "DynMoEGate",
    "ReMoEController",
    "TopPEntropyLoss",
    "bound_hits",
]
