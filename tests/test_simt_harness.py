"""Self-test of the SIMT harness (tests/simt/): the CPU model of the CUDA execution model that our
kernel headers run on. tests/simt/selftest.cpp holds deliberately broken kernels, one per fault
class, and correct ones; this builds it with g++ (plain, -fsanitize=address, and with the
swapcontext fiber backend) and requires every broken kernel caught and every correct one passed.
It also compiles every csrc/*_kernel.cuh under the harness (tests/simt/compile/).

Builds are cached under the temp dir, keyed by a hash of the harness sources and the flags.
"""

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SIMT = ROOT / "tests" / "simt"
CXX = shutil.which("g++")
pytestmark = pytest.mark.skipif(CXX is None, reason="needs g++")

FLAGS = [
    "-std=c++20",
    "-O1",
    "-g",
    "-ffp-contract=off",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-Wno-unknown-pragmas",
    "-include",
    str(SIMT / "simt.h"),
    f"-I{SIMT / 'shim'}",
    f"-I{ROOT / 'csrc'}",
]
VARIANTS = {
    "plain": [],
    "asan": ["-fsanitize=address", "-fno-omit-frame-pointer"],
    "ucontext": ["-DSIMT_FIBER_UCONTEXT"],
}

# Each fault class the harness must catch: case name -> what the report must say.
FAULTS = {
    "missing_syncthreads": "wrote different bits",
    "missing_syncwarp": "wrote different bits",
    "uninit_static_smem": "wrote different bits",
    "uninit_dynamic_smem": "wrote different bits",
    "blockscan_reuse_without_sync": "wrote different bits",
    "divergent_syncthreads": "divergent __syncthreads",
    "divergent_syncwarp": "divergent __syncwarp",
    "deadlock": "deadlock",
    "livelock": "scheduling rounds",
    "shfl_exited_lane": "which has exited",
    "shfl_lane_outside_mask": "which is not in the mask",
    "mask_without_caller": "does not include the calling lane",
    "shfl_partial_warp": "does not exist",
    "masks_disagree": "passes mask",
    "too_many_threads": "at most 1024 threads",
    "block_dim_z_too_big": "at most 1024 threads",
    "smem_over_sm80_optin": "opt-in limit",
}
# Out-of-bounds accesses: AddressSanitizer's report, one process per case (ASan aborts).
OOB = {
    "oob_global_write": "k_write_tid",
    "oob_dynamic_smem": "k_dynamic_smem_overflow",
    "oob_static_smem": "k_static_smem_overflow",
}
CORRECT = [
    "block_exchange",
    "warp_exchange",
    "block_reduce",
    "warp_reductions",
    "votes_and_match",
    "block_scan",
    "block_scan_reuse_with_sync",
    "atomics_histogram",
    "exited_threads_count_as_arrived",
    "block_3d_and_grid",
    "syncthreads_count_and_or",
    "sm90_allows_200kb",
    "lowp_conversions",
    "cub_device_sort_and_scan",
]


def _build(variant):
    flags = FLAGS + VARIANTS[variant]
    h = hashlib.sha256(" ".join([CXX, *flags]).encode())
    for f in sorted(SIMT.rglob("*")) + [ROOT / "csrc" / "core" / "macros.h"]:
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    out = Path(tempfile.gettempdir()) / "mixops-simt" / f"selftest-{variant}-{h.hexdigest()[:16]}"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    proc = subprocess.run(
        [CXX, *flags, str(SIMT / "selftest.cpp"), "-o", str(tmp)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        if variant == "asan" and "asan" in proc.stderr:
            pytest.skip(f"no AddressSanitizer runtime: {proc.stderr[-300:]}")
        pytest.fail(f"building the {variant} self-test failed:\n{proc.stderr[-4000:]}")
    tmp.replace(out)  # atomic: concurrent sessions never see a half-written binary
    return out


def _run(exe, *args):
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120)


def _results(variant):
    proc = _run(_build(variant))
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("CASE "):
            _, name, status, *detail = line.split(" ", 3)
            results[name] = (status, detail[0] if detail else "")
    return proc, results


@pytest.fixture(scope="module")
def plain():
    return _results("plain")


@pytest.fixture(scope="module")
def asan():
    return _results("asan")


def test_selftest_lists_every_case():
    listed = {
        line.split()[0]: line.split()[1]
        for line in _run(_build("plain"), "--list").stdout.splitlines()
    }
    assert {n: "fault" for n in FAULTS} == {n: k for n, k in listed.items() if k == "fault"}
    assert {n: "asan" for n in OOB} == {n: k for n, k in listed.items() if k == "asan"}
    assert set(CORRECT) == {n for n, k in listed.items() if k == "pass"}
    assert {"stack_overflow": "exit"} == {n: k for n, k in listed.items() if k == "exit"}


@pytest.mark.parametrize("case", sorted(FAULTS))
def test_fault_is_caught(plain, case):
    status, detail = plain[1][case]
    assert status == "CAUGHT", f"{case}: {status} {detail}"
    assert FAULTS[case] in detail


@pytest.mark.parametrize("case", CORRECT)
def test_correct_kernel_passes(plain, case):
    status, detail = plain[1][case]
    assert status == "PASS", f"{case}: {status} {detail}"


def test_selftest_exit_status(plain):
    proc, results = plain
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert all(results[n][0] == "SKIP" for n in [*OOB, "stack_overflow"])


def test_asan_build_agrees_and_is_clean(asan):
    proc, results = asan
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert "AddressSanitizer" not in proc.stderr and "LeakSanitizer" not in proc.stderr
    for case in FAULTS:
        assert results[case][0] == "CAUGHT", (case, results[case])
    for case in CORRECT:
        assert results[case][0] == "PASS", (case, results[case])


@pytest.mark.parametrize("case", sorted(OOB))
def test_out_of_bounds_caught_by_asan(case):
    proc = _run(_build("asan"), case)
    assert proc.returncode != 0
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in proc.stderr, proc.stderr[-2000:]
    assert OOB[case] in proc.stderr  # the report's stack names the kernel


def test_stack_overflow_is_reported():
    # A fiber that overflows its stack hits the guard page: a message and exit status 3, not a
    # bare SIGSEGV (under ASan, ASan's own report).
    proc = _run(_build("plain"), "stack_overflow")
    assert proc.returncode == 3 and "overflowed its stack" in proc.stderr, proc.stderr[-2000:]
    proc = _run(_build("asan"), "stack_overflow")
    assert proc.returncode != 0 and "AddressSanitizer: stack-overflow" in proc.stderr


def test_ucontext_backend():
    proc = _run(_build("ucontext"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(" CAUGHT ") == len(FAULTS)
    assert proc.stdout.count(" PASS ") == len(CORRECT)


@pytest.mark.parametrize("unit", sorted(p.stem for p in (SIMT / "compile").glob("*.cpp")))
def test_kernel_headers_compile_under_harness(unit):
    # Every csrc/*_kernel.cuh, every instantiation its .cu launches (tests/simt/compile/).
    proc = subprocess.run(
        [CXX, *FLAGS, "-fsyntax-only", str(SIMT / "compile" / f"{unit}.cpp")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_every_kernel_header_has_a_compile_check():
    covered = "".join(p.read_text() for p in (SIMT / "compile").glob("*.cpp"))
    for header in sorted((ROOT / "csrc").glob("*/*_kernel.cuh")):
        name = f"{header.parent.name}/{header.name}"
        assert f'#include "{name}"' in covered, f"{name} has no tests/simt/compile/ check"
