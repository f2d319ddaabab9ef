"""mixops.nn.MoD against independent references (tests/mod_reference.py): the masked-dense oracle
for the output and every gradient with RoPE positions (fp64, bf16 by the tolerance rule), exact
capacities, padding and routable masks (top-C and causal routing), the causal rule's BCE targets
and its locality, compile, MoD around an MoE block, p-MoD's schedule and bad input."""

import math
from fractions import Fraction

import pytest
import torch
from torch import nn

from helpers import assert_close_to_ref
from mixops.nn import MoD, MoE, pmod_capacity_schedule
from mixops.reference.decoder import DecoderBlock, rotary
from mod_reference import dense_mod, topc_mask

H, HEADS, FFN = 32, 4, 48


def make(capacity=Fraction(3, 10), dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    block = DecoderBlock(H, HEADS, FFN, dtype=dtype)
    m = MoD(block, capacity=capacity, dtype=dtype, **kw)
    with torch.no_grad():
        m.router.weight.normal_(0, 0.5)  # a router that separates the tokens (tanh too)
    return m


def inputs(B=3, S=13, dtype=torch.float64, offset=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, H, generator=g, dtype=dtype).requires_grad_(True)
    pos = (torch.arange(S) + offset).expand(B, S)  # RoPE positions that are not 0..S-1
    return x, pos, rotary(pos, H // HEADS, dtype=dtype)


def logits(m, x):
    """The router's logits, computed here (with their graph) for the oracle."""
    return x @ m.router.weight[0].to(x.dtype)


def grads(out, x, m, gy):
    params = [p for p in m.parameters() if p.requires_grad]
    return torch.autograd.grad(out, [x, *params], gy, allow_unused=True, retain_graph=True)


class UpdateOnly(nn.Module):
    """A block that returns only its update f (MoD(residual=False))."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x, **kw):
        return self.block(x, **kw) - x


@pytest.mark.parametrize("gate", ["raw", "sigmoid", "tanh", "one"])
@pytest.mark.parametrize("scale_skipped", [False, True])
@pytest.mark.parametrize("residual", [True, False])
def test_matches_masked_dense_oracle_outputs_and_gradients(gate, scale_skipped, residual):
    m = make(gate=gate, scale_skipped=scale_skipped)
    if not residual:
        m = MoD(UpdateOnly(m.block), H, m.capacity, gate=gate, scale_skipped=scale_skipped,
                residual=False, dtype=torch.float64)  # fmt: skip
        with torch.no_grad():
            m.router.weight.normal_(0, 0.5)
    x, pos, pe = inputs()
    out = m(x, position_embeddings=pe, position_ids=pos)
    r = logits(m, x)
    chosen = topc_mask(r.detach(), math.ceil(0.3 * 13))
    assert torch.equal(m.chosen, chosen)
    ref = dense_mod(m.block, x, r, chosen, gate, scale_skipped=scale_skipped, residual=residual,
                    position_embeddings=pe)  # fmt: skip
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(out)
    for a, b in zip(grads(out, x, m, gy), grads(ref, x, m, gy)):
        if a is None or b is None:
            assert a is None and b is None or (a if a is not None else b).abs().max() == 0
            continue
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_bf16_follows_the_tolerance_rule():
    m64 = make(gate="sigmoid")
    m16 = make(gate="sigmoid", dtype=torch.bfloat16)
    m16.load_state_dict({k: v.to(torch.bfloat16) for k, v in m64.state_dict().items()})
    x, pos, pe = inputs()
    out16 = m16(x.detach().bfloat16(), position_embeddings=tuple(t.bfloat16() for t in pe))
    # The oracle in fp64 and in bf16, both on the tokens the bf16 MoD chose.
    chosen = m16.chosen
    r16 = m16.router_logits
    ref = dense_mod(m64.block, x.detach(), r16.double(), chosen, "sigmoid", position_embeddings=pe)
    low = dense_mod(m16.block, x.detach().bfloat16(), r16, chosen, "sigmoid",
                    position_embeddings=tuple(t.bfloat16() for t in pe))  # fmt: skip
    assert_close_to_ref(out16, ref, low, "MoD bf16 output")


def test_capacity_is_exact_in_integers_and_int_capacity_is_a_count():
    # 0.7 * 10 is 7.000000000000001 in floats; C = ceil(7/10 * 10) = 7 exactly.
    x = torch.randn(2, 10, H, dtype=torch.float64)
    for cap, want in ((0.7, 7), (Fraction(1, 3), 4), (0.1, 1), (3, 3), (25, 10), (1.0, 10)):
        m = make(capacity=cap)
        m(x)
        assert m.chosen.sum(1).tolist() == [want, want], cap


def test_padding_is_never_chosen_and_short_rows_keep_what_they_have():
    m = make(capacity=0.5)
    x, pos, pe = inputs(B=3, S=12)
    tm = torch.ones(3, 12, dtype=torch.bool)
    tm[0, :9] = False  # 3 real tokens < C = 6
    tm[1, 10:] = False  # right padding
    out = m(x, token_mask=tm, position_embeddings=pe)
    chosen = topc_mask(m.router_logits.detach(), 6, tm)
    assert torch.equal(m.chosen, chosen)
    assert m.chosen.sum(1).tolist() == [3, 6, 6]
    assert not (m.chosen & ~tm).any()
    # The oracle with the padding hidden as keys gives the chosen rows; others pass through.
    ref = dense_mod(m.block, x, logits(m, x), chosen, "raw", position_embeddings=pe)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(out)
    for a, b in zip(grads(out, x, m, gy), grads(ref, x, m, gy)):  # empty slots give nothing
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # A 2-D attention_mask is the padding mask when token_mask is not given.
    m(x, attention_mask=tm.long(), position_embeddings=pe)
    assert torch.equal(m.chosen, chosen)


def test_capacity_one_with_unit_gate_is_the_block_bit_for_bit():
    for gate in ("tanh", "one"):
        torch.manual_seed(0)
        block = DecoderBlock(H, HEADS, FFN)
        m = MoD(block, capacity=1.0, gate=gate)  # tanh: zero router, g = 1 exactly
        x, pos, pe = inputs(dtype=torch.float32)
        assert torch.equal(m(x, position_embeddings=pe), block(x, position_embeddings=pe))


def test_nan_router_scores_rank_last_and_stay_out_of_the_block():
    m = make(capacity=0.5)
    x, _, pe = inputs(B=2, S=8)
    x = x.detach().clone()
    x[0, 2] = float("nan")  # its router score is NaN: never chosen while others are eligible
    out = m(x, position_embeddings=pe)
    assert not m.chosen[0, 2]
    assert torch.isfinite(out[0, [i for i in range(8) if i != 2]]).all()


@pytest.mark.parametrize("rule", ["router", "predictor"])
def test_bce_targets_are_the_top_c_mask(rule):
    m = make(capacity=0.25, causal_rule=rule, aux_loss_coef=0.5)
    x, _, pe = inputs(B=2, S=16)
    tm = torch.ones(2, 16, dtype=torch.bool)
    tm[1, :5] = False
    m(x, token_mask=tm, position_embeddings=pe)
    target = topc_mask(m.router_logits.detach(), 4, tm)
    logits = m.router_logits if rule == "router" else m.predictor(x.detach()).squeeze(-1)
    bce = nn.functional.binary_cross_entropy_with_logits(logits, target.double(), reduction="none")
    want = 0.5 * bce[tm].mean()
    torch.testing.assert_close(m.aux_loss, want, rtol=1e-12, atol=1e-12)
    gs = torch.autograd.grad(m.aux_loss, [x, m.router.weight], allow_unused=True)
    if rule == "predictor":  # the predictor reads the stop-gradient input; the router is untouched
        assert gs[0] is None and gs[1] is None
        assert all(p.grad is None for p in m.predictor.parameters())
    else:
        assert gs[1].abs().sum() > 0


def test_causal_rule_hides_skipped_tokens_from_later_queries():
    m = make(capacity=0.5, causal_rule="router")
    x, _, pe = inputs(B=2, S=10)
    out = m(x, position_embeddings=pe, routing="causal")
    keep = m.router_logits.detach() > 0
    assert torch.equal(m.chosen, keep)
    assert keep.any() and (~keep).any()
    ref = dense_mod(m.block, x, logits(m, x), keep, "raw", position_embeddings=pe)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    # Move every skipped token orthogonally to the router: its decision stays, its output is its
    # new input, and every other token's output is unchanged.
    w = m.router.weight.detach()[0]
    d = torch.randn(2, 10, H, dtype=torch.float64)
    d = d - (d @ w).unsqueeze(-1) * w / w.dot(w)
    x2 = x.detach() + d * (~keep).unsqueeze(-1)
    out2 = m(x2, position_embeddings=pe, routing="causal")
    assert torch.equal(m.chosen, keep)
    torch.testing.assert_close(out2[keep], out[keep], rtol=1e-13, atol=1e-13)


def test_routable_mask_processes_the_rest_and_counts_only_routable_tokens():
    m = make(capacity=0.5)
    B, S = 3, 12
    x, _, pe = inputs(B=B, S=S)
    routable = torch.zeros(B, S, dtype=torch.bool)
    routable[0, 2:9] = True  # 7 routable -> 4 chosen
    routable[1, :] = True  # 12 -> 6
    routable[2, 5:7] = True  # 2 -> 1
    tm = torch.ones(B, S, dtype=torch.bool)
    tm[2, :2] = False
    out = m(x, token_mask=tm, routable_mask=routable, position_embeddings=pe)
    r = m.router_logits.detach()
    eligible = routable & tm
    chosen_r = topc_mask(r, [4, 6, 1], eligible)
    want = chosen_r | (tm & ~routable)
    assert torch.equal(m.chosen, want)
    ref = dense_mod(m.block, x, logits(m, x), want, "raw", position_embeddings=pe)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(out)
    for a, b in zip(grads(out, x, m, gy), grads(ref, x, m, gy)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # max_processed caps the compacted length: non-routable tokens first, then the best routable.
    m(x.detach(), token_mask=tm, routable_mask=routable, max_processed=7, position_embeddings=pe)
    assert m.chosen.sum(1).tolist() == [7, 6, 7]
    # Row 0: its 5 non-routable tokens and its 2 best routable ones; row 2 has 8 non-routable
    # tokens: the first 7 by position.
    assert torch.equal(m.chosen[0], (tm & ~routable)[0] | topc_mask(r, 2, eligible)[0])
    assert m.chosen[2].nonzero().flatten().tolist() == [2, 3, 4, 7, 8, 9, 10]


def test_routable_mask_under_causal_routing():
    # The causal rule decides for the routable tokens only: every other non-padding token is
    # processed whatever its logit, padding never; skipped tokens are hidden from later queries.
    m = make(capacity=0.5, causal_rule="router")
    B, S = 3, 12
    x, pos, pe = inputs(B=B, S=S)
    routable = torch.zeros(B, S, dtype=torch.bool)
    routable[0, 4:] = True
    routable[1, :] = True
    routable[2, ::2] = True
    tm = torch.ones(B, S, dtype=torch.bool)
    tm[2, :3] = False
    out = m(x, token_mask=tm, routable_mask=routable, routing="causal", position_embeddings=pe)
    r = m.router_logits.detach()
    rule = r > 0  # sigmoid(logit) > 1/2
    want = (rule | ~routable) & tm
    # Each case occurs: routable tokens kept and skipped, non-routable tokens the rule would skip.
    assert (routable & tm & rule).any() and (routable & tm & ~rule).any()
    assert (~routable & tm & ~rule).any() and (~tm & ~routable).any()
    assert torch.equal(m.chosen, want)
    ref = dense_mod(m.block, x, logits(m, x), want, "raw", position_embeddings=pe)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(out)
    for a, b in zip(grads(out, x, m, gy), grads(ref, x, m, gy)):
        if a is None or b is None:
            assert a is None and b is None or (a if a is not None else b).abs().max() == 0
            continue
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.xfail(
    torch.torch_version.TorchVersion(torch.__version__) < "2.14",
    raises=RuntimeError,
    strict=False,
    reason="torch 2.11's inductor gives the fp64 CPU flash-attention backward (the decoder block's "
    "SDPA) a float32 logsumexp buffer: 'expected scalar type Double but found Float'; 2.14 is right",
)
def test_compile_fullgraph_dynamic_matches_eager():
    m = make(capacity=0.25, gate="sigmoid", causal_rule="router")
    cm = torch.compile(m, fullgraph=True, dynamic=True)
    for S in (16, 13):  # C = 4 both times; one graph for both lengths
        x, pos, pe = inputs(B=2, S=S)
        ref = m(x, position_embeddings=pe)
        gref = torch.autograd.grad((ref * ref).sum() + m.aux_loss, [x, m.router.weight])
        out = cm(x, position_embeddings=pe)
        g = torch.autograd.grad((out * out).sum() + m.aux_loss, [x, m.router.weight])
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        for a, b in zip(g, gref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


class MoEBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.RMSNorm(H, dtype=torch.float64)
        self.moe = MoE(H, FFN, 4, 2, dtype=torch.float64)

    def forward(self, x, **unused):
        return x + self.moe(self.norm(x))


def test_mod_around_an_moe_block():
    torch.manual_seed(0)
    block = MoEBlock()
    m = MoD(block, H, 0.5, gate="sigmoid")
    x, _, _ = inputs(B=2, S=10)
    out = m(x)
    # Token-choice dropless MoE treats each token alone: the chosen rows are block(x) rows.
    ref = dense_mod(block, x, logits(m, x), m.chosen, "sigmoid")
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    out.sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_pmod_capacity_schedule():
    s = pmod_capacity_schedule(32)
    assert s[:8] == [None] * 8  # ratios above 0.85 stay dense
    assert abs(float(s[8]) - (0.5 + math.cos(math.pi * 8 / 31) / 2)) < 1e-6
    assert s[24:] == [Fraction(3, 20)] * 8  # clamped at min_ratio 0.15
    assert all(a >= b for a, b in zip(s[8:], s[9:]))
    lin = pmod_capacity_schedule(5, kind="linear", max_ratio=1.0, min_ratio=0.1)
    assert [float(c) for c in lin] == [1.0, 0.75, 0.5, 0.25, 0.1]


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(capacity=0), ValueError, "int capacity"),
        (dict(capacity=1.5), ValueError, "capacity must be"),
        (dict(capacity=-0.1), ValueError, "capacity must be"),
        (dict(capacity=float("nan")), ValueError, "capacity must be"),
        (dict(capacity=True), TypeError, "capacity must be"),
        (dict(gate="relu"), ValueError, "gate must be"),
        (dict(causal_rule="oracle"), ValueError, "causal_rule must be"),
        (dict(hidden_size=0), ValueError, "hidden_size"),
    ],
)
def test_bad_construction(kwargs, exc, match):
    block = DecoderBlock(H, HEADS, FFN)
    with pytest.raises(exc, match=match):
        MoD(block, **kwargs)


def test_bad_forward_inputs():
    m = make(capacity=0.5)
    x, _, _ = inputs(B=2, S=8)
    with pytest.raises(ValueError, match="hidden_states must be"):
        m(x[0])
    with pytest.raises(ValueError, match="token_mask must be"):
        m(x, token_mask=torch.ones(2, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="routable_mask must be"):
        m(x, routable_mask=torch.ones(8, dtype=torch.bool))
    with pytest.raises(ValueError, match="max_processed"):
        m(x, routable_mask=torch.ones(2, 8, dtype=torch.bool), max_processed=9)
    with pytest.raises(ValueError, match="routing must be"):
        m(x, routing="random")
    with pytest.raises(ValueError, match="needs causal_rule"):
        m(x, routing="causal")
    m.eval()
    with pytest.raises(ValueError, match="with a cache in evaluation"):
        m(x, routing="topc", cache=object())
    with pytest.raises(ValueError, match="attention_mask must be"):
        m(x, attention_mask=torch.ones(2, 1, 8, dtype=torch.bool))


@pytest.mark.parametrize("shape", [(2, 0, H), (0, 5, H), (1, 1, H)])
def test_empty_batches_and_sequences(shape):
    m = make(capacity=0.25)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    out = m(x)
    assert out.shape == x.shape and m.chosen.shape == shape[:2]
    out.sum().backward()
    assert x.grad.shape == x.shape
    if x.numel():
        assert m.chosen.all()  # one token, C = ceil(0.25) = 1


def test_a_trained_layer_deep_copies_and_pickles():
    """After a training forward the router's logits, choices and aux loss are the last call's
    results, not state: copy.deepcopy and pickle leave them out."""
    import copy
    import pickle

    m = make()
    x = inputs()
    x = x[0] if isinstance(x, tuple) else x
    out = m(x)
    (out[0] if isinstance(out, tuple) else out).sum().backward()
    assert m.router_logits is not None
    for twin in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert twin.router_logits is None and twin.aux_loss is None
        a, b = twin(x), m(x)
        a, b = (a[0], b[0]) if isinstance(a, tuple) else (a, b)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
