"""Expert-choice routing in mixops.nn.MoE (router="expert_choice") against a plain reference written
from the paper's equations (Zhou et al. 2022): S = softmax(X Wg) [T, E]; each expert e takes the C
tokens with the largest S[:, e] (I = top-C indices, G = their scores, P = one-hot of I); the
expert's input is P X; the output is x_t = sum_e sum_c G[e, c] P[e, c, t] FFN_e((P X)[e, c]).
Also: it is not causal (a later token changes earlier outputs; one decoded token is a mix of all
experts), so it warns once where that matters; the z-loss is applied, the aux loss refused."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from mixops.nn import MoE
from moe_reference import expert_choice_forward


def reference(x, gate, w1, w2, cf, token_mask=None):
    """moe_reference.expert_choice_forward (the equations above): (output, C)."""
    out, C, _ = expert_choice_forward(x, gate, w1, w2, cf, token_mask)
    return out, C


def make(E=4, H=16, F_=8, dtype=torch.float64, cf=1.0, **kw):
    torch.manual_seed(0)
    return MoE(H, F_, E, router="expert_choice", capacity_factor=cf, dtype=dtype, **kw)


def ffn(m, e, x):
    """Expert e's SwiGLU FFN on rows x, written from the weights."""
    gg, up = (x @ m.experts.gate_up_proj[e].T).chunk(2, dim=-1)
    return (F.silu(gg) * up) @ m.experts.down_proj[e].T


@pytest.mark.parametrize("cf", [0.5, 1.0, 2.0, 100.0])
@pytest.mark.parametrize("masked", [False, True])
def test_expert_choice_equals_the_paper_outputs_and_gradients(cf, masked):
    m = make(cf=cf)
    T = 13
    x = torch.randn(T, 16, dtype=torch.float64, requires_grad=True)
    mask = None
    if masked:
        mask = torch.ones(T, dtype=torch.bool)
        mask[:4] = False
    y = m(x, token_mask=mask)
    ref, C = reference(x, m.gate.weight, m.experts.gate_up_proj, m.experts.down_proj, cf, mask)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    params = [x, *m.parameters()]
    for a, b in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert m.aux_loss is None


def test_every_expert_gets_exactly_c_tokens():
    # The layer itself, with experts that say who ran them: expert e's FFN is relu(x[:, -1]) times
    # the unit vector e (x[:, -1] = 1), so y[t, e] = S[t, e] > 0 exactly when expert e took token t.
    T, E, H = 20, 5, 16
    m = make(E=E, H=H, cf=1.5, activation="relu")
    C = min(T, math.ceil(1.5 * T / E))
    with torch.no_grad():
        m.experts.up_proj.zero_()  # [E, F, H]
        m.experts.up_proj[:, 0, H - 1] = 1.0
        m.experts.down_proj.zero_()  # [E, H, F]
        for e in range(E):
            m.experts.down_proj[e, e, 0] = 1.0
    x = torch.randn(T, H, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    x[:, H - 1] = 1.0
    with torch.no_grad():
        y = m(x)
    s = torch.softmax(x @ m.gate.weight.detach().T, -1)  # [T, E], every entry > 0
    taken = y[:, :E] != 0  # [T, E]
    assert taken.sum(0).tolist() == [C] * E
    assert (y[:, E:] == 0).all()
    for e in range(E):
        want = set(torch.topk(s[:, e], C).indices.tolist())
        assert set(taken[:, e].nonzero().flatten().tolist()) == want, e
    torch.testing.assert_close(y[:, :E], torch.where(taken, s, 0), rtol=1e-12, atol=1e-12)


def test_one_token_is_picked_by_every_expert():
    m = make(cf=1.0)
    x = torch.randn(1, 16, dtype=torch.float64)
    ref, C = reference(x, m.gate.weight, m.experts.gate_up_proj, m.experts.down_proj, 1.0)
    assert C == 1
    torch.testing.assert_close(m(x), ref, rtol=1e-12, atol=1e-12)


def test_compile_fullgraph_matches_eager():
    m = make(dtype=torch.float32)
    x = torch.randn(12, 16)
    cm = torch.compile(m, fullgraph=True, dynamic=True)
    torch.testing.assert_close(cm(x), m(x), rtol=1e-5, atol=1e-5)


def test_bad_expert_choice_configurations_name_the_argument():
    with pytest.raises(ValueError, match="top_k"):
        MoE(16, 8, 4, 2, router="expert_choice", capacity_factor=1.0)
    with pytest.raises(ValueError, match="capacity_factor"):
        MoE(16, 8, 4, router="expert_choice")
    with pytest.raises(ValueError, match="score_fn"):
        MoE(16, 8, 4, router="expert_choice", capacity_factor=1.0, score_fn="sigmoid")
    with pytest.raises(TypeError, match="expert_choice"):
        MoE(16, 8, 4, 2, router="expert-choice")


# ---- not causal: the behaviour, and the warning it justifies ---------------------------------


def not_causal(why=""):
    """The warning's message: why, then what to use instead and how to silence it."""
    return r"expert choice is not causal \(" + why + r".*use token choice.*causal=False"


def test_a_later_token_changes_earlier_outputs():
    # Expert 0 takes its C = 2 best of 8 tokens. Token 7 first scores ~0 on expert 0 (not taken);
    # made to score ~1 there, it is taken instead of an earlier token, whose output loses expert
    # 0's share: position < 7 changes because of position 7. (What a causal decoder must not do.)
    m = make(causal=False)  # the behaviour itself, without the warning
    S, H = 8, 16
    x = torch.randn(1, S, H, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    w0 = m.gate.weight[0].detach()
    x_a, x_b = x.clone(), x.clone()
    x_a[0, 7], x_b[0, 7] = -50 * w0, 50 * w0
    with torch.no_grad():
        y_a, y_b = m(x_a), m(x_b)
    changed = (y_a[0, :7] - y_b[0, :7]).abs().amax(-1) > 1e-6
    assert changed.any(), "an earlier output must depend on token 7"
    # and the reference from the paper says the same, position by position
    for xx, yy in ((x_a, y_a), (x_b, y_b)):
        ref, _ = reference(xx[0], m.gate.weight, m.experts.gate_up_proj, m.experts.down_proj, 1.0)
        torch.testing.assert_close(yy[0], ref, rtol=1e-12, atol=1e-12)


def test_one_decoded_token_is_a_softmax_mix_of_all_experts_and_warns_once():
    m = make()
    x = torch.randn(1, 1, 16, dtype=torch.float64)  # [batch, 1, hidden]: a cached decoding step
    with pytest.warns(UserWarning, match=not_causal("it got one token per sequence")) as rec:
        y = m(x)
    assert len([w for w in rec if "expert choice" in str(w.message)]) == 1
    s = torch.softmax(x[0] @ m.gate.weight.T, dim=-1)[0]  # [E]
    mix = sum(s[e] * ffn(m, e, x[0]) for e in range(4))
    torch.testing.assert_close(y[0], mix, rtol=1e-12, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per layer: the next step is silent
        m(x)
    with pytest.warns(UserWarning, match=not_causal()):  # another layer warns once too
        make()(x)


def test_causal_layer_warns_once_on_its_first_forward_and_staged_call():
    m = make(causal=True)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    with pytest.warns(UserWarning, match=not_causal("the layer was built with causal=True")):
        m.combine_finish(m.run_experts(m.dispatch_start(x)))  # the staged API checks too
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(x)
    with pytest.warns(UserWarning, match=not_causal()):
        make(causal=True)(x)


@pytest.mark.parametrize("shape", [(2, 6), (12,), (3, 1)], ids=["batch_seq", "flat", "decode"])
def test_no_warning_for_non_causal_layers(shape):
    # causal=False (encoders, non-causal training) silences it, also for one-token sequences;
    # unknown causality (the default) warns only on a decoding step's [batch, 1, hidden].
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make(causal=False)(torch.randn(*shape, 16, dtype=torch.float64))
        if shape != (3, 1):
            make()(torch.randn(*shape, 16, dtype=torch.float64))


def test_bad_causal_value_names_the_argument():
    with pytest.raises(ValueError, match=r"causal must be True, False or None, got 'yes'"):
        make(causal="yes")


# ---- losses: the router z-loss applies, the load-balancing loss is refused -------------------


@pytest.mark.parametrize("masked", [False, True])
def test_z_loss_equals_the_st_moe_formula(masked):
    coef = 0.03
    m = make(z_loss_coef=coef)
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    mask = None
    if masked:
        mask = torch.ones(2, 7, dtype=torch.bool)
        mask[1, :3] = False
    y = m(x, token_mask=mask)
    # ST-MoE (Zoph et al. 2022): mean over the counted tokens of logsumexp(logits)^2
    w = m.gate.weight.detach().clone().requires_grad_(True)
    lse = torch.logsumexp(x.reshape(-1, 16) @ w.T, dim=-1)
    keep = torch.ones(14, dtype=torch.bool) if mask is None else mask.reshape(-1)
    want = coef * (lse[keep] ** 2).mean()
    assert m.aux_loss.dim() == 0 and m.aux_loss.requires_grad
    torch.testing.assert_close(m.aux_loss, want, rtol=1e-12, atol=0)
    (g,) = torch.autograd.grad(m.aux_loss, m.gate.weight)
    torch.testing.assert_close(g, torch.autograd.grad(want, w)[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(y, make()(x, token_mask=mask), rtol=0, atol=0)  # output unchanged


def test_aux_loss_coef_is_refused():
    with pytest.raises(
        ValueError, match=r"balanced by construction.*aux_loss_coef must be 0, got 0\.01"
    ):
        make(aux_loss_coef=0.01)
