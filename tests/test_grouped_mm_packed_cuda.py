"""CUDA-only grouped_mm_packed behaviour: every kernel path against the CPU op, zeros over reused
(NaN-filled) memory, bad offsets/ends (MIXOPS_DEBUG=1, mixops.check_errors()), no host sync
(graph capture and replay), autograd. Skipped without a GPU.

Paths (csrc/grouped_mm/path.h), per case kind:
  aligned   widths, row counts, fixed sizes, width and total multiples of 8: bf16/fp16 take SM90
            (H100, sm_90a built) or SM80 tensor ops; fp32 the SIMT (exact) or TF32 kernels;
  rescue    the call meets path.h's rules but most groups have odd widths, row counts and packed
            starts: the vector paths skip those groups and the fallback kernel computes them;
  fallback  odd width, total and fixed size: bf16/fp16 take the fallback kernel for the whole
            call (fp32 still SIMT, which takes any sizes); fp64 always does.
Low-precision results follow the shared rule of helpers.assert_close_to_ref (twice the CPU op's
error in the dtype against fp64, plus atol).
"""

import itertools
import os
import re
import subprocess
import sys

import pytest
import torch

import mixops
from conftest import requires_cuda
from helpers import assert_close_to_ref
from mixops.ops import grouped_mm_packed
from packed_reference import layout_randn, packed_shapes
from test_grouped_mm_packed import ref_gmp

pytestmark = requires_cuda

MODES = ["mn", "mk", "km", "kn"]
LAYOUTS = [("row", "row"), ("row", "col"), ("col", "row")]  # the kernels' combos (RR, RC, CR)


def cumsum32(xs, device="cpu"):
    return torch.tensor(list(itertools.accumulate(xs)), dtype=torch.int32, device=device)


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 runs the exact (SIMT) kernels unless a test turns TF32 on itself."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def sizes(kind, e, seed):
    """(widths, rows, fixed, width, total, ragged) of one case kind (module docstring)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "aligned":
        widths = [[0, 8, 40, 136, 256][int(i)] for i in torch.randint(0, 5, (e,), generator=g)]
        rows = (torch.randint(0, 20, (e,), generator=g) * 8).tolist()
        fixed, pad, tails = 256, 0, (8, 8)
    else:
        widths = torch.randint(1, 150, (e,), generator=g).tolist()
        rows = torch.randint(0, 150, (e,), generator=g).tolist()
        widths[1], widths[2], rows[3] = 0, 8, 0  # an empty width, a whole vector, no rows
        if kind == "rescue":  # the call's own sizes whole vectors, so the vector paths take it
            fixed, pad = 256, (-max(widths)) % 8
            tails = ((-sum(rows)) % 8, (-sum(widths)) % 8)
        else:
            fixed, pad = 250, 1 + (max(widths) % 2)  # odd width
            tails = (3, 1 + sum(widths) % 2)  # odd total
    width = max(widths) + pad
    return widths, rows, fixed, width, sum(widths) + tails[1], sum(rows) + tails[0]


def operands(mode, fixed, width, total, ragged, dtype, layouts, device="cuda"):
    shapes = packed_shapes(mode, fixed, width, total, ragged)
    return tuple(layout_randn(sh, lay, dtype, device) for sh, lay in zip(shapes, layouts))


def make_case(mode, kind, dtype, layouts, e=24, seed=0):
    widths, rows, fixed, width, total, ragged = sizes(kind, e, seed)
    a, b = operands(mode, fixed, width, total, ragged, dtype, layouts)
    return a, b, cumsum32(rows, "cuda"), cumsum32(widths, "cuda"), width, total


def cpu(*args):
    return [x.cpu() if isinstance(x, torch.Tensor) else x for x in args]


def poisoned_call(a, b, off, ends, mode, width, total):
    """The op with its output most likely in a block the caching allocator just freed, full of
    NaN: every element no group writes must be written as zero."""
    meta = grouped_mm_packed(
        a.to("meta"), b.to("meta"), off.to("meta"), ends.to("meta"), mode, width, total
    )
    poison = torch.full(meta.shape, float("nan"), dtype=a.dtype, device=a.device)
    del poison
    return grouped_mm_packed(a, b, off, ends, mode, width, total)


def check_against_cpu(out, a, b, off, ends, mode, width, total, what):
    args = cpu(off, ends, mode, width, total)
    hi = grouped_mm_packed(a.double().cpu(), b.double().cpu(), *args)
    lowp = grouped_mm_packed(a.cpu(), b.cpu(), *args)
    assert not out.isnan().any(), f"{what}: NaN (an element left unwritten)"
    assert_close_to_ref(out, hi, lowp, what)
    # Zeros exactly where no group writes: the op on all-ones operands is >= 1 everywhere else.
    ones = grouped_mm_packed(
        torch.ones_like(a.cpu(), dtype=torch.float64),
        torch.ones_like(b.cpu(), dtype=torch.float64),
        *args,
    )
    unwritten = (ones == 0).to(out.device)
    assert torch.all(out[unwritten] == 0), f"{what}: non-zero where no group writes"


@pytest.mark.parametrize("layouts", LAYOUTS, ids="".join)
@pytest.mark.parametrize("kind", ["aligned", "rescue", "fallback"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_paths_against_cpu(mode, dtype, kind, layouts):
    a, b, off, ends, width, total = make_case(mode, kind, dtype, layouts)
    out = poisoned_call(a, b, off, ends, mode, width, total)
    check_against_cpu(out, a, b, off, ends, mode, width, total, f"{mode} {dtype} {kind}")


@pytest.mark.parametrize("kind", ["aligned", "fallback"])
@pytest.mark.parametrize("mode", MODES)
def test_fp64_fallback(mode, kind):
    a, b, off, ends, width, total = make_case(mode, kind, torch.float64, ("row", "col"))
    out = poisoned_call(a, b, off, ends, mode, width, total)
    want = grouped_mm_packed(*cpu(a, b, off, ends), mode, width, total)
    torch.testing.assert_close(out.cpu(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_tf32_follows_torch_switch(mode):
    a, b, off, ends, width, total = make_case(mode, "aligned", torch.float32, ("row", "col"))
    args = (off, ends, mode, width, total)
    hi = grouped_mm_packed(a.double().cpu(), b.double().cpu(), *cpu(*args))
    torch.backends.cuda.matmul.allow_tf32 = True  # the fixture restores it
    fast = grouped_mm_packed(a, b, *args)
    lowp = ref_gmp(a, b, *args)  # torch's matmul in TF32 on the same device
    assert_close_to_ref(fast, hi, lowp, f"{mode} tf32")


@pytest.mark.parametrize("mode", MODES)
def test_empty_and_degenerate(mode):
    """E = 0, all widths 0, no rows at all: zeros of the right shape (and no launch errors)."""
    for widths, rows in (([], []), ([0, 0, 0], [4, 0, 3]), ([3, 2], [0, 0])):
        width, total = max(widths, default=0) + 1, sum(widths)
        a, b = operands(mode, 5, width, total, 7, torch.float32, ("row", "row"))
        off, ends = cumsum32(rows, "cuda"), cumsum32(widths, "cuda")
        out = poisoned_call(a, b, off, ends, mode, width, total)
        want = grouped_mm_packed(*cpu(a, b, off, ends), mode, width, total)
        assert out.shape == want.shape
        torch.testing.assert_close(out.cpu(), want)


# ---- bad offsets / ends: clamped on the device, reported by the error flag -------------------

# A valid call: offsets [2, 4, 6] over the ragged size 6, ends [3, 3, 5] over total 7, width 4.
SHAPES = {
    "mn": ((6, 5), (5, 7)),
    "mk": ((6, 4), (7, 5)),
    "km": ((4, 6), (6, 5)),
    "kn": ((5, 6), (6, 4)),
}
# (mode, offsets, ends, the valid values the kernels' clamping amounts to, message)
BAD = [
    ("mn", [2, 4, 7], [3, 3, 5], ([2, 4, 6], [3, 3, 5]), r"offsets must be <= a\.size\(0\) = 6"),
    ("mk", [2, 4, 6], [3, 3, -1], ([2, 4, 6], [3, 3, 3]), "ends must be non-negative"),
    ("km", [2, 4, 6], [3, 3, 2], ([2, 4, 6], [3, 3, 3]), "ends must be non-decreasing"),
    ("kn", [2, 4, 6], [3, 3, 9], ([2, 4, 6], [3, 3, 7]), "ends must be <= total = 7"),
    ("mn", [2, 4, 6], [0, 5, 5], ([2, 4, 6], [0, 4, 4]), "must be <= width"),
]


def bad_call(mode, offsets, ends, device="cuda"):
    torch.manual_seed(0)
    sa, sb = SHAPES[mode]
    a, b = torch.randn(sa).to(device), torch.randn(sb).to(device)
    i32 = dict(dtype=torch.int32, device=device)
    return a, b, torch.tensor(offsets, **i32), torch.tensor(ends, **i32), mode, 4, 7


@pytest.mark.parametrize("mode, offsets, ends, valid, match", BAD)
def test_bad_values_are_clamped_and_flagged(mode, offsets, ends, valid, match):
    with pytest.raises(RuntimeError, match="grouped_mm_packed: invalid .*" + match):
        grouped_mm_packed(*bad_call(mode, offsets, ends, "cpu"))  # the CPU raises at once
    mixops.check_errors()  # start clean
    out = grouped_mm_packed(*bad_call(mode, offsets, ends))
    with pytest.raises(RuntimeError, match="grouped_mm_packed: invalid offsets or ends:.*" + match):
        mixops.check_errors()
    want = grouped_mm_packed(*bad_call(mode, *valid))  # same path, same arithmetic
    assert torch.equal(out, want), "clamped bounds differ from the equivalent valid values"
    mixops.check_errors()  # the valid call left nothing


_DEBUG_SCRIPT = """
import torch, mixops
from mixops.ops import grouped_mm_packed
i32 = dict(dtype=torch.int32, device="cuda")
a, b = torch.randn({sa}, device="cuda"), torch.randn({sb}, device="cuda")
out = grouped_mm_packed(a, b, torch.tensor({offsets}, **i32), torch.tensor({ends}, **i32),
                        "{mode}", 4, 7)
torch.cuda.synchronize()
print("NO ERROR", float(out.abs().sum()))
"""


@pytest.mark.parametrize("mode, offsets, ends, valid, match", BAD)
def test_bad_values_debug_mode_raises_the_cpu_message(mode, offsets, ends, valid, match):
    sa, sb = SHAPES[mode]
    code = _DEBUG_SCRIPT.format(sa=sa, sb=sb, offsets=offsets, ends=ends, mode=mode)
    env = dict(os.environ, MIXOPS_DEBUG="1")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert p.returncode != 0 and "RuntimeError" in p.stderr, p.stderr[-2000:]
    assert re.search("grouped_mm_packed: invalid .*" + match, p.stderr), p.stderr[-2000:]
    env.pop("MIXOPS_DEBUG")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert p.returncode == 0 and "NO ERROR" in p.stdout, p.stderr[-2000:]  # clamped, alive


# ---- no host sync: graph capture, replays follow new offsets and ends --------------------


@pytest.mark.parametrize("mode", MODES)
def test_cuda_graph_capture_reads_offsets_and_ends_on_device(mode):
    widths0, rows0 = [16, 0, 40, 24], [24, 8, 0, 32]
    widths1, rows1 = [8, 72, 0, 0], [16, 16, 16, 16]  # same sums: the shapes stay
    fixed, width, total, ragged = 64, 72, 80, 64
    a, b = operands(mode, fixed, width, total, ragged, torch.bfloat16, ("row", "col"))
    off, ends = cumsum32(rows0, "cuda"), cumsum32(widths0, "cuda")
    args = (mode, width, total)
    grouped_mm_packed(a, b, off, ends, *args)  # warm up (lazy init outside the capture)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = grouped_mm_packed(a, b, off, ends, *args)
    for widths, rows in ((widths0, rows0), (widths1, rows1)):
        off.copy_(cumsum32(rows, "cuda"))
        ends.copy_(cumsum32(widths, "cuda"))
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        check_against_cpu(out, a, b, off, ends, *args, f"{mode} replay {widths}")
        assert torch.equal(out, grouped_mm_packed(a, b, off, ends, *args)), "replay != eager"


# ---- autograd: both operands against the CPU op's gradients -----------------------------


def _grads(a, b, off, ends, mode, width, total, g):
    a = a.detach().requires_grad_(True)
    b = b.detach().requires_grad_(True)
    grouped_mm_packed(a, b, off, ends, mode, width, total).backward(g)
    return a.grad, b.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("kind", ["aligned", "rescue"])
@pytest.mark.parametrize("mode", MODES)
def test_autograd_against_cpu(mode, kind, dtype):
    """b is the transposed view of a row-major weight (the MoE layer's W.t()); its gradient is
    written in that storage layout on CUDA as on CPU."""
    a, b, off, ends, width, total = make_case(mode, kind, dtype, ("row", "col"), e=12, seed=3)
    args = (off, ends, mode, width, total)
    g = torch.randn(grouped_mm_packed(a, b, *args).shape, dtype=dtype, device="cuda")
    ga, gb = _grads(a, b, *args, g)
    ca, cb = _grads(*cpu(a, b, *args, g))
    if dtype == torch.float64:
        torch.testing.assert_close(ga.cpu(), ca, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gb.cpu(), cb, rtol=1e-12, atol=1e-12)
    else:
        ha, hb = _grads(*cpu(a.double(), b.double(), *args, g.double()))
        assert_close_to_ref(ga, ha, ca, f"{mode} {kind} grad a")
        assert_close_to_ref(gb, hb, cb, f"{mode} {kind} grad b")
    if mode in ("mn", "mk"):  # the weight operand: its gradient in the parameter's layout
        b_ = b.detach().requires_grad_()
        (gb_raw,) = torch.autograd.grad(grouped_mm_packed(a, b_, *args), (b_,), g)
        assert gb_raw.stride() == b.stride()
