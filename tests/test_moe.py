"""mixops.nn.MoE against the independent plain-PyTorch layer in moe_reference.py: outputs and
gradients (input and every parameter) over the option grid, DeepSeek-V3 routing, capacity drops,
equivalences that need no oracle, the auxiliary losses (also against HF transformers' Mixtral
loss), the selection-bias update, torch.compile, autocast, bad configurations and static shapes.

Float comparisons all follow helpers.assert_close_to_ref: the module against the reference in
float64 from the same (dtype-rounded) parameters, bounded by twice PyTorch's own error when the
reference runs in the module's dtype; gradients through assert_grad_close, the same rule on
tensors scaled by a power of two to max|ref| <= 1 (see there why). Chosen experts, counts and
drops are exact.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixops
import mixops.nn.moe as moe_mod
import moe_reference as ref
from conftest import DEVICES, requires_cuda
from helpers import assert_close_to_ref
from mixops.nn import MoE

H, FFN, T = 32, 24, 37
BASE = dict(hidden_size=H, ffn_size=FFN, num_experts=8, top_k=2)
G16 = dict(num_experts=16, num_groups=4, groups_kept=2, top_k=4)
DSV3 = dict(
    hidden_size=H,
    ffn_size=FFN,
    num_experts=16,
    top_k=4,
    score_fn="sigmoid",
    selection_bias=True,
    num_groups=4,
    groups_kept=2,
    group_score="top2_sum",
    renormalize=True,
    renorm_eps=1e-20,
    scaling=2.5,
    router_fp32=True,
    shared_ffn_size=48,
)

CASES = {
    "swiglu": {},
    "geglu": dict(activation="geglu"),
    "gelu": dict(activation="gelu"),
    "relu-k1": dict(activation="relu", top_k=1),
    "k4-no-renorm": dict(top_k=4, renormalize=False),
    "k1-renorm": dict(top_k=1),
    "sigmoid-scaled": dict(score_fn="sigmoid", scaling=2.5),
    "sigmoid-no-renorm": dict(score_fn="sigmoid", renormalize=False),
    "topk-then-score": dict(topk_then_score=True, top_k=4),
    "topk-then-score-sigmoid": dict(
        topk_then_score=True, score_fn="sigmoid", renormalize=False, scaling=0.5
    ),
    "bias-softmax": dict(selection_bias=True, scaling=1.5),
    "bias-sigmoid-tts": dict(selection_bias=True, score_fn="sigmoid", topk_then_score=True),
    "groups-top2-bias": dict(
        G16, score_fn="sigmoid", selection_bias=True, renorm_eps=1e-20, scaling=2.5
    ),
    "groups-max": dict(G16, group_score="max"),
    "groups-max-tts-bias": dict(
        G16, group_score="max", topk_then_score=True, selection_bias=True, renormalize=False
    ),
    "shared": dict(shared_ffn_size=40),
    "shared-gate-geglu": dict(shared_ffn_size=40, shared_expert_gate=True, activation="geglu"),
    "shared-gate-gelu": dict(shared_ffn_size=16, shared_expert_gate=True, activation="gelu"),
    "router-fp32": dict(router_fp32=True, score_fn="sigmoid"),
    "fine-e256-k8": dict(num_experts=256, top_k=8, ffn_size=8),
}


# ---- helpers --------------------------------------------------------------------------------


def make_moe(cfg, dtype=torch.float32, device="cpu", bias=None):
    """An MoE with random parameters; with a selection bias, a random one with negative entries
    (or ``bias``)."""
    m = MoE(**cfg, dtype=dtype, device=device)
    if m.selection_bias:
        E = cfg["num_experts"]
        b = (torch.rand(E) - 0.5) * 0.3 if bias is None else bias
        with torch.no_grad():
            m.gate.e_score_correction_bias.copy_(b)
    return m


def selection_logits(m, x, cfg, dtype=None):
    """The logits the module chooses from, as plain PyTorch computes them in the module's dtype
    (``dtype``: the autocast dtype)."""
    x2 = x.detach().reshape(-1, cfg["hidden_size"]).cpu()
    w = m.gate.weight.detach().cpu()
    if dtype is not None:
        x2, w = x2.to(dtype), w.to(dtype)
    if cfg.get("router_fp32"):
        return F.linear(x2.float(), w.float())
    return F.linear(x2, w)


def module_bias(m):
    return m.gate.e_score_correction_bias.detach().cpu() if m.selection_bias else None


def run_ours(m, x, cot, token_mask=None):
    """Forward, then backward of ``<y, cot> + aux_loss``; returns (y, aux, x.grad)."""
    x = x.detach().clone().requires_grad_()
    m.zero_grad(set_to_none=True)
    y = m(x, token_mask=token_mask)
    outs, grads = [y], [cot.to(y.device, y.dtype)]
    if m.aux_loss is not None:
        outs.append(m.aux_loss)
        grads.append(torch.ones_like(m.aux_loss))
    torch.autograd.backward(outs, grads)
    return y.detach(), (None if m.aux_loss is None else m.aux_loss.detach()), x.grad


def run_ref(m, x, cot, cfg, dtype, round_to=None, token_mask=None, sel_dtype=None):
    """The reference in ``dtype`` from the module's parameters (rounded to ``round_to`` first),
    with the same backward; returns (RefOut, params with .grad, x.grad)."""
    params = ref.leaf_params(m, dtype, round_to)
    xr = x.detach().cpu()
    if round_to is not None:
        xr = xr.to(round_to)
    xr = xr.to(dtype).requires_grad_()
    sel = selection_logits(m, x, cfg, sel_dtype)
    out = ref.moe_forward(params, xr, cfg, dtype, sel, module_bias(m), token_mask)
    outs, grads = [out.y], [cot.cpu().to(dtype)]
    if out.aux_loss is not None:
        outs.append(out.aux_loss)
        grads.append(torch.ones_like(out.aux_loss))
    torch.autograd.backward(outs, grads)
    return out, params, xr.grad


def check_module(m, x, cfg, token_mask=None, what=""):
    """Outputs, aux loss and every gradient of ``m`` against the reference (float64 from the same
    parameters, and PyTorch in the module's dtype)."""
    dtype = m.gate.weight.dtype
    cot = torch.randn(x.shape, dtype=torch.float64).to(dtype)
    y, aux, gx = run_ours(m, x, cot, token_mask)
    hi, hi_p, hi_gx = run_ref(m, x, cot, cfg, torch.float64, token_mask=token_mask)
    lo, lo_p, lo_gx = run_ref(m, x, cot, cfg, dtype, token_mask=token_mask)
    assert_close_to_ref(y, hi.y, lo.y, f"{what}: output")
    if aux is not None:
        assert_close_to_ref(aux, hi.aux_loss, lo.aux_loss.float(), f"{what}: aux_loss")
    assert_grad_close(gx, hi_gx, lo_gx, f"{what}: grad x")
    for name, p in m.named_parameters():
        assert p.grad is not None, f"{what}: no gradient for {name}"
        assert_grad_close(p.grad, hi_p[name].grad, lo_p[name].grad, f"{what}: grad {name}")
    return hi


def assert_grad_close(ours, ref_hi, torch_lowp, what=""):
    """helpers.assert_close_to_ref on the three tensors divided by 2^e, the power of two at or above
    max|ref_hi| (when that is > 1). The division is exact in every dtype, so the rule is unchanged
    except that its atol, meant for O(1) values, scales with the tensor: weight gradients sum over
    tokens and reach ~20, where one bf16 ulp (0.125) is far above atol (1e-2) and a single
    correctly-rounded-but-other-side element would fail whenever PyTorch's own largest error
    happens to sit at a smaller element."""
    top = ref_hi.detach().abs().max().item() if ref_hi.numel() else 0.0
    s = 2.0 ** -max(0, math.ceil(math.log2(top))) if top > 0 else 1.0
    assert_close_to_ref(ours * s, ref_hi * s, torch_lowp * s, what)


def input_of(lead, dtype=torch.float32, device="cpu"):
    """Random input [*lead, H] (drawn in float64, then rounded to dtype)."""
    return torch.randn(*lead, H, dtype=torch.float64).to(dtype).to(device)


class Recorder:
    """Wraps a function of mixops.nn.moe (router_topk / permute) to keep what it returned."""

    def __init__(self, monkeypatch, name):
        self.calls = []
        fn = getattr(moe_mod, name)

        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            self.calls.append(out)
            return out

        monkeypatch.setattr(moe_mod, name, wrapped)


# ---- 1. the option grid ----------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(3, 13), (T,)], ids=["BSH", "TH"])
@pytest.mark.parametrize("case", list(CASES))
def test_against_reference(device, dtype, shape, case):
    cfg = dict(BASE, **CASES[case])
    m = make_moe(cfg, dtype, device)
    check_module(m, input_of(shape, dtype, device), cfg, what=f"{case}/{dtype}")


@pytest.mark.parametrize("case", ["swiglu", "groups-top2-bias", "shared-gate-gelu"])
def test_against_reference_fp64(case):
    cfg = dict(BASE, **CASES[case])
    m = make_moe(cfg, torch.float64)
    check_module(m, input_of((T,), torch.float64), cfg, what=f"{case}/fp64")


def test_gradcheck_fp64():
    """Finite differences on a tiny float64 layer (router, experts, shared experts and gate,
    aux + z losses), through torch.func.functional_call."""
    cfg = dict(
        hidden_size=6,
        ffn_size=5,
        num_experts=4,
        top_k=2,
        shared_ffn_size=3,
        shared_expert_gate=True,
        aux_loss_coef=0.1,
        z_loss_coef=0.01,
        scaling=1.5,
    )
    m = make_moe(cfg, torch.float64)
    names = [n for n, _ in m.named_parameters()]
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        y = torch.func.functional_call(m, dict(zip(names, ps)), (x,))
        return y, m.aux_loss

    params = [p.detach().clone().requires_grad_() for p in m.parameters()]
    assert torch.autograd.gradcheck(f, (x, *params))


# ---- 2. DeepSeek-V3 routing ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deepseek_v3_routing(monkeypatch, dtype):
    E = DSV3["num_experts"]
    bias = -torch.rand(E) * 0.3  # all <= 0
    bias[4:8] = -10.0  # group 1 can never be among the kept groups
    m = make_moe(DSV3, dtype, bias=bias)
    x = input_of((2, 20), dtype)
    rec = Recorder(monkeypatch, "router_topk")
    hi = check_module(m, x, DSV3, what=f"dsv3/{dtype}")
    ids = rec.calls[0].ids.long()
    assert torch.equal(ids.sort(1).values, hi.ids.sort(1).values), "chosen experts differ"
    assert torch.equal(ids, hi.ids), "choice order (best first) differs"
    assert not ((ids >= 4) & (ids < 8)).any(), "an expert of a masked group was chosen"
    # every token's experts lie in at most groups_kept groups
    assert ((ids // 4).sort(1).values.diff(dim=1) != 0).sum(1).max() <= 1

    # the weights ignore the bias: renormalised sigmoids of the chosen logits, times 2.5
    def weights(dtype):
        sig = torch.sigmoid(selection_logits(m, x, DSV3).to(dtype)).gather(1, ids)
        return 2.5 * sig / (sig.sum(1, keepdim=True) + 1e-20)

    assert_close_to_ref(
        rec.calls[0].weights, weights(torch.float64), weights(torch.float32), "dsv3 weights"
    )


# ---- 3. capacity ------------------------------------------------------------------------------


@pytest.mark.parametrize("cf", [0.5, 1.0, 1.25])
@pytest.mark.parametrize("variant", ["softmax-k2", "sigmoid-k4-shared"])
def test_capacity_against_reference(monkeypatch, cf, variant):
    extra = (
        dict(top_k=2)
        if variant == "softmax-k2"
        else dict(top_k=4, score_fn="sigmoid", shared_ffn_size=16, selection_bias=True)
    )
    cfg = dict(BASE, capacity_factor=cf, **extra)
    m = make_moe(cfg)
    with torch.no_grad():  # make expert 0 popular, so drops happen at every factor
        m.gate.weight[0] += 0.3
    x = input_of((T,)) + 0.3
    rec = Recorder(monkeypatch, "permute")
    hi = check_module(m, x, cfg, what=f"capacity {cf}")
    E, k = cfg["num_experts"], cfg["top_k"]
    capacity = math.ceil(cf * T * k / E)
    assert ref.capacity_of(cfg, T) == capacity
    drops = torch.bincount(hi.ids[~hi.keep], minlength=E)
    assert drops.sum() > 0, "the test should drop slots"
    p = rec.calls[0]
    assert torch.equal(p.dropped.long(), drops), "dropped per expert"
    assert p.x_sorted.shape[0] == min(T * k, E * capacity)


@pytest.mark.parametrize("huge", [False, True], ids=["cf=E", "cf=1e30"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dropless_equals_capacity_that_drops_nothing(monkeypatch, dtype, huge):
    # 1e30 * T * k / E is far past int64: the layer caps the capacity at T * k (drops nothing).
    cfg = dict(BASE, shared_ffn_size=16, aux_loss_coef=0.01)
    m = make_moe(cfg, dtype)
    cf = 1e30 if huge else float(cfg["num_experts"])
    big = make_moe(dict(cfg, capacity_factor=cf), dtype)
    big.load_state_dict(m.state_dict())
    x = input_of((3, 13), dtype)
    cot = torch.randn(x.shape).to(dtype)
    rec = Recorder(monkeypatch, "permute")
    a, b = run_ours(m, x, cot), run_ours(big, x, cot)
    assert rec.calls[1].dropped.sum() == 0 and rec.calls[1].x_sorted.shape[0] == 39 * 2
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    for (n, p), q in zip(m.named_parameters(), big.parameters()):
        assert torch.equal(p.grad, q.grad), n


# ---- 4. equivalences -------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_identical_experts_all_chosen_equal_one_mlp(activation):
    E = 4
    m = MoE(H, FFN, E, E, activation=activation, renormalize=True)
    with torch.no_grad():
        for w in (
            m.experts.gate_up_proj if activation == "swiglu" else m.experts.up_proj,
            m.experts.down_proj,
        ):
            w.copy_(w[:1].expand_as(w))
    x = input_of((T,)).requires_grad_()
    y = m(x)
    gy = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, gy)

    def one(dtype):
        xd = x.detach().to(dtype).requires_grad_()
        if activation == "swiglu":
            w1 = m.experts.gate_up_proj[0].detach().to(dtype)
            out = ref.mlp(
                xd, w1[:FFN], w1[FFN:], m.experts.down_proj[0].detach().to(dtype), activation
            )
        else:
            out = ref.mlp(
                xd,
                None,
                m.experts.up_proj[0].detach().to(dtype),
                m.experts.down_proj[0].detach().to(dtype),
                activation,
            )
        return out.detach(), torch.autograd.grad(out, xd, gy.to(dtype))[0]

    hi, lo = one(torch.float64), one(torch.float32)
    assert_close_to_ref(y.detach(), hi[0], lo[0], "identical experts: output")
    assert_grad_close(gx, hi[1], lo[1], "identical experts: grad x")


@pytest.mark.parametrize("gate", [False, True])
def test_zero_routed_experts_leave_the_shared_mlp(gate):
    m = MoE(H, FFN, 8, 2, shared_ffn_size=40, shared_expert_gate=gate)
    with torch.no_grad():
        m.experts.down_proj.zero_()
    x = input_of((3, 13))
    y = m(x)
    s = m.shared_experts

    def dense(dtype):
        xd = x.to(dtype)
        w = {
            n: getattr(s, n).weight.detach().to(dtype)
            for n in ("gate_proj", "up_proj", "down_proj")
        }
        out = ref.mlp(xd, w["gate_proj"], w["up_proj"], w["down_proj"], "swiglu")
        if gate:
            out = torch.sigmoid(xd @ m.shared_expert_gate.weight.detach().to(dtype).T) * out
        return out

    assert_close_to_ref(y.detach(), dense(torch.float64), dense(torch.float32), "shared only")
    plain = mixops.nn.MLP(H, 40)
    plain.load_state_dict(s.state_dict())
    if not gate:
        assert torch.equal(y, plain(x)), "routed experts with zero weights must add exactly 0"


# ---- 5. auxiliary losses ---------------------------------------------------------------------

AUX_CASES = {
    "mixtral": dict(BASE, aux_loss_coef=0.02),
    "softmax-z": dict(BASE, aux_loss_coef=0.01, z_loss_coef=0.001, top_k=1),
    "z-only": dict(BASE, z_loss_coef=0.003),
    "sigmoid-groups-bias": dict(DSV3, aux_loss_coef=0.01, z_loss_coef=0.001),
    "topk-then-score": dict(BASE, aux_loss_coef=0.01, topk_then_score=True, top_k=3),
}


def padding_mask(B=3, S=13):
    lengths = torch.tensor([S, S - 4, 5])
    return torch.arange(S)[None, :] < lengths[:, None]  # [B, S] bool


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("case", list(AUX_CASES))
def test_aux_loss_against_formula(case, masked):
    cfg = AUX_CASES[case]
    m = make_moe(cfg)
    x = input_of((3, 13))
    mask = padding_mask() if masked else None
    m(x, token_mask=mask)
    aux = m.aux_loss
    assert aux.dim() == 0 and aux.dtype == torch.float32 and aux.requires_grad
    params = {n: ref.leaf_params(m, d) for n, d in (("hi", torch.float64), ("lo", torch.float32))}
    sel = selection_logits(m, x, cfg)
    outs = {
        n: ref.moe_forward(
            p,
            x.double() if n == "hi" else x,
            cfg,
            p["gate.weight"].dtype,
            sel,
            module_bias(m),
            mask,
        )
        for n, p in params.items()
    }
    assert_close_to_ref(aux.detach(), outs["hi"].aux_loss, outs["lo"].aux_loss, f"{case}: aux")
    # the loss's gradient alone, w.r.t. the router weight
    (g,) = torch.autograd.grad(aux, m.gate.weight)
    for n in outs:
        outs[n].aux_loss.backward()
    assert_grad_close(
        g,
        params["hi"]["gate.weight"].grad,
        params["lo"]["gate.weight"].grad,
        f"{case}: d aux / d gate.weight",
    )
    if masked:  # padding tokens change nothing in the loss
        m2 = make_moe(cfg)
        m2.load_state_dict(m.state_dict())
        xp = x.clone()
        xp[~mask] = torch.randn(int((~mask).sum()), H)
        m2(xp, token_mask=mask)
        assert_close_to_ref(
            m2.aux_loss.detach(),
            outs["hi"].aux_loss,
            outs["lo"].aux_loss,
            f"{case}: aux with other padding",
        )


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_aux_loss_equals_transformers_mixtral(masked):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    cfg = AUX_CASES["mixtral"]
    coef, E, k = cfg["aux_loss_coef"], cfg["num_experts"], cfg["top_k"]
    m = make_moe(cfg)
    x = input_of((3, 13))
    mask = padding_mask() if masked else None
    m(x, token_mask=mask)
    logits = selection_logits(m, x, cfg)
    hf = load_balancing_loss_func((logits,), E, k, None if mask is None else mask.long())
    p = ref.leaf_params(m, torch.float64)
    hi = ref.moe_forward(p, x.double(), cfg, torch.float64, logits, None, mask)
    assert_close_to_ref(m.aux_loss.detach(), hi.aux_loss, (coef * hf).float(), "vs transformers")


def test_no_aux_loss_by_default():
    m = make_moe(BASE)
    m(input_of((T,)))
    assert m.aux_loss is None


# ---- 6. selection-bias updates ---------------------------------------------------------------


def test_update_bias_rule():
    cfg = dict(BASE, score_fn="sigmoid", selection_bias=True, top_k=3)
    m = make_moe(cfg).train()
    E = cfg["num_experts"]
    before = m.gate.e_score_correction_bias.clone()
    load = torch.zeros(E, dtype=torch.int64)
    for step, n in enumerate((T, 20, 3 * 13)):
        x = input_of((n,))
        mask = (torch.rand(n) > 0.3) if step == 1 else None
        m(x, token_mask=mask)
        ids = ref.select_experts(selection_logits(m, x, cfg), cfg, before)
        valid = torch.ones(n, dtype=torch.bool) if mask is None else mask
        load += torch.bincount(ids[valid].reshape(-1), minlength=E)
        assert torch.equal(m.tokens_per_expert.cpu(), load), f"counts after forward {step}"
    assert torch.equal(m.gate.e_score_correction_bias, before), "forwards must not move the bias"
    rate = 1e-3
    used = m.update_bias(rate)
    assert torch.equal(used, load.float())
    lf = load.float()
    expected = before + rate * torch.sign(lf.mean() - lf)
    assert torch.equal(m.gate.e_score_correction_bias, expected)
    assert not torch.equal(expected, before)
    assert torch.equal(m.tokens_per_expert, torch.zeros(E, dtype=torch.int64)), "count reset"

    m.eval()
    m(input_of((T,)))
    assert not m.tokens_per_expert.any(), "eval forwards must not count"
    with torch.no_grad():
        m.train()(input_of((T,)))
    assert m.tokens_per_expert.sum() == T * cfg["top_k"], "training forwards count under no_grad"


def test_bias_stays_fp32_after_module_to_bf16():
    # Were the bias cast with the module, a 1e-3 step would be below half a bf16 ulp for
    # |bias| >= 0.25 and be lost.
    m = make_moe(dict(BASE, selection_bias=True), bias=torch.full((8,), 0.6)).to(torch.bfloat16)
    m.train()(input_of((T,), torch.bfloat16))
    before = m.gate.e_score_correction_bias.clone()
    m.update_bias(1e-3)
    assert m.gate.e_score_correction_bias.dtype == torch.float32
    assert not torch.equal(m.gate.e_score_correction_bias, before)


def test_update_bias_needs_a_bias():
    m = make_moe(BASE)
    with pytest.raises(RuntimeError, match="no selection bias"):
        m.update_bias(1e-3)


def test_state_dict_keys():
    m = make_moe(dict(BASE, selection_bias=True, shared_ffn_size=16, shared_expert_gate=True))
    sd = m.state_dict()
    assert "gate.e_score_correction_bias" in sd
    assert sd["gate.e_score_correction_bias"].dtype == torch.float32
    assert not any("tokens_per_expert" in key for key in sd)
    assert set(sd) == {
        "gate.weight",
        "gate.e_score_correction_bias",
        "experts.gate_up_proj",
        "experts.down_proj",
        "shared_experts.gate_proj.weight",
        "shared_experts.up_proj.weight",
        "shared_experts.down_proj.weight",
        "shared_expert_gate.weight",
    }
    m2 = make_moe(dict(BASE, selection_bias=True, shared_ffn_size=16, shared_expert_gate=True))
    m2.load_state_dict(sd)
    assert torch.equal(m2.gate.e_score_correction_bias, m.gate.e_score_correction_bias)
    assert not any("e_score" in key for key in make_moe(BASE).state_dict())


# ---- 7. torch.compile ------------------------------------------------------------------------


class Block(nn.Module):
    """Linear -> MoE (-> more MoEs) -> Linear; returns (y, summed aux loss) when there is one."""

    def __init__(self, *layers):
        super().__init__()
        self.inp = nn.Linear(H, H)
        self.moes = nn.ModuleList([MoE(**dict(BASE, **kw)) for kw in (layers or [{}])])
        self.out = nn.Linear(H, H)

    def forward(self, x):
        h = self.inp(x)
        aux = None
        for moe in self.moes:
            h = moe(h)
            if moe.aux_loss is not None:
                aux = moe.aux_loss if aux is None else aux + moe.aux_loss
        y = self.out(h)
        return y if aux is None else (y, aux)


def run_block(mod, x):
    """Forward and backward of a Block; returns [y, (aux), x.grad, param grads...]."""
    x = x.detach().clone().requires_grad_()
    mod.zero_grad(set_to_none=True)
    out = mod(x)
    y, aux = out if isinstance(out, tuple) else (out, None)
    loss = (y * torch.linspace(-1, 1, y.numel()).to(y).view_as(y)).sum()
    (loss + (0 if aux is None else aux)).backward()
    return (
        [y.detach()]
        + ([] if aux is None else [aux.detach()])
        + [x.grad]
        + [p.grad for p in mod.parameters()]
    )


def test_compile_matches_eager():
    """Inductor, fullgraph, dynamic shapes, training mode, two token counts, through a plain
    dropless MoE and one with aux + z losses, capacity, shared experts and a selection bias (one
    compiled graph for both keeps this test's compile time down). The reference is the eager Block
    in float64, PyTorch's own error the eager Block in float32."""
    layers = [
        dict(),
        dict(
            aux_loss_coef=0.01,
            z_loss_coef=1e-3,
            capacity_factor=1.0,
            shared_ffn_size=16,
            selection_bias=True,
            score_fn="sigmoid",
        ),
    ]
    torch._dynamo.reset()
    eager = Block(*layers)
    hi64 = Block(*layers).double()
    hi64.load_state_dict(eager.state_dict())
    twin = Block(*layers)
    twin.load_state_dict(eager.state_dict())
    compiled = torch.compile(twin, fullgraph=True, dynamic=True)
    for n in (T, 50):
        x = input_of((n,))
        ours, lo, hi = run_block(compiled, x), run_block(eager, x), run_block(hi64, x.double())
        assert len(ours) == len(lo) == len(hi) == 3 + len(list(eager.parameters()))
        for i, (a, b, c) in enumerate(zip(ours, lo, hi)):
            check = assert_close_to_ref if i < 2 else assert_grad_close
            check(a, c, b, f"compiled vs eager, tokens {n}, tensor {i}")
        # the plain layer's output really flows through (its gradient is not zero)
        assert eager.moes[0].experts.down_proj.grad.abs().sum() > 0
    assert torch.equal(twin.moes[1].tokens_per_expert, eager.moes[1].tokens_per_expert)
    assert twin.moes[1].tokens_per_expert.sum() == (T + 50) * BASE["top_k"]


@pytest.mark.parametrize(
    "train,cf",
    [
        (False, None),
        (False, 1.0),
        (True, None),
        (True, 1.25),
    ],
    ids=["inference", "inference-capacity", "training", "training-capacity"],
)
def test_compile_one_graph_for_all_token_counts(train, cf):
    """dynamic=True should give one graph for any token count (aot_eager: the same tracing as
    inductor without its code generation, so the check is cheap)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    block = Block(dict(capacity_factor=cf)).train(train)
    compiled = torch.compile(block, fullgraph=True, dynamic=True, backend="aot_eager")
    for n in (T, 50, 61):
        x = input_of((n,)).requires_grad_(train)
        with torch.set_grad_enabled(train):
            y = compiled(x)
            if train:
                y.sum().backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


# ---- 8. autocast -----------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["swiglu", "shared-gate-geglu", "router-fp32", "groups-top2-bias"])
def test_autocast_bf16(case):
    cfg = dict(BASE, **CASES[case])
    m = make_moe(cfg)
    x = input_of((3, 13))
    cot = torch.randn(x.shape).to(torch.bfloat16)
    xg = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(xg)
    assert y.dtype == torch.bfloat16
    y.backward(cot)
    assert xg.grad.dtype == torch.float32
    hi, hi_p, hi_gx = run_ref(
        m, x, cot, cfg, torch.float64, round_to=torch.bfloat16, sel_dtype=torch.bfloat16
    )
    lo, lo_p, lo_gx = run_ref(
        m, x, cot, cfg, torch.bfloat16, round_to=torch.bfloat16, sel_dtype=torch.bfloat16
    )
    assert_close_to_ref(y.detach(), hi.y, lo.y, f"autocast {case}: output")
    assert_grad_close(xg.grad, hi_gx, lo_gx.float(), f"autocast {case}: grad x")
    for name, p in m.named_parameters():
        assert p.grad.dtype == torch.float32, name
        assert_grad_close(
            p.grad, hi_p[name].grad, lo_p[name].grad.float(), f"autocast {case}: grad {name}"
        )


# ---- edge cases -----------------------------------------------------------------------------


@pytest.mark.parametrize("cf", [None, 1.0])
def test_zero_tokens(cf):
    m = make_moe(
        dict(BASE, capacity_factor=cf, aux_loss_coef=0.01, z_loss_coef=0.01, shared_ffn_size=16)
    )
    x = torch.randn(0, H, requires_grad=True)
    y = m(x)
    assert y.shape == (0, H)
    assert m.aux_loss.item() == 0.0
    (y.sum() + m.aux_loss).backward()
    assert x.grad.shape == (0, H)
    assert all(p.grad is not None and not p.grad.any() for p in m.parameters())


def test_strided_input_and_single_token():
    cfg = dict(BASE, shared_ffn_size=16)
    m = make_moe(cfg)
    wide = input_of((T,)).repeat(1, 2)[:, ::2]  # row stride 2H
    assert not wide.is_contiguous()
    assert torch.equal(m(wide), m(wide.contiguous()))
    one = input_of(())  # [H]: one token
    assert m(one).shape == (H,)
    check_module(m, one, cfg, what="single token")


# ---- 9. bad configurations -------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(top_k=9), r"top_k \(9\)"),
        (dict(num_experts=16, num_groups=4, groups_kept=1, top_k=5), r"top_k \(5\)"),
        (dict(num_groups=3), r"num_groups \(3\) must divide num_experts \(8\)"),
        (dict(num_groups=4, groups_kept=5), r"groups_kept \(5\) must be <= num_groups \(4\)"),
        (dict(activation="swish"), "unknown activation 'swish'"),
        (dict(capacity_factor=0), "capacity_factor"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(capacity_factor=-1), "capacity_factor"),
        (dict(capacity_factor=float("nan")), "capacity_factor"),
        (dict(capacity_factor=float("inf")), "capacity_factor"),
        (dict(score_fn="softplus"), "score_fn"),
        (dict(group_score="mean", num_groups=2), "group_score"),
        (dict(shared_expert_gate=True), "shared_expert_gate needs shared experts"),
        (dict(top_k=0), "top_k must be a positive int"),
    ],
    ids=str,
)
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        MoE(**dict(BASE, **kw))


def test_wrong_hidden_size():
    m = make_moe(BASE)
    with pytest.raises(ValueError, match="hidden size 32"):
        m(torch.randn(5, H + 1))
    with pytest.raises(ValueError, match="hidden size 32"):
        m(torch.randn(2, 3, H - 1))


# ---- 10. static shapes, no host sync ---------------------------------------------------------


@pytest.mark.parametrize("cf", [None, 1.0])
def test_shapes_do_not_depend_on_routing(monkeypatch, cf):
    cfg = dict(BASE, capacity_factor=cf)
    m = make_moe(cfg)
    rec = Recorder(monkeypatch, "permute")
    x = input_of((3, 13)).abs()
    y_spread = m(x)
    with torch.no_grad():  # every token's first choice: expert 5
        m.gate.weight.zero_()
        m.gate.weight[5] = 1e3
    y_one = m(x)
    assert y_spread.shape == y_one.shape == x.shape
    a, b = rec.calls
    assert a.x_sorted.shape == b.x_sorted.shape
    assert a.offsets.shape == b.offsets.shape and a.row_map.shape == b.row_map.shape
    assert int(b.offsets[5] - b.offsets[4]) == (
        x.shape[0] * x.shape[1] if cf is None else math.ceil(cf * 39 * 2 / 8)
    )


@requires_cuda
def test_no_host_sync_cuda():
    m = make_moe(
        dict(
            BASE, aux_loss_coef=0.01, capacity_factor=1.25, shared_ffn_size=16, selection_bias=True
        ),
        device="cuda",
    ).train()
    x = input_of((T,), device="cuda").requires_grad_()
    m(x)  # warm up (lazy init may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = m(x)
        (y.sum() + m.aux_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_a_trained_layer_deep_copies_and_pickles():
    """After a training forward ``aux_loss`` holds a graph (not state): copy.deepcopy (an EMA
    model, a teacher) and pickle leave it out and copy the parameters."""
    import copy
    import pickle

    torch.manual_seed(0)
    moe = MoE(16, 24, 8, 2, aux_loss_coef=0.01, z_loss_coef=0.001, dtype=torch.float64)
    x = torch.randn(6, 16, dtype=torch.float64)
    moe(x).sum().backward()
    assert moe.aux_loss is not None and moe.aux_loss.grad_fn is not None
    for twin in (copy.deepcopy(moe), pickle.loads(pickle.dumps(moe))):
        assert twin.aux_loss is None
        assert twin.experts.down_proj is not moe.experts.down_proj
        torch.testing.assert_close(twin(x), moe(x), rtol=0, atol=0)
    assert moe.aux_loss is not None  # the original keeps its own
