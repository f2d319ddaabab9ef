"""NVTX ranges (mixops._nvtx.nvtx_range, used by the MoE layer's stages and the benchmarks) are
closed when their body raises. torch.cuda.nvtx is replaced by a recorder, so this runs without a
GPU; the MoE layer's CUDA-only branch is forced on."""

import pytest
import torch

import mixops.nn.experts as experts_mod
import mixops.nn.moe as moe_mod
from mixops._nvtx import nvtx_range
from mixops.bench import timing
from mixops.nn import MoE

STAGES = [
    "router",
    "permute",
    "gate_up_gemm",
    "activation",
    "down_gemm",
    "unpermute",
    "shared_experts",
]


@pytest.fixture
def calls(monkeypatch):
    """Every range_push(name) / range_pop() as ("push", name) / ("pop",), in order."""
    out = []
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: out.append(("push", name)))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: out.append(("pop",)))
    return out


def balanced(calls):
    """True when every push is matched by a later pop, in stack order."""
    depth = 0
    for c in calls:
        depth += 1 if c[0] == "push" else -1
        if depth < 0:
            return False
    return depth == 0


def test_range_closes_when_the_body_raises(calls):
    with pytest.raises(KeyError):
        with nvtx_range("outer"):
            with nvtx_range("inner"):
                raise KeyError("boom")
    assert calls == [("push", "outer"), ("push", "inner"), ("pop",), ("pop",)]


def test_disabled_range_records_nothing(calls):
    with nvtx_range("off", enabled=False):
        pass
    assert calls == []


def test_bench_ranges_are_the_same_helper(calls, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError):
        with timing.nvtx_range("bench stage"):
            raise ValueError
    assert calls == [("push", "bench stage"), ("pop",)]


def _moe():
    torch.manual_seed(0)
    return MoE(16, 8, 4, 2, shared_ffn_size=8)


def test_moe_stages(calls, monkeypatch):
    monkeypatch.setattr(moe_mod, "_nvtx_enabled", lambda x: True)
    _moe()(torch.randn(5, 16))
    assert [c[1] for c in calls if c[0] == "push"] == [f"mixops.moe.{s}" for s in STAGES]
    assert balanced(calls) and len(calls) == 2 * len(STAGES)


@pytest.mark.parametrize("failing", ["router_topk", "permute", "grouped_mm", "unpermute"])
def test_moe_ranges_close_when_a_stage_raises(calls, monkeypatch, failing):
    monkeypatch.setattr(moe_mod, "_nvtx_enabled", lambda x: True)

    def fail(*args, **kwargs):
        raise RuntimeError(f"{failing} failed")

    # The GEMMs run in experts.expert_mlp (every routed path shares it), the rest in moe.py.
    for mod in (moe_mod, experts_mod):
        if hasattr(mod, failing):
            monkeypatch.setattr(mod, failing, fail)
    with pytest.raises(RuntimeError, match=f"{failing} failed"):
        _moe()(torch.randn(5, 16))
    assert calls and balanced(calls), calls


def test_moe_on_cpu_records_no_ranges(calls):
    _moe()(torch.randn(5, 16))
    assert calls == []
