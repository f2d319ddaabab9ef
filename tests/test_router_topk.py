"""router_topk against the plain-PyTorch reference over the option grid, properties that need no
oracle, gradients, opcheck, edge cases. Low-precision values follow helpers.assert_close_to_ref;
integer outputs (ids, counts) are exact."""

import pytest
import torch

import mixops
import mixops.reference as ref
from conftest import DEVICES
from helpers import assert_close_to_ref, opcheck
from mixops.reference.routing import ranked_ids
from routing_cases import OPTION_GRID, distinct_logits, router_kwargs

NAMES = ("weights", "ids", "counts", "score_sum", "lse")


def check_against_reference(logits, k, what="", **kw):
    out = mixops.ops.router_topk(logits, k, **kw)
    cpu_kw = {n: (v.cpu() if torch.is_tensor(v) else v) for n, v in kw.items()}
    hi = ref.router_topk(logits.cpu().double(), k, **cpu_kw)
    lowp = ref.router_topk(
        logits.cpu() if logits.dtype == torch.float64 else logits.cpu().float(), k, **cpu_kw
    )
    assert torch.equal(out.ids.cpu(), hi[1]), f"{what}: ids differ from the reference"
    assert torch.equal(out.counts.cpu(), hi[2]), f"{what}: counts differ"
    for name, ours, h, lp in zip(NAMES, out, hi, lowp):
        if name in ("ids", "counts"):
            continue
        assert_close_to_ref(ours, h, lp.to(ours.dtype), f"{what}: {name}")
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "case",
    OPTION_GRID,
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items() if v not in (False, None, 1.0)),
)
def test_options_against_reference(device, case):
    num_tokens, num_experts, k = 37, 16, 3
    logits = distinct_logits(num_tokens, num_experts, device=device)
    kw = router_kwargs(case, num_experts, num_tokens, device)
    check_against_reference(logits, k, str(case), **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str
)
@pytest.mark.parametrize("shape", [(64, 8, 2), (50, 64, 8), (9, 60, 6), (5, 256, 8), (3, 512, 4)])
@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid"])
def test_dtypes_and_sizes(device, dtype, shape, score_fn):
    num_tokens, num_experts, k = shape
    logits = distinct_logits(num_tokens, num_experts, dtype, device, scale=1 / 64)
    check_against_reference(logits, k, f"{dtype}/{shape}", score_fn=score_fn)
    bias = (torch.rand(num_experts) - 0.5).to(device) * 0.1
    check_against_reference(
        logits,
        k,
        f"{dtype}/{shape}/bias",
        score_fn=score_fn,
        bias=bias,
        num_groups=4 if num_experts % 4 == 0 else 1,
        groups_kept=2 if num_experts % 4 == 0 else 1,
    )


@pytest.mark.parametrize("device", DEVICES)
def test_token_mask_and_strided_logits(device):
    logits = distinct_logits(40, 24, device=device).t().contiguous().t()  # column-major
    mask = torch.rand(40, device=device) > 0.3
    check_against_reference(logits, 4, "mask", token_mask=mask)
    wide = distinct_logits(40, 48, device=device)[:, ::2]  # row stride 48
    check_against_reference(wide, 4, "strided", score_fn="sigmoid", token_mask=mask)


@pytest.mark.parametrize("device", DEVICES)
def test_negative_bias_changes_choice_not_weights(device):
    logits = distinct_logits(32, 16, device=device)
    bias = torch.zeros(16, device=device)
    bias[:8] = -10.0  # experts 0..7 can never win over 8..15
    out = check_against_reference(
        logits, 4, "bias", score_fn="sigmoid", bias=bias, renormalize=False
    )
    assert torch.all(out.ids >= 8)
    assert torch.allclose(out.weights, torch.sigmoid(logits.gather(1, out.ids.long())))


# ---- properties that need no oracle --------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_softmax_then_topk_equals_topk_then_softmax(device):
    logits = distinct_logits(100, 32, device=device)
    a = mixops.ops.router_topk(logits, 6, renormalize=True)
    b = mixops.ops.router_topk(logits, 6, topk_then_score=True, renormalize=False)
    assert torch.equal(a.ids, b.ids)
    assert_close_to_ref(a.weights, b.weights.double(), b.weights, "renormalised softmax")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid"])
def test_relabelling_experts_relabels_ids_only(device, score_fn):
    num_experts = 24
    logits = distinct_logits(64, num_experts, device=device)
    bias = (torch.rand(num_experts) - 0.5).to(device)
    perm = torch.randperm(num_experts, device=device)  # new expert e' is old expert perm[e']
    a = mixops.ops.router_topk(logits, 5, score_fn=score_fn, bias=bias)
    b = mixops.ops.router_topk(logits[:, perm], 5, score_fn=score_fn, bias=bias[perm])
    assert torch.equal(perm[b.ids.long()].int(), a.ids)
    assert torch.equal(b.counts, a.counts[perm])
    torch.testing.assert_close(b.weights, a.weights, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b.score_sum, a.score_sum[perm], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.lse, a.lse, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_group_limited_excludes_dropped_groups(device):
    # 4 groups of 4; group scores chosen so groups 1 and 3 win; every chosen id must be there
    logits = distinct_logits(20, 16, device=device)
    logits[:, 4:8] += 5
    logits[:, 12:16] += 4
    out = mixops.ops.router_topk(logits, 6, score_fn="sigmoid", num_groups=4, groups_kept=2)
    group = out.ids // 4
    assert torch.all((group == 1) | (group == 3))


@pytest.mark.parametrize("device", DEVICES)
def test_modality_routes_inside_the_group(device):
    logits = distinct_logits(30, 12, device=device)
    modality = torch.arange(30, device=device) % 3
    out = check_against_reference(logits, 2, "modality", modality=modality, num_modalities=3)
    assert torch.equal((out.ids // 4).long(), modality[:, None].expand(-1, 2))
    # the softmax is over the token's group: its weights equal routing that group alone
    for m in range(3):
        rows = modality == m
        alone = mixops.ops.router_topk(logits[rows][:, 4 * m : 4 * m + 4], 2)
        torch.testing.assert_close(out.weights[rows], alone.weights)
        torch.testing.assert_close(out.lse[rows], alone.lse)
        assert torch.equal(out.ids[rows] - 4 * m, alone.ids)


# ---- gradients -----------------------------------------------------------------------------

GRAD_CASES = [
    dict(),
    dict(renormalize=False, scaling=2.0),
    dict(topk_then_score=True, renormalize=False),
    dict(score_fn="sigmoid", renorm_eps=1e-3),
    dict(score_fn="sigmoid", topk_then_score=True),
    dict(score_fn="none", renormalize=False),
    dict(modality=True),
    dict(token_mask=True, score_fn="sigmoid"),
]


def _grad_kwargs(case, num_tokens, device):
    kw = dict(case)
    if kw.pop("modality", False):
        kw.update(modality=torch.arange(num_tokens, device=device) % 2, num_modalities=2)
    if kw.pop("token_mask", False):
        kw.update(token_mask=torch.arange(num_tokens, device=device) % 3 != 0)
    return kw


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", GRAD_CASES, ids=str)
def test_gradcheck(device, case):
    logits = distinct_logits(7, 8, torch.float64, device, scale=0.3).requires_grad_(True)
    kw = _grad_kwargs(case, 7, device)

    def f(x):
        out = mixops.ops.router_topk(x, 3, **kw)
        return out.weights, out.score_sum, out.lse

    torch.autograd.gradcheck(f, (logits,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", GRAD_CASES, ids=str)
def test_gradients_against_reference(device, dtype, case):
    logits = distinct_logits(33, 16, dtype, device, scale=1 / 8)
    kw = _grad_kwargs(case, 33, device)
    gw = torch.randn(33, 4, device=device)
    gs = torch.randn(16, device=device)
    gl = torch.randn(33, device=device)

    def grad_of(fn, x):
        x = x.detach().requires_grad_(True)
        w, s, l = fn(x)
        torch.autograd.backward([w, s, l], [gw.to(w), gs.to(s), gl.to(l)])
        return x.grad

    ours = grad_of(
        lambda x: (lambda o: (o.weights, o.score_sum, o.lse))(mixops.ops.router_topk(x, 4, **kw)),
        logits,
    )
    cpu_kw = {n: (v.cpu() if torch.is_tensor(v) else v) for n, v in kw.items()}

    def reference(x):
        w, _, _, s, l = ref.router_topk(x, 4, **cpu_kw)
        return w, s, l

    hi = grad_of(reference, logits.cpu().double())
    lowp = grad_of(reference, logits.cpu().float()).to(dtype)
    assert_close_to_ref(ours, hi, lowp, f"d logits {case}")


@pytest.mark.parametrize("device", DEVICES)
def test_only_used_outputs_need_gradients(device):
    logits = distinct_logits(10, 8, device=device).requires_grad_(True)
    out = mixops.ops.router_topk(logits, 2)
    (out.lse**2).mean().backward()  # the z-loss alone
    expected = 2 * out.lse.detach()[:, None] / 10 * torch.softmax(logits.detach(), -1)
    torch.testing.assert_close(logits.grad, expected)


# ---- opcheck -------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", GRAD_CASES + [dict(bias=True, num_groups=2)], ids=str)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, case, requires_grad):
    kw = _grad_kwargs(case, 12, device)
    if kw.pop("bias", False):
        kw["bias"] = torch.rand(8, device=device)
    logits = distinct_logits(12, 8, device=device).requires_grad_(requires_grad)
    opcheck(torch.ops.mixops.router_topk.default, (logits, 3), kw)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_backward(device):
    logits = distinct_logits(12, 8, device=device)
    out = mixops.ops.router_topk(logits, 3)
    args = (
        torch.randn(12, 3, device=device),
        torch.randn(8, device=device),
        None,
        logits,
        out.ids,
        "softmax",
        False,
        True,
        0.0,
        1.0,
        None,
        1,
        None,
    )
    opcheck(torch.ops.mixops.router_topk_backward.default, args)


# ---- edge cases ----------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "shape", [(0, 8, 2), (16, 8, 8), (16, 1, 1), (40, 60, 7), (5, 1024, 3)], ids=str
)
def test_edge_shapes(device, shape):
    num_tokens, num_experts, k = shape
    logits = distinct_logits(num_tokens, num_experts, device=device, scale=1 / 256)
    out = check_against_reference(logits, k, str(shape))
    if k == num_experts and num_tokens:  # every expert chosen by every token
        assert torch.equal(
            out.ids.sort(-1).values.cpu(),
            torch.arange(num_experts, dtype=torch.int32).expand(num_tokens, -1),
        )
    assert int(out.counts.sum()) == num_tokens * k


@pytest.mark.parametrize("device", DEVICES)
def test_all_tokens_to_one_expert(device):
    logits = distinct_logits(50, 16, device=device)
    logits[:, 5] = 100.0
    out = check_against_reference(logits, 1, "one expert")
    assert torch.all(out.ids == 5) and int(out.counts[5]) == 50 and int(out.counts.sum()) == 50


@pytest.mark.parametrize("device", DEVICES)
def test_nan_and_inf_logits(device):
    logits = distinct_logits(6, 8, device=device)
    logits[0, 3] = float("nan")  # row 0: NaN ranks last; softmax row is NaN
    logits[1, 2] = float("inf")  # row 1: +inf chosen first; softmax row is NaN
    logits[2, :] = float("-inf")  # row 2: all -inf; NaN weights, ids 0..k-1
    logits[3, 4] = float("-inf")  # row 3: one -inf: an ordinary zero probability
    out = mixops.ops.router_topk(logits, 3)
    ids = out.ids.cpu()
    assert 3 not in ids[0].tolist() and ids[1, 0] == 2
    assert ids[2].tolist() == [0, 1, 2]
    assert all(len(set(r)) == 3 for r in ids.tolist()), "ids must stay distinct"
    assert torch.isnan(out.weights[:3]).all() and torch.isnan(out.lse[:3]).all()
    hi = ref.router_topk(logits.cpu().double(), 3)
    torch.testing.assert_close(out.weights[3:].double().cpu(), hi[0][3:], rtol=1e-6, atol=1e-7)
    assert torch.equal(out.ids[3:].cpu(), hi[1][3:])
    # sigmoid scores stay finite for +-inf; NaN stays NaN in its own weight only
    sig = mixops.ops.router_topk(logits[[1, 3]], 3, score_fn="sigmoid", renormalize=False)
    assert torch.isfinite(sig.weights).all() and sig.ids[0, 0] == 2 and sig.weights[0, 0] == 1


# ---- bad input -----------------------------------------------------------------------------

BAD = [
    (dict(k=0), "k must be in"),
    (dict(k=9), "k must be in"),
    (dict(score_fn="tanh"), "score_fn must be"),
    (dict(group_score="mean", num_groups=2), "group_score must be"),
    (dict(num_groups=3), "num_groups .* must divide num_experts"),
    (dict(num_groups=2, groups_kept=3), "groups_kept must be in"),
    (dict(num_groups=4, groups_kept=1, k=3), "k .* must be <= groups_kept"),
    (dict(bias=torch.zeros(7)), "bias must have shape"),
    (
        dict(num_modalities=3, modality=torch.zeros(4, dtype=torch.long)),
        "num_modalities .* must divide",
    ),
    (dict(num_modalities=2), "modality .* must be given exactly when"),
    (dict(num_modalities=2, modality=torch.zeros(5, dtype=torch.long)), "modality must have shape"),
    (dict(num_modalities=2, modality=torch.full((4,), 2)), "modality values must be in"),
    (
        dict(num_modalities=2, modality=torch.zeros(4, dtype=torch.long), num_groups=2),
        "cannot be combined",
    ),
    (dict(token_mask=torch.ones(4)), "token_mask must be bool"),
    (dict(renorm_eps=-1.0), "renorm_eps must be"),
]


@pytest.mark.parametrize("kw,match", BAD, ids=[m for _, m in BAD])
def test_bad_input(kw, match):
    kw = dict(kw)
    k = kw.pop("k", 2)
    with pytest.raises(RuntimeError, match=match):
        mixops.ops.router_topk(torch.randn(4, 8), k, **kw)


def test_bad_logits():
    with pytest.raises(RuntimeError, match="logits must be 2-D"):
        mixops.ops.router_topk(torch.randn(8), 2)
    with pytest.raises(RuntimeError, match="logits must be float32"):
        mixops.ops.router_topk(torch.ones(4, 8, dtype=torch.int32), 2)


def test_bad_backward_ids():
    logits = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="ids must be int32"):
        torch.ops.mixops.router_topk_backward(
            torch.ones(4, 2),
            None,
            None,
            logits,
            torch.zeros(4, 2, dtype=torch.long),
            "softmax",
            False,
            True,
            0.0,
            1.0,
            None,
            1,
            None,
        )
    with pytest.raises(RuntimeError, match="ids values must be in"):
        torch.ops.mixops.router_topk_backward(
            torch.ones(4, 2),
            None,
            None,
            logits,
            torch.full((4, 2), 9, dtype=torch.int32),
            "softmax",
            False,
            True,
            0.0,
            1.0,
            None,
            1,
            None,
        )
    with pytest.raises(RuntimeError, match="not an eligible expert"):  # modality 0: experts 0-3
        torch.ops.mixops.router_topk_backward(
            torch.ones(4, 2),
            None,
            None,
            logits,
            torch.full((4, 2), 5, dtype=torch.int32),
            "softmax",
            False,
            True,
            0.0,
            1.0,
            torch.zeros(4, dtype=torch.long),
            2,
            None,
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 3, 8])
def test_tie_rule_and_nan_order_with_many_ties(device, k):
    """Heavy ties, NaNs and infinities at E=256: ids follow the documented order exactly (higher
    logit first, NaN last, ties to the lower id), whatever shortcuts the kernels take."""
    gen = torch.Generator().manual_seed(k)
    logits = torch.randint(-3, 4, (200, 256), generator=gen).float() * 0.5
    r = torch.rand(200, 256, generator=gen)
    logits[r < 0.2] = float("nan")
    logits[(r > 0.2) & (r < 0.22)] = float("-inf")
    logits[(r > 0.22) & (r < 0.23)] = float("inf")
    logits[5] = float("nan")
    logits[6] = 1.0
    out = mixops.ops.router_topk(logits.to(device), k)
    expected = ranked_ids(logits, torch.ones_like(logits, dtype=torch.bool), k)
    assert torch.equal(out.ids.cpu().long(), expected)
