"""PEFT's LoRA on fused expert weights (``LoraConfig(target_parameters=[...experts.gate_up_proj,
...experts.down_proj])``) on mixops' adapter path (integrations/peft.py), with mixops switched on
each way a user can: ``experts_implementation="mixops"``, ``patch_model`` after
``get_peft_model``, and ``patch_model`` before it.

The reference is PEFT alone on HF's eager experts in fp64; the model under test runs in fp32 and
is held by the tolerance rule against PEFT alone in fp32 (the patched layers route in fp32 as
mixops always does, so fp64 runs would not compare like for like). Every forward of a mixops
model is watched: PEFT folding ``W + B A`` into a parametrization (its slow path) fails the test,
and mixops' adapter GEMMs must have run."""

import copy
import functools

import pytest
import torch

from helpers import (
    TRANSFORMERS_MIN,
    TRANSFORMERS_REASON,
    assert_close_to_ref,
    require_peft,
    skip_unsupported_transformers,
)

transformers = pytest.importorskip(
    "transformers", minversion=TRANSFORMERS_MIN, reason=TRANSFORMERS_REASON
)
skip_unsupported_transformers()
require_peft()

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

import mixops.integrations.transformers as mt  # noqa: E402
import mixops.nn.lora as mixops_lora  # noqa: E402
from hf_moe_models import tiny_moe_families  # noqa: E402

# The families patch_model converts whose experts PEFT's target_parameters reaches (fused 3-D
# weights; LongCat-Flash and JetMoE have their own layers and are not covered).
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "glm4_moe")
MODES = ("experts_implementation", "patch_after_peft", "patch_before_peft")
TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))


def _config(r=2, alpha=4):
    # init_lora_weights=False: random A and B (PEFT's default B = 0 would hide a missing delta).
    return LoraConfig(r=r, lora_alpha=alpha, target_parameters=TARGETS, init_lora_weights=False)


def _base(family):
    torch.manual_seed(0)
    model = tiny_moe_families()[family]().double()
    model.set_experts_implementation("eager")
    return model


def _peft(base, mode, dtype, adapters, state=None):
    """PEFT with ``adapters`` ({name: LoraConfig}) on a ``dtype`` copy of ``base``, mixops switched
    on by ``mode`` (None: PEFT alone); adapter weights from ``state`` when given."""
    model = copy.deepcopy(base).to(dtype)
    if mode == "experts_implementation":
        model.set_experts_implementation("mixops")
    elif mode == "patch_before_peft":
        mt.patch_model(model)
    names = list(adapters)
    pm = get_peft_model(model, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        pm.add_adapter(name, adapters[name])
    if mode == "patch_after_peft":
        assert mt.patch_model(pm)
    if state is not None:
        result = pm.load_state_dict(state, strict=False)
        assert not result.unexpected_keys
    return pm


def _lora_state(pm):
    return {k: v for k, v in pm.state_dict().items() if "lora_" in k}


@pytest.fixture
def watch(monkeypatch):
    """Counts PEFT's parametrizations (``W + B A``) and mixops' adapter GEMMs."""
    counts = {"fold": 0, "adapter_gemm": 0}
    register, gemm = torch.nn.utils.parametrize.register_parametrization, mixops_lora.grouped_mm

    def fold(*args, **kwargs):
        counts["fold"] += 1
        return register(*args, **kwargs)

    def adapter_gemm(*args, **kwargs):
        counts["adapter_gemm"] += 1
        return gemm(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils.parametrize, "register_parametrization", fold)
    monkeypatch.setattr(mixops_lora, "grouped_mm", adapter_gemm)
    return counts


def _run(pm, counts=None, adapters=True):
    """(loss, {trainable name: grad}); with ``counts``: PEFT folded nothing, and mixops' adapter
    GEMMs ran (``adapters``) or did not."""
    if counts is not None:
        counts.update(fold=0, adapter_gemm=0)
    pm.zero_grad(set_to_none=True)
    loss = pm(IDS, labels=IDS).loss
    if loss.requires_grad:  # not with the adapters disabled or merged (all else is frozen)
        loss.backward()
    if counts is not None:
        assert counts["fold"] == 0, "PEFT folded W + B A (its slow path ran)"
        assert (counts["adapter_gemm"] > 0) == adapters, counts
    return loss.detach(), {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}


def _assert_same(ours, ref_hi, peft_lowp, what):
    (loss, grads), (ref_loss, ref_grads), (low_loss, low_grads) = ours, ref_hi, peft_lowp
    assert_close_to_ref(loss, ref_loss, low_loss, f"{what} loss")
    assert list(grads) == list(ref_grads), f"{what}: PEFT's trainable parameters changed"
    for name, g in grads.items():
        if ref_grads[name] is None:
            assert g is None, f"{what}: {name}"
        else:
            assert_close_to_ref(g, ref_grads[name], low_grads[name], f"{what} {name}")


def _three(family, mode, adapters):
    base = _base(family)
    ref = _peft(base, None, torch.float64, adapters)
    state = _lora_state(ref)
    low = _peft(base, None, torch.float32, adapters, state)
    ours = _peft(base, mode, torch.float32, adapters, state)
    return ours, ref, low


@functools.cache
def _peft_alone(family):
    """The base model, PEFT's adapter state, and PEFT alone's (loss, grads) in fp64 and fp32."""
    base = _base(family)
    adapters = {"default": _config()}
    ref = _peft(base, None, torch.float64, adapters)
    state = _lora_state(ref)
    return base, state, _run(ref), _run(_peft(base, None, torch.float32, adapters, state))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_loss_and_adapter_grads_equal_peft(family, mode, watch):
    base, state, ref, low = _peft_alone(family)
    ours = _peft(base, mode, torch.float32, {"default": _config()}, state)
    _assert_same(_run(ours, watch), ref, low, f"{family} {mode}")
    if mode != "experts_implementation":
        assert isinstance(ours.base_model.model.model.layers[-1].mlp, mt.PatchedMoE)


@pytest.mark.parametrize("mode", MODES)
def test_autocast_by_the_tolerance_rule(mode, watch):
    """An fp32 model under CPU autocast to bf16: mixops' adapter path is held to twice PEFT
    alone's error under the same autocast, against PEFT alone in fp64."""
    base, state, ref, _ = _peft_alone("qwen3_moe")
    low, ours = (_peft(base, m, torch.float32, {"default": _config()}, state) for m in (None, mode))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low_run, ours_run = _run(low), _run(ours, watch)
    _assert_same(ours_run, ref, low_run, f"{mode} autocast")


@pytest.mark.parametrize("mode", MODES)
def test_disable_adapters_set_adapter_and_several_active(mode, watch):
    adapters = {"default": _config(), "other": _config(r=3, alpha=6)}
    models = _three("qwen3_moe", mode, adapters)
    ours, ref, low = models
    with ours.disable_adapter(), ref.disable_adapter(), low.disable_adapter():
        _assert_same(_run(ours, watch, adapters=False), _run(ref), _run(low), "disabled")
    _assert_same(_run(ours, watch), _run(ref), _run(low), "enabled again")
    assert watch["fold"] > 0  # the watch sees PEFT's own path (PEFT alone, just above)
    for pm in models:
        pm.set_adapter("other")
    _assert_same(_run(ours, watch), _run(ref), _run(low), "set_adapter('other')")
    for pm in models:
        pm.base_model.set_adapter(["default", "other"])  # both active: their sum
    _assert_same(_run(ours, watch), _run(ref), _run(low), "both adapters active")


@pytest.mark.parametrize("mode", MODES)
def test_adapter_files_load_into_peft_without_mixops(mode, tmp_path, watch):
    base = _base("olmoe")
    ours = _peft(base, mode, torch.float32, {"default": _config()})
    _run(ours, watch)  # one training step on the mixops path
    torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.5).step()
    # The file is PEFT's own for these weights: the same keys and tensors as PEFT alone saves.
    ref = _peft(base, None, torch.float32, {"default": _config()}, _lora_state(ours))
    ours.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "peft")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    want = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert list(saved) == list(want)
    assert all(torch.equal(saved[k], want[k]) for k in want)
    # Loaded back into PEFT without mixops: the outputs of the model that saved it.
    hi = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    low = PeftModel.from_pretrained(copy.deepcopy(base).float(), tmp_path / "ours")
    with torch.no_grad():
        logits = [m(IDS).logits for m in (ours, hi, low)]
    assert_close_to_ref(*logits, f"{mode} reloaded")
    # A deep copy (the layer's adapter provider goes with it) computes the same.
    with torch.no_grad():
        assert torch.equal(copy.deepcopy(ours)(IDS).logits, logits[0])


@pytest.mark.parametrize("mode", MODES)
def test_merge_and_merge_and_unload(mode, watch):
    ours, ref, low = _three("mixtral", mode, {"default": _config()})
    for pm in (ours, ref, low):
        pm.merge_adapter()  # merged: the base weights carry the adapters, no adapter GEMMs
    _assert_same(_run(ours, watch, adapters=False), _run(ref), _run(low), "merged")
    ours, ref, low = (pm.merge_and_unload() for pm in (ours, ref, low))
    block = ours.model.layers[0].mlp
    assert not hasattr(block.experts, "base_layer")  # PEFT's wrappers are gone
    assert isinstance(block, mt.PatchedMoE) == (mode != "experts_implementation")
    with torch.no_grad():
        assert_close_to_ref(*(m(IDS).logits for m in (ours, ref, low)), f"{mode} unloaded")


def test_patch_model_refuses_peft_wrapped_blocks_outside_the_tested_peft(monkeypatch):
    monkeypatch.setattr(mt, "_PEFT", None)  # what _load_peft gives outside PEFT_TESTED
    pm = get_peft_model(_base("mixtral"), _config())
    with pytest.warns(UserWarning, match="wrapped by PEFT.*PEFT_TESTED"):
        assert mt.patch_model(pm) == []
