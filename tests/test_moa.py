"""mixops.nn.MoA against independent references (tests/moa_reference.py): the dense-mask oracle for
the output and every gradient (fp64 exactly, bf16 by the tolerance rule), grouped-query attention
for E = k with a constant router, incremental decoding against recomputation, compile, masks,
configurations and errors."""

import copy

import pytest
import torch
from transformers import DynamicCache

import mixops.nn.moa as moa_mod
from helpers import assert_close_to_ref
from mixops.nn import MoA, MoAParts, RouterConfig
from moa_reference import causal_allowed, dense_moa

MODES = {"jetmoe": dict(topk_then_score=True), "paper": dict(renormalize=False), "renorm": {}}


def make(H=32, E=5, k=2, d=8, Hkv=2, mode="jetmoe", dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    m = MoA(H, E, k, d, Hkv, dtype=dtype, **MODES[mode], **kw)
    with torch.no_grad():
        if m.experts.bias is not None:
            m.experts.bias.normal_()
    return m


def oracle(m, x, mode, allowed, rope=None):
    ex = m.experts
    cos, sin = rope if rope is not None else (None, None)
    return dense_moa(
        x, ex.input_linear.weight, ex.output_linear.weight, ex.bias, m.kv_proj.weight,
        ex.router.layer.weight, m.top_k, m.num_kv_heads, mode=mode, allowed=allowed,
        cos=cos, sin=sin, scale=m.scaling,
    )  # fmt: skip


def rope_tables(B, S, d, dtype, positions=None):
    pos = torch.arange(S).expand(B, S) if positions is None else positions
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    f = pos[..., None].double() * inv
    emb = torch.cat((f, f), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


LEFT_PAD = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1]])

CASES = [  # (E, k, Hkv, mode, causal, padded)
    (5, 2, 2, "jetmoe", True, False),
    (5, 2, 2, "jetmoe", True, True),
    (6, 3, 1, "paper", True, True),
    (4, 1, 2, "renorm", False, False),
    (4, 4, 2, "jetmoe", False, True),  # k == E
    (8, 1, 1, "jetmoe", True, False),  # experts that get no token
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_dense_oracle_fp64_output_and_grads(case):
    E, k, Hkv, mode, causal, padded = case
    m = make(E=E, k=k, Hkv=Hkv, mode=mode, causal=causal)
    B, S = LEFT_PAD.shape
    x = torch.randn(B, S, 32, dtype=torch.float64, requires_grad=True)
    rope = rope_tables(B, S, 8, torch.float64)
    pad = LEFT_PAD if padded else None
    allowed = causal_allowed(B, S, pad) if causal else (
        None if pad is None else (pad != 0)[:, None, :].expand(B, S, S))  # fmt: skip
    y = m(x, attention_mask=pad, position_embeddings=rope)
    ref = oracle(m, x, mode, allowed, rope)
    valid = torch.ones(B, S, dtype=torch.bool) if pad is None else pad.bool()
    torch.testing.assert_close(y[valid], ref[valid], rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y) * valid[..., None]
    params = [x, *m.parameters()]
    got = torch.autograd.grad(y, params, g, allow_unused=True)
    want = torch.autograd.grad(ref, params, g, allow_unused=True)
    names = ["x"] + [n for n, _ in m.named_parameters()]
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"grad of {name}")


def test_dense_oracle_bf16_by_the_tolerance_rule():
    m64 = make(E=6, k=2, Hkv=2)
    m16 = make(E=6, k=2, Hkv=2, dtype=torch.bfloat16)
    m16.load_state_dict({n: t.to(torch.bfloat16) for n, t in m64.state_dict().items()})
    x16 = torch.randn(2, 16, 32).bfloat16()
    rope = rope_tables(2, 16, 8, torch.float64)
    allowed = causal_allowed(2, 16)
    hi = oracle(m64, x16.double(), "jetmoe", allowed, rope)
    lo = oracle(m16, x16, "jetmoe", allowed, tuple(t.bfloat16() for t in rope))
    y = m16(x16, position_embeddings=tuple(t.bfloat16() for t in rope))
    assert y.dtype == torch.bfloat16
    assert_close_to_ref(y, hi, lo, "MoA bf16 output")


def test_equals_gqa_when_every_expert_is_chosen_with_equal_gates():
    # E = k, router weight zero: every token takes every expert with gate 1/k. Then MoA is GQA with
    # Hkv * k query heads (head h * k + j = expert j's head h) and output projection
    # concat_j(output_linear[j]) / k.
    E = k = 3
    Hkv, d, H, B, S = 2, 8, 24, 2, 6
    m = make(H=H, E=E, k=k, d=d, Hkv=Hkv)
    with torch.no_grad():
        m.experts.router.layer.weight.zero_()
    x = torch.randn(B, S, H, dtype=torch.float64)
    wq, wo = m.experts.input_linear.weight, m.experts.output_linear.weight  # [E, Hkv*d, H]
    q = torch.einsum("bsh,eoh->bseo", x, wq).view(B, S, E, Hkv, d)
    q = q.permute(0, 3, 2, 1, 4).reshape(B, Hkv * k, S, d)  # head h * k + j
    kv = (x @ m.kv_proj.weight.T).view(B, S, 2, Hkv, d)
    key = kv[:, :, 0].transpose(1, 2).repeat_interleave(k, dim=1)
    value = kv[:, :, 1].transpose(1, 2).repeat_interleave(k, dim=1)
    o = torch.nn.functional.scaled_dot_product_attention(q, key, value, is_causal=True)
    o = o.view(B, Hkv, k, S, d).permute(0, 3, 2, 1, 4).reshape(B, S, k * Hkv * d)  # (j, h, d)
    w_out = torch.cat(list(wo), dim=1) / k  # [H, k * Hkv * d], expert j's columns j-th
    ref = o @ w_out.T + m.experts.bias
    torch.testing.assert_close(m(x), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("padded", [False, True])
def test_incremental_decoding_equals_recomputation(padded):
    m = make(E=5, k=2, Hkv=2).eval()
    B, S = LEFT_PAD.shape
    x = torch.randn(B, S, 32, dtype=torch.float64)
    pad = LEFT_PAD if padded else torch.ones(B, S, dtype=torch.long)
    pos = (pad.cumsum(-1) - 1).clamp(min=0)
    rope = rope_tables(B, S, 8, torch.float64, pos)
    full = m(x, attention_mask=pad, position_embeddings=rope)
    cache = DynamicCache()
    m.layer_idx = 0
    outs = [m(x[:, :4], attention_mask=pad[:, :4], position_embeddings=tuple(t[:, :4] for t in rope),
              cache=cache)]  # fmt: skip
    for s in range(4, S):  # one token at a time
        r = tuple(t[:, s : s + 1] for t in rope)
        outs.append(m(x[:, s : s + 1], attention_mask=pad[:, : s + 1], position_embeddings=r,
                      cache=cache))  # fmt: skip
    assert cache.get_seq_length() == S
    assert cache.layers[0].keys.shape == (B, 2, S, 8), "one key per token, whatever k is"
    inc = torch.cat(outs, dim=1)
    valid = pad.bool()
    torch.testing.assert_close(inc[valid], full[valid], rtol=1e-12, atol=1e-12)


def test_chunked_prefill_with_cache_and_no_mask_is_causal():
    # More keys than queries without a mask: causal alignment to the end (not SDPA's top-left).
    m = make().eval()
    x = torch.randn(1, 7, 32, dtype=torch.float64)
    full = m(x)
    m.layer_idx = 0
    cache = DynamicCache()
    a = m(x[:, :3], cache=cache)
    b = m(x[:, 3:], cache=cache)
    torch.testing.assert_close(torch.cat([a, b], 1), full, rtol=1e-12, atol=1e-12)


def test_padding_tokens_do_not_change_other_tokens():
    m = make(E=6, k=2)
    B, S = LEFT_PAD.shape
    x = torch.randn(B, S, 32, dtype=torch.float64)
    x2 = x.clone()
    x2[LEFT_PAD == 0] = 1e3 * torch.randn_like(x2[LEFT_PAD == 0])
    valid = LEFT_PAD.bool()
    y1, y2 = m(x, attention_mask=LEFT_PAD), m(x2, attention_mask=LEFT_PAD)
    # (not bit-equal: padding tokens change the expert group sizes, so BLAS blocks differently)
    torch.testing.assert_close(y1[valid], y2[valid], rtol=1e-13, atol=1e-13)
    assert not y1.isnan().any()


@pytest.mark.parametrize("mask_kind", ["bool4", "float4", "per_head"])
def test_hf_style_4d_masks_equal_the_padding_mask(mask_kind):
    m = make(E=5, k=2, Hkv=2)
    B, S = LEFT_PAD.shape
    x = torch.randn(B, S, 32, dtype=torch.float64)
    allowed = causal_allowed(B, S, LEFT_PAD)[:, None]  # [B, 1, S, S]
    if mask_kind == "float4":
        mask = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, -1e30)
    elif mask_kind == "per_head":
        mask = allowed.expand(B, 2 * 2, S, S)
    else:
        mask = allowed
    valid = LEFT_PAD.bool()
    torch.testing.assert_close(
        m(x, attention_mask=mask)[valid],
        m(x, attention_mask=LEFT_PAD)[valid],
        rtol=1e-12,
        atol=1e-12,
    )


def test_compile_fullgraph_dynamic_forward_and_backward():
    m = make(E=5, k=2, dtype=torch.float32)
    x = torch.randn(2, 6, 32, requires_grad=True)
    rope = rope_tables(2, 6, 8, torch.float32)
    cm = torch.compile(m, fullgraph=True, dynamic=True)
    y_eager = m(x, position_embeddings=rope)
    y_comp = cm(x, position_embeddings=rope)
    torch.testing.assert_close(y_comp, y_eager, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y_eager)
    ge = torch.autograd.grad(y_eager, [x, *m.parameters()], g)
    gc = torch.autograd.grad(y_comp, [x, *m.parameters()], g)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    x3 = torch.randn(3, 5, 32)  # another shape, same graph (dynamic)
    torch.testing.assert_close(cm(x3, position_embeddings=rope_tables(3, 5, 8, torch.float32)),
                               m(x3, position_embeddings=rope_tables(3, 5, 8, torch.float32)),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_aux_and_z_loss_follow_the_moe_formula():
    m = make(E=5, k=2, aux_loss_coef=0.1, z_loss_coef=0.01)
    x = torch.randn(3, 7, 32, dtype=torch.float64)
    m(x, attention_mask=LEFT_PAD)
    logits = (x.reshape(-1, 32) @ m.experts.router.layer.weight.T)[LEFT_PAD.reshape(-1).bool()]
    probs = torch.softmax(logits, -1)
    ids = logits.topk(2, -1).indices
    f = torch.zeros(5, dtype=torch.float64).scatter_add_(0, ids.reshape(-1), torch.ones(ids.numel(),
        dtype=torch.float64)) / logits.shape[0]  # fmt: skip
    aux = 0.1 * 5 * (f * probs.mean(0)).sum()
    z = 0.01 * torch.logsumexp(logits, -1).square().mean()
    torch.testing.assert_close(m.aux_loss.double(), aux + z, rtol=1e-6, atol=1e-9)
    assert m.router_logits.shape == (21, 5)


def test_state_dict_names_follow_jetmoe():
    m = make(E=3, k=2, Hkv=2)
    assert sorted(m.state_dict()) == [
        "experts.bias",
        "experts.input_linear.weight",
        "experts.output_linear.weight",
        "experts.router.layer.weight",
        "kv_proj.weight",
    ]
    assert make(bias=False).experts.bias is None


def _raises(match, **kw):
    args = dict(hidden_size=32, num_experts=4, top_k=2, head_dim=8, num_kv_heads=2)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        MoA(**args)


def test_bad_configurations_name_the_argument():
    _raises("head_dim", head_dim=0)
    _raises("head_dim", head_dim=None)
    _raises("num_kv_heads", num_kv_heads=0)
    _raises("hidden_size", hidden_size=-1)
    _raises("top_k", top_k=5)
    _raises("scaling", scaling=float("nan"))
    _raises("attention_dropout", attention_dropout=1.0)
    _raises("num_modalities", num_modalities=2)
    _raises("num_experts", router=RouterConfig(num_experts=8, top_k=2))
    bad = MoAParts(experts=make().experts, kv_proj=torch.nn.Linear(32, 8, bias=False))
    _raises("parts.kv_proj.weight", parts=bad, num_experts=5)
    m = make()
    with pytest.raises(ValueError, match="hidden_states"):
        m(torch.randn(2, 3, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="attention_mask"):
        m(torch.randn(2, 3, 32, dtype=torch.float64), attention_mask=torch.ones(2, 5))


def test_nvtx_stages(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda n: calls.append(n))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: calls.append(None))
    monkeypatch.setattr(moa_mod, "_nvtx_enabled", lambda x: True)
    make()(torch.randn(1, 3, 32, dtype=torch.float64))
    pushed = [c for c in calls if c is not None]
    assert pushed == [f"mixops.moa.{s}" for s in ("router", "permute", "query_gemm", "kv_proj",
                                                  "attention", "output_gemm", "unpermute")]  # fmt: skip
    assert len(calls) == 2 * len(pushed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("padded", [False, True])
def test_cuda_runs_on_fused_sdpa_kernels(padded):
    # No math fallback: with enable_gqa (no mask) or the folded slots (masks), SDPA must find a
    # flash or memory-efficient kernel; forward and backward, bf16, against the fp64 oracle.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    m64 = make(E=6, k=2, Hkv=2, d=64, H=128)
    mb = make(E=6, k=2, Hkv=2, d=64, H=128, dtype=torch.bfloat16)
    mb.load_state_dict({n: t.to(torch.bfloat16) for n, t in m64.state_dict().items()})
    m = copy.deepcopy(mb).cuda()
    B, S = LEFT_PAD.shape
    pad = LEFT_PAD if padded else None
    x = torch.randn(B, S, 128).bfloat16()
    rope = rope_tables(B, S, 64, torch.float64)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        xc = x.cuda().requires_grad_(True)
        y = m(xc, attention_mask=None if pad is None else pad.cuda(),
              position_embeddings=tuple(t.bfloat16().cuda() for t in rope))  # fmt: skip
        y.float().square().sum().backward()
    allowed = causal_allowed(B, S, pad)
    hi = oracle(m64, x.double(), "jetmoe", allowed, rope)
    lo = oracle(mb, x, "jetmoe", allowed, tuple(t.bfloat16() for t in rope))
    valid = torch.ones(B, S, dtype=torch.bool) if pad is None else pad.bool()
    assert_close_to_ref(y.cpu()[valid], hi[valid], lo[valid], "MoA bf16 on CUDA")
    assert xc.grad is not None and torch.isfinite(xc.grad).all()


@pytest.mark.large
@pytest.mark.parametrize("seed", range(3))
def test_dense_oracle_large(seed):
    # E = 16, k = 4, two kv heads of 16, 2 x 48 tokens with padding, RoPE: output and gradients.
    g = torch.Generator().manual_seed(seed)
    m = make(H=64, E=16, k=4, d=16, Hkv=2, seed=seed)
    B, S = 2, 48
    pad = torch.ones(B, S, dtype=torch.long)
    pad[0, : int(torch.randint(0, S // 2, (1,), generator=g))] = 0
    x = torch.randn(B, S, 64, dtype=torch.float64, generator=g, requires_grad=True)
    rope = rope_tables(B, S, 16, torch.float64, (pad.cumsum(-1) - 1).clamp(min=0))
    y = m(x, attention_mask=pad, position_embeddings=rope)
    ref = oracle(m, x, "jetmoe", causal_allowed(B, S, pad), rope)
    valid = pad.bool()
    torch.testing.assert_close(y[valid], ref[valid], rtol=1e-11, atol=1e-11)
    gy = torch.randn(y.shape, dtype=torch.float64, generator=g) * valid[..., None]
    params = [x, *m.parameters()]
    for a, b in zip(torch.autograd.grad(y, params, gy), torch.autograd.grad(ref, params, gy)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_autocast_bf16_casts_explicitly_and_keeps_fp32_master_grads():
    m = make(E=5, k=2, dtype=torch.float32)
    x = torch.randn(2, 6, 32, requires_grad=True)
    rope = rope_tables(2, 6, 8, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x, attention_mask=torch.ones(2, 6, dtype=torch.long), position_embeddings=rope)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in m.parameters())
    mb = make(E=5, k=2, dtype=torch.bfloat16)
    mb.load_state_dict({n: t.bfloat16() for n, t in m.state_dict().items()})
    ref = mb(x.detach().bfloat16(), attention_mask=torch.ones(2, 6, dtype=torch.long),
             position_embeddings=tuple(t.bfloat16() for t in rope))  # fmt: skip
    torch.testing.assert_close(y, ref, rtol=0, atol=0)


def test_bad_mask_lengths_and_a_cache_without_layer_idx_are_clear_errors():
    m = make()
    x = torch.randn(2, 3, 32, dtype=torch.float64)
    for bad in (torch.ones(2, 2), torch.ones(2, 5)):  # shorter and longer than the keys
        with pytest.raises(ValueError, match=rf"attention_mask.*{bad.shape[1]}.*\b3\b|"
                                             rf"attention_mask.*\b3\b.*{bad.shape[1]}"):  # fmt: skip
            m(x, attention_mask=bad)
    with pytest.raises(ValueError, match=r"attention_mask.*batch"):
        m(x, attention_mask=torch.ones(3, 3))
    cache = DynamicCache()
    with pytest.raises(ValueError, match="layer_idx"):
        m(x, cache=cache)
    assert cache.get_seq_length() == 0, "the cache is left as it was"
    m.layer_idx = 0
    m(x[:, :2], cache=cache)
    with pytest.raises(
        ValueError, match=r"attention_mask.*\b4\b.*\b3\b|attention_mask.*\b3\b.*\b4\b"
    ):
        m(x[:, :1], attention_mask=torch.ones(2, 4), cache=cache)  # 2 cached + 1 new = 3 keys


@pytest.mark.parametrize(
    "cos_shape, sin_shape, bad",
    [
        ((2, 3, 16), (2, 3, 16), "cos"),  # another head_dim (the model's, not this layer's)
        ((2, 3, 8), (2, 3, 4), "sin"),
        ((2, 4, 8), (2, 4, 8), "cos"),  # another length
        ((3, 3, 8), (3, 3, 8), "cos"),  # another batch
        ((3, 8), (3, 8), "cos"),  # no batch dimension
    ],
)
def test_rope_tables_of_the_wrong_shape_get_moas_message(cos_shape, sin_shape, bad):
    m = make(d=8)  # head_dim 8
    x = torch.randn(2, 3, 32, dtype=torch.float64)
    pe = (torch.randn(cos_shape, dtype=torch.float64), torch.randn(sin_shape, dtype=torch.float64))
    want = rf"MoA: position_embeddings' {bad} must be \[batch or 1, q_len, head_dim\] = \[2 or 1, 3, 8\]"
    with pytest.raises(ValueError, match=want):
        m(x, position_embeddings=pe)
    with pytest.raises(ValueError, match=r"MoA: position_embeddings must be a pair \(cos, sin\)"):
        m(x, position_embeddings=pe[:1])
    m(x, position_embeddings=rope_tables(1, 3, 8, torch.float64))  # batch 1 broadcasts


def test_an_input_of_another_dtype_names_the_layer():
    m = make(dtype=torch.float32)
    with pytest.raises(
        ValueError, match=r"MoA: hidden_states is torch.bfloat16 .*weights are torch.float32"
    ):
        m(torch.randn(2, 3, 32, dtype=torch.bfloat16))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: the layer casts itself
        assert m(torch.randn(2, 3, 32)).dtype == torch.bfloat16


DOC_IDS = torch.tensor([[0, 0, 0, 1, 1, 2, 2], [0, 0, 0, 0, 0, 0, 0], [5, 5, 7, 7, 7, 7, 9]])


@pytest.mark.parametrize("padded", [False, True])
def test_document_ids_attend_within_each_document(padded):
    m = make(E=5, k=2, Hkv=2)
    B, S = DOC_IDS.shape
    x = torch.randn(B, S, 32, dtype=torch.float64, requires_grad=True)
    rope = rope_tables(B, S, 8, torch.float64)
    pad = LEFT_PAD if padded else None
    same = DOC_IDS[:, :, None] == DOC_IDS[:, None, :]
    allowed = causal_allowed(B, S, pad) & same
    y = m(x, attention_mask=pad, position_embeddings=rope, document_ids=DOC_IDS)
    ref = oracle(m, x, "jetmoe", allowed, rope)
    valid = torch.ones(B, S, dtype=torch.bool) if pad is None else pad.bool()
    torch.testing.assert_close(y[valid], ref[valid], rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y) * valid[..., None]
    params = [x, *m.parameters()]
    for a, b in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="document_ids"):
        m(x, document_ids=DOC_IDS[:, :4])
    m.layer_idx, cache = 0, DynamicCache()
    m(x[:, :3], cache=cache)
    with pytest.raises(ValueError, match="document_ids"):  # keys of earlier calls: no ids for them
        m(x[:, 3:], cache=cache, document_ids=DOC_IDS[:, 3:])


def test_output_attentions_gives_the_weights_in_jetmoe_head_order():
    m = make(E=5, k=2, Hkv=2)
    B, S = LEFT_PAD.shape
    x = torch.randn(B, S, 32, dtype=torch.float64)
    rope = rope_tables(B, S, 8, torch.float64)
    y, w = m(x, attention_mask=LEFT_PAD, position_embeddings=rope, output_attentions=True)
    valid = LEFT_PAD.bool()
    want = m(x, attention_mask=LEFT_PAD, position_embeddings=rope)
    torch.testing.assert_close(y[valid], want[valid], rtol=1e-12, atol=1e-12)
    assert w.shape == (B, 2 * 2, S, S)
    # head j * Hkv + h: the j-th chosen expert's query head h against key head h (HF's order)
    ids = (x.reshape(-1, 32) @ m.experts.router.layer.weight.T).topk(2, -1).indices.view(B, S, 2)
    kv = (x @ m.kv_proj.weight.T).view(B, S, 2, 2, 8)
    key = moa_mod.rope(kv[:, :, 0].transpose(1, 2), *rope)  # [B, Hkv, S, d]
    allowed = causal_allowed(B, S, LEFT_PAD)
    for j in range(2):
        wq = m.experts.input_linear.weight[ids[..., j]]  # [B, S, Hkv * d, H]
        q = torch.einsum("bsoh,bsh->bso", wq, x).view(B, S, 2, 8).transpose(1, 2)
        q = moa_mod.rope(q, *rope)
        s = (q @ key.transpose(-1, -2)) * m.scaling
        p = torch.softmax(s.masked_fill(~allowed[:, None], float("-inf")), -1)
        for h in range(2):
            torch.testing.assert_close(
                w[:, j * 2 + h][valid], p[:, h][valid], rtol=1e-12, atol=1e-12
            )


@torch.no_grad()
def test_block_mask_equals_the_dense_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    m = make(E=5, k=2, Hkv=2).eval()
    B, S = LEFT_PAD.shape
    x = torch.randn(B, S, 32, dtype=torch.float64)
    rope = rope_tables(B, S, 8, torch.float64)
    pad = LEFT_PAD.bool()

    def mask_mod(b, h, qi, ki):
        return (ki <= qi) & pad[b, ki]

    bm = create_block_mask(mask_mod, B, None, S, S, device="cpu")
    valid = LEFT_PAD.bool()
    want = m(x, attention_mask=LEFT_PAD, position_embeddings=rope)
    got = m(x, attention_mask=bm, position_embeddings=rope)
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-12, atol=1e-12)
    want = m(x, attention_mask=LEFT_PAD, position_embeddings=rope, document_ids=DOC_IDS)
    got = m(x, attention_mask=bm, position_embeddings=rope, document_ids=DOC_IDS)
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="BlockMask"):
        m(x[:, :5], attention_mask=bm)
    with pytest.raises(ValueError, match="output_attentions"):
        m(x, attention_mask=bm, output_attentions=True)
    md = make(attention_dropout=0.1).train()
    with pytest.raises(ValueError, match="dropout"):
        md(x, attention_mask=bm)


def test_a_trained_layer_deep_copies_and_pickles():
    """After a training forward ``aux_loss`` and ``router_logits`` hold a graph: copies leave
    them out."""
    import pickle

    m = make(aux_loss_coef=0.01)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    m(x).sum().backward()
    assert m.aux_loss is not None and m.aux_loss.grad_fn is not None
    for twin in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert twin.aux_loss is None and twin.router_logits is None
        torch.testing.assert_close(twin(x), m(x), rtol=0, atol=0)
