"""Expert parallelism over torch.distributed: all-to-all dispatch and combine overlapped with the
expert GEMMs (dispatch.py), the collectives (comm.py), ``ExpertParallelMoE`` (moe.py; its experts
are DTensor shards: shards.py), FSDP2 on a (dp x ep) mesh (fsdp.py) and the helpers for
data-parallel wrappers and state dicts (helpers.py)."""

from .comm import all_to_all, check_same_config, resolve_group, slow_link, traced, traced_call
from .fsdp import fully_shard_experts
from .helpers import (
    allreduce_expert_grads,
    expert_parameter_names,
    full_state_dict,
    ignore_experts_in_ddp,
    load_full_state_dict,
)
from .moe import EXPERT_PARALLEL_ATTR, ExpertParallelMoE

__all__ = [
    "ExpertParallelMoE",
    "EXPERT_PARALLEL_ATTR",
    "all_to_all",
    "check_same_config",
    "resolve_group",
    "slow_link",
    "traced",
    "traced_call",
    "expert_parameter_names",
    "ignore_experts_in_ddp",
    "allreduce_expert_grads",
    "load_full_state_dict",
    "full_state_dict",
    "fully_shard_experts",
]
