"""Shared test helpers: the one tolerance rule (style.md), opcheck, and bit-exact comparison of
the copy ops (data with NaN/inf/-0, bits, assert_bits_equal)."""

import math
import subprocess
import sys

import pytest
import torch

# The transformers versions the HF integration supports, [TRANSFORMERS_MIN, TRANSFORMERS_BELOW)
# (pyproject's `transformers` extra; tests/test_gpu_check.py keeps the two equal). The HF tests
# skip outside it: pytest.importorskip("transformers", minversion=TRANSFORMERS_MIN) before their
# imports (an older transformers, a GPU machine's own, may lack the classes they import), and
# skip_unsupported_transformers() after them.
TRANSFORMERS_MIN, TRANSFORMERS_BELOW = "5.24", "5.25"
TRANSFORMERS_REASON = "transformers (requirements-test.txt) is needed for the HF integration tests"


def skip_unsupported_transformers():
    """Skip the calling test module when transformers is newer than the supported range."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) >= Version(TRANSFORMERS_BELOW):
        pytest.skip(
            f"transformers {transformers.__version__} is outside the supported range "
            f">={TRANSFORMERS_MIN},<{TRANSFORMERS_BELOW}",
            allow_module_level=True,
        )


# torchtitan (the integration's tested range, mixops.integrations.torchtitan.TORCHTITAN_TESTED;
# CI installs it: requirements-torchtitan*.txt). Its tests call require_torchtitan() first.
TORCHTITAN_REASON = (
    "torchtitan 0.3 is needed for the torchtitan integration tests "
    "(pip install --no-deps -r requirements-torchtitan.txt)"
)


def require_torchtitan():
    """Skip the calling test module unless torchtitan (and what its model code imports) is
    installed in the tested range."""
    pytest.importorskip("torchtitan.models.common.moe", reason=TORCHTITAN_REASON)
    from mixops.integrations.torchtitan import TORCHTITAN_TESTED

    _skip_outside("torchtitan", TORCHTITAN_TESTED)


def _skip_outside(dist, tested):
    """Skip the calling test module unless the installed ``dist`` is in ``tested`` [lo, below)."""
    from importlib.metadata import version

    from packaging.version import Version

    v = Version(version(dist))
    lo, below = tested
    if not Version(lo) <= v < Version(below):
        pytest.skip(
            f"{dist} {v} is outside the tested range >={lo},<{below}", allow_module_level=True
        )


# PEFT (the integration's tested range, mixops.integrations.peft.PEFT_TESTED; CI installs it:
# requirements-peft.txt). Its tests call require_peft() after checking transformers.
PEFT_REASON = "peft 0.21 is needed for the PEFT integration tests (requirements-peft.txt)"


def require_peft():
    """Skip the calling test module unless PEFT is installed in the tested range."""
    pytest.importorskip("peft", reason=PEFT_REASON)
    from mixops.integrations.peft import PEFT_TESTED

    _skip_outside("peft", PEFT_TESTED)


# atol of the rule below, per dtype: a floor for outputs whose reference error is ~0.
ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def assert_close_to_ref(ours, ref_hi, torch_lowp, what=""):
    """max|ours - ref| <= 2 * max|torch_lowp - ref| + atol.

    ref_hi: the reference computed in float64 (or float32 for the low-precision dtypes) from the
    same inputs; torch_lowp: PyTorch's own result in the dtype under test. So a kernel is held to
    twice the error PyTorch itself makes in that dtype.
    """
    assert ours.shape == ref_hi.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref_hi.shape)}"
    assert ours.dtype == torch_lowp.dtype, f"{what}: dtype {ours.dtype} != {torch_lowp.dtype}"
    ref = ref_hi.double().cpu()
    err = (ours.double().cpu() - ref).abs().max().item() if ours.numel() else 0.0
    torch_err = (torch_lowp.double().cpu() - ref).abs().max().item() if ours.numel() else 0.0
    bound = 2 * torch_err + ATOL[ours.dtype]
    assert err <= bound, (
        f"{what}: max|ours - ref| = {err:.3e} > 2*{torch_err:.3e} + atol = {bound:.3e}"
    )


def opcheck(op, args, kwargs=None):
    """torch.library.opcheck with every check, failing loudly on any of them."""
    result = torch.library.opcheck(op, args, kwargs or {})
    bad = {k: v for k, v in result.items() if v != "SUCCESS"}
    assert not bad, f"opcheck failed: {bad}"


def data(rows, cols, dtype, device="cpu"):
    """Random values with NaN, +-inf and -0 mixed in (the ops copy bits)."""
    t = torch.randn(rows, cols, dtype=torch.float64) * 3
    flat = t.view(-1)
    for i, v in enumerate([math.nan, math.inf, -math.inf, -0.0]):
        if flat.numel():
            flat[(7 * i + 3) % flat.numel()] = v
    return t.to(dtype).to(device)


def bits(t):
    return t.detach().cpu().contiguous().view(torch.uint8)


def assert_bits_equal(ours, expect, what):
    assert ours.shape == expect.shape and ours.dtype == expect.dtype, (
        f"{what}: {ours.dtype} {tuple(ours.shape)} vs {expect.dtype} {tuple(expect.shape)}"
    )
    assert torch.equal(bits(ours), bits(expect)), f"{what}: bits differ from the reference"


def strided_variants(rows, cols, dtype, device):
    """Row-strided (offset by one element), column-strided (copied), expanded (row stride 0) and
    transposed views of [rows, cols] (the copy ops' layout tests)."""
    wide = data(rows, 3 * cols + 1, dtype, device)
    return {
        "row-strided": wide[:, 1 : 1 + cols],
        "column-strided": wide[:, : 3 * cols : 3],
        "expanded": data(1, cols, dtype, device).expand(rows, cols),
        "transposed": data(cols, rows, dtype, device).t(),
    }


def run_script_ok(source, timeout=300):
    """Run ``source`` in a fresh Python process (an extreme that crashes fails one test, not the
    run) and assert it exited 0 after printing exactly "ok"."""
    p = subprocess.run(
        [sys.executable, "-c", source], capture_output=True, text=True, timeout=timeout
    )
    assert p.returncode == 0 and p.stdout.strip() == "ok", (
        f"exit {p.returncode}\n{p.stdout}\n{p.stderr[-2000:]}"
    )
