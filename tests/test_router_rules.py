"""router_topk's variable number of experts per token (issue 28): rule "top_p" (Huang et al.),
"cum_threshold" (XMoE) and score_fn "relu" (ReMoE), against routing_rules_reference.py (the
authors' selection code). Selection, ids, counts and float32 weights bit-exact on CPU; float64
outputs and gradients against the differentiable reference (helpers.assert_close_to_ref);
gradcheck, opcheck, torch.compile; edge rows; every refusal, CPU and meta/fake alike."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import mixops
import routing_rules_reference as rr
from helpers import assert_bits_equal, assert_close_to_ref, opcheck

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16
RULES = ["top_p", "cum_threshold", "relu"]
THRESHOLDS = {"top_p": [0.0, 0.2, 0.5, 0.8, 0.95], "cum_threshold": [0.0, 0.3, 0.6, 0.9, 1.0]}
BACKWARD = torch.ops.mixops.router_topk_backward.default


def rule_kw(rule, threshold=0.5):
    return dict(score_fn="relu") if rule == "relu" else dict(rule=rule, threshold=threshold)


def rule_logits(num_tokens, num_experts, dtype=F32, seed=0):
    """Rows of random sharpness (1 to all experts wanted), a few -inf (zero probabilities);
    centred below 0 so relu keeps some, none or all of a row."""
    g = torch.Generator().manual_seed(seed)
    sharp = torch.rand(num_tokens, 1, generator=g) * 4 + 0.1
    x = torch.randn(num_tokens, num_experts, generator=g, dtype=F64) * sharp
    x += torch.randn(num_tokens, 1, generator=g, dtype=F64) - 0.5
    x[torch.rand(num_tokens, num_experts, generator=g) < 0.02] = float("-inf")
    x[::7, 0] = float("-inf")  # ... never a whole row
    return x.to(dtype)


def reference(logits, k, rule, threshold, **kw):
    if rule == "relu":
        return rr.relu_reference(logits, k, **kw)
    return rr.softmax_rule_reference(logits, k, rule, threshold, **kw)


def finish(w, renormalize, scaling):
    """routing.h finish_weights, bit for bit: divide by the slot-order sum of the kept weights
    (none kept: nothing to divide), then scale."""
    if renormalize:
        s = rr.sequential_cumsum(w)[:, -1:]
        w = torch.where(s == 0, w, w / s)
    return w * scaling if scaling != 1.0 else w


def counts_of(ids, num_experts, token_mask=None):
    ids = ids if token_mask is None else ids[token_mask.cpu()]
    return torch.bincount(ids[ids >= 0].long(), minlength=num_experts).int()


# ---- selection: bit-exact against the authors' rule on the kernel's scores -------------------


@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=str)
@pytest.mark.parametrize("e,k", [(8, 1), (8, 2), (8, 8), (64, 1), (64, 2), (64, 8), (64, 64)])
@pytest.mark.parametrize("rule", RULES)
def test_selection_bit_exact(rule, e, k, dtype):
    logits = rule_logits(300, e, dtype, seed=e + k)
    for threshold in THRESHOLDS.get(rule, [0.0]):
        ids, w = reference(logits, k, rule, threshold)
        kept = (ids >= 0).sum(1)
        assert torch.all((ids[:, :-1] >= 0) | (ids[:, 1:] < 0)), "kept slots must be a prefix"
        if k > 1 and threshold in (0.5, 0.6):  # the data exercise the rule: counts vary
            assert kept.unique().numel() >= 2, f"{rule} p={threshold}: counts {kept.unique()}"
        for renormalize, scaling in [(False, 1.0), (True, 1.0), (True, 2.5)]:
            kw = dict(renormalize=renormalize, scaling=scaling, **rule_kw(rule, threshold))
            out = mixops.ops.router_topk(logits, k, **kw)
            what = f"{rule} p={threshold} {kw}"
            assert torch.equal(out.ids, ids), f"{what}: ids"
            assert torch.equal(out.counts, counts_of(ids, e)), f"{what}: counts"
            assert_bits_equal(out.weights, finish(w, renormalize, scaling), f"{what}: weights")


@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=str)
@pytest.mark.parametrize("rule", ["top_p", "cum_threshold"])
def test_selection_agrees_with_the_authors_torch_code(rule, dtype):
    """torch.softmax + torch.sort + torch.cumsum as the authors run them (no bound: k = E, and
    k = 8 keeping the first 8): same kept count and expert set on every row whose decisions are
    more than 1e-6 from the threshold; the rows skipped are few."""
    e = 64
    logits = rule_logits(2000, e, dtype, seed=3)
    near_rows = 0
    for threshold in THRESHOLDS[rule][1:4]:  # 1.0: the tail decides, within 1e-6 on most rows
        kept, sorted_ids, _, margin = rr.authors_path(logits, rule, threshold)
        count = kept.sum(1)
        assert torch.equal(kept, torch.arange(e) < count[:, None]), "authors' mask not a prefix"
        for k in (e, 8):
            out = mixops.ops.router_topk(logits, k, renormalize=False, **rule_kw(rule, threshold))
            ours = (out.ids >= 0).sum(1)
            # the decisions that matter: slots 1 .. the first dropped one (either side's)
            last = torch.maximum(ours, count).clamp(max=k - 1)
            near = ((margin[:, :k] <= 1e-6) & (torch.arange(k) <= last[:, None])).any(1)
            near_rows += int(near.sum())
            far = ~near
            assert torch.equal(ours[far], count.clamp(max=k)[far]), f"{rule} p={threshold} k={k}"
            slot_kept = torch.arange(k) < ours[:, None]
            got = out.ids.masked_fill(~slot_kept, e).sort(1).values
            want = sorted_ids[:, :k].int().masked_fill(~slot_kept, e).sort(1).values
            assert torch.equal(got[far], want[far]), f"{rule} p={threshold} k={k}: experts"
    assert near_rows <= 0.01 * 2000 * 2 * 3


# ---- float64 outputs and gradients against the differentiable reference ----------------------

VARIANTS = [
    dict(),
    dict(renormalize=False),
    dict(renormalize=False, scaling=2.0),
    dict(modality=True, token_mask=True),
    dict(renormalize=False, modality=True, token_mask=True),
]


def variant_kw(case, num_tokens):
    kw = dict(case)
    if kw.pop("modality", False):
        kw.update(modality=torch.arange(num_tokens) % 2, num_modalities=2)
    if kw.pop("token_mask", False):
        kw.update(token_mask=torch.arange(num_tokens) % 3 != 0)
    return kw


@pytest.mark.parametrize("case", VARIANTS, ids=str)
@pytest.mark.parametrize("rule", RULES)
def test_outputs_and_gradients_float64(rule, case):
    t, e, k = 97, 16, 6
    logits = rule_logits(t, e, F64, seed=11)
    kw = variant_kw(case, t)
    mod = {n: kw[n] for n in ("modality", "num_modalities") if n in kw}
    ids, _ = reference(logits, k, rule, 0.6, **mod)
    x = logits.clone().requires_grad_(True)
    out = mixops.ops.router_topk(x, k, **rule_kw(rule, 0.6), **kw)
    x_ref = logits.clone().requires_grad_(True)
    score_fn = "relu" if rule == "relu" else "softmax"
    ref = rr.differentiable_forward(x_ref, ids, score_fn=score_fn, **kw)
    assert torch.equal(out.ids, ids)
    assert torch.equal(out.counts, counts_of(ids, e, kw.get("token_mask")))
    g = torch.Generator().manual_seed(5)
    grads = [torch.randn(r.shape, generator=g, dtype=F64) for r in ref]
    for name, ours, r in zip(("weights", "score_sum", "lse"), (out[0], out[3], out[4]), ref):
        assert_close_to_ref(ours, r.detach(), r.detach(), name)
    torch.autograd.backward([out[0], out[3], out[4]], grads)
    torch.autograd.backward(list(ref), grads)
    assert_close_to_ref(x.grad, x_ref.grad, x_ref.grad, "d logits")
    assert torch.all(x.grad[logits == float("-inf")] == 0)  # rule_logits puts some in


def far_logits(rule, threshold, t=6, e=8, k=4):
    """float64 logits whose every decision is >= 1e-3 from its boundary (gradcheck moves them
    by ~1e-6); relu rows: one all negative (no expert), one all positive (more than k)."""
    for seed in range(100):
        x = rule_logits(t, e, F64, seed=seed).clamp_min(-8.0) * 0.8
        if rule == "relu":
            x[0] = -x[0].abs() - 0.1
            x[1] = x[1].abs() + 0.1
        else:
            w = rr.kernel_scores(x, k)[1]
            cum = rr.sequential_cumsum(w)
            if torch.cat([cum[:, :-1], cum - w], 1).sub(threshold).abs().min() < 1e-3:
                continue
        top = x.sort(-1, descending=True).values[:, : k + 1]
        if (top.diff(dim=-1) < -1e-3).all() and (x.abs() > 1e-3).all():
            return x
    raise AssertionError("no seed gives decisions away from the boundaries")


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("rule", RULES)
def test_gradcheck(rule, renormalize):
    x = far_logits(rule, 0.5).requires_grad_(True)
    mask = torch.tensor([True, False, True, True, True, False])

    def f(x):
        out = mixops.ops.router_topk(
            x, 4, renormalize=renormalize, scaling=1.5, token_mask=mask, **rule_kw(rule, 0.5)
        )
        return out.weights, out.score_sum, out.lse

    assert (f(x)[0] == 0).any(), "some slots must be empty"
    torch.autograd.gradcheck(f, (x,))


@pytest.mark.parametrize("rule", RULES)
def test_opcheck(rule):
    x = far_logits(rule, 0.5).float().requires_grad_(True)
    kw = rule_kw(rule, 0.5)
    opcheck(torch.ops.mixops.router_topk.default, (x, 4), dict(renormalize=False, **kw))
    ids = mixops.ops.router_topk(x, 4, **kw).ids
    assert (ids == -1).any()
    bw = (torch.randn(6, 4), torch.randn(8), torch.randn(6), x.detach(), ids)
    opcheck(BACKWARD, bw + (kw.get("score_fn", "softmax"), False, True, 0.0, 1.0, None, 1, None))


def test_compile_fullgraph_equals_eager():
    def f(x):
        a = mixops.ops.router_topk(x, 4, rule="top_p", threshold=0.5)
        b = mixops.ops.router_topk(x, 4, rule="cum_threshold", threshold=0.6, renormalize=False)
        c = mixops.ops.router_topk(x, 4, score_fn="relu", renormalize=False)
        return a.weights, a.ids, b.weights, b.ids, c.weights, c.ids, a.score_sum + c.score_sum

    logits = rule_logits(33, 16, F32, seed=2)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    outs = []
    for fn in (f, compiled):
        x = logits.clone().requires_grad_(True)
        o = fn(x)
        sum(v.sum() for v in o if v.is_floating_point()).backward()
        outs.append((*o, x.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


# ---- edge rows --------------------------------------------------------------------------------


def test_exact_ties_and_equality_at_the_threshold():
    x = torch.zeros(2, 4)  # probabilities exactly 1/4: ties to the lower id
    top_p = mixops.ops.router_topk(x, 4, rule="top_p", threshold=0.5, renormalize=False)
    assert top_p.ids.tolist() == [[0, 1, 2, -1]] * 2  # Huang: keep while c_{j-1} <= p
    assert top_p.weights.tolist() == [[0.25, 0.25, 0.25, 0.0]] * 2
    xmoe = mixops.ops.router_topk(x, 4, rule="cum_threshold", threshold=0.5)
    assert xmoe.ids.tolist() == [[0, 1, -1, -1]] * 2  # XMoE: stop once the sum reaches p
    assert xmoe.weights.tolist() == [[0.5, 0.5, 0.0, 0.0]] * 2
    assert xmoe.counts.tolist() == [2, 2, 0, 0]
    relu = mixops.ops.router_topk(torch.tensor([[1.0, 2.0, 2.0, -1.0, 1.0]]), 4, score_fn="relu")
    assert relu.ids.tolist() == [[1, 2, 0, 4]]


def test_nan_and_inf_rows():
    x = rule_logits(6, 8, seed=1)
    x[0, 3] = float("nan")
    x[1, 2] = float("inf")
    x[2] = float("-inf")
    for rule in ("top_p", "cum_threshold"):
        out = mixops.ops.router_topk(x, 4, rule=rule, threshold=0.9)
        # a NaN softmax row keeps its best expert only (XMoE's code too; Huang's code keeps all)
        assert out.ids[:3, 1:].eq(-1).all() and out.weights[:3, 0].isnan().all()
        assert out.ids[1, 0] == 2 and out.ids[2, 0] == 0 and out.ids[0, 0] != 3
        assert out.weights[:3, 1:].eq(0).all() and out.counts.sum() == 3 + (out.ids[3:] >= 0).sum()
        ids, w = reference(x[3:], 4, rule, 0.9)
        assert torch.equal(out.ids[3:], ids) and torch.equal(out.weights[3:], finish(w, True, 1.0))
    out = mixops.ops.router_topk(x, 8, score_fn="relu", renormalize=False)
    assert 3 not in out.ids[0].tolist() and out.ids[1, 0] == 2 and out.weights[1, 0] == float("inf")
    assert out.ids[2].eq(-1).all() and out.score_sum[3].isnan()
    assert torch.equal(out.ids[3:], rr.relu_reference(x[3:], 8)[0])


@pytest.mark.parametrize("k", [1, 3, 8])
def test_threshold_extremes(k):
    x = rule_logits(200, 8, seed=4)
    x = x.clamp_min(-30.0)  # no zero probabilities: every row's sum of 8 is below 2
    for rule in ("top_p", "cum_threshold"):
        for p, want in ((-1.0, 1), (0.0, 1), (2.0, k), (1e30, k)):
            out = mixops.ops.router_topk(x, k, rule=rule, threshold=p)
            assert torch.all((out.ids >= 0).sum(1) == want), f"{rule} p={p}"
    # p = 1: every expert in exact arithmetic, but a float32 prefix sum of the sorted
    # probabilities can pass 1.0 by an ulp (the authors' torch.cumsum too): those rows stop there
    w = rr.kernel_scores(x, k)[1]
    past_one = (rr.sequential_cumsum(w)[:, :-1] > 1.0).any(1)
    out = mixops.ops.router_topk(x, k, rule="top_p", threshold=1.0)
    assert torch.equal(out.ids, reference(x, k, "top_p", 1.0)[0])
    assert torch.equal((out.ids >= 0).sum(1) < k, past_one)
    neg = -x.abs() - 1e-3  # relu: nothing above 0 -> no expert, zero weights, no counts
    xg = neg.clone().requires_grad_(True)
    out = mixops.ops.router_topk(xg, k, score_fn="relu")
    assert out.ids.eq(-1).all() and out.weights.eq(0).all() and out.counts.eq(0).all()
    assert out.score_sum.eq(0).all()
    (out.weights.sum() + out.score_sum.sum()).backward()
    assert xg.grad.eq(0).all()


def test_bound_keeps_the_k_best():
    x = torch.zeros(1, 8)  # uniform: top_p 0.99 wants all 8 experts
    out = mixops.ops.router_topk(x, 3, rule="top_p", threshold=0.99, renormalize=False)
    assert out.ids.tolist() == [[0, 1, 2]] and out.weights.tolist() == [[0.125] * 3]
    x = torch.tensor([[0.5, 3.0, -1.0, 2.0, 1.0, 4.0, -2.0, 0.25]])  # relu wants 6
    out = mixops.ops.router_topk(x, 2, score_fn="relu", renormalize=False)
    assert out.ids.tolist() == [[5, 1]] and out.weights.tolist() == [[4.0, 3.0]]


def test_modality_and_token_mask():
    t, e, k = 60, 16, 4
    x = rule_logits(t, e, seed=6)
    modality, mask = torch.arange(t) % 2, torch.arange(t) % 4 != 1
    kw = dict(modality=modality, num_modalities=2)
    for rule in RULES:
        out = mixops.ops.router_topk(x, k, token_mask=mask, **rule_kw(rule, 0.7), **kw)
        ids, _ = reference(x, k, rule, 0.7, **kw)
        assert torch.equal(out.ids, ids)
        assert torch.all((ids < 0) | (ids // 8 == modality[:, None]))
        assert torch.equal(out.counts, counts_of(ids, e, mask)), rule
        assert out.counts.sum() < (ids >= 0).sum()


# ---- refusals: the CPU op and its meta/fake raise the same message --------------------------

BAD = [
    (dict(rule="top-p"), "rule must be 'topk', 'top_p' or 'cum_threshold', got 'top-p'"),
    (dict(score_fn="relu", rule="top_p", threshold=0.5), "it takes no rule, got rule 'top_p'"),
    (dict(score_fn="sigmoid", rule="top_p", threshold=0.5), "score_fn must be 'softmax'"),
    (dict(score_fn="none", rule="cum_threshold", threshold=0.5), "score_fn must be 'softmax'"),
    (dict(rule="top_p", threshold=float("nan")), "threshold .*must be finite, got nan"),
    (dict(rule="cum_threshold", threshold=float("inf")), "threshold .*must be finite, got inf"),
    (dict(threshold=0.5), "it must be 0 with rule 'topk', got 0.5"),
    (dict(score_fn="relu", threshold=0.5), "it must be 0 with rule 'topk'"),
    (dict(rule="top_p", threshold=0.5, bias=torch.zeros(8)), "a top-p rule cannot .*bias"),
    (dict(score_fn="relu", bias=torch.zeros(8)), "score_fn 'relu' cannot be .*bias"),
    (dict(rule="top_p", threshold=0.5, num_groups=2), "a top-p rule .*num_groups = 2"),
    (dict(score_fn="relu", num_groups=4, groups_kept=2), "group-limited .*num_groups = 4"),
    (dict(rule="cum_threshold", threshold=0.5, topk_then_score=True), "topk_then_score=True"),
    (dict(score_fn="relu", topk_then_score=True), "'relu' cannot be combined with topk_then"),
]


@pytest.mark.parametrize("kw,match", BAD, ids=[m for _, m in BAD])
def test_refusals_cpu_and_fake(kw, match):
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match=match) as cpu:
        mixops.ops.router_topk(x, 2, **kw)
    meta = {n: v.to("meta") if torch.is_tensor(v) else v for n, v in kw.items()}
    with pytest.raises(RuntimeError) as on_meta:
        mixops.ops.router_topk(x.to("meta"), 2, **meta)
    with FakeTensorMode() as mode, pytest.raises(RuntimeError) as fake:
        fkw = {n: mode.from_tensor(v) if torch.is_tensor(v) else v for n, v in kw.items()}
        mixops.ops.router_topk(mode.from_tensor(x), 2, **fkw)
    assert str(on_meta.value) == str(cpu.value) == str(fake.value)


def test_backward_takes_trailing_minus_one_only():
    x = torch.randn(2, 8)

    def bw(ids):
        ids = torch.tensor(ids, dtype=torch.int32)
        return BACKWARD(
            torch.ones(2, 3), None, None, x, ids, "softmax", False, True, 0.0, 1.0, None, 1, None
        )

    g = bw([[3, 1, -1], [-1, -1, -1]])
    assert g[1].eq(0).all() and torch.isfinite(g).all()
    with pytest.raises(RuntimeError, match=r"or -1 in the slots after them.*ids\[0, 2\] = 5"):
        bw([[3, -1, 5], [0, 1, 2]])
    with pytest.raises(RuntimeError, match=r"or -1 in the slots after them.*ids\[1, 1\] = 1"):
        bw([[3, 1, 2], [-1, 1, 2]])
