"""Expert-choice routing in mixops.nn.MoE (router="expert_choice") against a plain reference written
from the paper's equations (Zhou et al. 2022): S = softmax(X Wg) [T, E]; each expert e takes the C
tokens with the largest S[:, e] (I = top-C indices, G = their scores, P = one-hot of I); the
expert's input is P X; the output is x_t = sum_e sum_c G[e, c] P[e, c, t] FFN_e((P X)[e, c])."""

import math

import pytest
import torch
import torch.nn.functional as F

from mixops.nn import MoE


def reference(x, gate, w1, w2, cf, token_mask=None):
    T, E = x.shape[0], gate.shape[0]
    C = min(T, math.ceil(cf * T / E))
    s = torch.softmax(x @ gate.T, dim=-1)  # [T, E]
    out = torch.zeros_like(x)
    for e in range(E):
        col = s[:, e] if token_mask is None else s[:, e].masked_fill(~token_mask, float("-inf"))
        top = torch.topk(col, C).indices
        top = top[col[top] > float("-inf")]  # fewer eligible tokens than C
        g = s[top, e]
        h = x[top] @ w1[e].T  # [C, 2F], gate then up
        gg, up = h.chunk(2, dim=-1)
        ffn = (F.silu(gg) * up) @ w2[e].T
        out = out.index_add(0, top, g[:, None] * ffn)
    return out, C


def make(E=4, H=16, F_=8, dtype=torch.float64, cf=1.0):
    torch.manual_seed(0)
    return MoE(H, F_, E, router="expert_choice", capacity_factor=cf, dtype=dtype)


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
    # the chosen rows are expert-major, C per expert: each expert's rows are C distinct tokens
    m = make(E=5, cf=1.5)
    T, E = 20, 5
    C = min(T, math.ceil(1.5 * T / E))
    x = torch.randn(T, 16, dtype=torch.float64)
    s = torch.softmax(x @ m.gate.weight.T, -1)
    from mixops.ops import select_topc

    sel = select_topc(s.t().contiguous(), C)
    assert sel.indices.shape == (E, C) and bool((sel.indices >= 0).all())
    for e in range(E):
        assert len(set(sel.indices[e].tolist())) == C
        assert set(sel.indices[e].tolist()) == set(torch.topk(s[:, e], C).indices.tolist())


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
