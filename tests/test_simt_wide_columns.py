"""gated_activation's CUDA kernels on half rows of about 2^31 columns and more, on the SIMT harness.

tests/simt/wide_columns.cpp runs the real launch code (csrc/activation/activation.cu) with the
grid it picks for such a row, but only one block of that grid (simt::Options::block_begin/end),
on buffers that are mapped without being touched (MAP_NORESERVE: a few MB of pages back buffers
of up to 32 GB), each behind 2^31 elements of inaccessible address space. A 32-bit column index
steps past 2^31 - 1 after its last column once f / N passes 2^31 - 2^24 (the grid strides by up to
2^16 blocks x 256 threads), wraps negative and faults in front of a buffer (exit status 4); a
64-bit one writes every column the block owns (checked against activation.h's math, which the
CPU op runs too) and nothing of the blocks that did not run. The cases cover the scalar path
(odd f) for every dtype, forward and backward, f just past 2^31 - 2^24 and past 2^31 (which the
launcher used to refuse), and the 16-byte path past 2^31.

A GPU twin (skipped without CUDA) runs the whole op on such a row in a subprocess.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import requires_cuda
from simt_driver import COMMON_FLAGS, SIMT, build_cached
from simt_driver import requires_cxx as needs_cxx

FLAGS = [*COMMON_FLAGS, "-Wextra", "-Werror"]  # an executable, not a driver library
CASES = [
    "bf16_max_old_fwd",
    "bf16_max_old_fwd_last",
    "bf16_max_old_bwd",
    "fp32_near_wrap_fwd",
    "fp16_near_wrap_bwd",
    "fp64_max_old_fwd",
    "fp64_max_old_bwd",
    "bf16_past_2_31_fwd",
    "bf16_past_2_31_bwd",
    "bf16_past_2_31_vec_fwd",
    "fp32_past_2_31_vec_bwd",
]


def _overcommit_refuses():
    try:
        return Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "2"
    except OSError:
        return False


@pytest.fixture(scope="module")
def program():
    if _overcommit_refuses():
        pytest.skip("vm.overcommit_memory = 2 refuses MAP_NORESERVE mappings of 32 GB")
    return build_cached(SIMT / "wide_columns.cpp", "wide_columns", FLAGS)


@needs_cxx
def test_every_case_is_listed(program):
    listed = subprocess.run([str(program), "--list"], capture_output=True, text=True, timeout=60)
    assert listed.stdout.split() == CASES


@needs_cxx
@pytest.mark.parametrize("case", CASES)
def test_wide_half_row(program, case):
    proc = subprocess.run([str(program), case], capture_output=True, text=True, timeout=120)
    report = proc.stdout + proc.stderr
    assert proc.returncode != 4, f"a column index wrapped negative (out of bounds):\n{report}"
    assert proc.returncode == 0 and f"CASE {case} PASS" in proc.stdout, report


# ---- the same on a GPU: the whole op on one row of 2^31 + 1 columns -------------------------

GPU_SCRIPT = textwrap.dedent(
    """
    import torch
    import mixops  # noqa: F401

    f = (1 << 31) + 1  # odd: the scalar path; f + 2^24 and 2 f pass 2^31
    dev = "cuda"
    h = torch.empty(1, 2 * f, dtype=torch.bfloat16, device=dev)
    h.uniform_(-4, 4)
    out = torch.ops.mixops.gated_activation(h, "silu")
    torch.cuda.synchronize()
    go = torch.empty(1, f, dtype=torch.bfloat16, device=dev).uniform_(-1, 1)
    dh = torch.ops.mixops.gated_activation_backward(go, h, "silu")
    torch.cuda.synchronize()
    # Columns at the start, around 2^31 - 2^24, 2^31 and the end, against the CPU op (silu: the
    # same bits on CPU and CUDA).
    w = 4096
    for c0 in [0, (1 << 31) - (1 << 24) - w // 2, (1 << 31) - w // 2, f - w]:
        cols = torch.arange(c0, c0 + w, device=dev)
        hs = torch.cat([h[:, cols], h[:, cols + f]], dim=1).cpu()
        ref = torch.ops.mixops.gated_activation(hs, "silu")
        assert torch.equal(out[:, cols].cpu(), ref), f"forward differs near column {c0}"
        ref_dh = torch.ops.mixops.gated_activation_backward(go[:, cols].cpu(), hs, "silu")
        got_dh = torch.cat([dh[:, cols], dh[:, cols + f]], dim=1).cpu()
        assert torch.equal(got_dh, ref_dh), f"backward differs near column {c0}"
    print("OK")
    """
)


@requires_cuda
def test_gpu_half_row_past_2_31_columns():
    free, _ = torch.cuda.mem_get_info()
    if free < 30 * 2**30:
        pytest.skip(f"needs 30 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    # A subprocess: a wrapped index is an illegal address (the CUDA context is lost) or a kernel
    # that never ends.
    proc = subprocess.run(
        [sys.executable, "-c", GPU_SCRIPT], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, (proc.stdout + proc.stderr)[-4000:]
