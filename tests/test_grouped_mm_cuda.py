"""CUDA-only grouped_mm behaviour: no host sync (graph capture), the MIXOPS_DEBUG error path,
TF32 following torch's switch, every kernel path against the CPU. Skipped without a GPU."""

import os
import subprocess
import sys

import pytest
import torch

import mixops
import mixops.reference as ref
from conftest import requires_cuda
from grouped_mm_cases import offsets_of
from helpers import assert_close_to_ref

pytestmark = requires_cuda


def test_cuda_graph_capture_reads_offsets_on_device():
    """Capturable (no host sync), and a replay follows new offsets written into the same tensor."""
    e, k, n = 4, 64, 32
    a = torch.randn(40, k, device="cuda")
    b = torch.randn(e, k, n, device="cuda")
    off = offsets_of([10, 0, 20, 10], "cuda")
    mixops.grouped_mm(a, b, off)  # warm up (lazy init outside the capture)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = mixops.grouped_mm(a, b, off)
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, ref.grouped_mm(a, b, off), rtol=1e-5, atol=1e-5)
    off.copy_(offsets_of([5, 5, 5, 5], "cuda"))  # rows 20.. become zero
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, ref.grouped_mm(a, b, off), rtol=1e-5, atol=1e-5)
    assert torch.all(out[20:] == 0)


_BAD = """
import torch, mixops
a = torch.randn(6, 8, device="cuda"); b = torch.randn(3, 8, 4, device="cuda")
out = mixops.grouped_mm(a, b, torch.tensor({offsets}, dtype=torch.int32, device="cuda"))
torch.cuda.synchronize()
print("NO ERROR", float(out.abs().sum()))
"""


@pytest.mark.parametrize(
    "offsets, match",
    [
        ([2, -1, 6], "offsets must be non-negative"),
        ([4, 2, 6], "offsets must be non-decreasing"),
        ([2, 4, 7], "offsets must be <= a.size\\(0\\) = 6"),
    ],
)
def test_bad_offsets_debug_mode_raises_and_default_mode_clamps(offsets, match):
    code = _BAD.format(offsets=offsets)
    env = dict(os.environ, MIXOPS_DEBUG="1")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert p.returncode != 0 and "RuntimeError" in p.stderr
    import re

    assert re.search(match, p.stderr), p.stderr
    env.pop("MIXOPS_DEBUG")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert p.returncode == 0 and "NO ERROR" in p.stdout, p.stderr  # clamped; context still alive


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("mode", ["3d", "2d"])
@pytest.mark.parametrize("aligned", [True, False])
def test_paths_against_cpu(dtype, mode, aligned):
    """Bigger shapes than the generic tests: multiple tiles per group, 64 skewed groups, aligned
    (tensor-core paths) and misaligned group starts / dims (the fallback kernel, for whole calls or for the misaligned groups of the SM90 path)."""
    gen = torch.Generator().manual_seed(1)
    e = 64
    sizes = (torch.rand(e, generator=gen) ** 3 * 300).long()
    sizes[3] = 0
    if aligned:
        sizes = sizes // 8 * 8
    k, n = (256, 192) if aligned else (250, 190)
    off = offsets_of(sizes.tolist(), "cuda")
    total = int(sizes.sum())
    if mode == "3d":
        a = torch.randn(total + 7, k, dtype=dtype, device="cuda")
        b = torch.randn(e, n, k, dtype=dtype, device="cuda").transpose(1, 2)
    else:
        a = torch.randn(total, k, dtype=dtype, device="cuda").t()
        b = torch.randn(total, n, dtype=dtype, device="cuda")
    out = mixops.grouped_mm(a, b, off)
    hi = ref.grouped_mm(a.double().cpu(), b.double().cpu(), off.cpu())
    lowp = ref.grouped_mm(a, b, off)
    assert_close_to_ref(out, hi, lowp, f"{mode} {dtype} aligned={aligned}")


def test_tf32_follows_torch_switch():
    a = torch.randn(256, 512, device="cuda")
    b = torch.randn(2, 512, 128, device="cuda")
    off = offsets_of([128, 128], "cuda")
    hi = ref.grouped_mm(a.double().cpu(), b.double().cpu(), off.cpu())
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        exact = mixops.grouped_mm(a, b, off)
        assert (exact.double().cpu() - hi).abs().max() < 1e-3  # fp32 SIMT
        torch.backends.cuda.matmul.allow_tf32 = True
        fast = mixops.grouped_mm(a, b, off)
        lowp = ref.grouped_mm(a, b, off)
        assert_close_to_ref(fast, hi, lowp, "tf32")
        assert (fast.double().cpu() - hi).abs().max() > 1e-3  # really TF32, not silently exact
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize(
    "a_shape, b_shape, offsets, match",
    [
        ((0, 16), (2, 16, 8), [0, 3], "offsets must be <= a.size\\(0\\) = 0"),  # empty output
        ((6, 0), (2, 0, 8), [4, 2], "offsets must be non-decreasing"),  # k == 0
        ((6, 16), (2, 16, 0), [-1, 6], "offsets must be non-negative"),  # n == 0
        ((4, 0), (0, 8), [1, 3], "offsets must be <= a.size\\(1\\) = 0"),  # 2-D x 2-D, k == 0
    ],
)
def test_bad_offsets_are_checked_when_nothing_is_computed(a_shape, b_shape, offsets, match):
    # The CPU rejects these; CUDA used to return early (empty output, k == 0) without a check.
    a, b = torch.randn(a_shape), torch.randn(b_shape)
    off = torch.tensor(offsets, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=match):
        mixops.grouped_mm(a, b, off)
    mixops.check_errors()  # start clean
    out = mixops.grouped_mm(a.cuda(), b.cuda(), off.cuda())
    assert out.shape == mixops.grouped_mm(a, b, off.clamp(0, 0)).shape
    assert torch.all(out == 0)
    with pytest.raises(RuntimeError, match=match):
        mixops.check_errors()
