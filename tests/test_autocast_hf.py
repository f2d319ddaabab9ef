"""bf16 autocast (CPU) on the HF transformers models mixops patches: Mixtral, Qwen2-MoE, Qwen3-MoE,
OLMoE, DeepSeek-V3 and GLM-4-MoE through ``patch_model`` (and through
``experts_implementation="mixops"``), and LongCat-Flash through ``patch_model``.

Each run trains one step of a tiny model under ``torch.autocast("cpu", dtype=torch.bfloat16)`` with
fp32 master weights, beside HF's own model under the same autocast and the same model in fp64
without it (the reference). Required: the forward and backward run; every parameter HF gives a
gradient gets one, in fp32; every token is routed as the fp64 model routes it; and, by the
project's rule (tests/helpers.py), the per-token losses and the gradients of the routers, the
experts, the shared experts and an attention weight are within twice HF's own autocast error of
the reference (+ atol). The same for layer 0's MoE block alone (output and input gradient), all
three runs on one input, where the block's own rounding is not hidden under the model's.

Why per-token losses: the loss HF returns is their mean, one signed sum of rounding errors; its
error's ratio to HF's is a coin toss between two runs of equal precision (measured 0.01x to 12x
over seeds), while the largest per-token error is a stable measure of the same quantity.

Which HF autocast: the patched blocks run their routed experts in the autocast dtype (bf16), as
HF's ``"eager"`` and ``"batched_mm"`` experts and LongCat-Flash's do; HF's default
``"grouped_mm"`` experts do not autocast (torch's grouped GEMM is not an autocast op: HF casts the
input to the fp32 weights), so the patched models are compared with HF's eager experts, and
``experts_implementation="mixops"`` (which, like grouped_mm, computes in the weights' dtype) with
HF's default. README: "HF transformers", autocast.

The models: weights drawn with std 0.2 (HF's 0.02 leaves the logits ~0 and the loss error ~1e-5,
the rule's atol, where nothing could fail), routers with std 0.5 and random selection biases, and
a seed at which no token's choice is a near tie that bf16 rounding flips (asserted: HF's own
autocast routing equals the fp64 routing; a flipped choice would make this a test of ties).
"""

import copy
import re

import pytest
import torch
import torch.nn.functional as F

from helpers import (
    TRANSFORMERS_MIN,
    TRANSFORMERS_REASON,
    assert_close_to_ref,
    skip_unsupported_transformers,
)

transformers = pytest.importorskip(
    "transformers", minversion=TRANSFORMERS_MIN, reason=TRANSFORMERS_REASON
)

import mixops.integrations.transformers as hf_mod  # noqa: E402
import mixops.nn.moe as moe_mod  # noqa: E402
from hf_moe_models import tiny_moe_families  # noqa: E402
from mixops.integrations.transformers import patch_model  # noqa: E402

skip_unsupported_transformers()

SEED = 6  # model seed; the tokens use SEED + 100 (see the module docstring)
# Weights with std 0.2 (see the module docstring); JetMoE's autocast is tested in test_moa_hf_modes.
FAMILIES = {k: f for k, f in tiny_moe_families(0.2).items() if k != "jetmoe"}
# The families whose experts follow HF's experts_implementation (LongCat-Flash's do not).
HF_EXPERTS = [k for k in FAMILIES if k != "longcat_flash"]

# The gradients held to the rule: the routers, the experts, the shared experts' projections and
# the attention output projection. (Not the [1, hidden] shared-expert gate, the norms or the
# biases: their largest error is over a few dozen elements, whose ratio between two equally
# precise runs passes 2 by chance.)
CHECKED = re.compile(
    r"mlp\.(gate\.weight|router\.classifier\.weight|experts\.|shared_experts?\.)"
    r"|self_attn\.(0\.)?o_proj\.weight"
)


def _base(kind):
    torch.manual_seed(SEED)
    model = FAMILIES[kind]().train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "mlp.router.classifier.weight")):
                torch.nn.init.normal_(p, std=0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.3)
    return model


def _ids():
    return torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(SEED + 100))


class _Choices:
    """Each MoE layer's chosen experts (sorted per token), in call order."""

    def __init__(self):
        self.ids = []

    def add(self, ids):
        self.ids.append(ids.detach().long().sort(-1).values)

    def hook_hf(self, module):
        """Record what HF's routers in ``module`` (a model or a block) choose: their 3rd output."""
        for name, m in module.named_modules():
            if name.rpartition(".")[2] in ("gate", "router"):
                m.register_forward_hook(lambda mod, args, out: self.add(out[2]))
        return self


class _MixopsChoices(_Choices):
    """Records what mixops' router (router_topk) chooses; ``reset()`` starts a new list."""

    def __init__(self, monkeypatch):
        super().__init__()
        router_topk = moe_mod.router_topk

        def recorded(*args, **kwargs):
            r = router_topk(*args, **kwargs)
            self.add(r.ids)
            return r

        monkeypatch.setattr(moe_mod, "router_topk", recorded)

    def reset(self):
        self.ids = []
        return self


def _train_step(model, ids, autocast, choices):
    """One forward/backward of a model: (HF's loss, the per-token losses, {name: grad}, choices)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(ids, labels=ids)
    out.loss.backward()
    logits = out.logits[:, :-1]
    logits = logits if logits.dtype == torch.float64 else logits.float()  # as HF's loss does
    tok = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").detach()
    # The per-token losses are the terms of HF's loss (which HF computes in fp32, also in fp64).
    torch.testing.assert_close(out.loss.detach().double(), tok.mean().double(), rtol=1e-6, atol=0)
    grads = {n: p.grad for n, p in model.named_parameters()}
    return out.loss.detach(), tok, grads, choices.ids


def _block_step(block, x, gy, autocast, choices):
    """One forward/backward of one MoE block on x: (output, x's gradient, choices)."""
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = block(x)
    y.backward(gy.to(y.dtype))  # (a bf16 output's gradient is bf16, as in the model)
    return y.detach(), x.grad, choices.ids


def _with_experts(model, implementation):
    if implementation is not None:
        model.set_experts_implementation(implementation)
    return model


def _layer0(model):
    return model.model.layers[0].mlp


def _check_routing(kind, what, choices, choices_hf, choices_ref, layers):
    assert len(choices_ref) == layers, f"{kind}: {len(choices_ref)} MoE layers recorded"
    for layer, (a, b) in enumerate(zip(choices_hf, choices_ref)):
        # The setup's own condition (module docstring): HF's autocast flips no near-tied choice.
        assert torch.equal(a, b), f"{kind}: test setup: HF's autocast flips a choice, layer {layer}"
    assert len(choices) == layers, f"{kind} {what}: {len(choices)} MoE calls"
    for layer, (a, b) in enumerate(zip(choices, choices_ref)):
        assert torch.equal(a, b), f"{kind} {what}: layer {layer} routes unlike the fp64 model"


def _check_model(kind, what, model, ours, theirs, ref):
    """Routing, gradient presence and dtype, per-token losses and the CHECKED gradients."""
    _, tok, grads, choices = ours
    _, tok_hf, grads_hf, choices_hf = theirs
    _, tok_ref, grads_ref, choices_ref = ref
    _check_routing(kind, what, choices, choices_hf, choices_ref, layers=2)
    assert list(grads) == list(grads_hf), f"{kind} {what}: other parameters than HF's"
    for name, p in model.named_parameters():
        g, g_hf = grads[name], grads_hf[name]
        assert (g is None) == (g_hf is None), (
            f"{kind} {what}: {name}: gradient {'None' if g is None else 'set'}, "
            f"HF's {'None' if g_hf is None else 'set'}"
        )
        if g is not None:
            assert p.dtype == torch.float32 and g.dtype == torch.float32, (
                f"{kind} {what}: {name}: fp32 master weights need fp32 gradients, got {g.dtype}"
            )
    assert_close_to_ref(tok, tok_ref, tok_hf, f"{kind} {what}: per-token losses")
    checked = [n for n in grads_ref if CHECKED.search(n) and grads_ref[n] is not None]
    assert len(checked) >= 6, checked
    for name in checked:
        assert_close_to_ref(grads[name], grads_ref[name], grads_hf[name], f"{kind} {what}: {name}")


def _check_block(kind, what, ours, theirs, ref):
    """Layer 0's MoE block alone, all three on the same input: routing, output, input gradient.
    (In the model, each block's input differs by the rounding upstream, which the model-level
    numbers include; here the block's own rounding is all there is.)"""
    y, gx, choices = ours
    y_hf, gx_hf, choices_hf = theirs
    y_ref, gx_ref, choices_ref = ref
    _check_routing(kind, f"{what} block", choices, choices_hf, choices_ref, layers=1)
    assert gx.dtype == gx_hf.dtype == torch.float32
    # HF's block returns fp32 under autocast; a patched one the autocast dtype (README).
    assert_close_to_ref(y.float(), y_ref, y_hf, f"{kind} {what}: layer 0 MoE output")
    assert_close_to_ref(gx, gx_ref, gx_hf, f"{kind} {what}: layer 0 MoE input gradient")


def _references(kind, base, ids, hf_experts):
    """The fp64 reference and HF's own autocast run of the model and of its layer-0 MoE block
    (whose input, taken from the fp64 run and rounded to fp32, all block runs share)."""
    model = _with_experts(copy.deepcopy(base), "eager" if kind in HF_EXPERTS else None).double()
    inputs = []
    _layer0(model).register_forward_hook(lambda m, args, out: inputs.append(args[0].detach()))
    ref = _train_step(model, ids, False, _Choices().hook_hf(model))
    model = _with_experts(copy.deepcopy(base), hf_experts)
    theirs = _train_step(model, ids, True, _Choices().hook_hf(model))

    x = inputs[0].float()
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(SEED))
    block = _layer0(_with_experts(copy.deepcopy(base), "eager" if kind in HF_EXPERTS else None))
    block = block.double()
    ref_block = _block_step(block, x.double(), gy.double(), False, _Choices().hook_hf(block))
    block = _layer0(_with_experts(copy.deepcopy(base), hf_experts))
    theirs_block = _block_step(block, x, gy, True, _Choices().hook_hf(block))
    return (ref, theirs), (ref_block, theirs_block), (x, gy)


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_patch_model_under_autocast(kind, monkeypatch):
    base, ids = _base(kind), _ids()
    hf_experts = "eager" if kind in HF_EXPERTS else None  # bf16 expert GEMMs, as the patched ones
    (ref, theirs), (ref_block, theirs_block), (x, gy) = _references(kind, base, ids, hf_experts)
    choices = _MixopsChoices(monkeypatch)

    model = copy.deepcopy(base)
    assert patch_model(model)
    ours = _train_step(model, ids, True, choices)
    assert ours[0].dtype == theirs[0].dtype == torch.float32
    _check_model(kind, "patch_model", model, ours, theirs, ref)

    model = copy.deepcopy(base)
    patch_model(model)
    ours_block = _block_step(_layer0(model), x, gy, True, choices.reset())
    _check_block(kind, "patch_model", ours_block, theirs_block, ref_block)


@pytest.mark.parametrize("kind", HF_EXPERTS)
def test_mixops_experts_implementation_under_autocast(kind, monkeypatch):
    # HF's routers, mixops' experts: compared with HF's default experts (grouped_mm), which also
    # compute in the weights' dtype under autocast.
    base, ids = _base(kind), _ids()
    assert base.config._experts_implementation == "grouped_mm"  # HF's default
    (ref, theirs), (ref_block, theirs_block), (x, gy) = _references(kind, base, ids, None)
    calls = []
    grouped_mm = hf_mod.grouped_mm
    monkeypatch.setattr(hf_mod, "grouped_mm", lambda *a: calls.append(a[0].dtype) or grouped_mm(*a))

    model = _with_experts(copy.deepcopy(base), "mixops")
    ours = _train_step(model, ids, True, _Choices().hook_hf(model))
    assert calls == [torch.float32] * 4  # 2 layers x 2 GEMMs, in the weights' dtype
    _check_model(kind, 'experts_implementation="mixops"', model, ours, theirs, ref)

    block = _layer0(_with_experts(copy.deepcopy(base), "mixops"))
    ours_block = _block_step(block, x, gy, True, _Choices().hook_hf(block))
    _check_block(kind, 'experts_implementation="mixops"', ours_block, theirs_block, ref_block)
