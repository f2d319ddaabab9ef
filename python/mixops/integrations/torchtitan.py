"""mixops inside torchtitan: one override that runs torchtitan's MoE layers on mixops ops.

Turn it on with one line of torchtitan configuration::

    --override.imports mixops.integrations.torchtitan.mixops_moe

(or ``config.override = OverrideConfig(imports=["mixops.integrations.torchtitan.mixops_moe"])``
in a config function; with options: ``(target, {"expert_dtype": None, "ep_num_chunks": 3})``).
Every
``MoE.Config`` of the model (``fqns`` narrow it in your own ``@override``, see ``to_mixops``) is
replaced by ``MixopsMoE.Config``: the same module tree, parameter and buffer names, init,
``sharding_config`` and checkpoints, with the forward on mixops' router_topk, permute, grouped
GEMMs, gated activation and unpermute (integrations/torchtitan_moe.py).

Tested with torchtitan 0.3.0 (``TORCHTITAN_TESTED``). Models: deepseek_v3, kimi_k2_7, qwen3,
qwen3_5 (torchtitan's ``GroupedExperts``) and gpt_oss (its biased, clamped-SwiGLU experts). What
the layer cannot express is refused when the override is applied, with the option named: other
token dispatchers than the standard one (DeepEP, HybridEP, MinimalAsyncEP), other experts or
router classes, and (at ``parallelize``) tensor parallelism of the MoE layers.

Expert parallelism (``parallelism.expert_parallel_degree > 1``) runs on mixops' own chunked,
overlapped all-to-all schedule over torchtitan's ``ep`` mesh axis, with the expert weights
distributed by torchtitan as for its own layer (integrations/torchtitan_ep.py); the number of
chunks is the ``ep_num_chunks`` option (default 2).
"""

from torchtitan.config import derive, override
from torchtitan.models.common.moe import (
    GroupedExperts,
    MoE,
    RoutedExperts,
    TokenChoiceTopKRouter,
)
from torchtitan.models.common.token_dispatcher import (
    AllToAllTokenDispatcher,
    LocalTokenDispatcher,
)

from .torchtitan_ep import check_num_chunks
from .torchtitan_moe import MixopsMoE, expert_dtype_of

__all__ = ["MixopsMoE", "TORCHTITAN_TESTED", "mixops_moe", "to_mixops", "use_mixops"]

# The torchtitan versions this integration is tested with, [min, below).
TORCHTITAN_TESTED = ("0.3.0", "0.4")

_PREFIX = "mixops torchtitan override"


def _experts_classes():
    """torchtitan's expert modules the layer computes: GroupedExperts (w1/w2/w3) and GPT-OSS's."""
    classes = [GroupedExperts.Config]
    try:
        from torchtitan.models.gpt_oss.moe import GptOssGroupedExperts, GptOssMoE
    except ImportError:  # pragma: no cover - gpt_oss is part of torchtitan 0.3.0
        return classes, (MoE.Config,)
    return classes + [GptOssGroupedExperts.Config], (MoE.Config, GptOssMoE.Config)


def _refuse(fqn, what):
    where = f" at '{fqn}'" if fqn else ""
    raise NotImplementedError(f"{_PREFIX}{where}: {what}")


def check_supported(cfg, fqn=""):
    """Raise NotImplementedError naming the option when ``cfg`` (a ``MoE.Config``) holds
    something the mixops layer cannot compute."""
    experts_ok, moe_ok = _experts_classes()
    if type(cfg) not in moe_ok:
        _refuse(
            fqn, f"MoE config class {type(cfg).__qualname__} (its own forward) is not supported"
        )
    routed = cfg.routed_experts
    if type(routed) is not RoutedExperts.Config:
        _refuse(fqn, f"routed_experts {type(routed).__qualname__} is not supported")
    inner = routed.inner_experts
    if type(inner) not in experts_ok:
        _refuse(
            fqn,
            f"routed_experts.inner_experts {type(inner).__qualname__} is not supported (mixops "
            "computes GroupedExperts and GptOssGroupedExperts; list mixops_moe instead of "
            "another experts override)",
        )
    disp = routed.token_dispatcher
    if type(disp) not in (LocalTokenDispatcher.Config, AllToAllTokenDispatcher.Config):
        _refuse(
            fqn,
            f"token_dispatcher {type(disp).__qualname__} (comm_backend other than 'standard') "
            "is not supported",
        )
    router = cfg.router
    if type(router) is not TokenChoiceTopKRouter.Config:
        _refuse(fqn, f"router {type(router).__qualname__} is not supported")
    if router.score_func not in ("softmax", "sigmoid"):
        _refuse(fqn, f"router.score_func={router.score_func!r} is not supported")
    E = router.num_experts
    if inner.num_experts != E or cfg.num_experts != E:
        raise ValueError(
            f"{_PREFIX} at '{fqn}': num_experts disagree: MoE {cfg.num_experts}, router {E}, "
            f"inner_experts {inner.num_experts}"
        )
    if not 1 <= router.top_k <= E:
        raise ValueError(f"{_PREFIX} at '{fqn}': router.top_k={router.top_k} must be in [1, {E}]")
    G, kept = router.num_expert_groups, router.num_limited_groups
    if G is not None:
        if kept is None:
            raise ValueError(
                f"{_PREFIX} at '{fqn}': router.num_limited_groups must be set when "
                "router.num_expert_groups is set"
            )
        if E % G != 0 or E // G < 2:
            raise ValueError(
                f"{_PREFIX} at '{fqn}': router.num_expert_groups={G} must divide num_experts={E} "
                "into groups of at least 2 experts"
            )
        if not 1 <= kept <= G or kept * (E // G) < router.top_k:
            raise ValueError(
                f"{_PREFIX} at '{fqn}': router.num_limited_groups={kept} must be in [1, {G}] "
                f"and leave at least top_k={router.top_k} experts"
            )


def to_mixops(cfg, *, expert_dtype="bfloat16", ep_num_chunks=2, fqn=""):
    """``MixopsMoE.Config`` for torchtitan's ``MoE.Config`` ``cfg`` (every field carried over
    by name, so later torchtitan fields follow). ``expert_dtype``: the experts' GEMM dtype,
    "bfloat16" as torchtitan's own experts, or None for the input's dtype. ``ep_num_chunks``:
    under expert parallelism, the chunks whose all-to-alls overlap the experts (1: none). Raises
    naming the option the layer cannot express."""
    expert_dtype_of(expert_dtype)
    check_num_chunks(ep_num_chunks)
    check_supported(cfg, fqn)
    return derive(cfg, MixopsMoE.Config, expert_dtype=expert_dtype, ep_num_chunks=ep_num_chunks)


@override(
    target=MoE.Config,
    description="mixops: MoE layers on mixops' fused routing, permutation and grouped GEMMs",
)
def mixops_moe(cfg, *, expert_dtype="bfloat16", ep_num_chunks=2):
    """The override factory (``--override.imports mixops.integrations.torchtitan.mixops_moe``)."""
    if isinstance(cfg, MixopsMoE.Config):
        return cfg
    return to_mixops(cfg, expert_dtype=expert_dtype, ep_num_chunks=ep_num_chunks)


def use_mixops(config_root, **kwargs):
    """Apply the override to a config tree in place, as the trainer does for
    ``--override.imports`` (for scripts that build torchtitan models themselves); returns
    torchtitan's log lines, one per replaced layer."""
    from torchtitan.config.override import OverrideConfig, apply_overrides

    target = f"{__name__}.mixops_moe"
    return apply_overrides(OverrideConfig(imports=[(target, kwargs)]), config_root)
