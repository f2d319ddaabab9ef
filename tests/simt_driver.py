"""Building and calling SIMT-harness drivers from pytest (test code).

A driver (tests/simt/drivers/<name>.cpp) includes tests/simt/launch_bridge.h and one or more of our
real .cu launch files, and exposes extern "C" functions that run an op's launch code on host
buffers under the SIMT harness. This builds it as a shared library with g++ (cached under the temp
dir, keyed by a hash of every harness and csrc source and the flags), loads it with ctypes, and
gives the four harness runs a test repeats every call under (schedule, seed, poison), so a race or
a read of unwritten shared memory shows as different bits between runs.

Driver convention: every extern "C" entry point takes, last, ``const SimtRun* run`` and
``char* err, int err_len``, returns 0 on success and non-zero with the message in ``err``
(a simt::Error, a std::exception from the launch code, or "unknown"). See drivers/README.md.

Buffers for the raw-pointer calls: ``addr`` (any strides), ``poisoned`` outputs (one fill byte per
run, ``FILLS``), ``Bytes`` (a strided input at a chosen misalignment) and ``bits_equal``.
"""

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SIMT = ROOT / "tests" / "simt"
CXX = shutil.which("g++")
requires_cxx = pytest.mark.skipif(CXX is None, reason="needs g++ for the SIMT harness")

COMMON_FLAGS = [  # every harness build; FLAGS adds the shared-library ones for the drivers
    "-std=c++20",
    "-O2",
    "-ffp-contract=off",
    "-Wall",
    "-Wno-unknown-pragmas",
    "-include",
    str(SIMT / "simt.h"),
    f"-I{SIMT}",
    f"-I{SIMT / 'shim'}",
    f"-I{ROOT / 'csrc'}",
]
FLAGS = [*COMMON_FLAGS, "-fPIC", "-shared"]


class SimtRun(ctypes.Structure):
    """simt_run.h's SimtRun: schedule 0 forward, 1 reversed, 2 shuffled; arch 80 or 90;
    smem_optin: the shared-memory opt-in the modelled device reports to launch plans (0: the
    arch's), e.g. small to drive a kernel's global-memory fallback with small shapes."""

    _fields_ = [
        ("schedule", ctypes.c_int),
        ("seed", ctypes.c_uint64),
        ("poison", ctypes.c_uint8),
        ("arch", ctypes.c_int),
        ("smem_optin", ctypes.c_int),
    ]


# The runs of simt::default_runs(): every order differs at every round, poison differs per run.
RUNS = [
    SimtRun(0, 1, 0xA5, 90),
    SimtRun(1, 1, 0x5A, 90),
    SimtRun(2, 1, 0xFF, 90),
    SimtRun(2, 2, 0x3C, 80),
]


def _sources_hash(flags):
    h = hashlib.sha256(" ".join(flags).encode())
    for base in (SIMT, ROOT / "csrc"):
        for f in sorted(base.rglob("*")):
            if f.is_file() and f.suffix in {".h", ".cuh", ".cu", ".cpp", ".hpp"}:
                h.update(str(f.relative_to(ROOT)).encode())
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


def build_cached(source, name, flags, suffix=""):
    """``source`` built by g++ with ``flags``, once per hash of the flags and every harness and
    csrc source (cached under the temp directory); returns the output's path."""
    cache = Path(tempfile.gettempdir()) / "mixops_simt_drivers"
    cache.mkdir(exist_ok=True)
    out = cache / f"{name}-{_sources_hash([str(source), *flags])}{suffix}"
    if not out.exists():
        tmp = cache / f"{out.name}.{os.getpid()}.tmp"
        proc = subprocess.run(
            [CXX, *flags, str(source), "-o", str(tmp)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"building {name} for the SIMT harness failed:\n{proc.stderr[-4000:]}"
            )
        tmp.replace(out)
    return out


_loaded = {}


def load_driver(name, extra_flags=()):
    """Builds (once per source hash) and loads tests/simt/drivers/<name>.cpp."""
    key = (name, tuple(extra_flags))
    if key in _loaded:
        return _loaded[key]
    so = build_cached(SIMT / "drivers" / f"{name}.cpp", name, [*FLAGS, *extra_flags], ".so")
    lib = ctypes.CDLL(str(so))
    _loaded[key] = lib
    return lib


def ptr(t):
    """A ctypes pointer to a contiguous CPU tensor's data (None for None)."""
    if t is None:
        return None
    assert t.device.type == "cpu" and t.is_contiguous()
    return ctypes.c_void_p(t.data_ptr())


def call(fn, *args, run):
    """Calls a driver entry point with run and an error buffer; raises RuntimeError on failure."""
    err = ctypes.create_string_buffer(4096)
    rc = fn(*args, ctypes.byref(run), err, len(err))
    if rc != 0:
        raise RuntimeError(err.value.decode(errors="replace"))


def runs_with(**fields):
    """RUNS with some SimtRun fields changed (e.g. smem_optin=4096)."""
    out = []
    for r in RUNS:
        c = SimtRun(r.schedule, r.seed, r.poison, r.arch, r.smem_optin)
        for k, v in fields.items():
            setattr(c, k, v)
        out.append(c)
    return out


def run_all(make_outputs, launch, runs=None):
    """Runs launch(outputs, run) under every run in RUNS (or runs) on fresh outputs from
    make_outputs() and requires bit-identical outputs; returns those of the first run."""
    first = None
    for run in runs or RUNS:
        outs = make_outputs()
        launch(outs, run)
        if first is None:
            first = outs
            continue
        for i, (a, b) in enumerate(zip(first, outs)):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), (
                f"output {i} differs between the forward run and schedule {run.schedule} "
                f"(seed {run.seed}, poison {run.poison:#x}): a race or a read of unwritten memory"
            )
    return first


# ---- buffers for the raw-pointer calls -------------------------------------------------------

DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}  # Dtype
FILLS = (0xA5, 0x5A, 0xFF, 0x3C)  # outputs start as these bytes, one per harness run


def addr(t):
    """The data pointer of a CPU tensor (any strides; None for None)."""
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def poisoned(fill, shape, dtype):
    t = torch.empty(shape, dtype=dtype)
    t.view(torch.uint8).fill_(fill)
    return t


class Bytes:
    """A copy of a strided tensor's memory (every element its strides reach, non-negative
    strides) at a chosen byte offset from 16-byte alignment: the harness reads it through a raw
    pointer with the same strides, so a misaligned input reaches a kernel's narrower vector
    paths."""

    def __init__(self, t, misalign=0):
        assert all(s >= 0 for s in t.stride())
        span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) if t.numel() else 0
        nbytes = span * t.element_size()
        self.buf = torch.zeros(nbytes + 32, dtype=torch.uint8)
        start = (-self.buf.data_ptr()) % 16 + misalign
        if nbytes:
            src = torch.as_strided(t, (span,), (1,)).contiguous().view(torch.uint8)
            self.buf[start : start + nbytes] = src
        self.ptr = ctypes.c_void_p(self.buf.data_ptr() + start)


def bits_equal(a, b, what):
    assert a.shape == b.shape and a.dtype == b.dtype, (
        f"{what}: {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}"
    )
    if a.numel() == 0:
        return
    ua = a.contiguous().view(torch.uint8)
    ub = b.contiguous().view(torch.uint8)
    if not torch.equal(ua, ub):
        bad = (ua != ub).nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: not bit-equal to the CPU op ({(ua != ub).sum().item()} bytes differ, "
            f"first at byte index {bad})"
        )
