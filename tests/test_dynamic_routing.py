"""A variable number of experts per token in the MoE layer (RouterConfig rule / threshold,
score_fn "relu"; issue 28) and the rules' training signals (nn/dynamic_routing.py): the layer
against a per-token float64 loop whose weights come from torch's softmax / relu at the chosen ids,
capacity, compile, tokens with no expert; ReMoE's L1 term against the formula of its code and its
controller's trajectory on a fixed sequence of sparsities; the top-p entropy loss; the bound-hit
counter against the rule run without a bound."""

import pytest
import torch
import torch.nn.functional as F

from mixops.nn import MoA, MoE, ReMoEController, TopPEntropyLoss, bound_hits
from mixops.nn.dynamic_routing import BoundHitCounter
from mixops.ops import router_topk
from moa_reference import causal_allowed, dense_moa

H, FF, E, T = 8, 12, 8, 40
RULES = {
    "top_p": dict(rule="top_p", threshold=0.45, renormalize=False),
    "top_p-renorm": dict(rule="top_p", threshold=0.6),
    "cum_threshold": dict(rule="cum_threshold", threshold=0.5, renormalize=False, scaling=2.0),
    "relu": dict(score_fn="relu", renormalize=False),
}


def _layer(kw, k=4, **extra):
    torch.manual_seed(0)
    return MoE(H, FF, E, k, dtype=torch.float64, **kw, **extra)


def _reference(moe, x, kw):
    """The layer's output from the definition: the op's choice of ids (tested on its own in
    test_router_rules.py), each chosen expert's SwiGLU MLP in float64, weighted by torch's score
    at that id (softmax or relu), renormalised over the kept slots when asked, times scaling."""
    logits = F.linear(x, moe.gate.weight)
    ids = router_topk(logits.detach(), **moe.router_config.op_kwargs()).ids.long()
    kept = ids >= 0
    scores = F.relu(logits) if kw.get("score_fn") == "relu" else torch.softmax(logits, -1)
    w = torch.where(kept, scores.gather(1, ids.clamp(min=0)), 0.0)
    if kw.get("renormalize", True):
        w = w / w.sum(-1, keepdim=True)
    w = w * kw.get("scaling", 1.0)
    gate_up, down = moe.experts.gate_up_proj, moe.experts.down_proj
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            if kept[t, j]:
                e = ids[t, j]
                g, u = (gate_up[e] @ x[t]).chunk(2)
                y = y.index_add(0, torch.tensor([t]), (w[t, j] * (down[e] @ (F.silu(g) * u)))[None])
    return y, kept


@pytest.mark.parametrize("name", RULES)
def test_layer_matches_per_token_loop(name):
    kw = RULES[name]
    moe = _layer(kw)
    x = torch.randn(T, H, dtype=torch.float64)
    xr, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref, kept = _reference(moe, xr, kw)
    counts = kept.sum(-1)
    assert counts.min() < counts.max(), f"{name}: every token took the same number of experts"
    refs = torch.autograd.grad(ref.square().sum(), [xr, *moe.parameters()])
    y = moe(xm)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)
    ours = torch.autograd.grad(y.square().sum(), [xm, *moe.parameters()])
    for n, a, b in zip(["x", *[n for n, _ in moe.named_parameters()]], ours, refs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=f"{name}: d {n}")


@pytest.mark.parametrize("name", ["top_p", "relu"])
def test_moa_heads_match_dense_oracle(name):
    """MoA with a variable number of heads per token against the dense oracle of
    tests/moa_reference.py, its gates torch's scores at the op's ids (zero for -1 slots)."""
    kw = RULES[name]
    torch.manual_seed(0)
    m = MoA(32, 6, 4, 8, 2, dtype=torch.float64, **kw)
    ex = m.experts

    def gates(logits):
        ids = router_topk(logits.detach(), **m.router_config.op_kwargs()).ids.long()
        s = F.relu(logits) if name == "relu" else torch.softmax(logits, -1)
        w = torch.where(ids >= 0, s.gather(1, ids.clamp(min=0)), 0.0)
        return torch.zeros_like(logits).scatter_add(1, ids.clamp(min=0), w)

    x = torch.randn(2, 7, 32, dtype=torch.float64)
    xr, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = dense_moa(
        xr, ex.input_linear.weight, ex.output_linear.weight, ex.bias, m.kv_proj.weight,
        ex.router.layer.weight, m.top_k, m.num_kv_heads, allowed=causal_allowed(2, 7),
        scale=m.scaling, gates=gates,
    )  # fmt: skip
    y = m(xm)
    y = y[0] if isinstance(y, tuple) else y
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)
    ref.square().sum().backward()
    y.square().sum().backward()
    torch.testing.assert_close(xm.grad, xr.grad, rtol=1e-9, atol=1e-12)


def test_relu_token_with_no_expert_gets_zero():
    moe = _layer(RULES["relu"])
    x = torch.randn(T, H, dtype=torch.float64)
    with torch.no_grad():
        moe.gate.weight.copy_(torch.eye(E, H, dtype=torch.float64))
    x[:5] = -x[:5].abs()  # every logit of these tokens <= 0: no expert at all
    y = moe(x)
    assert torch.equal(y[:5], torch.zeros_like(y[:5]))
    assert y[5:].abs().sum(-1).gt(0).all()


@pytest.mark.parametrize("name", ["top_p"])
def test_capacity_and_compile(name):
    moe = _layer(RULES[name], capacity_factor=0.5)
    x = torch.randn(T, H, dtype=torch.float64)
    y = moe(x)
    torch._dynamo.reset()
    yc = torch.compile(moe, fullgraph=True)(x)
    torch.testing.assert_close(yc, y)


def _relu_model(k=4):
    moe = _layer(RULES["relu"], k=k)
    with torch.no_grad():
        moe.gate.weight.copy_(torch.eye(E, H, dtype=torch.float64))  # logits = x
    return moe


def _with_active(counts):
    """Tokens x [len(counts), H = E] whose logits have exactly counts[t] positive entries."""
    x = -torch.rand(len(counts), E, dtype=torch.float64) - 0.1
    for t, c in enumerate(counts):
        x[t, :c] = torch.rand(c, dtype=torch.float64) + 0.1
    return x


def test_remoe_l1_term_is_its_formula():
    moe = _relu_model()
    ctl = ReMoEController(moe, k=2, lam=0.5)
    x = torch.randn(T, H, dtype=torch.float64)
    moe(x).sum().backward()
    ours = ctl.loss()
    # thu-ml/ReMoE moe_utils.py L46-55 (switch_load_balancing_loss_func with the relu probs):
    probs = F.relu(F.linear(x, moe.gate.weight)).float()
    tokens_per_expert = (probs > 0).sum(0)
    ref = torch.sum(probs.sum(0) * tokens_per_expert) * (E * 0.5 / (T * T * 2))
    torch.testing.assert_close(ours, ref)
    assert ours.requires_grad
    assert ctl.loss().item() == 0  # started over


def test_remoe_controller_trajectory():
    """k = 1 of E = 8: target sparsity 0.875. Steps with measured sparsity 0.5, 0.9, exactly
    0.875, and 0.75 (two forwards, 0.625 and 0.875): lam x1.2, /1.2, /1.2 (equality is not
    below), x1.2; a step with no forward leaves it."""
    moe = _relu_model()
    ctl = ReMoEController(moe, k=1)
    expected = 1e-8
    for active, factor in [([4, 4], 1.2), ([1, 0, 1, 1, 1], 1 / 1.2), ([1, 1], 1 / 1.2),
                           ([3, 3, 3, 3, 1, 1], 1.2), (None, 1.0)]:  # fmt: skip
        if active is not None and len(active) == 6:  # two forwards: 0.625 and 0.875
            moe(_with_active(active[:4]))
            moe(_with_active(active[4:]))
        elif active is not None:
            moe(_with_active(active))
        ctl.step()
        expected *= factor
        assert ctl.lam.item() == pytest.approx(expected, rel=1e-6)
    moe.eval()
    moe(_with_active([8, 8]))  # eval forwards are not measured
    ctl.step()
    assert ctl.lam.item() == pytest.approx(expected, rel=1e-6)


def test_top_p_entropy_loss():
    moe = _layer(RULES["top_p"])
    ent = TopPEntropyLoss(moe, coef=0.25)
    x = torch.randn(T, H, dtype=torch.float64)
    moe(x)
    moe(x[:7])
    p = [torch.softmax(F.linear(z, moe.gate.weight), -1) for z in (x, x[:7])]
    ref = 0.25 * sum(-(q * q.log()).sum(-1).mean() for q in p)
    loss = ent.loss()
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert moe.gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["top_p", "cum_threshold", "relu"])
def test_bound_hits_against_the_unbounded_rule(name):
    """A token hits bound k exactly when the same rule with bound E keeps more than k."""
    kw = RULES[name]
    moe = _layer(kw, k=2)
    counter = BoundHitCounter(moe)
    xs = [torch.randn(T, H, dtype=torch.float64) for _ in range(2)]
    want = 0
    for x in xs:
        moe(x)
        logits = F.linear(x, moe.gate.weight)
        unbounded = router_topk(logits, **{**moe.router_config.op_kwargs(), "k": E})
        hit = (unbounded.ids >= 0).sum(-1) > 2
        assert torch.equal(bound_hits(logits, moe.router_config), hit)
        want += int(hit.sum())
    assert 0 < want < 2 * T
    assert counter.hits[0].item() == want
    counter.reset()
    counter.remove()
    moe(xs[0])
    assert counter.hits[0] is None


def test_bound_hits_at_an_exact_boundary():
    """Uniform logits over 8 experts: scores 1/8 exactly, the two best sum to 0.25 exactly. With
    p = 0.25 top-p (sum must exceed p) wants a third expert, cum_threshold (sum reaches p) does
    not; the op keeps 2 either way."""
    logits = torch.zeros(3, E)
    for rule, hit in [("top_p", True), ("cum_threshold", False)]:
        moe = _layer(dict(rule=rule, threshold=0.25, renormalize=False), k=2)
        assert bound_hits(logits, moe.router_config).tolist() == [hit] * 3
        unbounded = router_topk(logits, E, rule=rule, threshold=0.25, renormalize=False)
        assert (unbounded.ids >= 0).sum(-1).tolist() == [3 if hit else 2] * 3


def test_refusals():
    with pytest.raises(ValueError, match="no mixops MoE layer it applies to"):
        ReMoEController(_layer({}), k=1)
    with pytest.raises(ValueError, match="k must be in"):
        ReMoEController(_relu_model(), k=0)
    with pytest.raises(ValueError, match="score_fn must be 'softmax'"):
        _layer(dict(rule="top_p", threshold=0.5, score_fn="sigmoid"))
    with pytest.raises(ValueError, match="cannot be combined with selection_bias"):
        _layer(dict(score_fn="relu", selection_bias=True))
    with pytest.raises(ValueError, match="threshold"):
        _layer(dict(threshold=0.5))
    with pytest.raises(ValueError, match="rule must be"):
        _layer(dict(rule="top-p"))
