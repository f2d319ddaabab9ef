"""LoRA on mixops.nn.MoE's routed experts (``add_lora``, nn/moe_lora.py) against the plain-PyTorch
layer of moe_reference.py with the adapter term added per expert from the definition
(``W x + scale * B_e A_e x``, moe_reference.lora_mlp): outputs and gradients in fp64 (the base
frozen: no gradient on it; every adapter: one) and bf16 by the tolerance rule; rsLoRA's scale;
dropout; merge / unmerge against PEFT's fold; capacity, zero and shared experts, expert choice,
checkpointing, autocast, torch.compile(fullgraph=True); deepcopy, pickle, state dicts; bad
arguments. Expert parallelism: test_moe_lora_ep.py."""

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import moe_reference as ref
from helpers import assert_close_to_ref
from mixops.nn import MoE

H, FFN, E, T = 16, 12, 4, 21
BASE = dict(hidden_size=H, ffn_size=FFN, num_experts=E, top_k=2)

# (layer options, add_lora options)
CASES = {
    "swiglu-both": ({}, dict(rank=4, alpha=8)),
    "gelu-up-both": (dict(activation="gelu"), dict(rank=3, targets=("up_proj", "down_proj"))),
    "down-only": ({}, dict(rank=2, alpha=3, targets="down_proj")),
    "gate-up-only-rslora": ({}, dict(rank=4, alpha=2, targets=["gate_up_proj"], rslora=True)),
    "k1-rank1": (dict(top_k=1), dict(rank=1, alpha=0.5)),
    "capacity-zero-shared": (
        dict(capacity_factor=0.75, zero_experts=("identity", "null"), shared_ffn_size=8),
        dict(rank=4, alpha=16),
    ),
}


def make(layer_opts, lora_opts, dtype=torch.float64, seed=0):
    """An MoE with adapters whose B is random (a fresh adapter's B is zero, which would leave A
    without gradient and the adapter term without effect)."""
    torch.manual_seed(seed)
    m = MoE(**dict(BASE, **layer_opts), dtype=dtype)
    lora = m.add_lora(**lora_opts)
    m.lora_options = lora_opts  # for the reference's scale
    with torch.no_grad():
        for _, B in lora.pairs().values():
            B.copy_(torch.randn(B.shape, dtype=torch.float64) * 0.5)
    return m


def expected_scale(rank, alpha=None, rslora=False, **_):
    """alpha / r (rsLoRA: alpha / sqrt(r)); alpha defaults to r."""
    alpha = rank if alpha is None else alpha
    return alpha / (math.sqrt(rank) if rslora else rank)


def lora_spec(params, m):
    """The adapters of ``m`` for moe_reference, from the reference's leaf parameters, with the
    scale from the options the test gave add_lora (``m.lora_options``)."""
    scale = expected_scale(**m.lora_options)
    return {
        key: (params[f"experts_lora.{p}_A"], params[f"experts_lora.{p}_B"], scale)
        for key, p in m.experts_lora.prefixes.items()
    }


def selection_logits(m, x, dtype):
    return F.linear(x.detach().to(dtype), m.gate.weight.detach().to(dtype))


def run_ours(m, x, cot):
    x = x.detach().clone().requires_grad_()
    y = m(x)
    y.backward(cot.to(y.dtype))
    grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads


def run_ref(m, x, cot, cfg, dtype, round_to=None):
    params = ref.leaf_params(m, dtype, round_to)
    xr = (x if round_to is None else x.to(round_to)).detach().to(dtype).requires_grad_()
    sel = selection_logits(m, x, m.gate.weight.dtype)
    out = ref.moe_forward(params, xr, cfg, dtype, sel, lora=lora_spec(params, m))
    out.y.backward(cot.to(dtype))
    return out.y.detach(), xr.grad, {n: p.grad for n, p in params.items()}


def grad_close(ours, hi, lo, what):
    """assert_close_to_ref on tensors scaled by the power of two at or above max|hi| (exact in
    every dtype: keeps atol meaningful for gradients summed over tokens; test_moe.py's rule)."""
    top = hi.abs().max().item()
    s = 2.0 ** -max(0, math.ceil(math.log2(top))) if top > 0 else 1.0
    assert_close_to_ref(ours * s, hi * s, lo * s, what)


# ---- outputs and gradients -------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_fp64_outputs_and_gradients(case):
    layer, opts = CASES[case]
    m = make(layer, opts)
    cfg = dict(BASE, **layer)
    x = torch.randn(T, H, dtype=torch.float64)
    cot = torch.randn(T, H, dtype=torch.float64)
    y, gx, grads = run_ours(m, x, cot)
    ry, rgx, rgrads = run_ref(m, x, cot, cfg, torch.float64)
    assert_close_to_ref(y, ry, ry, f"{case}: output")
    assert_close_to_ref(gx, rgx, rgx, f"{case}: grad x")
    lora_names = {f"experts_lora.{n}" for n, _ in m.experts_lora.named_parameters()}
    assert set(grads) == lora_names, f"{case}: gradients on {sorted(grads)}"
    for n in lora_names:
        assert_close_to_ref(grads[n], rgrads[n], rgrads[n], f"{case}: grad {n}")
        assert grads[n].abs().sum() > 0, f"{case}: zero gradient on {n}"
    # the adapter term is really there: the layer without it differs
    with torch.no_grad():
        m.experts_lora.merged = True  # (skips the adapters without folding them)
        assert (m(x) - y).abs().max() > 1e-3
        m.experts_lora.merged = False


@pytest.mark.parametrize("case", ["swiglu-both", "capacity-zero-shared"])
def test_bf16_by_the_tolerance_rule(case):
    layer, opts = CASES[case]
    m = make(layer, opts, dtype=torch.bfloat16)
    cfg = dict(BASE, **layer)
    x = torch.randn(T, H, dtype=torch.float64).to(torch.bfloat16)
    cot = torch.randn(T, H, dtype=torch.float64).to(torch.bfloat16)
    y, gx, grads = run_ours(m, x, cot)
    hy, hgx, hg = run_ref(m, x, cot, cfg, torch.float64)
    ly, lgx, lg = run_ref(m, x, cot, cfg, torch.bfloat16)
    assert_close_to_ref(y, hy, ly, f"{case}: output")
    grad_close(gx, hgx, lgx, f"{case}: grad x")
    for n, g in grads.items():
        grad_close(g, hg[n], lg[n], f"{case}: grad {n}")


def test_autocast_runs_the_adapters_in_the_autocast_dtype():
    """fp32 layer under bf16 autocast: the adapters' math in bf16 like the base GEMMs (judged
    against the bf16-rounded reference), their gradients fp32 (differentiable casts)."""
    layer, opts = CASES["swiglu-both"]
    m = make(layer, opts, dtype=torch.float32)
    x = torch.randn(T, H, dtype=torch.float64).to(torch.bfloat16).float()
    cot = torch.randn(T, H, dtype=torch.float64).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _, grads = run_ours(m, x, cot)
    assert y.dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in grads.values()) and len(grads) == 4
    cfg = dict(BASE, **layer)
    hy, _, _ = run_ref(m, x, cot, cfg, torch.float64, round_to=torch.bfloat16)
    ly, _, _ = run_ref(m, x, cot, cfg, torch.bfloat16, round_to=torch.bfloat16)
    assert_close_to_ref(y, hy, ly, "autocast output")


def test_expert_choice_against_the_folded_weights():
    """Expert choice with adapters equals the paper's layer (moe_reference) on W + scale * B A."""
    torch.manual_seed(0)
    m = MoE(H, FFN, E, router="expert_choice", capacity_factor=1.5, causal=False)
    m = m.double()
    lora = m.add_lora(rank=3, alpha=6)
    with torch.no_grad():
        lora.gate_up_B.normal_()
        lora.down_B.normal_()
    x = torch.randn(T, H, dtype=torch.float64)
    s = lora.scale
    w1 = m.experts.gate_up_proj + s * torch.bmm(lora.gate_up_B, lora.gate_up_A)
    w2 = m.experts.down_proj + s * torch.bmm(lora.down_B, lora.down_A)
    want, _, _ = ref.expert_choice_forward(x, m.gate.weight.detach(), w1, w2, 1.5)
    y = m(x)
    assert_close_to_ref(y, want, want, "expert choice output")
    (y * want.detach()).sum().backward()
    assert lora.down_A.grad.abs().sum() > 0 and m.experts.down_proj.grad is None


# ---- rsLoRA, init, freezing, dropout -------------------------------------------------------


def test_scale_init_and_frozen_base():
    torch.manual_seed(0)
    m = MoE(**BASE, shared_ffn_size=8)
    x = torch.randn(T, H)
    y0 = m(x)
    lora = m.add_lora(rank=4, alpha=8)
    assert lora.scale == 2.0
    assert MoE(**BASE).add_lora(rank=4, alpha=8, rslora=True).scale == 4.0
    assert MoE(**BASE).add_lora(rank=9).scale == 1.0  # alpha defaults to the rank
    assert lora.gate_up_A.shape == (E, 4, H) and lora.gate_up_B.shape == (E, 2 * FFN, 4)
    assert lora.down_A.shape == (E, 4, FFN) and lora.down_B.shape == (E, H, 4)
    # PEFT's init: B zero (the output is unchanged), A ~ U(+-1/sqrt(in)) per expert
    assert torch.equal(m(x), y0)
    assert lora.gate_up_A.abs().max() <= H**-0.5 and lora.gate_up_A.abs().max() > 0.8 * H**-0.5
    assert lora.down_A.abs().max() <= FFN**-0.5
    assert [n for n, p in m.named_parameters() if p.requires_grad] == [
        f"experts_lora.{n}" for n in ("gate_up_A", "gate_up_B", "down_A", "down_B")
    ]
    m.remove_lora()
    assert all(p.requires_grad for p in m.parameters()) and "experts_lora" not in m._modules
    assert m.lora_adapters() == {}
    kept = MoE(**BASE)
    kept.add_lora(rank=2, freeze_base=False)
    assert all(p.requires_grad for p in kept.parameters())


def test_dropout():
    """p=1 drops the whole adapter input in training (the base output), p=0 keeps it; in eval
    no dropout; p in between: a different output in training only."""
    layer, opts = CASES["swiglu-both"]
    x = torch.randn(T, H, dtype=torch.float64)
    full = make(layer, opts)
    y_full = full(x)
    base = copy.deepcopy(full)
    base.remove_lora()
    y_base = base(x)
    for p, train_out in ((1.0, y_base), (0.0, y_full)):
        m = make(layer, dict(opts, dropout=p))
        assert torch.equal(m.train()(x), train_out), f"train, p={p}"
        assert torch.equal(m.eval()(x), y_full), f"eval, p={p}"
    m = make(layer, dict(opts, dropout=0.5))
    assert not torch.allclose(m.train()(x), y_full)
    assert torch.equal(m.eval()(x), y_full)


# ---- merge / unmerge -------------------------------------------------------------------------


def test_merge_unmerge_fp64():
    layer, opts = CASES["capacity-zero-shared"]
    m = make(layer, opts)
    x = torch.randn(T, H, dtype=torch.float64)
    w1, w2 = m.experts.gate_up_proj.detach().clone(), m.experts.down_proj.detach().clone()
    y = m(x)
    m.merge_lora()
    assert m.lora_adapters() == {}  # the adapter path is skipped while merged
    lora = m.experts_lora
    s = lora.scale
    torch.testing.assert_close(
        m.experts.gate_up_proj, w1 + s * torch.bmm(lora.gate_up_B, lora.gate_up_A), rtol=0, atol=0
    )
    assert_close_to_ref(m(x), y, y, "merged output")
    m.merge_lora()  # already merged: nothing happens
    assert_close_to_ref(m(x), y, y, "merged twice")
    m.unmerge_lora()
    assert len(m.lora_adapters()) == 2
    # back up to one fp64 rounding of each sum
    torch.testing.assert_close(m.experts.gate_up_proj, w1, rtol=0, atol=1e-15)
    torch.testing.assert_close(m.experts.down_proj, w2, rtol=0, atol=1e-15)
    assert_close_to_ref(m(x), y, y, "unmerged output")
    m.merge()  # PEFT's names too
    assert m.lora_adapters() == {}
    m.unmerge()
    assert len(m.lora_adapters()) == 2
    torch.testing.assert_close(m.experts.down_proj, w2, rtol=0, atol=1e-15)
    m.merge_lora()
    m.remove_lora()  # unmerges: the base as it was
    torch.testing.assert_close(m.experts.down_proj, w2, rtol=0, atol=1e-15)


def test_merge_bf16_rounds_as_peft():
    """PEFT folds ``(B.float() @ A.float() * scale).to(bf16)`` into the bf16 weight (on CPU) and
    subtracts the same to unmerge: back up to one bf16 rounding of the merged weight."""
    m = make(*CASES["swiglu-both"], dtype=torch.bfloat16)
    lora = m.experts_lora
    w2 = m.experts.down_proj.detach().clone()
    delta = (lora.down_B.float() @ lora.down_A.float() * lora.scale).to(torch.bfloat16).detach()
    m.merge_lora()
    assert torch.equal(m.experts.down_proj, w2 + delta)
    m.unmerge_lora()
    back = m.experts.down_proj.detach().clone()
    assert torch.equal(back, (w2 + delta) - delta)
    assert (back.float() - w2.float()).abs().max() <= 2**-8 * (w2 + delta).float().abs().max()
    m.remove_lora(merge=True)  # PEFT's merge_and_unload
    assert torch.equal(m.experts.down_proj, back + delta) and m.lora_adapters() == {}


# ---- checkpointing, compile, copies, state dicts -------------------------------------------


def test_checkpointing_gives_the_same_outputs_and_gradients():
    """torch.utils.checkpoint around the layer, with dropout (the recomputation replays the
    RNG): bitwise the same output and adapter gradients."""
    layer, opts = CASES["capacity-zero-shared"]
    x = torch.randn(T, H, dtype=torch.float64)
    outs = []
    for ckpt in (False, True):
        m = make(layer, dict(opts, dropout=0.3))
        torch.manual_seed(1)
        y = checkpoint(m, x, use_reentrant=False) if ckpt else m(x)
        y.square().sum().backward()
        outs.append([y.detach()] + [p.grad for p in m.experts_lora.parameters()])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_compile_fullgraph():
    """torch.compile(fullgraph=True, dynamic=True) with adapters and dropout in eval, two token
    counts: the eager outputs and adapter gradients; then merged (a recompile, no graph break)."""
    torch._dynamo.reset()
    layer, opts = CASES["capacity-zero-shared"]
    eager = make(layer, dict(opts, dropout=0.1)).eval()
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True, dynamic=True, backend="aot_eager")
    for n in (T, 30):
        x = torch.randn(n, H, dtype=torch.float64)
        for mod in (eager, twin):
            mod.zero_grad()
        y, yc = eager(x), compiled(x)
        y.sum().backward()
        yc.sum().backward()
        assert_close_to_ref(yc, y, y, f"compiled output, {n} tokens")
        for (name, a), b in zip(
            eager.experts_lora.named_parameters(), twin.experts_lora.parameters()
        ):
            assert_close_to_ref(b.grad, a.grad, a.grad, f"compiled grad {name}")
    twin.train()(x).sum().backward()  # dropout in the graph
    twin.merge_lora()
    eager.merge_lora()
    assert_close_to_ref(compiled.eval()(x), eager(x), eager(x), "compiled, merged")


def test_deepcopy_pickle_and_state_dict():
    layer, opts = CASES["gelu-up-both"]
    m = make(layer, opts)
    x = torch.randn(T, H, dtype=torch.float64)
    y = m(x)
    keys = ["experts_lora.up_A", "experts_lora.up_B", "experts_lora.down_A", "experts_lora.down_B"]
    assert list(m.lora_state_dict()) == keys
    assert list(m.state_dict())[-4:] == keys
    for twin in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert twin.lora_provider.__self__ is twin.experts_lora  # bound to the copy's adapters
        assert torch.equal(twin(x), y)
        with torch.no_grad():
            twin.experts_lora.down_B.zero_()
        assert not torch.equal(twin(x), y) and torch.equal(m(x), y)
    fresh = MoE(**dict(BASE, **layer), dtype=torch.float64)
    fresh.add_lora(**opts)
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh(x), y)
    base_only = MoE(**dict(BASE, **layer), dtype=torch.float64)
    base_only.load_state_dict({k: v for k, v in m.state_dict().items() if k not in keys})
    base_only.add_lora(**opts)
    base_only.load_state_dict(m.lora_state_dict(), strict=False)
    assert torch.equal(base_only(x), y)


# ---- bad arguments ---------------------------------------------------------------------------

BAD = [
    (dict(rank=0), "rank must be an int >= 1, got 0"),
    (dict(rank=2.0), "rank must be an int >= 1, got 2.0"),
    (dict(rank=True), "rank must be an int >= 1, got True"),
    (dict(rank=2, alpha=0), "alpha must be a number > 0"),
    (dict(rank=2, alpha=-1.0), "alpha must be a number > 0"),
    (dict(rank=2, targets=("q_proj",)), "targets must be distinct names among 'gate_up_proj'"),
    (dict(rank=2, targets=("up_proj",)), r"targets .* got \('up_proj',\)"),
    (dict(rank=2, targets=()), "targets must be"),
    (dict(rank=2, targets=("down_proj", "down_proj")), "targets must be distinct"),
    (dict(rank=2, dropout=1.5), r"dropout must be a probability in \[0, 1\], got 1.5"),
    (dict(rank=2, dropout="0.1"), "dropout must be a probability"),
]


@pytest.mark.parametrize("kwargs,match", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_arguments(kwargs, match):
    m = MoE(**BASE)
    with pytest.raises(ValueError, match="MoE.add_lora: " + match):
        m.add_lora(**kwargs)
    assert "experts_lora" not in m._modules and m.lora_adapters() == {}


def test_bad_states():
    m = MoE(**BASE)
    for call in (m.merge_lora, m.unmerge_lora, m.remove_lora, m.lora_state_dict):
        with pytest.raises(RuntimeError, match="has no add_lora adapters"):
            call()
    with pytest.raises(ValueError, match=r"got \('gate_up_proj',\)"):
        MoE(**BASE, activation="relu").add_lora(2, targets=("gate_up_proj",))
    m.add_lora(2)
    with pytest.raises(RuntimeError, match="has adapters already"):
        m.add_lora(2)
    other = MoE(**BASE)
    other.lora_provider = dict  # someone else's provider (PEFT's integration)
    with pytest.raises(RuntimeError, match="lora_provider is set by someone else"):
        other.add_lora(2)
