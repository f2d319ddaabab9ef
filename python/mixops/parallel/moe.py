"""``ExpertParallelMoE``: mixops.nn.MoE with its routed experts sharded over a process group.

Rank r of the group holds experts ``r*E/R .. (r+1)*E/R - 1`` under the single-process names:
``experts.gate_up_proj`` is a DTensor of global shape [E, 2F, H] sharded ``Shard(0)`` over the
group's mesh, whose local shard [E/R, 2F, H] the kernels read (shards.py; ``dtensor=False``: the
plain slice); the router and shared experts are replicated. Every rank routes its own tokens over
all E experts, and the rows travel to the experts' ranks and back (dispatch.py); ``add_lora``'s
adapters are sharded with their experts (moe_lora.py). Autograd convention: the total loss is the
sum of the ranks' losses; each rank's expert gradients then equal its slice of the single-process
gradients, and router / shared-expert gradients equal them after an all-reduce (sum) over the group
(the data parallel reduction does that). Load counts and aux losses are per rank unless
``reduce_stats=True``: then they cover the group's tokens, each rank's ``aux_loss`` being 1/R of
the group's (so the ranks' sum is the single-process loss).

Ranks that disagree are an error on every rank, never a hang: every eager call starts one small
all_gather of the configuration (and, in capacity mode, the token count) before the router and
checks it before the layer's first other collective, on every rank alike (no per-rank cache
that one rank could hit while another misses). ``update_bias`` sums the load over the ranks that
hold the router (``router_group``), so its replicated bias stays equal.

Staged API (for work to overlap with the exchanges)::

    h = moe.dispatch_start(x)   # router, permute, the dispatch all-to-all starts
    ...                         # the caller's independent work
    moe.run_experts(h)          # waits for the dispatch, expert GEMMs, the combine starts
    ...                         # more independent work
    y = moe.combine_finish(h)   # waits for the combine, unpermute, shared experts
"""

import copy
from typing import Optional

import torch
import torch.distributed as dist

from ..nn.activations import GATED
from ..nn.experts import MLP, Experts
from ..nn.moe import (
    MoE,
    MoEParts,
    StagedCall,
    _cast_weights,
    _router_config,
    _stage,
    _zero_kinds,
    autocast_dtype,
    no_autocast,
)
from ..nn.moe_staged import shaped_output
from ..nn.router import TopKRouter
from .comm import _AllReduceSum, resolve_group, start_config_check, traced_call
from .dispatch import (
    compiled_experts_all,
    experts_all,
    finish_all,
    permute_and_plan,
    start_stage,
    take_sends,
    unpermute_all,
)
from .moe_lora import ExpertParallelLoRA, trainable_only
from .shards import ep_mesh_of, shard_experts

__all__ = ["ExpertParallelMoE", "EXPERT_PARALLEL_ATTR"]

EXPERT_PARALLEL_ATTR = "_mixops_expert_parallel"  # set True on sharded expert parameters


class ExpertParallelMoE(ExpertParallelLoRA, MoE):
    """MoE with expert parallelism over ``group`` (a ProcessGroup or a 1-D DeviceMesh; default
    the world). Same arguments as ``mixops.nn.MoE`` (token choice) plus ``group``, ``num_chunks``
    (n chunks whose exchanges overlap the experts; 1: the plain schedule), ``reduce_stats``,
    ``router_group`` and ``check_each_call``.

    ``capacity_factor`` None is dropless (one host sync per layer for the split sizes); a capacity
    factor gives fixed splits: every rank must then pass the same number of tokens.

    check_each_call: every eager call (not under torch.compile or CUDA-graph capture) compares
        the configuration and, in capacity mode, the token count between the ranks (one
        all_gather of a few int64, started before the router and waited for after it), so a
        mismatch at any step raises on every rank, naming each rank's value. On NCCL reading its
        result is a host sync, so an eager capacity-mode layer is not sync-free (compiled or
        captured ones are). Cost, gloo, 2 ranks on a shared 2-core CPU: 0.6-0.9 ms a call (one
        small round trip): +2-10% on a 256-token H=256 forward (~13 ms), within the noise of a
        1024-token H=1024 one (~0.4 s), +40-90% on a 10-token toy layer (~2 ms).
        False: only the first eager call checks (on every rank); a later mismatch of the token
        count is then undetected (gloo aborts the process, NCCL may hang or corrupt).
    dtensor: the expert parameters as DTensors (``Shard(0)`` over ``group``'s mesh: global
        shapes in state dicts and DCP checkpoints, which reshard on load; FSDP2 composes, see
        fsdp.py); False keeps plain local slices under the global names (DDP-era code).
    router_group: the ranks holding a replica of the router (its weight and selection bias):
        a ProcessGroup, or a DeviceMesh of any dimensions (e.g. the dp x ep mesh), which must
        contain every rank of ``group``. ``update_bias`` sums the load over it. Default: the EP
        group when that is the whole world; otherwise ``update_bias`` needs ``group=`` (the layer
        cannot see the data-parallel replicas of a sub-group).
    """

    def __init__(
        self,
        hidden_size: int,
        ffn_size: int,
        num_experts: int,
        top_k: Optional[int] = None,
        *,
        group=None,
        num_chunks: int = 1,
        reduce_stats: bool = False,
        router_group=None,
        check_each_call: bool = True,
        dtensor: bool = True,
        activation: str = "swiglu",
        shared_ffn_size: int = 0,
        shared_expert_gate: bool = False,
        device=None,
        dtype=None,
        **options,
    ):
        if options.get("ffn_sizes") is not None:  # Shard(0) [E, ...] weights: uniform experts
            raise ValueError("ExpertParallelMoE: ffn_sizes (experts of different widths) is not "
                             "expert-parallel yet; use MoE, or one ffn_size")  # fmt: skip
        pg = resolve_group(group)
        world, rank = dist.get_world_size(pg), dist.get_rank(pg)
        if router_group is not None:
            _check_router_group(router_group, pg, "router_group")
        if options.get("router") == "expert_choice":
            raise ValueError("ExpertParallelMoE: expert-choice routing is not expert-parallel")
        if not isinstance(num_experts, int) or num_experts % world:
            raise ValueError(
                f"ExpertParallelMoE: num_experts ({num_experts}) must be divisible by the group "
                f"size ({world})"
            )
        if not isinstance(num_chunks, int) or num_chunks < 1:
            raise ValueError(f"ExpertParallelMoE: num_chunks must be an int >= 1, got {num_chunks}")
        router_keys = {"router", *_router_option_names()}
        router_opts = {k: v for k, v in options.items() if k in router_keys}
        Z = len(_zero_kinds(options.get("zero_experts")))  # zero experts never travel
        cfg = _router_config(
            num_experts + Z, top_k, router_opts.pop("router", None), dict(router_opts)
        )
        El = num_experts // world
        kw = dict(device=device, dtype=dtype)
        parts = MoEParts(
            gate=TopKRouter(hidden_size, cfg.num_experts, cfg.selection_bias, **kw),
            experts=Experts(hidden_size, ffn_size, El, activation in GATED, **kw),
            shared=MLP(hidden_size, shared_ffn_size, activation, **kw) if shared_ffn_size else None,
            shared_gate=(
                torch.nn.Linear(hidden_size, 1, bias=False, **kw) if shared_expert_gate else None
            ),
        )
        rest = {k: v for k, v in options.items() if k not in router_keys}
        super().__init__(
            hidden_size, ffn_size, router=cfg, activation=activation, parts=parts, **rest, **kw
        )
        self.group, self.world_size, self.rank = pg, world, rank
        self.local_experts, self.num_chunks = El, num_chunks
        self.reduce_stats = bool(reduce_stats)
        self.router_group, self.check_each_call = router_group, bool(check_each_call)
        self.ep_mesh = ep_mesh_of(group, pg, device) if dtensor else None
        if dtensor:
            shard_experts(self.experts, self.ep_mesh)
        for p in self.experts.parameters():
            self._mark_expert_parameter(p)
        self._checked = False  # a call has been checked (the same on every rank: one per call)

    def __deepcopy__(self, memo):
        """A copy with its own parameters and buffers on the same process groups and meshes
        (shared: a communicator is not copied), e.g. for an EMA model."""
        for shared in (self.group, self.ep_mesh, self.router_group):
            if shared is not None:
                memo[id(shared)] = shared
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for k, v in self.__getstate__().items():
            new.__dict__[k] = copy.deepcopy(v, memo)
        return new

    @staticmethod
    def _mark_expert_parameter(p):
        setattr(p, EXPERT_PARALLEL_ATTR, True)
        p.allreduce = False  # the DeepSpeed / Megatron convention for expert parameters

    @property
    def expert_range(self):
        """The global expert ids this rank holds: ``range(rank*E/R, (rank+1)*E/R)``."""
        return range(self.rank * self.local_experts, (self.rank + 1) * self.local_experts)

    # -- configuration check ----------------------------------------------------------------------
    def _start_check(self, x2):
        """Start the configuration check of this call (see ``check_each_call``); None when it is
        skipped, which depends only on the call count and mode, never on the values."""
        if torch.compiler.is_compiling() or (
            x2.is_cuda and torch.cuda.is_current_stream_capturing()
        ):
            return None
        if self._checked and not self.check_each_call:
            return None
        self._checked = True
        cap = self._capacity
        values = {
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "hidden_size": self.hidden_size,
            "ffn_size": self.ffn_size,
            "gated": int(self.activation in GATED),
            "capacity_numerator": -1 if cap is None else cap.numerator,
            "capacity_denominator": -1 if cap is None else cap.denominator,
            "num_chunks": self.num_chunks,
            "num_computing_experts": self.num_computing_experts,
            "LoRA rank (add_lora; 0: none)": getattr(
                getattr(self, "experts_lora", None), "rank", 0
            ),
            # The collectives of _group_losses (reduce_stats) depend on these.
            "reduce_stats": int(self.reduce_stats),
            "aux_loss all-reduced": int(self.reduce_stats and bool(self.aux_loss_coef)),
            "z_loss all-reduced": int(self.reduce_stats and bool(self.z_loss_coef)),
            _DTYPE_NAME: _DTYPES.index(self.experts.down_proj.dtype),
            # Fixed splits: every rank must send the same padded shape. (-1: dropless, so that
            # the gathered tensor has the same size in both modes.)
            "tokens (capacity mode needs equal token counts)": (-1 if cap is None else x2.shape[0]),
        }
        return start_config_check(values, self.group, "ExpertParallelMoE")

    # -- the stages -------------------------------------------------------------------------------
    def dispatch_start(self, x, token_mask=None, modality=None) -> StagedCall:
        """Router and permute, then the dispatch all-to-all starts; returns the handle."""
        x2, token_mask, modality = self._flatten(x, token_mask, modality)
        compiling = torch.compiler.is_compiling()
        if compiling and self._capacity is None:
            raise RuntimeError(
                "ExpertParallelMoE: dropless mode needs the split sizes on the host (one sync per "
                "layer) and cannot be compiled; use a capacity_factor under torch.compile"
            )
        check = self._start_check(x2)  # its all_gather travels while the router runs
        h = StagedCall(x.shape, x2, autocast_dtype(x))
        with no_autocast(x, h.cast):
            xr = h.routed_input()
            r, capacity = self._route(xr, token_mask, modality)
            if check is not None:  # before any other collective: a mismatch raises, not hangs
                check.finish()
            if self.reduce_stats:
                self.aux_loss = self._group_losses(r, xr.shape[0], token_mask)
            E, n = self.num_computing_experts, self.num_chunks
            ids = self._computing_ids(r.ids)  # zero experts stay on this rank
            plan = permute_and_plan(xr, ids, E, self.group, n, capacity, stage=_stage)
            plan.compiled = compiling
            if not compiling:  # compiled: run_experts exchanges with functional collectives
                with _stage("dispatch", xr):
                    start_stage(plan)
        h.r, h.plan = r, plan
        return h

    def run_experts(self, h: StagedCall) -> StagedCall:
        """Waits for each chunk's dispatch, runs the local experts, starts its combine."""
        h.advance("dispatching", "combining", "ExpertParallelMoE.run_experts")
        act, plan, cast = self.activation, h.plan, h.cast
        # The local experts' LoRA adapters (local shards of Shard(0) DTensors, like the experts):
        # their A and B travel as extra weights of the chunked schedule, so their gradients come
        # back through ChunkedExperts' backward like the experts'.
        experts, lora_weights = self._lora_experts(act, _stage)  # moe_lora.py

        def run(w1, w2, *sends):
            w1, w2 = _cast_weights(w1, w2, cast)
            weights = (w1, w2, *lora_weights)
            with no_autocast(h.x2, cast):
                if plan.compiled:
                    return compiled_experts_all(plan, experts, *weights)
                fn, trainable = trainable_only(experts, weights)  # a frozen base: closed over
                return experts_all(plan, fn, *trainable, sends=sends)

        # Through the experts module's call (Experts.forward), so that FSDP2 on the experts
        # gathers their shards around it; the rows to send as its arguments, so that its
        # backward hooks see their gradients.
        self.experts(run, *(() if plan.compiled else take_sends(plan)))
        return h

    def combine_finish(self, h: StagedCall, shared_input=None) -> torch.Tensor:
        """The shared experts (on ``shared_input`` when given, else x) run while the combine
        travels; then waits for it, unpermutes (routing weights) and adds them."""
        shared_x2 = h.shared_x2(self, shared_input)
        h.advance("combining", "finished", "ExpertParallelMoE.combine_finish")
        s = traced_call("shared", self._shared_out, shared_x2)
        with no_autocast(h.x2, h.cast):
            with _stage("combine_wait", h.x2):
                outs = finish_all(h.plan)
            with _stage("unpermute", h.x2):
                y = unpermute_all(h.plan, outs, h.r.weights)
            y = self._add_zero_experts(h.routed_input(), y, h.r)
        h.plan = None
        return shaped_output(y if s is None else y + s, h.x_shape)

    def _group_losses(self, r, num_tokens, token_mask):
        """The aux / z losses over the group's tokens, 1/R of them on each rank."""
        if not (self.aux_loss_coef or self.z_loss_coef):
            return None

        def all_reduce(t):  # differentiable sum over the group
            return _AllReduceSum.apply(self.group, t)

        n = (
            torch.tensor(float(num_tokens), device=r.lse.device)
            if token_mask is None
            else token_mask.sum().to(r.lse.dtype)
        )
        n = all_reduce(n.reshape(1))[0].clamp(min=1)
        loss = r.lse.new_zeros(())
        if self.aux_loss_coef:
            counts = r.counts.to(r.score_sum.dtype)
            dist.all_reduce(counts, group=self.group)
            p = all_reduce(r.score_sum)
            loss = loss + self.aux_loss_coef * self.num_experts * (counts / n * p / n).sum()
        if self.z_loss_coef:
            z = r.lse.square()
            if token_mask is not None:
                z = torch.where(token_mask, z, z.new_zeros(()))
            loss = loss + self.z_loss_coef * all_reduce(z.sum().reshape(1))[0] / n
        return loss / self.world_size

    # -- training-loop API ----------------------------------------------------------------------
    @torch.no_grad()
    def update_bias(self, rate: float, group=None) -> torch.Tensor:
        """``mixops.nn.MoE.update_bias`` with the load summed over every rank holding a replica
        of the router, so the replicated selection bias stays equal on all of them (the load of
        the union of their tokens, as in Megatron-LM and torchtitan). ``group``: a ProcessGroup
        or a DeviceMesh (summed dimension by dimension), which must contain the EP group;
        default ``router_group``, else the EP group if it is the whole world. A sub-group EP
        group without either is ambiguous (data-parallel replicas, pipeline stages) and raises
        before any collective, on every rank alike. Summing over ranks that see the same tokens
        (tensor parallel) scales the load evenly and leaves its sign unchanged."""
        if not self.selection_bias:
            return super().update_bias(rate)  # raises: the layer has no bias
        if group is None:
            group = self.router_group
        if group is None:
            world = dist.get_world_size()
            if self.world_size != world:
                raise ValueError(
                    f"ExpertParallelMoE.update_bias: the EP group holds {self.world_size} of the "
                    f"{world} ranks, so the router's replicas (data-parallel, across the EP "
                    "groups) cannot be inferred; pass group= (the ranks holding this router: "
                    "the dp x ep DeviceMesh, or dist.group.WORLD without pipeline stages) or "
                    "construct the layer with router_group="
                )
            group = self.group
        else:
            _check_router_group(group, self.group, "update_bias: group")
        for g in _reduce_groups(group):
            dist.all_reduce(self.tokens_per_expert, group=g)
        return super().update_bias(rate)

    # -- state dicts ------------------------------------------------------------------------------
    def load_full_state_dict(self, state_dict, strict: bool = True):
        """Load a single-process (or HF v5) MoE state dict: each expert tensor becomes this
        rank's shard (no communication), the rest loads as is."""
        from .helpers import load_full_state_dict

        return load_full_state_dict(self, state_dict, strict=strict)

    def full_state_dict(self):
        """The single-process state dict (every rank gets it): expert tensors gathered."""
        from .helpers import full_state_dict

        return full_state_dict(self)


_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
_DTYPE_NAME = "dtype (" + ", ".join(f"{str(d)[6:]}={i}" for i, d in enumerate(_DTYPES)) + ")"


def _ranks(group):
    """The global ranks of a ProcessGroup or of a DeviceMesh (any dimensions)."""
    if callable(getattr(group, "get_group", None)):  # DeviceMesh
        return sorted(group.mesh.flatten().tolist())
    return sorted(dist.get_process_group_ranks(group))


def _check_router_group(router_group, ep_group, what):
    """The router's replicas include every rank of the EP group (each holds one)."""
    ranks, ep = _ranks(router_group), _ranks(ep_group)
    if not set(ep) <= set(ranks):
        raise ValueError(
            f"ExpertParallelMoE: {what} (ranks {ranks}) must contain every rank of the EP group "
            f"(ranks {ep}): the router is replicated over the EP group and its data-parallel "
            "replicas"
        )


def _reduce_groups(group):
    """Process groups whose successive all-reduces sum over ``group``'s ranks: one for a
    ProcessGroup, one per dimension for a DeviceMesh."""
    if callable(getattr(group, "get_group", None)):  # DeviceMesh
        return [group.get_group(d) for d in range(group.ndim)]
    return [group]


def _router_option_names():
    from ..nn.router import RouterConfig

    return RouterConfig.option_names()
