"""mixops.nn.LoRAMoE (a mixture of LoRA experts around a frozen nn.Linear) against a per-expert
PyTorch loop written from the definitions (outputs, losses and gradients in fp64; bf16 and
autocast by the tolerance rule), the router options, the shared adapter, torch.compile, copies,
state dicts and bad arguments. HF decoders (add_lora_moe): test_lora_moe_hf.py."""

import copy
import dataclasses
import io

import pytest
import torch
from torch import nn

from helpers import assert_close_to_ref
from mixops.nn import LoRAMoE, RouterConfig
from mixops.nn.lora_moe import lora_moe_aux_loss
from moe_reference import aux_losses, expert_weights, full_config, select_experts
from test_moe import assert_grad_close

IN, OUT, RANK = 13, 11, 4
LOSSES = dict(aux_loss_coef=0.01, z_loss_coef=1e-3)
CASES = {
    "softmax": dict(num_experts=4, top_k=2),
    "softmax-no-renorm": dict(num_experts=4, top_k=2, renormalize=False),
    "sigmoid-masked": dict(num_experts=4, top_k=2, score_fn="sigmoid", masked=True),
    "sigmoid-no-renorm-scaling": dict(
        num_experts=5, top_k=2, score_fn="sigmoid", renormalize=False, scaling=2.5
    ),
    "topk-then-score": dict(num_experts=4, top_k=2, topk_then_score=True),
    "k-equals-E": dict(num_experts=3, top_k=3),
    "one-expert": dict(num_experts=1, top_k=1),
    "groups-selection-bias": dict(
        num_experts=6,
        top_k=2,
        num_groups=3,
        groups_kept=2,
        selection_bias=True,
        score_fn="sigmoid",
        group_score="max",
    ),  # fmt: skip
    "shared-rslora-no-bias": dict(
        num_experts=4, top_k=2, shared_adapter=3, use_rslora=True, rank=5, base_bias=False
    ),
    "shared-eps-top1": dict(num_experts=4, top_k=1, shared_adapter=True, renorm_eps=0.1),
}


def make(case, dtype=torch.float64, adapter_dtype=None, **extra):
    """A LoRAMoE on a random Linear with random (non-zero) B and selection bias."""
    kw = {k: v for k, v in CASES[case].items() if k not in ("masked", "base_bias")}
    kw = {**LOSSES, "rank": RANK, **kw, **extra}
    base = nn.Linear(IN, OUT, bias=CASES[case].get("base_bias", True)).to(dtype)
    m = LoRAMoE(base, dtype=adapter_dtype, **kw)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape) * 0.5)
        if m.selection_bias:
            m.gate.e_score_correction_bias.copy_(torch.randn(m.num_experts) * 0.1)
    return m


def mask_for(case, lead):
    if not CASES[case].get("masked"):
        return None
    mask = torch.ones(lead, dtype=torch.bool)
    mask.view(-1)[::3] = False
    return mask


def reference(m, x, dtype, sel_logits, token_mask=None, round_to=None):
    """The layer from its definition in ``dtype``: base + a dense loop over the experts, each
    adding ``w_e * scale * B_e A_e x`` to the tokens that chose it (+ the shared adapter), and the
    weighted losses. Returns (y, aux_loss, params with grads, x leaf)."""
    cfg = full_config(**dataclasses.asdict(m.router_config))

    def leaf(t, grad):
        t = t.detach() if round_to is None else t.detach().to(round_to)
        return t.to(dtype).requires_grad_(grad)

    P = {n: leaf(p, n not in ("weight", "bias")) for n, p in m.named_parameters()}
    xr = leaf(x, True)
    x2 = xr.reshape(-1, IN)
    y = x2 @ P["weight"].T + (P["bias"] if "bias" in P else 0)
    logits = x2 @ P["gate.weight"].T
    sel_bias = m.gate.e_score_correction_bias if m.selection_bias else None
    ids = select_experts(sel_logits.reshape(-1, m.num_experts), cfg, bias=sel_bias)
    w = expert_weights(logits, ids, cfg)
    for e in range(m.num_experts):
        w_e = (w * (ids == e)).sum(-1, keepdim=True)
        y = y + w_e * (m.scale * (x2 @ P["lora_A"][e].T) @ P["lora_B"][e].T)
    if m.shared_rank:
        y = y + m.shared_scale * (x2 @ P["shared_lora_A"].T) @ P["shared_lora_B"].T
    balance, z = aux_losses(logits, ids, cfg, token_mask)
    aux = m.aux_loss_coef * balance + m.z_loss_coef * z
    return y.reshape(*x.shape[:-1], OUT), aux, P, xr


def selection_logits(m, x, dtype=None):
    """The logits the layer chooses from: its router on x in the adapter path's dtype."""
    with torch.no_grad():
        return m.gate(x.reshape(-1, IN).to(dtype or m.lora_A.dtype))


def run(m, x, cot, token_mask=None):
    xg = x.clone().requires_grad_()
    y = m(xg, token_mask=token_mask)
    (y * cot).sum().add(m.aux_loss).backward()
    return y, xg


@pytest.mark.parametrize("case", list(CASES))
def test_against_reference_fp64(case):
    m = make(case)
    x = torch.randn(3, 7, IN, dtype=torch.float64)
    cot = torch.randn(3, 7, OUT, dtype=torch.float64)
    mask = mask_for(case, (3, 7))
    y, xg = run(m, x, cot, mask)
    ry, raux, P, rx = reference(m, x, torch.float64, selection_logits(m, x), mask)
    (ry * cot).sum().add(raux).backward()
    assert_close_to_ref(y.detach(), ry, ry, f"{case}: output")
    assert_close_to_ref(m.aux_loss.detach().double(), raux, raux, f"{case}: aux + z loss")
    assert_close_to_ref(xg.grad, rx.grad, rx.grad, f"{case}: grad x")
    for n, p in m.named_parameters():
        if n in ("weight", "bias"):
            assert p.grad is None and not p.requires_grad, f"{case}: the base {n} is frozen"
        else:
            assert_close_to_ref(p.grad, P[n].grad, P[n].grad, f"{case}: grad {n}")
    assert m.gate.weight.grad.abs().sum() > 0 and m.lora_A.grad.abs().sum() > 0


@pytest.mark.parametrize("case", ["softmax", "groups-selection-bias", "shared-rslora-no-bias"])
def test_bf16_by_the_tolerance_rule(case):
    m = make(case, torch.bfloat16)
    x = torch.randn(4, 9, IN).to(torch.bfloat16)
    cot = torch.randn(4, 9, OUT).to(torch.bfloat16)
    y, xg = run(m, x, cot)
    sel = selection_logits(m, x)
    outs = {}
    for dt in (torch.float64, torch.bfloat16):
        ry, raux, P, rx = reference(m, x, dt, sel)
        (ry * cot.to(dt)).sum().add(raux).backward()
        outs[dt] = (ry.detach(), raux.detach(), P, rx)
    (hi, hi_aux, hi_p, hi_x), (lo, lo_aux, lo_p, lo_x) = outs[torch.float64], outs[torch.bfloat16]
    assert y.dtype == torch.bfloat16
    assert_close_to_ref(y.detach(), hi, lo, f"{case}: output")
    assert_close_to_ref(m.aux_loss.detach(), hi_aux, lo_aux.float(), f"{case}: losses")
    assert_grad_close(xg.grad, hi_x.grad, lo_x.grad, f"{case}: grad x")
    for n, p in m.named_parameters():
        if p.requires_grad:
            assert_grad_close(p.grad, hi_p[n].grad, lo_p[n].grad, f"{case}: grad {n}")


@pytest.mark.parametrize("how", ["autocast", "fp32-adapters-on-bf16-base"])
def test_autocast_and_fp32_adapters(how):
    """Under autocast everything runs in bf16 (the reference rounds the fp32 parameters as
    autocast does); fp32 adapters on a bf16 base run the adapter path in fp32 (as PEFT)."""
    auto = how == "autocast"
    m = make("softmax", torch.float32 if auto else torch.bfloat16, adapter_dtype=torch.float32)
    x = torch.randn(3, 5, IN)
    x_in = x if auto else x.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=auto):
        y = m(x_in)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert m.lora_A.grad.dtype == m.lora_B.grad.dtype == m.gate.weight.grad.dtype == torch.float32
    round_to = torch.bfloat16 if auto else None
    sel = selection_logits(m, x_in, torch.bfloat16 if auto else torch.float32)
    hi = reference(m, x_in, torch.float64, sel, round_to=round_to)[0]
    lo = reference(m, x_in, torch.bfloat16, sel, round_to=round_to)[0]
    assert_close_to_ref(y.detach(), hi.detach(), lo.detach(), how)


def test_zero_b_is_the_base_exactly():
    for dtype in (torch.float32, torch.bfloat16):
        base = nn.Linear(IN, OUT).to(dtype)
        m = LoRAMoE(base, 4, 2, RANK, shared_adapter=True, dropout=0.1).train()
        x = torch.randn(2, 6, IN).to(dtype)
        assert torch.equal(m(x), base(x))  # lora_B and shared_lora_B start at zero (PEFT)
        bound = IN**-0.5
        assert 0 < m.lora_A.abs().max() <= bound and m.lora_A.std() > bound / 3


def test_shared_adapter_only_sees_zero_routed_b():
    m = make("shared-eps-top1", torch.float64)
    with torch.no_grad():
        m.lora_B.zero_()
    x = torch.randn(5, IN, dtype=torch.float64)
    want = nn.functional.linear(x, m.weight, m.bias) + m.shared_scale * (
        x @ m.shared_lora_A.T @ m.shared_lora_B.T
    )
    assert_close_to_ref(m(x).detach(), want.detach(), want.detach(), "shared adapter")
    assert m.shared_scale == 8.0 / 4 and make("shared-rslora-no-bias").scale == 8.0 / 5**0.5


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager = make("groups-selection-bias", torch.float32).train()
    hi = copy.deepcopy(eager).double()
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True, dynamic=True, backend="aot_eager")
    for n in (7, 19):
        x, cot = torch.randn(n, IN), torch.randn(n, OUT)
        res = []
        for mod, dt in ((compiled, torch.float32), (eager, torch.float32), (hi, torch.float64)):
            mod.zero_grad()
            y, xg = run(mod, x.to(dt), cot.to(dt))
            res.append([y.detach(), mod.aux_loss.detach(), xg.grad, mod.lora_B.grad])
        for i, (a, b, c) in enumerate(zip(*res)):
            assert_grad_close(a, c, b, f"compiled vs eager, tokens {n}, tensor {i}")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert torch.equal(twin.tokens_per_expert, eager.tokens_per_expert)


def test_zero_tokens_dropout_and_copies():
    m = make("shared-eps-top1", torch.float32, dropout=0.5)
    x0 = torch.zeros(0, IN, requires_grad=True)
    y0 = m(x0)
    assert y0.shape == (0, OUT)
    (y0.sum() + m.aux_loss).backward()
    x = torch.randn(4, 3, IN)
    m.train()
    assert not torch.equal(m(x), m(x))  # the adapters' input is dropped at random
    m.eval()
    want = m(x)
    assert torch.equal(want, m(x))
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    for other in (copy.deepcopy(m), torch.load(buf, weights_only=False)):
        assert torch.equal(other(x), want)


def test_state_dict_keeps_the_base_names():
    base = nn.Linear(IN, OUT)
    m = LoRAMoE(base, 4, 2, RANK, shared_adapter=True, selection_bias=True)
    assert m.weight is base.weight and m.bias is base.bias
    assert list(m.state_dict()) == [
        "weight", "bias", "lora_A", "lora_B", "shared_lora_A", "shared_lora_B",
        "gate.weight", "gate.e_score_correction_bias",
    ]  # fmt: skip
    fresh = LoRAMoE(nn.Linear(IN, OUT), 4, 2, RANK, shared_adapter=True, selection_bias=True)
    res = fresh.load_state_dict(nn.Linear(IN, OUT).state_dict(), strict=False)
    assert sorted(res.missing_keys) == sorted(set(m.state_dict()) - {"weight", "bias"})
    fresh.load_state_dict(m.state_dict())
    x = torch.randn(5, IN)
    assert torch.equal(fresh(x), m(x))


def test_selection_bias_counts_and_update_and_aux_sum():
    model = nn.Sequential(make("groups-selection-bias", torch.float32), make("softmax"))
    model.train()
    model[0](torch.randn(10, IN))
    model[1](torch.randn(10, IN, dtype=torch.float64))
    assert int(model[0].tokens_per_expert.sum()) == 20
    load = model[0].update_bias(0.01)
    assert load.sum() == 20 and model[0].tokens_per_expert.sum() == 0
    total = lora_moe_aux_loss(model)
    assert torch.equal(total, model[0].aux_loss + model[1].aux_loss)
    assert torch.equal(lora_moe_aux_loss(model, "mean"), total / 2)
    with pytest.raises(ValueError, match="reduction must be 'sum' or 'mean', got 'max'"):
        lora_moe_aux_loss(model, "max")
    assert lora_moe_aux_loss(nn.Sequential(LoRAMoE(nn.Linear(IN, OUT), 2, 1))) is None


BAD = [
    (dict(base=nn.Conv1d(1, 1, 1)), TypeError, "base must be an nn.Linear"),
    (dict(rank=0), ValueError, "rank must be a positive int, got 0"),
    (dict(alpha=float("nan")), ValueError, "alpha must be a finite number"),
    (dict(dropout=1.0), ValueError, r"dropout must be a number in \[0, 1\)"),
    (dict(shared_adapter=0), ValueError, "shared_adapter"),
    (dict(top_k=5), ValueError, r"top_k \(5\) must be <="),
    (dict(num_experts=0), ValueError, "num_experts must be a positive int"),
    (dict(score_fn="tanh"), ValueError, "score_fn"),
    (dict(capacity_factor=1.0), TypeError, "unexpected keyword arguments: capacity_factor"),
    (dict(router=RouterConfig(4, 2), renormalize=False), ValueError, "either as router="),
    (dict(router=RouterConfig(3, 2)), ValueError, r"num_experts=4 disagrees"),
    (dict(use_rslora=1), ValueError, "use_rslora must be a bool"),
]


@pytest.mark.parametrize("kw,exc,match", BAD, ids=[b[2] for b in BAD])
def test_bad_arguments(kw, exc, match):
    args = dict(base=nn.Linear(IN, OUT), num_experts=4, top_k=2, rank=RANK)
    with pytest.raises(exc, match=match):
        LoRAMoE(**dict(args, **kw))


def test_bad_inputs():
    m = LoRAMoE(nn.Linear(IN, OUT), 4, 2)
    with pytest.raises(ValueError, match=f"x must have {IN} features"):
        m(torch.randn(3, IN + 1))
    with pytest.raises(ValueError, match="x is torch.float64 but the base weight is torch.float32"):
        m(torch.randn(3, IN, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"token_mask must be \[2, 3\]"):
        m(torch.randn(2, 3, IN), token_mask=torch.ones(3, 2, dtype=torch.bool))
