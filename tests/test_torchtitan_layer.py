"""MixopsMoE, the torchtitan override's layer (mixops.integrations.torchtitan): numerics against
an independent float64 reference of torchtitan's MoE (tests/torchtitan_cases.py) and next to
torchtitan's own layer, loads, module state, GPT-OSS experts and the override registry.

Numerics: ours in float64 (expert_dtype=None) equals the reference up to summation order, output
and every gradient; ours with the default bf16 experts is held to the tolerance rule
(tests/helpers.py) with torchtitan's own layer (model in float32 and in bfloat16) as the
low-precision baseline, on tokens whose routing margins are comfortable. The router's options and
the configurations the override refuses are in test_torchtitan_router.py.
"""

import copy
import pickle
from types import SimpleNamespace

import pytest

from helpers import require_torchtitan

require_torchtitan()

import torch  # noqa: E402
from torchtitan.config.override import OverrideConfig, apply_overrides  # noqa: E402
from torchtitan.models.common.moe import MoE  # noqa: E402
from torchtitan.models.common.token_dispatcher import DeepEPTokenDispatcher  # noqa: E402

import torchtitan_cases as tc  # noqa: E402
from helpers import ATOL, assert_close_to_ref  # noqa: E402
from mixops.integrations.torchtitan import (  # noqa: E402
    MixopsMoE,
    mixops_moe,
    to_mixops,
    use_mixops,
)

pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast")

TARGET = "mixops.integrations.torchtitan.mixops_moe"
# deepseek_v3's routing (sigmoid, 4 groups of 2, the best 2, top 3, norm, scale) + shared experts.
DSV3 = dict(
    score_func="sigmoid",
    route_norm=True,
    route_scale=2.5,
    groups=4,
    groups_kept=2,
    top_k=3,
    shared=True,
)


# 1-2: deepseek_v3-like layer with shared experts.


def test_fp64_equals_reference():
    cfg = tc.moe_config(**DSV3)
    _, ours = tc.build_pair(
        cfg, expert_dtype=None, expert_bias=tc.expert_bias(), dtype=torch.float64
    )
    grads = tc.check_fp64(cfg, ours, torch.randn(2, 12, tc.D, dtype=torch.float64), "dsv3")
    assert {"x", "router.gate.weight", "shared_experts.w2.weight"} <= grads.keys()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bf16_experts_vs_torchtitan(dtype):
    cfg = tc.moe_config(**DSV3)
    tt, ours = tc.build_pair(cfg, expert_bias=tc.expert_bias(), dtype=dtype)
    x = tc.comfortable_input(cfg, tt, (2, 32, tc.D), dtype)
    tc.check_vs_torchtitan(cfg, tt, ours, [x], f"dsv3 {dtype}")


def test_expert_dtype_none_follows_the_input():
    """expert_dtype=None in float32: no bf16 anywhere, so ours is held to the reference run in
    float32 (where torchtitan's bf16 experts are ~1e-2 off)."""
    cfg = tc.moe_config(**DSV3)
    _, ours = tc.build_pair(cfg, expert_dtype=None, expert_bias=tc.expert_bias())
    x = tc.comfortable_input(cfg, ours, (2, 16, tc.D), torch.float32)
    grad_out = torch.randn(x.shape)
    y, grads = tc.run_module(ours, x, grad_out)
    y_ref, grads_ref = tc.run_ref(cfg, ours, x, grad_out)
    y32, grads32 = tc.run_ref(cfg, ours, x, grad_out, dtype=torch.float32)
    assert_close_to_ref(y, y_ref, y32, "output")
    for k, g in grads.items():
        assert_close_to_ref(g, grads_ref[k], grads32[k], f"grad {k}")
    # The default casts the experts to bf16 as torchtitan does: it is not float32-accurate.
    bf16 = to_mixops(cfg).build()
    bf16.load_state_dict(ours.state_dict())
    with torch.no_grad():
        err = (bf16(x).double() - y_ref).abs().max()
    assert err > 2 * (y32.double() - y_ref).abs().max() + ATOL[torch.float32]


@pytest.mark.parametrize("name", ["float32", "float16"])
def test_expert_dtype_named(name):
    """expert_dtype="float32" / "float16" on a float64 model: the output stays float64, the
    experts' error is that of the named dtype (the reference's experts in that dtype bound it),
    and it is not float64-exact (the cast happened)."""
    dt = getattr(torch, name)
    cfg = tc.moe_config(**DSV3)
    _, ours = tc.build_pair(
        cfg, expert_dtype=name, expert_bias=tc.expert_bias(), dtype=torch.float64
    )
    x = tc.comfortable_input(cfg, ours, (2, 16, tc.D), torch.float64)
    with torch.no_grad():
        y = ours(x)
        exact = to_mixops(cfg, expert_dtype=None).build().double()
        exact.load_state_dict(ours.state_dict())
        y_ref = exact(x)
        # The same layer with its expert weights and input rounded to the dtype and back (the
        # router sees the rounded input too): the error of the GEMMs' rounded operands, within
        # which ours (rounded operands, fp32 accumulation) must be.
        rounded = to_mixops(cfg, expert_dtype=None).build().double()
        rounded.load_state_dict(
            {
                k: v.to(dt).double() if k.startswith("routed_experts.") else v
                for k, v in ours.state_dict().items()
            }
        )
        y_round = rounded(x.to(dt).double())
    assert y.dtype == torch.float64
    err = (y - y_ref).abs().max().item()
    assert 0 < err <= 4 * (y_round - y_ref).abs().max().item() + ATOL[dt]


# 4: loads. bias: (expert, value) pairs added to the expert bias.

LOADS = {
    "all-on-one": (dict(top_k=1), {3: 10.0}, (2, 16)),
    "most-on-one": (dict(top_k=2, route_norm=True), {3: 10.0}, (2, 16)),
    "idle-experts": (dict(top_k=2), {e: -10.0 for e in range(5)}, (2, 16)),
    "one-token": (dict(top_k=2, shared=True), {}, (1, 1)),
}


def _load_pair(name, dtype, expert_dtype):
    kw, shift, shape = LOADS[name]
    cfg = tc.moe_config(**kw)
    bias = tc.expert_bias()
    for e, v in shift.items():
        bias[e] += v
    tt, ours = tc.build_pair(cfg, expert_dtype=expert_dtype, expert_bias=bias, dtype=dtype)
    return cfg, tt, ours, shape


def _idle(name, counts):
    expect = {
        "all-on-one": [e != 3 for e in range(tc.E)],
        "idle-experts": [e < 5 for e in range(tc.E)],
    }
    if name in expect:
        assert (counts == 0).tolist() == expect[name], f"{name}: counts {counts.tolist()}"
    if name == "most-on-one":
        assert counts[3] == counts.sum() / 2
    return (counts == 0).nonzero().flatten()


@pytest.mark.parametrize("name", LOADS)
def test_loads_fp64(name):
    cfg, _, ours, shape = _load_pair(name, torch.float64, None)
    grads = tc.check_fp64(cfg, ours, torch.randn(*shape, tc.D, dtype=torch.float64), name)
    for e in _idle(name, ours.tokens_per_expert_E):
        for w in ("w1_EFD", "w2_EDF", "w3_EFD"):
            assert not grads[f"routed_experts.inner_experts.{w}"][e].any(), f"idle expert {e}"


@pytest.mark.parametrize("name", LOADS)
def test_loads_vs_torchtitan(name):
    cfg, tt, ours, shape = _load_pair(name, torch.float32, "bfloat16")
    # One token: 32 calls, judged together.
    calls = 32 if shape == (1, 1) else 1
    x = tc.comfortable_input(cfg, tt, (calls * shape[0], *shape[1:], tc.D), torch.float32)
    tc.check_vs_torchtitan(cfg, tt, ours, list(x.split(shape[0])), name)
    _idle(name, ours.tokens_per_expert_E)


@pytest.mark.parametrize("shape", [(0, 4), (2, 0)], ids=["batch0", "seq0"])
@pytest.mark.parametrize("expert_dtype", ["bfloat16", None])
def test_zero_tokens(shape, expert_dtype):
    """No tokens (torchtitan 0.3's own layer fails to reshape them): zeros of the input's shape,
    zero gradients, no counts."""
    _, ours = tc.build_pair(tc.moe_config(shared=True), expert_dtype=expert_dtype)
    x = torch.randn(*shape, tc.D, requires_grad=True)
    y = ours(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    for n, p in ours.named_parameters():
        assert p.grad is not None and not p.grad.any(), n
    assert not ours.tokens_per_expert_E.any()


# 5: module state.


@pytest.mark.parametrize("lb", [1e-3, None], ids=["load-balance", "no-load-balance"])
def test_parameters_and_buffers_as_torchtitan(lb):
    tt, ours = tc.build_pair(tc.moe_config(load_balance_coeff=lb, shared=True, gate_bias=True))
    assert type(ours) is MixopsMoE and isinstance(ours, MoE)
    shapes = [(n, p.shape, p.dtype) for n, p in tt.named_parameters()]
    assert [(n, p.shape, p.dtype) for n, p in ours.named_parameters()] == shapes
    buffers = [(n, b.shape, b.dtype) for n, b in tt.named_buffers()]
    assert [(n, b.shape, b.dtype) for n, b in ours.named_buffers()] == buffers
    assert (
        ours._non_persistent_buffers_set
        == tt._non_persistent_buffers_set
        == {"tokens_per_expert_E"}
    )
    assert list(ours.state_dict()) == list(tt.state_dict())
    assert ("expert_bias_E" in ours.state_dict()) == (lb is not None)
    if lb is None:
        assert ours.expert_bias_E is None


def test_tokens_per_expert_counts_in_training_only():
    cfg = tc.moe_config(top_k=2)
    tt, ours = tc.build_pair(cfg, expert_bias=tc.expert_bias())
    xs = [tc.comfortable_input(cfg, tt, (2, 8, tc.D), torch.float32, seed=s) for s in (1, 2)]
    with torch.no_grad():
        for x in xs:
            tt(x), ours(x)
        assert ours.tokens_per_expert_E.sum() == 2 * 16 * 2
        assert torch.equal(ours.tokens_per_expert_E, tt.tokens_per_expert_E)
        ids = torch.cat([tc.ref_ids(cfg, tt, x) for x in xs]).flatten()
        assert torch.equal(ours.tokens_per_expert_E, torch.bincount(ids, minlength=tc.E).float())
        counts = ours.tokens_per_expert_E.clone()
        ours.eval()
        ours(xs[0])
    assert torch.equal(ours.tokens_per_expert_E, counts)
    assert ours.tokens_per_expert_E.dtype == torch.float32


def test_init_states_as_torchtitan():
    cfg = tc.moe_config(**DSV3)
    torch.manual_seed(5)
    tt = cfg.build()
    tt.init_states()
    torch.manual_seed(5)
    ours = to_mixops(cfg).build()
    ours.init_states()
    ref = tt.state_dict()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, ref[k]), k
    with torch.no_grad():
        ours.expert_bias_E.fill_(1.0)
        ours(torch.randn(1, 4, tc.D))
    assert ours.tokens_per_expert_E.any()
    ours.init_states()
    assert not ours.tokens_per_expert_E.any() and not ours.expert_bias_E.any()
    assert [n for n, _ in ours.named_buffers()] == ["expert_bias_E", "tokens_per_expert_E"]


def test_deepcopy_and_pickle():
    _, ours = tc.build_pair(tc.moe_config(**DSV3), expert_bias=tc.expert_bias())
    ours.eval()
    x = torch.randn(2, 5, tc.D)
    with torch.no_grad():
        y = ours(x)
        for other in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
            assert type(other) is MixopsMoE and other.expert_dtype == torch.bfloat16
            assert torch.equal(other(x), y)


def test_parallelize_refuses_tensor_parallel():
    """Tensor parallelism of the MoE layers is refused (expert parallelism runs on mixops'
    schedule: tests/test_torchtitan_ep.py)."""
    _, ours = tc.build_pair(tc.moe_config())
    dims = SimpleNamespace(tp_enabled=True, ep_enabled=False, tp=4, ep=1)
    with pytest.raises(NotImplementedError, match="tp degree 4 > 1"):
        ours.parallelize(dims)


# 6: GPT-OSS experts (biases, clamped interleaved SwiGLU, biased gate).


def test_gpt_oss_fp64_equals_reference():
    cfg = tc.gpt_oss_config()
    _, ours = tc.build_pair(
        cfg, expert_dtype=None, expert_bias=tc.expert_bias(), dtype=torch.float64
    )
    x = torch.randn(2, 12, tc.D, dtype=torch.float64)
    grads = tc.check_fp64(cfg, ours, x, "gpt_oss")
    assert {"router.gate.bias", "routed_experts.inner_experts.mlp2_bias_ED"} <= grads.keys()
    # The clamps are exercised: pre-activations beyond the limit on both halves.
    inner = ours.routed_experts.inner_experts
    h = torch.einsum("td,egd->teg", x.reshape(-1, tc.D), inner.mlp1_weight_EGD.detach())
    h = h + inner.mlp1_bias_EG.detach()
    limit = inner.swiglu_limit
    assert (h[..., 0::2] > limit).float().mean() > 0.05
    assert (h[..., 1::2].abs() > limit).float().mean() > 0.05


def test_gpt_oss_vs_torchtitan():
    """bf16 model only: torchtitan 0.3's GPT-OSS experts return bf16 whatever the model dtype, so
    its own layer fails in float32 (scatter_add of bf16 into float32); ours returns x's dtype."""
    cfg = tc.gpt_oss_config()
    tt, ours = tc.build_pair(cfg, expert_bias=tc.expert_bias(), dtype=torch.bfloat16)
    x = tc.comfortable_input(cfg, tt, (2, 32, tc.D), torch.bfloat16)
    tc.check_vs_torchtitan(cfg, tt, ours, [x], "gpt_oss bf16")
    _, ours32 = tc.build_pair(cfg, expert_bias=tc.expert_bias())
    with torch.no_grad():
        assert ours32(x.float()).dtype == torch.float32


# 8: the override registry, on torchtitan's own model config trees.


def _tree(model):
    if model == "deepseek_v3":
        from torchtitan.models.deepseek_v3 import deepseekv3_configs as configs
    else:
        from torchtitan.models.gpt_oss import gptoss_configs as configs
    return configs["debugmodel"](attn_backend="flex", moe_comm_backend="standard")


@pytest.mark.parametrize("model", ["deepseek_v3", "gpt_oss"])
@pytest.mark.parametrize("kwargs", [None, {"expert_dtype": None}], ids=["default", "kwargs"])
def test_override_replaces_every_moe_layer(model, kwargs):
    root = _tree(model)
    before = {fqn: cfg for fqn, cfg, _, _ in root.traverse(MoE.Config)}
    assert len(before) >= 4
    entry = TARGET if kwargs is None else (TARGET, kwargs)
    lines = apply_overrides(OverrideConfig(imports=[entry]), root)
    assert len(lines) == len(before)
    after = {fqn: cfg for fqn, cfg, _, _ in root.traverse(MoE.Config)}
    assert after.keys() == before.keys()
    for line, (fqn, cfg) in zip(lines, after.items()):
        assert line.startswith(f"[Override] {TARGET}: {fqn} ")
        assert line.endswith(
            "-> MixopsMoE.Config" + ("" if kwargs is None else " with expert_dtype=None")
        )
        assert type(cfg) is MixopsMoE.Config
        assert cfg.expert_dtype == ("bfloat16" if kwargs is None else None)
        assert cfg.router is before[fqn].router and cfg.routed_experts is before[fqn].routed_experts
    assert isinstance(next(iter(after.values())).build(), MixopsMoE)


def test_use_mixops_and_refusal_through_the_registry():
    root = _tree("deepseek_v3")
    lines = use_mixops(root, expert_dtype=None)
    assert lines and all(line.endswith("with expert_dtype=None") for line in lines)
    again = {fqn: cfg for fqn, cfg, _, _ in root.traverse(MoE.Config)}
    assert all(mixops_moe(cfg) is cfg for cfg in again.values())  # already ours: unchanged
    deepep = _tree("deepseek_v3")
    for _, cfg, _, _ in deepep.traverse(MoE.Config):
        cfg.routed_experts.token_dispatcher = DeepEPTokenDispatcher.Config(
            num_experts=cfg.num_experts, top_k=cfg.router.top_k, hidden_dim=256
        )
    with pytest.raises(NotImplementedError, match="DeepEPTokenDispatcher"):
        apply_overrides(OverrideConfig(imports=[TARGET]), deepep)
