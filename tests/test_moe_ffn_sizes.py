"""MoE with experts of different widths (``ffn_sizes``; nn/packed_experts.py, issue 27): outputs
and every gradient against a per-expert loop in float64 written from the definition
(packed_reference.loop_forward), an expert of width 1, an expert no token chooses, expert
choice, all widths equal bit-equal to the uniform layer, torch.compile, HMoE's losses against
their formulas, bad ffn_sizes and the refusals. Every test runs on the op
``mixops.ops.grouped_mm_packed`` and on the plain-PyTorch ``gmp_reference`` patched in its place
(packed_reference.py)."""

import copy

import pytest
import torch

import moe_reference as ref
from helpers import assert_close_to_ref
from mixops.nn import MoE
from mixops.nn.packed_experts import PackedExperts
from packed_reference import (  # noqa: F401  (impl_fixture: autouse)
    SIZES,
    H,
    T,
    _grad_experts,
    check_against_loop,
    experts_of,
    impl_fixture,
    loop_forward,
    make,
)

CASES = {
    "swiglu": dict(ffn_sizes=SIZES),
    "gelu-ungated": dict(ffn_sizes=SIZES, activation="gelu"),
    "geglu-k1": dict(ffn_sizes=SIZES, activation="geglu", top_k=1),
    "capacity": dict(ffn_sizes=SIZES, capacity_factor=0.75),
    "shared-zero": dict(ffn_sizes=SIZES, shared_ffn_size=12, zero_experts=["identity", "null"]),
    "one-expert": dict(ffn_sizes=[3], top_k=1),
}


@pytest.mark.parametrize("name", CASES)
def test_matches_per_expert_loop(name):
    moe, cfg = make(CASES[name])
    ids = check_against_loop(moe, cfg, torch.randn(T, H, dtype=torch.float64))
    if name == "swiglu":
        assert (ids == 1).any(), "the width-1 expert should be chosen in this case"


def test_expert_no_token_chooses():
    """A selection bias of -1e9 keeps expert 2 out of every choice: its rows are empty groups,
    its weights get exactly zero gradient, everything else still matches the loop."""
    moe, cfg = make(dict(ffn_sizes=SIZES, selection_bias=True))
    with torch.no_grad():
        moe.gate.e_score_correction_bias[2] = -1e9
    ids = check_against_loop(moe, cfg, torch.randn(T, H, dtype=torch.float64))
    assert not (ids == 2).any()
    for name, g in _grad_experts(moe.experts).expert_weights(2).items():
        assert g.shape[-1 if name == "down_proj" else 0] == SIZES[2] and not g.any(), name


def test_all_tokens_on_width_one_expert():
    moe, cfg = make(dict(ffn_sizes=SIZES, selection_bias=True, top_k=1))
    with torch.no_grad():
        moe.gate.e_score_correction_bias.fill_(-1e9)[1] = 0
    ids = check_against_loop(moe, cfg, torch.randn(T, H, dtype=torch.float64))
    assert (ids == 1).all()


def test_expert_choice():
    """Expert choice (Zhou et al. 2022) from its equations, each expert its own width: S =
    softmax(x Wg); expert e takes its C = min(T, ceil(1.5 T / E)) best tokens by S[:, e] and adds
    S[t, e] * FFN_e(x_t)."""
    moe, cfg = make(dict(ffn_sizes=SIZES, router="expert_choice", capacity_factor=1.5, top_k=None))
    x = torch.randn(T, H, dtype=torch.float64)
    params = {n: p.detach().clone().requires_grad_() for n, p in moe.named_parameters()}
    E = len(SIZES)
    C = min(T, -(-3 * T // (2 * E)))
    s = torch.softmax(x @ params["gate.weight"].T, dim=-1)
    y_ref = torch.zeros_like(x)
    for e, (gate, up, down) in enumerate(experts_of(params, SIZES, True)):
        top = torch.topk(s[:, e], C).indices
        y_ref = y_ref.index_add(0, top, s[top, e, None] * ref.mlp(x[top], gate, up, down, "swiglu"))
    y = moe(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    for n, p in moe.named_parameters():
        torch.testing.assert_close(p.grad, params[n].grad, rtol=1e-10, atol=1e-12, msg=n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equal_widths_bit_equal_uniform(dtype, impl):
    """Equal widths: the layer converted from a uniform one (from_padded) gives the same bits
    forward and the same bits in every weight gradient (capacity and shared experts on). On the
    op; the reference op's BLAS calls on other strides round differently (then: close)."""
    same = torch.equal if impl == "op" else _close
    E, F = 4, 12
    uni = MoE(H, F, E, 2, dtype=dtype, capacity_factor=1.25, shared_ffn_size=8)
    packed_experts = PackedExperts.from_padded(
        uni.experts.gate_up_proj.detach(), uni.experts.down_proj.detach(), [F] * E
    )
    assert packed_experts.down_proj.dtype == dtype
    pk = MoE(H, num_experts=E, top_k=2, ffn_sizes=[F] * E, dtype=dtype, capacity_factor=1.25,
             shared_ffn_size=8)  # fmt: skip
    pk.experts = packed_experts
    sd = {k: v for k, v in uni.state_dict().items() if not k.startswith("experts.")}
    pk.load_state_dict(sd, strict=False)
    x = torch.randn(T, H, dtype=dtype)
    xu, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    yu, yp = uni(xu), pk(xp)
    assert same(yu, yp)
    g = torch.randn_like(yu)
    yu.backward(g)
    yp.backward(g)
    assert same(uni.gate.weight.grad, pk.gate.weight.grad)
    gu, gd = _grad_experts(pk.experts).to_padded()
    assert same(gu, uni.experts.gate_up_proj.grad)
    assert same(gd, uni.experts.down_proj.grad)
    # The input gradient sums d h @ W1 over the 2F gate/up columns in another order (interleaved
    # g0, u0, g1, u1, ... instead of gate then up): equal up to that rounding only.
    torch.testing.assert_close(xp.grad, xu.grad)


def test_bf16_within_twice_torch_bf16_error():
    """bf16 weights and input: the output, the input gradient and every weight gradient within
    twice the error of the per-expert loop run in bf16 PyTorch, both against that loop in float64
    on the same bf16 values (the tolerance rule). top_k = E: every expert is chosen, so no near
    tie can flip a choice between the precisions."""
    moe64, cfg = make(dict(ffn_sizes=SIZES, top_k=len(SIZES)))
    moe = copy.deepcopy(moe64).to(torch.bfloat16)
    x = torch.randn(T, H).to(torch.bfloat16)
    g = torch.randn(T, H).to(torch.bfloat16)
    runs = {}
    for name, dtype in [("ref", torch.float64), ("torch bf16", torch.bfloat16)]:
        params = {n: p.detach().to(dtype).requires_grad_() for n, p in moe.named_parameters()}
        xr = x.detach().to(dtype, copy=True).requires_grad_()
        y, _ = loop_forward(params, xr, cfg, moe)
        y.backward(g.to(dtype))
        runs[name] = (y, xr.grad, {n: p.grad for n, p in params.items()})
    xm = x.detach().clone().requires_grad_()
    y = moe(xm)
    y.backward(g)
    ours = (y, xm.grad, {n: p.grad for n, p in moe.named_parameters()})
    for i, what in enumerate(["output", "d x"]):
        assert_close_to_ref(ours[i], runs["ref"][i], runs["torch bf16"][i], what)
    for n, grad in ours[2].items():
        assert_close_to_ref(grad, runs["ref"][2][n], runs["torch bf16"][2][n], f"d {n}")


def _close(a, b):
    torch.testing.assert_close(a, b)
    return True


def test_compile_fullgraph():
    torch._dynamo.reset()
    moe, _ = make(dict(ffn_sizes=SIZES, capacity_factor=1.0, aux_loss_coef=0.01,
                       aux_loss_weighting="size", param_loss_coef=0.01),
                  dtype=torch.float32)  # fmt: skip
    compiled = torch.compile(moe, fullgraph=True, dynamic=True)
    for n in (T, 41):
        x = torch.randn(n, H)
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye = moe(xe)
        le = moe.aux_loss
        yc = compiled(xc)
        lc = moe.aux_loss
        torch.testing.assert_close(yc, ye)
        torch.testing.assert_close(lc, le)
        (ye.square().sum() + le).backward()
        (yc.square().sum() + lc).backward()
        torch.testing.assert_close(xc.grad, xe.grad)


@pytest.mark.parametrize("weighting", ["tokens", "size"])
def test_hmoe_losses_against_formula(weighting):
    """aux_loss = a * (E+Z) * sum_e w_e f_e P_e (w_e = 1 with "tokens") + b * sum_e w_e P_e
    + c * mean lse^2, with w_e = F_e / mean(F) over the computing experts and 0 for the zero
    expert, f_e = chosen (token, e) pairs / T_valid, P_e = mean softmax probability of e over the
    valid tokens; value and gradient of the router weight."""
    a, b, c = 0.1, 0.05, 0.01
    moe, cfg = make(dict(ffn_sizes=SIZES, zero_experts=1, aux_loss_coef=a, z_loss_coef=c,
                         aux_loss_weighting=weighting, param_loss_coef=b))  # fmt: skip
    x = torch.randn(T, H, dtype=torch.float64)
    mask = torch.ones(T, dtype=torch.bool)
    mask[[3, 7, 20]] = False
    moe(x, token_mask=mask)
    moe.aux_loss.backward()
    Wg = moe.gate.weight.detach().clone().requires_grad_()
    logits = x @ Wg.T
    E, Z = len(SIZES), 1
    ids = ref.select_experts(logits, dict(cfg, num_experts=E))
    n = mask.sum()
    f = torch.bincount(ids[mask].reshape(-1), minlength=E + Z).double() / n
    P = torch.softmax(logits, -1)[mask].sum(0) / n
    sizes = torch.tensor(SIZES, dtype=torch.float64)
    w = torch.cat([sizes / sizes.mean(), torch.zeros(Z, dtype=torch.float64)])
    fw = f * w if weighting == "size" else f
    loss = a * (E + Z) * (fw * P).sum() + b * (w * P).sum()
    loss = loss + c * torch.logsumexp(logits, -1)[mask].square().sum() / n
    loss.backward()
    torch.testing.assert_close(moe.aux_loss.double(), loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(moe.gate.weight.grad, Wg.grad, rtol=1e-5, atol=1e-9)


def test_size_weighting_charges_large_experts_more():
    """All tokens forced on one expert: weighting "size" multiplies the plain loss by that
    expert's width over the mean width (24 / 10.8 for the widest, 1 / 10.8 for the narrowest)."""
    losses = {}
    for weighting in ("tokens", "size"):
        for e in (2, 1):  # widest (24), narrowest (1)
            torch.manual_seed(1)
            moe, _ = make(dict(ffn_sizes=SIZES, aux_loss_coef=1.0, top_k=1, selection_bias=True,
                               aux_loss_weighting=weighting))  # fmt: skip
            with torch.no_grad():
                moe.gate.e_score_correction_bias.fill_(-1e9)[e] = 0
            moe(torch.randn(T, H, dtype=torch.float64))
            losses[weighting, e] = moe.aux_loss.item()
    mean = sum(SIZES) / len(SIZES)
    assert losses["size", 2] == pytest.approx(losses["tokens", 2] * 24 / mean, rel=1e-6)
    assert losses["size", 1] == pytest.approx(losses["tokens", 1] * 1 / mean, rel=1e-6)


def test_bad_ffn_sizes():
    def build(**kw):
        return MoE(H, **{"top_k": 1, **kw})

    for bad, msg in [
        ([], "at least one expert"),
        ([4, 0], r"ffn_sizes\[1\] must be an int >= 1, got 0"),
        ([4, -2], r"ffn_sizes\[1\] must be an int >= 1, got -2"),
        ([4, 2.0], r"ffn_sizes\[1\] must be an int >= 1, got 2.0"),
        ([True, 4], r"ffn_sizes\[0\] must be an int >= 1, got True"),
        (5, "ffn_sizes must be a sequence of ints, got 5"),
    ]:
        with pytest.raises(ValueError, match=msg):
            build(ffn_sizes=bad)
    with pytest.raises(ValueError, match=r"one width per computing expert \(4\), got 3"):
        build(ffn_sizes=[4, 4, 4], num_experts=4)
    with pytest.raises(ValueError, match=r"one width per computing expert \(2\), got 3"):
        build(ffn_sizes=[4, 4, 4], num_experts=2, zero_experts=1)
    with pytest.raises(ValueError, match="exactly one of ffn_size .* and ffn_sizes"):
        MoE(H, 8, top_k=1, ffn_sizes=[4, 4])
    with pytest.raises(ValueError, match="exactly one of ffn_size .* and ffn_sizes"):
        MoE(H, num_experts=2, top_k=1)
    with pytest.raises(ValueError, match="need ffn_sizes"):
        MoE(H, 8, 4, 1, aux_loss_coef=0.1, aux_loss_weighting="size")
    with pytest.raises(ValueError, match="need ffn_sizes"):
        MoE(H, 8, 4, 1, param_loss_coef=0.1)
    with pytest.raises(ValueError, match="aux_loss_weighting must be 'tokens' or 'size'"):
        build(ffn_sizes=[4, 4], aux_loss_weighting="params")
    with pytest.raises(ValueError, match="param_loss_coef must be a number >= 0"):
        build(ffn_sizes=[4, 4], param_loss_coef=-1.0)
    # With zero experts the router counts E + Z; num_experts may be left out.
    moe = build(ffn_sizes=[4, 6], zero_experts=1)
    assert moe.num_experts == 3 and moe.num_computing_experts == 2 and moe.ffn_size == 6


def test_parts_must_match_ffn_sizes():
    from mixops.nn import MoEParts, TopKRouter
    from mixops.nn.experts import Experts

    gate = TopKRouter(H, 2)
    with pytest.raises(ValueError, match="parts.experts has widths"):
        MoE(H, top_k=1, ffn_sizes=[4, 6], parts=MoEParts(gate=gate, experts=Experts(H, 6, 2)))
    with pytest.raises(ValueError, match="parts.experts has widths"):
        MoE(H, 6, 2, 1, parts=MoEParts(gate=gate, experts=PackedExperts(H, [4, 6])))
    with pytest.raises(ValueError, match="parts.experts has widths"):
        MoE(
            H,
            top_k=1,
            ffn_sizes=[4, 5],
            parts=MoEParts(gate=gate, experts=PackedExperts(H, [4, 6])),
        )
    with pytest.raises(ValueError, match="gated=True disagrees"):
        MoE(H, top_k=1, ffn_sizes=[4, 6], activation="gelu",
            parts=MoEParts(gate=gate, experts=PackedExperts(H, [4, 6])))  # fmt: skip
    ex = PackedExperts(H, [4, 6], dtype=torch.float64)
    moe = MoE(
        H,
        top_k=1,
        ffn_sizes=[4, 6],
        parts=MoEParts(gate=TopKRouter(H, 2, dtype=torch.float64), experts=ex),
    )
    assert moe.experts is ex
    check_against_loop(
        moe, dict(hidden_size=H, top_k=1, ffn_sizes=[4, 6]), torch.randn(T, H).double()
    )


def test_refusals():
    from mixops.parallel import ExpertParallelMoE

    with pytest.raises(ValueError, match="ExpertParallelMoE: ffn_sizes .* not expert-parallel"):
        ExpertParallelMoE(H, 8, 4, 1, ffn_sizes=[4, 8, 8, 8])
    moe, _ = make(dict(ffn_sizes=SIZES))
    with pytest.raises(
        ValueError, match=r"MoE.add_lora: LoRA on experts of different widths \(ffn_sizes\)"
    ):
        moe.add_lora(4)
    with pytest.raises(ValueError, match=r"LoRA adapters on experts of different widths"):
        from mixops.nn.experts import expert_mlp

        expert_mlp(torch.zeros(0, H), torch.zeros(5, dtype=torch.int32), None, None, "swiglu",
                   {"gate_up": object()}, packed=moe.experts.spec())  # fmt: skip
