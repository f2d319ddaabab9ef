"""grouped_mm's CPU kernel for thin groups (csrc/grouped_mm/cpu_thin.cpp: decoding; groups of 1-4
rows, 1-2 for bf16/fp16 where BLAS has a native GEMM for them and the CPU no AVX512-BF16; weights
in HF's [E, n, k] layout) against the float64 reference: every row count, thin and BLAS groups in
one call, tails of k (not a multiple of the lanes or of the chains), all three dtypes, strided
operands, rows past offsets[-1], NaN and inf; each SIMD kernel (AVX512-BF16 dot products, AVX-512
and AVX2 fused multiply-adds, forced by MIXOPS_CPU_THIN=avx512 / avx2, none) in a subprocess; and
the MoE layer at decode sizes against the per-token loop.

Low-precision results follow the shared rule in helpers.assert_close_to_ref."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import mixops
import mixops.nn
import mixops.reference as ref
from grouped_mm_cases import offsets_of
from helpers import assert_close_to_ref

THIN = mixops._C._cpu_thin_kernel()
needs_thin = pytest.mark.skipif(THIN == "none", reason="this CPU has neither AVX-512 nor AVX2+FMA")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# group sizes: every thin row count (1-4), empty groups, and groups BLAS takes (5, 9) in the same
# call
SIZES = {"thin": [1, 2, 0, 3, 4], "mixed": [1, 9, 0, 2, 5], "one": [1], "single_empty": [0, 2]}
KN = [(1, 1), (7, 5), (16, 8), (37, 19), (256, 130), (1030, 64), (2048, 3)]


def _case(sizes, k, n, dtype, tail=0, a_strided=False, b_sliced=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    e = len(sizes)
    rows = sum(sizes) + tail
    a = torch.randn(rows, k + 3, generator=g).to(dtype)
    a = a[:, 1 : k + 1] if a_strided else a[:, :k].contiguous()
    w = torch.randn(e + 2, n, k + (5 if b_sliced else 0), generator=g).to(dtype)
    w = w[1 : e + 1, :, 2 : k + 2] if b_sliced else w[:e]
    return a, w.transpose(1, 2), offsets_of(sizes, "cpu")


def _check(a, b, off, what):
    out = mixops.grouped_mm(a, b, off)
    hi = ref.grouped_mm(a.double(), b.double(), off)
    assert_close_to_ref(out, hi, ref.grouped_mm(a, b, off), what)
    end = int(off[-1]) if off.numel() else 0
    assert not out[end:].any(), f"{what}: rows past offsets[-1] are not zero"
    return out


@needs_thin
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sizes", list(SIZES))
@pytest.mark.parametrize("kn", KN, ids=str)
def test_values(dtype, sizes, kn):
    a, b, off = _case(SIZES[sizes], *kn, dtype, tail=2)
    _check(a, b, off, f"{sizes}/{kn}")


@needs_thin
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_operands(dtype):
    for k, n in ((37, 19), (64, 24)):
        a, b, off = _case([3, 0, 4, 1], k, n, dtype, a_strided=True, b_sliced=True)
        assert not a.is_contiguous() and b.stride(0) != n * k
        _check(a, b, off, f"strided {k}x{n}")


@needs_thin
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_and_inf(dtype):
    a, b, off = _case([2, 3], 40, 9, dtype)
    a[1, 5] = math.nan  # row 1: NaN everywhere
    b[1, 7, 4] = math.inf  # expert 1, output column 4: +-inf or NaN (0 * inf) in its rows
    out = mixops.grouped_mm(a, b, off)
    expect = ref.grouped_mm(a.double(), b.double(), off)
    assert torch.isnan(out[1]).all() and not torch.isnan(out[0]).any()
    col = out[2:, 4].double()
    assert torch.equal(torch.isnan(col), torch.isnan(expect[2:, 4]))
    assert torch.equal(torch.isinf(col), torch.isinf(expect[2:, 4]))
    finite = torch.isfinite(expect)
    torch.testing.assert_close(
        out.double()[finite], expect[finite], rtol=0.05, atol=0.5
    )  # values checked in test_values; here only that inf/NaN stay where they belong


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_thin_groups_do_not_depend_on_the_others(dtype):
    # a group's rows come out the same whether the call's other groups are thin or BLAS's
    a, b, off = _case([1, 2, 0, 16], 64, 40, dtype)
    alone = mixops.grouped_mm(a[:3], b[:2], off[:2])
    assert torch.equal(mixops.grouped_mm(a, b, off)[:3], alone)


_KERNEL_PROBE = """
import json, torch, mixops
import mixops.reference as ref
torch.manual_seed(0)
errs = []
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for sizes, k, n in (([1, 0, 3, 4], 37, 19), ([2, 9, 1], 1030, 64), ([4], 8, 1), ([3], 70, 9)):
        w = torch.randn(len(sizes), n, k).to(dtype)
        a = torch.randn(sum(sizes), k).to(dtype)
        off = torch.tensor(sizes, dtype=torch.int32).cumsum(0).to(torch.int32)
        out = mixops.grouped_mm(a, w.transpose(1, 2), off).double()
        hi = ref.grouped_mm(a.double(), w.double().transpose(1, 2), off)
        low = ref.grouped_mm(a, w.transpose(1, 2), off).double()
        errs.append([(out - hi).abs().max().item(), (low - hi).abs().max().item()])
print(json.dumps({"kernel": mixops._C._cpu_thin_kernel(), "errs": errs}))
"""


@pytest.mark.parametrize("env", ["default", "avx512", "avx2", "0"])
def test_each_kernel_in_a_subprocess(env):
    environ = {k: v for k, v in os.environ.items() if k != "MIXOPS_CPU_THIN"}
    if env != "default":
        environ["MIXOPS_CPU_THIN"] = env
    p = subprocess.run(
        [sys.executable, "-c", _KERNEL_PROBE], capture_output=True, text=True, env=environ,
        timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    if env == "0":
        assert r["kernel"] == "none"
    elif env == "avx512":
        assert r["kernel"] == ("avx512" if THIN.startswith("avx512") else "none")
    elif env == "avx2":
        assert r["kernel"] in ("avx2", "none") and (r["kernel"] == "avx2") == (THIN != "none")
    else:
        assert r["kernel"] == THIN
    for i, (ours, torch_err) in enumerate(r["errs"]):
        dtype = (torch.float32, torch.bfloat16, torch.float16)[i // 4]
        atol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
        assert ours <= 2 * torch_err + atol, (env, i, ours, torch_err)


@needs_thin
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tokens", [1, 4, 16])
def test_moe_decode_equals_the_per_token_loop(dtype, tokens):
    torch.manual_seed(0)
    moe = mixops.nn.MoE(64, 48, 8, 2, dtype=dtype).eval()
    x = torch.randn(1, tokens, 64, dtype=dtype)
    with torch.no_grad():
        y = moe(x)
        r = mixops.ops.router_topk(moe.gate(x.view(-1, 64)), **moe._router_kwargs)
        w1, w2 = moe.experts.gate_up_proj, moe.experts.down_proj
        hi = torch.zeros(tokens, 64, dtype=torch.float64)
        low = torch.zeros(tokens, 64, dtype=dtype)
        for t in range(tokens):
            for j in range(2):
                e, wt = int(r.ids[t, j]), r.weights[t, j]
                for acc, cast in ((hi, torch.float64), (low, dtype)):
                    xt = x[0, t].to(cast)
                    gate, up = (w1[e].to(cast) @ xt).chunk(2)
                    acc[t] += (w2[e].to(cast) @ (torch.nn.functional.silu(gate) * up)) * wt.to(cast)
    assert_close_to_ref(y.view(tokens, 64), hi, low, f"MoE decode {tokens} tokens")


def test_moe_without_grad_mode_equals_the_grad_mode_forward():
    # without grad mode the layer dispatches below autograd (moe_staged.below_autograd_without_grad)
    torch.manual_seed(0)
    moe = mixops.nn.MoE(64, 48, 8, 2)
    x = torch.randn(2, 3, 64, requires_grad=True)
    y = moe(x)
    with torch.no_grad():
        y0 = moe(x)
    assert not y0.requires_grad and torch.equal(y0, y.detach())
    y.sum().backward()  # the grad-mode graph is intact
    assert x.grad is not None and moe.experts.gate_up_proj.grad is not None
