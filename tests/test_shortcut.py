"""Shortcut-connected blocks on one process (mixops.nn.ScMoEBlock, ShortcutDecoderLayer) and the
staged API of mixops.nn.MoE they run on: against plain reference compositions of the same modules
whose MoE is tests/moe_reference.py's (plain torch: routing written out, a per-expert loop; it never
calls the MoE under test), outputs and every gradient in fp64; the norm options; bad arguments."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixops.nn import MLP, MoE, ScMoEBlock, ShortcutDecoderLayer
from moe_reference import expert_choice_forward, moe_forward, shared_forward

H, FF, E, K = 16, 24, 6, 2
F64 = dict(dtype=torch.float64)
TOL = dict(rtol=1e-10, atol=1e-12)


class Attention(nn.Module):
    """Causal multi-head self-attention without norm or residual (test sublayer)."""

    def __init__(self, hidden=H, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False, **F64)
        self.o = nn.Linear(hidden, hidden, bias=False, **F64)

    def forward(self, x, attention_mask=None):
        B, S, _ = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, is_causal=True)
        return self.o(a.transpose(1, 2).reshape(B, S, -1)), None  # HF-style tuple


class PreNormAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.attn = nn.RMSNorm(H, **F64), Attention()

    def forward(self, x):
        return x + self.attn(self.norm(x))[0]


def _moe(**kw):
    torch.manual_seed(0)
    k = None if kw.get("router") == "expert_choice" else K
    return MoE(H, FF, E, k, **kw, **F64)


def _cfg(**kw):
    """The reference's configuration of ``_moe(**kw)``."""
    k = None if kw.get("router") == "expert_choice" else K
    return dict(hidden_size=H, ffn_size=FF, num_experts=E, top_k=k, **kw)


def _routed_reference(moe, cfg, s):
    """The routed experts' output on s [..., H] from moe_reference.py, on the layer's own
    parameters (so that gradients reach them); the layer is not called."""
    p = dict(moe.named_parameters())
    s2 = s.reshape(-1, H)
    if cfg.get("router") == "expert_choice":
        w1, w2 = p["experts.gate_up_proj"], p["experts.down_proj"]
        y, _, _ = expert_choice_forward(s2, p["gate.weight"], w1, w2, cfg["capacity_factor"])
    else:
        bias = moe.gate.e_score_correction_bias.detach() if cfg.get("selection_bias") else None
        sel = s2.detach() @ p["gate.weight"].detach().T
        y = moe_forward(p, s2, dict(cfg, shared_ffn_size=0), torch.float64, sel, bias).y
    return y.reshape(s.shape)


def _shared_reference(moe, cfg, u):
    """The shared experts' output on u [..., H] (0 without shared experts)."""
    if not cfg.get("shared_ffn_size"):
        return 0
    return shared_forward(dict(moe.named_parameters()), u.reshape(-1, H), cfg).reshape(u.shape)


def _x(seed=1, shape=(2, 5, H)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), **F64)


STAGED_CASES = {
    "plain": dict(),
    "shared": dict(shared_ffn_size=12, shared_expert_gate=True),
    "zero": dict(zero_experts=("null", "identity"), selection_bias=True),
    "capacity": dict(capacity_factor=0.75),
    "expert_choice": dict(router="expert_choice", capacity_factor=1.0),
}


@pytest.mark.parametrize("case", list(STAGED_CASES))
def test_staged_api_and_forward_equal_reference(case):
    kw = STAGED_CASES[case]
    moe = _moe(**kw)
    if moe.selection_bias:  # a bias that sends part of the tokens to the zero experts
        with torch.no_grad():
            moe.gate.e_score_correction_bias[E:] = 0.3
    x = _x().requires_grad_(True)
    ref = _routed_reference(moe, _cfg(**kw), x) + _shared_reference(moe, _cfg(**kw), x)
    params = [x, *moe.parameters()]
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), **F64)
    want = torch.autograd.grad(ref, params, gy, allow_unused=True)
    for how in ("staged", "forward"):
        if how == "staged":
            y = moe.combine_finish(moe.run_experts(moe.dispatch_start(x)))
        else:
            y = moe(x)
        torch.testing.assert_close(y, ref, **TOL, msg=lambda m, how=how: f"{how}: {m}")
        got = torch.autograd.grad(y, params, gy, allow_unused=True)
        for i, (a, b) in enumerate(zip(got, want)):
            if b is None:
                assert a is None or a.abs().max() == 0, (how, i)
            else:
                torch.testing.assert_close(
                    a, b, **TOL, msg=lambda m, w=f"{how}: gradient {i}": f"{w}: {m}"
                )


def test_staged_api_order_and_shared_input_are_checked():
    moe = _moe(shared_ffn_size=12)
    x = _x()
    h = moe.dispatch_start(x)
    with pytest.raises(RuntimeError, match="combine_finish: the handle is dispatching"):
        moe.combine_finish(h)
    moe.run_experts(h)
    with pytest.raises(RuntimeError, match="run_experts: the handle is combining"):
        moe.run_experts(h)
    with pytest.raises(ValueError, match="shared_input must have x's shape"):
        moe.combine_finish(h, shared_input=x[:, :3])
    # The shared experts take shared_input: routed(x) + shared(u).
    u = _x(seed=2)
    got = moe.combine_finish(h, shared_input=u)
    cfg = _cfg(shared_ffn_size=12)
    torch.testing.assert_close(
        got, _routed_reference(moe, cfg, x) + _shared_reference(moe, cfg, u), **TOL
    )


def _scmoe_reference(block, cfg, x, shortcut):
    """h = dense(x); out = h + [output_norm](routed(shortcut_norm(shortcut)) + shared(norm(h))),
    composed of the block's own modules, the MoE's parts from moe_reference.py."""
    moe = block.moe
    s = shortcut if block.shortcut_norm is None else block.shortcut_norm(shortcut)
    h = block.dense(x)
    m = _routed_reference(moe, cfg, s) + _shared_reference(moe, cfg, block.norm(h))
    return h + (m if block.output_norm is None else block.output_norm(m))


@pytest.mark.parametrize("norms", ["none", "shortcut", "output", "both"])
@pytest.mark.parametrize("own_shortcut", [False, True])
def test_scmoe_block_equals_reference(norms, own_shortcut):
    cfg = dict(shared_ffn_size=12, zero_experts=1)
    moe = _moe(**cfg)
    block = ScMoEBlock(
        PreNormAttention(),
        moe,
        norm=nn.RMSNorm(H, **F64),
        shortcut_norm=nn.RMSNorm(H, **F64) if norms in ("shortcut", "both") else None,
        output_norm=nn.RMSNorm(H, **F64) if norms in ("output", "both") else None,
    )
    with torch.no_grad():  # non-trivial norm weights
        for m in block.modules():
            if isinstance(m, nn.RMSNorm):
                m.weight.uniform_(0.5, 1.5)
    x = _x().requires_grad_(True)
    s = _x(seed=3).requires_grad_(True) if own_shortcut else None
    out = block(x, shortcut=s)
    loss = (out * out).sum()
    ins = [x] + ([s] if own_shortcut else [])
    got = torch.autograd.grad(loss, ins + list(block.parameters()))
    ref = _scmoe_reference(block, _cfg(**cfg), x, x if s is None else s)
    want = torch.autograd.grad((ref * ref).sum(), ins + list(block.parameters()))
    torch.testing.assert_close(out, ref, **TOL)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)


def _dual_layer(moe):
    torch.manual_seed(1)
    return ShortcutDecoderLayer(
        moe,
        [Attention(), Attention()],
        [MLP(H, 20, "swiglu", **F64), MLP(H, 20, "swiglu", **F64)],
        [nn.RMSNorm(H, **F64), nn.RMSNorm(H, **F64)],
        [nn.RMSNorm(H, **F64), nn.RMSNorm(H, **F64)],
    )


def _dual_reference(layer, cfg, x):
    """LongCat-Flash's formula, written out (the MoE from moe_reference.py)."""
    a, m = layer.self_attn, layer.mlps
    ln_in, ln_post = layer.input_layernorm, layer.post_attention_layernorm
    h1 = x + a[0](ln_in[0](x))[0]
    u = ln_post[0](h1)
    moe_out = _routed_reference(layer.mlp, cfg, u)
    h2 = h1 + m[0](u)
    h3 = h2 + a[1](ln_in[1](h2))[0]
    return h3 + m[1](ln_post[1](h3)) + moe_out


def test_shortcut_decoder_layer_equals_longcat_formula():
    cfg = dict(zero_experts=2, selection_bias=True, renormalize=False)
    layer = _dual_layer(_moe(**cfg))
    with torch.no_grad():  # a bias that sends part of the tokens to the zero experts
        layer.mlp.gate.e_score_correction_bias[E] = 0.3
    x = _x().requires_grad_(True)
    out = layer(x)
    got = torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])
    ref = _dual_reference(layer, _cfg(**cfg), x)
    want = torch.autograd.grad(ref.square().sum(), [x, *layer.parameters()])
    torch.testing.assert_close(out, ref, **TOL)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)
    assert {k.split(".")[0] for k in layer.state_dict()} == {
        "self_attn",
        "mlps",
        "input_layernorm",
        "post_attention_layernorm",
        "mlp",
    }


def test_bad_arguments():
    with pytest.raises(TypeError, match="staged API"):
        ScMoEBlock(PreNormAttention(), MLP(H, 8, "swiglu"))
    with pytest.raises(ValueError, match="self_attn must hold 2 modules"):
        ShortcutDecoderLayer(_moe(), [Attention()], [nn.Identity()] * 2, [nn.Identity()] * 2,
                             [nn.Identity()] * 2)  # fmt: skip
    block = ScMoEBlock(PreNormAttention(), _moe())
    with pytest.raises(ValueError, match="shortcut must have x's shape"):
        block(_x(), shortcut=_x(shape=(2, 4, H)))


def test_scmoe_block_compiles_fullgraph():
    # fp32: torch 2.11's inductor gives SDPA's CPU backward in fp64 graphs a float32 buffer.
    block = ScMoEBlock(PreNormAttention(), _moe(shared_ffn_size=12), norm=nn.RMSNorm(H, **F64))
    block = block.float()
    x = _x().float().requires_grad_(True)
    want = block(x)
    (gw,) = torch.autograd.grad(want.sum(), x)
    compiled = torch.compile(block, fullgraph=True, dynamic=False)
    got = compiled(x)
    (g,) = torch.autograd.grad(got.sum(), x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, gw, rtol=1e-5, atol=1e-5)
