"""mixops.nn.RouterConfig: the one place the routing options are checked, what it hands to
mixops.ops.router_topk, and MoE built from it (router=) or from the same options as keywords."""

import dataclasses
import inspect

import pytest
import torch

from mixops.nn import MoE, RouterConfig
from mixops.ops import router_topk

H, FFN = 32, 24
DSV3 = dict(
    num_experts=16,
    top_k=4,
    score_fn="sigmoid",
    selection_bias=True,
    num_groups=4,
    groups_kept=2,
    renorm_eps=1e-20,
    scaling=2.5,
    router_fp32=True,
)


def test_router_equals_keywords():
    torch.manual_seed(0)
    a = MoE(H, FFN, router=RouterConfig(**DSV3), shared_ffn_size=16)
    torch.manual_seed(0)
    b = MoE(
        H,
        FFN,
        16,
        4,
        shared_ffn_size=16,
        **{k: v for k, v in DSV3.items() if k not in ("num_experts", "top_k")},
    )
    assert a.router_config == b.router_config
    assert (a.num_experts, a.top_k, a.selection_bias, a.router_fp32) == (16, 4, True, True)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    x = torch.randn(11, H)
    assert torch.equal(a(x), b(x))


def test_op_kwargs_cover_every_router_topk_option():
    # Every option of the op comes from the config (the tensors are the caller's), and every
    # field of the config is an op option or one of the router's own.
    op = set(inspect.signature(router_topk).parameters) - {
        "logits",
        "bias",
        "modality",
        "token_mask",
    }
    kwargs = RouterConfig(**DSV3).op_kwargs()
    assert set(kwargs) == op
    fields = {f.name for f in dataclasses.fields(RouterConfig)}
    assert fields - {"top_k"} - set(kwargs) == {"num_experts", "selection_bias", "router_fp32"}
    assert kwargs["k"] == 4 and kwargs["num_groups"] == 4 and kwargs["scaling"] == 2.5


@pytest.mark.parametrize(
    "opts,eligible",
    [
        (dict(num_experts=16), 16),
        (dict(num_experts=16, num_groups=4, groups_kept=2), 8),
        (dict(num_experts=16, num_groups=8, groups_kept=3, group_score="max"), 6),
        (dict(num_experts=12, num_modalities=3), 4),
    ],
    ids=str,
)
def test_top_k_bound_agrees_with_the_op(opts, eligible):
    logits = torch.randn(7, opts["num_experts"])
    modality = torch.randint(0, 3, (7,)) if opts.get("num_modalities", 1) > 1 else None
    cfg = RouterConfig(top_k=eligible, **opts)
    assert cfg.eligible == eligible
    r = router_topk(logits, modality=modality, **cfg.op_kwargs())
    assert r.ids.shape == (7, eligible)
    with pytest.raises(ValueError, match=rf"top_k \({eligible + 1}\) must be <= .*\({eligible}"):
        RouterConfig(top_k=eligible + 1, **opts)
    with pytest.raises(RuntimeError, match=r"router_topk: k"):  # the op refuses it too
        router_topk(logits, modality=modality, **dict(cfg.op_kwargs(), k=eligible + 1))


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(top_k=0), "top_k must be a positive int"),
        (dict(top_k=True), "top_k must be a positive int"),
        (dict(num_experts=8.0), "num_experts must be a positive int"),
        (dict(score_fn="softplus"), "score_fn must be"),
        (dict(group_score="mean"), "group_score must be"),
        (dict(renorm_eps=-1e-6), "renorm_eps must be a finite number >= 0"),
        (dict(renorm_eps=float("nan")), "renorm_eps"),
        (dict(scaling=float("inf")), "scaling must be a finite number"),
        (dict(renormalize=1), "renormalize must be a bool"),
        (dict(selection_bias="yes"), "selection_bias must be a bool"),
        (dict(num_groups=3), r"num_groups \(3\) must divide num_experts \(8\)"),
        (dict(num_groups=2, groups_kept=3), r"groups_kept \(3\) must be <= num_groups \(2\)"),
        (dict(num_modalities=3), r"num_modalities \(3\) must divide num_experts \(8\)"),
        (dict(num_groups=2, num_modalities=2), "cannot be combined"),
        (dict(num_groups=8, groups_kept=2), "top2_sum' needs at least 2 experts per group"),
    ],
    ids=str,
)
def test_bad_values_name_the_argument(kw, match):
    with pytest.raises(ValueError, match=match):
        RouterConfig(**dict(dict(num_experts=8, top_k=2), **kw))


def test_frozen_and_normalised():
    cfg = RouterConfig(num_experts=8, top_k=2, scaling=2)
    assert isinstance(cfg.scaling, float) and isinstance(cfg.renorm_eps, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.top_k = 3


def test_moe_refuses_mixed_or_conflicting_router_arguments():
    cfg = RouterConfig(num_experts=8, top_k=2)
    with pytest.raises(ValueError, match="not both.*score_fn"):
        MoE(H, FFN, router=cfg, score_fn="sigmoid")
    with pytest.raises(ValueError, match=r"num_experts=4 disagrees with router\.num_experts=8"):
        MoE(H, FFN, 4, router=cfg)
    with pytest.raises(TypeError, match="unexpected keyword arguments: topk"):
        MoE(H, FFN, 8, 2, topk=2)
    with pytest.raises(TypeError, match="router must be a RouterConfig"):
        MoE(H, FFN, router=dict(num_experts=8, top_k=2))
    m = MoE(H, FFN, 8, 2, router=cfg)  # agreeing shape arguments are fine
    assert m.router_config is cfg
