"""CUDA-only routing behaviour: the GPU picks exactly the CPU's experts (the shared
routing::/det:: code), permute's integer outputs equal the CPU's, no host sync (graph capture of
the whole chain), the MIXOPS_DEBUG error path for bad ids/modality/row_map/index/counts
(permute, unpermute, the MoA slot ops, scatter_rows and reorder_chunks), determinism.
Skipped without a GPU."""

import os
import re
import subprocess
import sys

import pytest
import torch

import mixops
from conftest import requires_cuda
from helpers import assert_close_to_ref
from routing_cases import OPTION_GRID, router_kwargs

pytestmark = requires_cuda


def _on(device, kw):
    return {n: (v.to(device) if torch.is_tensor(v) else v) for n, v in kw.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "shape",
    [
        (4096, 8, 2),
        (2048, 64, 8),
        (1000, 60, 4),
        (512, 256, 8),
        (64, 512, 8),
        (16, 4096, 16),
        (300, 1, 1),
    ],
    ids=str,
)
@pytest.mark.parametrize("case", [c for c in OPTION_GRID if c["scaling"] == 1.0], ids=str)
def test_same_experts_as_cpu(dtype, shape, case):
    """Random normal logits (ties included in bf16/fp16): ids and counts bit-equal to the CPU's,
    the float outputs within the usual rule."""
    num_tokens, num_experts, k = shape
    if case["groups"] and num_experts % 4:
        pytest.skip("group-limited cases need E divisible by 4")
    if case["modality"] and (num_experts % 2 or k > num_experts // 2):
        pytest.skip("modality cases need two groups of >= k experts")
    if case["groups"] and k > 2 * num_experts // 4:
        pytest.skip("k exceeds the kept groups")
    gen = torch.Generator().manual_seed(num_tokens + num_experts)
    logits = torch.randn(num_tokens, num_experts, generator=gen).to(dtype)
    kw = router_kwargs(case, num_experts, num_tokens)
    cpu = mixops.ops.router_topk(logits, k, **kw)
    gpu = mixops.ops.router_topk(logits.cuda(), k, **_on("cuda", kw))
    assert torch.equal(gpu.ids.cpu(), cpu.ids)
    assert torch.equal(gpu.counts.cpu(), cpu.counts)
    for name in ("weights", "score_sum", "lse"):
        a, b = getattr(gpu, name).cpu(), getattr(cpu, name)
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-6 * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize(
    "case",
    [dict(), dict(score_fn="sigmoid", bias=True), dict(topk_then_score=True), dict(modality=True)],
    ids=str,
)
def test_backward_matches_cpu(case):
    logits = torch.randn(777, 64)
    kw = {}
    if case.get("bias"):
        kw["bias"] = torch.randn(64) * 0.1
    if case.get("modality"):
        kw.update(modality=torch.randint(0, 4, (777,)), num_modalities=4)
    kw.update({n: v for n, v in case.items() if n in ("score_fn", "topk_then_score")})
    grads = []
    for device in ("cpu", "cuda"):
        x = logits.to(device).requires_grad_(True)
        out = mixops.ops.router_topk(x, 4, **_on(device, kw))
        gw = torch.linspace(-1, 1, 777 * 4, device=device).view(777, 4)
        loss = (out.weights * gw).sum() + out.score_sum.square().sum() + out.lse.square().mean()
        loss.backward()
        grads.append(x.grad.cpu())
    assert_close_to_ref(grads[1], grads[0].double(), grads[0], "d logits cuda vs cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "shape",
    [(4096, 8, 8, 1024), (32768, 8, 64, 2048), (999, 3, 60, 13), (100, 4, 20000, 64)],
    ids=str,
)
@pytest.mark.parametrize("capacity", [None, 7, 1000])
@pytest.mark.parametrize("priority", [False, True])
def test_permute_matches_cpu(dtype, shape, capacity, priority):
    if priority and capacity is None:
        pytest.skip("priority needs capacity")
    num_tokens, k, num_experts, hidden = shape
    gen = torch.Generator().manual_seed(num_tokens)
    x = torch.randn(num_tokens, hidden, generator=gen).to(dtype)
    ids = torch.randint(-1, num_experts, (num_tokens, k), generator=gen)
    kw = dict(capacity=capacity)
    if priority:
        kw["priority"] = torch.rand(num_tokens, k, generator=gen)
    cpu = mixops.ops.permute(x, ids, num_experts, **kw)
    gpu = mixops.ops.permute(x.cuda(), ids.cuda(), num_experts, **_on("cuda", kw))
    for name, a, b in zip(cpu._fields, gpu, cpu):
        assert torch.equal(a.cpu(), b), name
    w = torch.rand(num_tokens, k, generator=gen)
    y_cpu = mixops.ops.unpermute(cpu.x_sorted, cpu.row_map, w)
    y_gpu = mixops.ops.unpermute(gpu.x_sorted, gpu.row_map, w.cuda())
    assert_close_to_ref(y_gpu, y_cpu.double(), y_cpu, "unpermute")


def test_graph_capture_of_the_chain_follows_new_logits():
    logits = torch.randn(256, 16, device="cuda")
    x = torch.randn(256, 64, device="cuda")

    def chain():
        r = mixops.ops.router_topk(logits, 2)
        p = mixops.ops.permute(x, r.ids, 16)
        return mixops.ops.unpermute(p.x_sorted * 3, p.row_map, r.weights), p.offsets

    chain()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y, off = chain()
    for _ in range(2):
        logits.copy_(torch.randn(256, 16, device="cuda"))
        g.replay()
        torch.cuda.synchronize()
        y_ref, off_ref = chain()
        torch.testing.assert_close(y, y_ref)
        assert torch.equal(off, off_ref)


def test_deterministic_run_to_run():
    logits = torch.randn(20000, 64, device="cuda")
    x = torch.randn(20000, 256, device="cuda")
    outs = []
    for _ in range(2):
        r = mixops.ops.router_topk(logits, 8)
        p = mixops.ops.permute(x, r.ids, 64)
        outs.append((r.score_sum, mixops.ops.unpermute(p.x_sorted, p.row_map, r.weights)))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


_BAD = {
    "ids": (
        "x = torch.randn(6, 4, device='cuda'); ids = torch.tensor([[0, 9]] * 6, device='cuda')\n"
        "out = mixops.ops.permute(x, ids, 4).x_sorted",
        r"ids values must be in \[-1, "
        r"num_experts = 4\)",
    ),
    "row_map": (
        "y = torch.randn(4, 4, device='cuda'); rm = torch.full((2, 2), 7, dtype=torch.int32,"
        " device='cuda')\nout = mixops.ops.unpermute(y, rm)",
        r"row_map values must be in \[-1, num_rows = 4\)",
    ),
    "rows_to_slots": (
        "r = torch.randn(4, 4, device='cuda'); rm = torch.full((2, 2), 7, dtype=torch.int32,"
        " device='cuda')\nout = mixops.ops.rows_to_slots(r, rm, 2)",
        r"rows_to_slots: invalid input values: row_map values must be in \[-1, num_rows = 4\)",
    ),
    "slots_to_rows": (
        "s = torch.randn(2, 1, 2, 4, device='cuda'); rm = torch.zeros((2, 2), dtype=torch.int32,"
        " device='cuda')\nout = mixops.ops.slots_to_rows(s, rm, 3)",
        r"slots_to_rows: invalid input values: row_map maps two slots to one row",
    ),
    "scatter_rows": (
        "b = torch.randn(4, 4, device='cuda'); r = torch.randn(2, 4, device='cuda')\n"
        "i = torch.tensor([1, 9], dtype=torch.int32, device='cuda')\n"
        "out = mixops.ops.scatter_rows(b, r, i)",
        r"scatter_rows: invalid input values: index values must be in \[-1, num_rows = 4\)",
    ),
    "scatter_rows_backward": (
        "g = torch.randn(4, 4, device='cuda'); i = torch.tensor([2, 2], dtype=torch.int32,"
        " device='cuda')\nout = torch.ops.mixops.scatter_rows_backward(g, i)[1]",
        r"scatter_rows_backward: invalid input values: index holds a row twice",
    ),
    "reorder_chunks": (
        "x = torch.randn(6, 4, device='cuda')\n"
        "c = torch.tensor([[2, -1], [3, 4]], dtype=torch.int32, device='cuda')\n"
        "out = mixops.ops.reorder_chunks(x, c)",
        r"reorder_chunks: invalid input values: counts values must be >= 0 \(treated as 0\); "
        r"counts sum to more rows than x has \(num_rows = 6; the chunks were cut at row 6\);",
    ),
    "modality": (
        "l = torch.randn(4, 8, device='cuda'); m = torch.full((4,), 5, device='cuda')\n"
        "out = mixops.ops.router_topk(l, 2, modality=m, num_modalities=2).weights",
        r"modality values must be in \[0, num_modalities = 2\)",
    ),
    "backward_ids": (
        "l = torch.randn(4, 8, device='cuda'); m = torch.zeros(4, dtype=torch.long, "
        "device='cuda'); ids = torch.full((4, 2), 5, dtype=torch.int32, device='cuda')\n"
        "out = torch.ops.mixops.router_topk_backward(torch.ones(4, 2, device='cuda'), "
        "None, None, l, ids, 'softmax', False, True, 0.0, 1.0, m, 2, None)",
        r"ids must name eligible experts",
    ),
}


@pytest.mark.parametrize("which", list(_BAD))
def test_bad_values_debug_mode_raises_and_default_mode_clamps(which):
    body, match = _BAD[which]
    code = f"import torch, mixops\n{body}\ntorch.cuda.synchronize()\nprint('NO ERROR', float(out.abs().sum()))\n"
    env = dict(os.environ, MIXOPS_DEBUG="1")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert p.returncode != 0 and re.search(match, p.stderr), p.stderr
    env.pop("MIXOPS_DEBUG")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert p.returncode == 0 and "NO ERROR" in p.stdout, p.stderr
