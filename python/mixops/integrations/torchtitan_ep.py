"""Expert parallelism for ``MixopsMoE`` (torchtitan's MoE layer on mixops ops) on mixops'
overlapped schedule.

torchtitan's own EP path (``RoutedExperts.forward``) runs dispatch -> experts -> combine one
after the other, so mixops' chunked schedule (chunk c+1's all-to-all travelling while chunk c's
experts compute, forward and backward: parallel/dispatch.py, parallel/overlap.py) cannot sit behind
its token dispatcher. Instead ``MixopsMoE.parallelize`` lets torchtitan distribute the expert
parameters exactly as it does (DTensors ``Shard(0)`` on its ``ep`` mesh axis: the same names, the
same DCP checkpoints, FSDP2 on the ``efsdp`` axis), remembers the ``ep`` mesh's process group, and
the forward here runs the local expert shards (``to_local()``; under torchtitan's default
"spmd_types" backend the weights are plain local tensors until FSDP2 wraps them) inside mixops'
schedule:

    permute_and_plan (dropless, ``ep_num_chunks`` token chunks) -> start_stage -> experts_all (the
    local experts' grouped GEMMs on rows grouped by local expert) -> finish_all -> unpermute_all.

Every rank routes its own tokens over all E experts, so ``tokens_per_expert_E`` accumulates this
rank's counts over all experts, as torchtitan's EP layer does (its load-balancing hook sums them
over the data-parallel ranks).
"""

import torch
from torch.distributed.tensor import DTensor

from ..ops import gated_activation, grouped_mm
from ..parallel.dispatch import (
    experts_all,
    finish_all,
    permute_and_plan,
    start_stage,
    take_sends,
    unpermute_all,
)

__all__ = ["check_num_chunks", "ep_group_for", "expert_parallel_experts"]

_PREFIX = "mixops torchtitan override"

# torchtitan's SPMD backends the EP path supports, both tested against torchtitan's own EP path:
# "partial_dtensor" (the MoE input, router and buffers are plain tensors; the expert weights
# DTensors Shard(0) on the ep mesh) and "spmd_types" (torchtitan's default: every tensor plain,
# the expert weights this rank's slice of the experts, then DTensors on the sparse SPMD mesh once
# FSDP2 shards them). Under "spmd_types" torchtitan's dispatcher takes the ep group from the
# sparse mesh its trainer registers (``spmd_sparse_mesh()["ep"]``), a slice of the same sparse
# mesh as ``parallel_dims.get_optional_mesh("ep")``: the same process group, read here at
# parallelize time. Its debug type checking (``--debug.spmd_typechecking``) is not supported.
# "full_dtensor" (every activation a DTensor) is refused.
_BACKENDS = ("partial_dtensor", "spmd_types")


def check_num_chunks(n):
    """``ep_num_chunks`` validated: an int >= 1."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{_PREFIX}: ep_num_chunks must be an int >= 1, got {n!r}")
    return n


def _refuse(what):
    raise NotImplementedError(
        f"{_PREFIX}: {what}. With expert parallelism the override supports FSDP2/HSDP "
        "(dp_shard, dp_replicate) and pipeline parallelism; for the rest leave the override out "
        "of --override.imports."
    )


def ep_group_for(moe, parallel_dims):
    """The process group of ``parallel_dims``' ``ep`` mesh axis, after checking that the layer
    can run this combination (raises naming what it cannot)."""
    ep = parallel_dims.ep
    backend = getattr(parallel_dims, "spmd_backend", "partial_dtensor")
    if backend not in _BACKENDS:
        _refuse(
            f"ep degree {ep} > 1 with parallelism.spmd_backend={backend!r} (supported: "
            f"{', '.join(map(repr, _BACKENDS))}: --parallelism.spmd_backend spmd_types, "
            "torchtitan's default, or --parallelism.spmd_backend partial_dtensor)"
        )
    if getattr(parallel_dims, "cp_enabled", False):
        _refuse(f"ep degree {ep} > 1 with context parallelism (cp degree {parallel_dims.cp})")
    E = moe.routed_experts.inner_experts.num_experts
    if E % ep:
        raise ValueError(f"{_PREFIX}: num_experts={E} must be divisible by the ep degree {ep}")
    mesh = parallel_dims.get_optional_mesh("ep")
    if mesh is None:  # pragma: no cover - torchtitan builds it whenever ep > 1
        raise ValueError(f"{_PREFIX}: parallel_dims has no 'ep' mesh for ep degree {ep}")
    return mesh.get_group()


def _local(t):
    """A DTensor parameter's local shard (differentiable, no copy); a plain tensor as it is
    (under "spmd_types" before FSDP2, the expert weights are already this rank's experts)."""
    return t.to_local() if isinstance(t, DTensor) else t


def call_as(module, fn, *args):
    """``fn(*args)`` run as ``module``'s call: a wrapper that hooks the module's forward (FSDP2's
    ``fully_shard`` on the experts) gathers its parameters around it and sees the tensors in
    ``args`` and in the result (its backward hooks). ``module.forward`` is swapped for the call
    only, so the module tree, names and torchtitan's wrapped forward are unchanged."""
    saved = module.__dict__.get("forward")
    module.forward = fn
    try:
        return module(*args)
    finally:
        if saved is None:
            del module.forward
        else:
            module.forward = saved


def _swiglu(rows, offsets, w1, w3, w2):
    """The local experts on ``rows`` [R, D] grouped by local expert (``offsets`` [E_local] int32
    ends): w2 (silu(w1 x) * (w3 x)); [E_local, F, D] weights read in place as [E_local, D, F]."""
    gate = grouped_mm(rows, w1.transpose(1, 2), offsets)
    up = grouped_mm(rows, w3.transpose(1, 2), offsets)
    return grouped_mm(gated_activation(gate, "silu", up=up), w2.transpose(1, 2), offsets)


def _gpt_oss_fn(limit, swiglu):
    def experts(rows, offsets, w1, b1, w2, b2):
        """GPT-OSS's biased experts on local rows: the bias of each row's local expert."""
        n = offsets.shape[0]
        index = torch.arange(rows.shape[0], device=rows.device)
        row_expert = torch.bucketize(index, offsets, right=True).clamp_(max=n - 1)
        h = grouped_mm(rows, w1.transpose(1, 2), offsets) + b1[row_expert].to(rows.dtype)
        o = grouped_mm(swiglu(h, limit), w2.transpose(1, 2), offsets)
        return o + b2[row_expert].to(o.dtype)

    return experts


def expert_parallel_experts(moe, x_TD, r, swiglu_oai=None):
    """The routed experts' weighted sum [T, D] for this rank's tokens ``x_TD`` [T, D] routed as
    ``r`` (weights [T, K], global expert ids [T, K]) over ``moe._ep_group``, on mixops' chunked
    schedule; the experts in ``moe.expert_dtype`` (the rows travel in it), the result in
    ``x_TD``'s dtype."""
    inner = moe.routed_experts.inner_experts
    if swiglu_oai is None:
        names, fn = ("w1_EFD", "w3_EFD", "w2_EDF"), _swiglu
    else:
        names = ("mlp1_weight_EGD", "mlp1_bias_EG", "mlp2_weight_EDF", "mlp2_bias_ED")
        fn = _gpt_oss_fn(inner.swiglu_limit, swiglu_oai)
    E, group = inner.num_experts, moe._ep_group
    plan = permute_and_plan(moe._cast(x_TD), r.ids, E, group, moe.ep_num_chunks)
    start_stage(plan)

    def run(*sends):
        # Read here, inside inner_experts' call: a fully_shard on it has gathered them.
        weights = [moe._cast(_local(getattr(inner, n))) for n in names]
        return experts_all(plan, fn, *weights, sends=sends)

    # The rows to send as the call's arguments, so that a wrapper's backward hooks see the
    # gradients flowing through them.
    call_as(inner, run, *take_sends(plan))
    # The outputs travel in the experts' dtype; torchtitan's type_as(x) before weighting.
    outs = [o.to(x_TD.dtype) for o in finish_all(plan)]
    return unpermute_all(plan, outs, r.weights)
