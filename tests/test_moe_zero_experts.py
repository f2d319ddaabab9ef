"""Zero-computation experts in mixops.nn.MoE (LongCat-Flash's identity experts, AdaMoE's null
experts) against a plain reference written from the definition: the router chooses among E + Z,
identity experts return their input times the routing weight, null experts zero; outputs and
every gradient in fp64, with a selection bias that sends tokens to the zero experts (null experts
listed before identity ones too); the capacity and the losses, which count all E + Z choices,
against moe_reference.py; load counts and the bias update cover all E + Z; bad arguments."""

import math

import pytest
import torch
import torch.nn.functional as F

import moe_reference
from mixops.nn import MoE

H, FF, E, K, T = 16, 24, 6, 2, 40
F64 = dict(dtype=torch.float64)


def reference(moe, x, kinds):
    """softmax over E + Z, top-k on scores + bias, renormalised weights; per choice the expert's
    SwiGLU MLP, x (identity) or 0 (null)."""
    logits = x @ moe.gate.weight.t()
    scores = torch.softmax(logits, -1)
    bias = getattr(moe.gate, "e_score_correction_bias", None)
    choose = scores + bias if bias is not None and moe.selection_bias else scores
    ids = choose.topk(K, -1).indices
    w = scores.gather(1, ids)
    w = w / w.sum(-1, keepdim=True)
    y = torch.zeros_like(x)
    gu, dn = moe.experts.gate_up_proj, moe.experts.down_proj
    for j in range(K):
        for t in range(x.shape[0]):
            e = int(ids[t, j])
            if e < E:
                g, u = (gu[e] @ x[t]).chunk(2)
                out = dn[e] @ (F.silu(g) * u)
            elif kinds[e - E] == "identity":
                out = x[t]
            else:
                out = torch.zeros_like(x[t])
            y[t] = y[t] + w[t, j] * out
    return y, ids


KINDS = [
    ("identity",),
    ("identity", "null"),
    ("null", "null"),
    ("null", "identity"),  # a null expert before an identity one: the ids are not the list order
    ("null", "identity", "null", "identity"),
]


@pytest.mark.parametrize("kinds", KINDS, ids=["-".join(k) for k in KINDS])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_reference_outputs_and_gradients(kinds, bias):
    torch.manual_seed(0)
    moe = MoE(H, FF, E, K, zero_experts=kinds, selection_bias=bias, **F64)
    assert moe.num_experts == E + len(kinds) and moe.num_computing_experts == E
    assert moe.experts.gate_up_proj.shape[0] == E and moe.gate.weight.shape[0] == E + len(kinds)
    if bias:  # a selection bias that sends tokens to the zero experts
        with torch.no_grad():
            moe.gate.e_score_correction_bias[E:] = 0.5
    x = torch.randn(T, H, **F64, requires_grad=True)
    y = moe(x)
    ref, ids = reference(moe, x, kinds)
    assert (ids < E).any()
    if bias:  # every zero expert is chosen by some token
        assert all((ids == E + z).any() for z in range(len(kinds))), ids
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)
    gy = torch.randn_like(y)
    params = [x, *moe.parameters()]
    g1 = torch.autograd.grad(y, params, gy, retain_graph=True, allow_unused=True)
    g2 = torch.autograd.grad(ref, params, gy, allow_unused=True)
    for a, b in zip(g1, g2):
        if b is None:
            assert a is None or a.abs().max() == 0
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_load_counts_and_bias_update_cover_zero_experts():
    torch.manual_seed(0)
    moe = MoE(H, FF, E, K, zero_experts=2, selection_bias=True, **F64)
    with torch.no_grad():
        moe.gate.e_score_correction_bias[E] = 10.0  # every token picks zero expert E first
    moe.train()
    moe(torch.randn(T, H, **F64))
    counts = moe.tokens_per_expert.clone()
    assert counts.shape == (E + 2,) and counts[E] == T and counts.sum() == T * K
    load = moe.update_bias(0.1)
    assert torch.equal(load, counts.float())
    assert moe.gate.e_score_correction_bias[E] < 10.0  # the overloaded zero expert is pushed down


def test_capacity_and_zero_experts():
    torch.manual_seed(0)
    moe = MoE(H, FF, E, K, zero_experts=("identity",), capacity_factor=4.0, **F64)
    x = torch.randn(T, H, **F64)
    ref = MoE(H, FF, E, K, zero_experts=("identity",), **F64)
    ref.load_state_dict(moe.state_dict())
    torch.testing.assert_close(moe(x), ref(x), rtol=1e-12, atol=1e-12)  # nothing dropped


@pytest.mark.parametrize("cf", [None, 0.5], ids=["dropless", "cap0.5"])
@pytest.mark.parametrize("kinds", [("null", "identity"), 2], ids=["null-identity", "2"])
def test_capacity_and_losses_count_every_choice(kinds, cf):
    # Capacity ceil(cf * T * k / (E + Z)) and the load-balancing loss's factor E + Z count the
    # zero experts too (they take no capacity slot and are never dropped).
    cfg = dict(hidden_size=H, ffn_size=FF, num_experts=E, top_k=K, zero_experts=kinds,
               selection_bias=True, capacity_factor=cf, aux_loss_coef=0.1, z_loss_coef=0.01)  # fmt: skip
    torch.manual_seed(0)
    moe = MoE(**cfg, **F64)
    Z = moe.num_experts - E
    with torch.no_grad():
        moe.gate.e_score_correction_bias[E:] = 0.3
    x = torch.randn(T, H, **F64, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    y = moe(x)
    params = dict(moe.named_parameters())
    sel = x.detach() @ moe.gate.weight.detach().T
    ref = moe_reference.moe_forward(
        params, x, cfg, torch.float64, sel, moe.gate.e_score_correction_bias.detach()
    )
    assert all((ref.ids == E + z).any() for z in range(Z)) and (ref.ids < E).any()
    if cf is not None:  # drops happen, and counting only the E computing experts would differ
        assert (~ref.keep).any()
        assert moe_reference.capacity_of(cfg, T) == math.ceil(cf * T * K / (E + Z))
        assert math.ceil(cf * T * K / (E + Z)) != math.ceil(cf * T * K / E)
    torch.testing.assert_close(y, ref.y, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(moe.aux_loss, ref.aux_loss, rtol=1e-10, atol=1e-12)
    gy = torch.randn_like(y)
    ins = [x, *params.values()]
    g1 = torch.autograd.grad((y * gy).sum() + moe.aux_loss, ins, allow_unused=True)
    g2 = torch.autograd.grad((ref.y * gy).sum() + ref.aux_loss, ins, allow_unused=True)
    for name, a, b in zip(["x", *params], g1, g2):
        if b is None:
            assert a is None or a.abs().max() == 0, name
        else:
            torch.testing.assert_close(
                a, b, rtol=1e-9, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}"
            )


def test_bad_arguments():
    with pytest.raises(ValueError, match="'identity' or 'null'"):
        MoE(H, FF, E, K, zero_experts=("copy",))
    with pytest.raises(ValueError, match="zero_experts must be >= 0"):
        MoE(H, FF, E, K, zero_experts=-1)
    with pytest.raises(ValueError, match="not expert choice"):
        MoE(H, FF, E, router="expert_choice", capacity_factor=1.0, zero_experts=1)
