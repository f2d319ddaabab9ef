"""MixopsMoE (mixops.integrations.torchtitan) under every option of torchtitan's
TokenChoiceTopKRouter, and the configurations the override refuses.

Options: score function, route norm and scale, group-limited routing, expert bias, no load
balancing, a biased gate, forced balance, top_k 1 and E. Each: ours in float64
(expert_dtype=None) against the float64 reference of torchtitan's definition
(tests/torchtitan_cases.py), output and every gradient; ours with the default bf16 experts
against the same reference by the tolerance rule next to torchtitan's own layer (model in float32
and in bfloat16) on tokens whose routing margins are comfortable, after checking that torchtitan
and the reference choose the same experts (and ours counts the same).

Refusals: check_supported, to_mixops and the override factory raise naming the option (token
dispatchers other than the standard one, other router / experts / MoE config classes, invalid
group or top_k settings, an unknown expert_dtype).
"""

import dataclasses

import pytest

from helpers import require_torchtitan

require_torchtitan()

import torch  # noqa: E402
from torchtitan.models.common.moe import GroupedExperts, MoE, TokenChoiceTopKRouter  # noqa: E402
from torchtitan.models.common.token_dispatcher import (  # noqa: E402
    DeepEPTokenDispatcher,
    HybridEPTokenDispatcher,
    MinimalAsyncEPTokenDispatcher,
)

import torchtitan_cases as tc  # noqa: E402
from mixops.integrations.torchtitan import check_supported, mixops_moe, to_mixops  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast")

ROUTERS = {
    "softmax": dict(),
    "softmax-norm-scale": dict(route_norm=True, route_scale=2.5),
    "sigmoid-norm-scale": dict(score_func="sigmoid", route_norm=True, route_scale=2.5),
    "sigmoid": dict(score_func="sigmoid"),
    # deepseek_v3's shape of routing: 4 groups of 2 experts, the 2 best groups, top 3.
    "groups": dict(
        score_func="sigmoid", route_norm=True, route_scale=2.5, groups=4, groups_kept=2, top_k=3
    ),
    "groups-softmax": dict(groups=2, groups_kept=1, top_k=2),
    "no-load-balance": dict(load_balance_coeff=None),
    "gate-bias": dict(gate_bias=True, route_norm=True),
    "force-balance": dict(force_balance=True, route_norm=True, route_scale=2.0),
    "top1": dict(top_k=1),
    "topE": dict(top_k=tc.E, route_norm=True),
}


def _pair(name, dtype, expert_dtype):
    cfg = tc.moe_config(**ROUTERS[name])
    bias = None if cfg.load_balance_coeff is None else tc.expert_bias()
    tt, ours = tc.build_pair(cfg, expert_dtype=expert_dtype, expert_bias=bias, dtype=dtype)
    return cfg, tt, ours


@pytest.mark.parametrize("name", ROUTERS)
def test_fp64_equals_reference(name):
    cfg, _, ours = _pair(name, torch.float64, None)
    tc.check_fp64(cfg, ours, torch.randn(2, 12, tc.D, dtype=torch.float64), name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ROUTERS)
def test_bf16_experts_vs_torchtitan(name, dtype):
    cfg, tt, ours = _pair(name, dtype, "bfloat16")
    x = tc.comfortable_input(cfg, tt, (2, 32, tc.D), dtype)
    # The same routing: torchtitan's router chooses the reference's experts, ours counts the same.
    ids_tt = tt.router(x, tt.expert_bias_E)[1].reshape(-1, cfg.router.top_k).sort(-1).values
    assert torch.equal(ids_tt, tc.ref_ids(cfg, tt, x)), f"{name}: torchtitan's routing differs"
    tc.check_vs_torchtitan(cfg, tt, ours, [x], f"{name} {dtype}")


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_expert_bias_changes_the_choice_only(score_func):
    """The bias moves tokens to other experts (their weights stay the unbiased scores): ours
    follows the biased choice, and a bias of zero gives the unbiased one."""
    cfg = tc.moe_config(score_func=score_func, route_norm=True)
    _, ours = tc.build_pair(
        cfg, expert_dtype=None, expert_bias=tc.expert_bias(), dtype=torch.float64
    )
    x = torch.randn(2, 8, tc.D, dtype=torch.float64)
    p = {n: t.detach() for n, t in ours.named_parameters()}
    x_TD = x.reshape(-1, tc.D)
    ids_biased = tc.ref_route(cfg, p, ours.expert_bias_E.double(), x_TD)[1].sort(-1).values
    ids_plain = tc.ref_route(cfg, p, None, x_TD)[1].sort(-1).values
    assert (ids_biased != ids_plain).any(-1).sum() >= 4, "the bias should change some choices"
    with torch.no_grad():
        tc.assert_fp64_close(ours(x), tc.ref_moe(cfg, p, ours.expert_bias_E.double(), x), "biased")
        ours.expert_bias_E.zero_()
        tc.assert_fp64_close(ours(x), tc.ref_moe(cfg, p, None, x), "bias zeroed")


def test_group_limiting_excludes_groups():
    """Group-limited routing chooses only from the kept groups: with groups_kept=1 every token's
    experts lie in one group, which is the group of its two best experts' sum."""
    cfg = tc.moe_config(score_func="sigmoid", groups=4, groups_kept=1, top_k=2)
    _, ours = tc.build_pair(
        cfg, expert_dtype=None, expert_bias=tc.expert_bias(), dtype=torch.float64
    )
    ours.train()
    x = torch.randn(4, 16, tc.D, dtype=torch.float64)
    ids = tc.ref_ids(cfg, ours, x)
    assert torch.equal(ids[:, 0] // 2, ids[:, 1] // 2)
    with torch.no_grad():
        y = ours(x)
    tc.assert_fp64_close(y, tc.ref_moe(cfg, tc.ref_params(ours), tc.ref_bias(ours), x), "output")
    counts = torch.bincount(ids.flatten(), minlength=tc.E).to(ours.tokens_per_expert_E.dtype)
    assert torch.equal(ours.tokens_per_expert_E, counts)


def test_force_balance_round_robin_counts():
    """_debug_force_load_balance: slot i of the flattened [T, K] goes to expert i mod E."""
    cfg = tc.moe_config(force_balance=True, top_k=3)
    tt, ours = tc.build_pair(cfg, expert_bias=tc.expert_bias())
    x = torch.randn(1, 7, tc.D)
    with torch.no_grad():
        tt(x), ours(x)
    expect = torch.bincount(torch.arange(21) % tc.E, minlength=tc.E).float()
    assert torch.equal(ours.tokens_per_expert_E, expect)
    assert torch.equal(tt.tokens_per_expert_E, expect)


# The configurations the override refuses, each with the option named.


@dataclasses.dataclass(kw_only=True, slots=True)
class _RouterConfig(TokenChoiceTopKRouter.Config):
    pass


@dataclasses.dataclass(kw_only=True, slots=True)
class _ExpertsConfig(GroupedExperts.Config):
    pass


@dataclasses.dataclass(kw_only=True, slots=True)
class _MoEConfig(MoE.Config):
    pass


def _dispatcher(cls):
    def edit(cfg):
        cfg.routed_experts.token_dispatcher = cls.Config(num_experts=tc.E, top_k=2, hidden_dim=tc.D)

    return edit


def _fused_experts(cfg):
    fused = pytest.importorskip("torchtitan.overrides.fused_swiglu")  # imports triton
    inner = cfg.routed_experts.inner_experts
    cfg.routed_experts.inner_experts = fused.FusedGroupedExperts.Config(
        dim=inner.dim, hidden_dim=inner.hidden_dim, num_experts=inner.num_experts
    )


def _fields(cfg):
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def _set(path, value):
    def edit(cfg):
        *parents, leaf = path.split(".")
        obj = cfg
        for p in parents:
            obj = getattr(obj, p)
        setattr(obj, leaf, value)

    return edit


REFUSALS = {
    "deepep": (_dispatcher(DeepEPTokenDispatcher), NotImplementedError, "DeepEPTokenDispatcher"),
    "hybridep": (_dispatcher(HybridEPTokenDispatcher), NotImplementedError, "HybridEPToken"),
    "minimal-async-ep": (
        _dispatcher(MinimalAsyncEPTokenDispatcher),
        NotImplementedError,
        "token_dispatcher MinimalAsyncEPTokenDispatcher",
    ),
    "router-subclass": (
        lambda c: setattr(c, "router", _RouterConfig(**_fields(c.router))),
        NotImplementedError,
        "router _RouterConfig is not supported",
    ),
    "experts-subclass": (
        lambda c: setattr(
            c.routed_experts,
            "inner_experts",
            _ExpertsConfig(**_fields(c.routed_experts.inner_experts)),
        ),
        NotImplementedError,
        "inner_experts _ExpertsConfig is not supported",
    ),
    "fused-grouped-experts": (
        _fused_experts,
        NotImplementedError,
        "inner_experts FusedGroupedExperts.Config is not supported",
    ),
    "score-func": (_set("router.score_func", "relu"), NotImplementedError, "score_func='relu'"),
    "groups-without-kept": (_set("router.num_expert_groups", 4), ValueError, "num_limited_groups"),
    "groups-of-one": (
        lambda c: (_set("router.num_expert_groups", 8)(c), _set("router.num_limited_groups", 2)(c)),
        ValueError,
        "num_expert_groups=8",
    ),
    "top-k": (_set("router.top_k", 9), ValueError, r"top_k=9 must be in \[1, 8\]"),
    "num-experts": (_set("num_experts", 4), ValueError, "num_experts disagree"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refusals_name_the_option(name):
    edit, exc, match = REFUSALS[name]
    cfg = tc.moe_config()
    edit(cfg)
    with pytest.raises(exc, match=match):
        check_supported(cfg)
    with pytest.raises(exc, match=f"mixops torchtitan override at 'layers.3.moe': .*{match}"):
        to_mixops(cfg, fqn="layers.3.moe")
    with pytest.raises(exc, match=match):
        mixops_moe(cfg)


def test_refuses_other_moe_class_and_expert_dtype():
    cfg = tc.moe_config()
    other = _MoEConfig(**_fields(cfg))
    with pytest.raises(NotImplementedError, match="MoE config class _MoEConfig"):
        to_mixops(other)
    with pytest.raises(ValueError, match="expert_dtype must be one of .* got 'int8'"):
        to_mixops(cfg, expert_dtype="int8")
