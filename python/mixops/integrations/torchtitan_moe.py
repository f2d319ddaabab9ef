"""``MixopsMoE``: torchtitan's ``MoE`` layer (torchtitan.models.common.moe) running on mixops ops.

It subclasses torchtitan's ``MoE`` and keeps its whole module tree (``router.gate``,
``routed_experts.inner_experts.w1_EFD``/``w2_EDF``/``w3_EFD`` or GPT-OSS's ``mlp1_*``/``mlp2_*``,
``shared_experts``, the ``expert_bias_E`` and ``tokens_per_expert_E`` buffers), so parameter
names, initialisation (``init_states``), ``sharding_config``, checkpoints and torchtitan's
load-balancing update are unchanged. Only ``forward`` differs:

    router.gate -> router_topk (score function, group limiting, expert bias, route norm and scale,
    the per-expert counts) -> permute -> grouped_mm(w1) and grouped_mm(w3) -> gated_activation(silu,
    reading both outputs in place) -> grouped_mm(w2) -> unpermute (weights applied, fp32 sums)
    -> + shared experts.

The experts compute in ``expert_dtype`` (bfloat16 by default, as torchtitan's own
``GroupedExperts`` does, whatever the model dtype) or, with ``expert_dtype=None``, in the input's
dtype with no casts (exact to the definition in float64). With torchtitan's expert parallelism
(ep > 1) the routed experts run on mixops' chunked all-to-all schedule over the ep mesh
(integrations/torchtitan_ep.py). See integrations/torchtitan.py for the override that installs it.
"""

from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor
from torchtitan.models.common.moe import MoE

from ..ops import gated_activation, grouped_mm, permute, router_topk, unpermute
from .torchtitan_ep import check_num_chunks, ep_group_for, expert_parallel_experts

__all__ = ["MixopsMoE"]

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def expert_dtype_of(name):
    """``expert_dtype`` (a name or None) as a torch dtype or None."""
    if name is None:
        return None
    if name not in _DTYPES:
        raise ValueError(
            f"mixops torchtitan override: expert_dtype must be one of "
            f"{', '.join(map(repr, _DTYPES))} or None (the input's dtype), got {name!r}"
        )
    return _DTYPES[name]


def _refuse_parallel(what):
    raise NotImplementedError(
        f"mixops torchtitan override: {what}. The override supports data parallelism (FSDP2, "
        "HSDP, DDP), context and pipeline parallelism, and expert parallelism (ep) with data "
        "and pipeline parallelism; for tensor parallelism of the MoE layers leave the override "
        "out of --override.imports."
    )


def _plain(t, name):
    if isinstance(t, DTensor):
        _refuse_parallel(
            f"{name} is a DTensor sharded as {t.placements} (tensor or expert parallelism)"
        )
    return t


def _gate_logits(gate, x):
    """The router's logits as torchtitan computes them: under float32 autocast on CUDA (where
    autocast supports it), in the input's dtype elsewhere (CPU autocast refuses float32, so
    torchtitan's context disables autocast there: here without the warning)."""
    if x.device.type == "cuda":
        with torch.autocast(device_type="cuda", dtype=torch.float32):
            return gate(x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return gate(x)


def _swiglu_oai(h, limit, alpha=1.702):
    """GPT-OSS's clamped SwiGLU on interleaved gate/linear columns (torchtitan gpt_oss.moe)."""
    g, lin = h[..., ::2].clamp(max=limit), h[..., 1::2].clamp(min=-limit, max=limit)
    out = g * torch.sigmoid(alpha * g)
    return torch.addcmul(out, out, lin)


class MixopsMoE(MoE):
    """torchtitan's ``MoE`` with its forward on mixops ops (module docstring)."""

    @dataclass(kw_only=True, slots=True)
    class Config(MoE.Config):
        # Dtype of the expert GEMMs: "bfloat16" (torchtitan's own choice), "float16", "float32",
        # or None for the input's dtype (no casts).
        expert_dtype: str | None = "bfloat16"
        # Expert parallelism (torchtitan's ep > 1): the tokens are cut into this many chunks,
        # whose all-to-alls travel while the previous chunk's experts compute (1: no overlap).
        ep_num_chunks: int = 2

    def __init__(self, config: Config):
        super().__init__(config)
        self.expert_dtype = expert_dtype_of(config.expert_dtype)
        self.ep_num_chunks = check_num_chunks(config.ep_num_chunks)
        inner = self.routed_experts.inner_experts
        self._gpt_oss = hasattr(inner, "mlp1_weight_EGD")
        self._ep_group = None  # the ep mesh's process group once parallelized with ep > 1

    def parallelize(self, parallel_dims) -> None:
        """torchtitan's parallelize (parameters and buffers distributed as for its own layer);
        with ep > 1 the forward then runs mixops' expert-parallel schedule over the ep mesh
        (integrations/torchtitan_ep.py). Tensor parallelism is refused."""
        if getattr(parallel_dims, "tp_enabled", False):
            _refuse_parallel(f"tp degree {parallel_dims.tp} > 1 (tensor parallelism)")
        group = None
        if getattr(parallel_dims, "ep_enabled", False):
            group = ep_group_for(self, parallel_dims)
        super().parallelize(parallel_dims)
        self._ep_group = group

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        _plain(x_BLD, "the MoE input")
        shape = x_BLD.shape
        x_TD = x_BLD.reshape(-1, shape[-1])
        r = self._route(x_TD)
        if self.training:
            with torch.no_grad():
                self.tokens_per_expert_E.add_(r.counts)
        if self._ep_group is not None:
            y_TD = expert_parallel_experts(self, x_TD, r, _swiglu_oai if self._gpt_oss else None)
        elif self._gpt_oss:
            y_TD = self._gpt_oss_experts(x_TD, r)
        else:
            y_TD = self._swiglu_experts(x_TD, r)
        out = y_TD.view(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x_BLD)
        return out

    # The router.

    def _route(self, x_TD):
        router = self.router
        logits = _gate_logits(router.gate, x_TD)
        if router._debug_force_load_balance:
            return self._round_robin(logits)
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        bias = self.expert_bias_E
        if bias is not None:
            bias = _plain(bias, "expert_bias_E").detach().to(acc)
        groups = router.num_expert_groups
        return router_topk(
            logits,
            router.top_k,
            score_fn=router.score_func,
            renormalize=router.route_norm,
            renorm_eps=1e-20,
            scaling=router.route_scale,
            bias=bias,
            num_groups=groups or 1,
            groups_kept=router.num_limited_groups if groups else 1,
            group_score="top2_sum",
        )

    def _round_robin(self, logits):
        """``_debug_force_load_balance``: token-slot i goes to expert i mod E (torchtitan's
        balanced debug routing), weights the chosen scores, then route norm and scale."""
        router = self.router
        T, E, k = logits.shape[0], self.router.num_experts, router.top_k
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        scores = logits.to(acc)
        scores = scores.sigmoid() if router.score_func == "sigmoid" else scores.softmax(-1)
        ids = torch.arange(T * k, device=logits.device).reshape(T, k) % E
        w = scores.gather(1, ids)
        if router.route_norm:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        w = w * router.route_scale
        # scatter, not bincount: bincount sizes its output from max(ids), a host sync on CUDA.
        flat = ids.reshape(-1)
        counts = torch.zeros(E, dtype=torch.int32, device=ids.device)
        counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        return _Routed(w, ids.to(torch.int32), counts)

    # The experts.

    def _cast(self, t):
        return t if self.expert_dtype is None else t.to(self.expert_dtype)

    def _swiglu_experts(self, x_TD, r):
        inner = self.routed_experts.inner_experts

        def weight(name):  # each cast just before its GEMM (a lower peak than all three at once)
            return self._cast(_plain(getattr(inner, name), f"inner_experts.{name}"))

        p = permute(self._cast(x_TD), r.ids, inner.num_experts)
        # [E, F, D] weights read in place as [E, D, F] (grouped_mm takes the transposed view).
        gate = grouped_mm(p.x_sorted, weight("w1_EFD").transpose(1, 2), p.offsets)
        up = grouped_mm(p.x_sorted, weight("w3_EFD").transpose(1, 2), p.offsets)
        h = gated_activation(gate, "silu", up=up)
        o = grouped_mm(h, weight("w2_EDF").transpose(1, 2), p.offsets)
        # torchtitan returns the experts' output in the input's dtype (type_as) before weighting.
        return unpermute(o.to(x_TD.dtype), p.row_map, r.weights)

    def _gpt_oss_experts(self, x_TD, r):
        inner = self.routed_experts.inner_experts
        E = inner.num_experts
        w1 = _plain(inner.mlp1_weight_EGD, "inner_experts.mlp1_weight_EGD")
        b1 = _plain(inner.mlp1_bias_EG, "inner_experts.mlp1_bias_EG")
        w2 = _plain(inner.mlp2_weight_EDF, "inner_experts.mlp2_weight_EDF")
        b2 = _plain(inner.mlp2_bias_ED, "inner_experts.mlp2_bias_ED")
        p = permute(self._cast(x_TD), r.ids, E)
        rows = torch.arange(p.x_sorted.shape[0], device=x_TD.device)
        # The expert of each row (every row is routed: no capacity, no dropped slots).
        row_expert = torch.bucketize(rows, p.offsets, right=True).clamp_(max=E - 1)
        h = grouped_mm(p.x_sorted, self._cast(w1).transpose(1, 2), p.offsets)
        h = h + b1[row_expert].to(h.dtype)
        h = _swiglu_oai(h, inner.swiglu_limit)
        o = grouped_mm(h, self._cast(w2).transpose(1, 2), p.offsets)
        o = o + b2[row_expert].to(o.dtype)
        return unpermute(o.to(x_TD.dtype), p.row_map, r.weights)


@dataclass
class _Routed:
    weights: torch.Tensor
    ids: torch.Tensor
    counts: torch.Tensor
