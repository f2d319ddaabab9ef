"""Timing helpers shared by the benchmarks: medians over repeats, CUDA events on GPU, NVTX ranges,
and the CUDA profiler range (cudaProfilerStart/Stop) around each timed region."""

import resource
import statistics
import time
from contextlib import contextmanager

import torch

from .._nvtx import nvtx_range as _nvtx_range


def nvtx_range(name):
    """An NVTX range (visible in `nsys profile`) around a benchmark stage; no-op off GPU."""
    return _nvtx_range(name, enabled=torch.cuda.is_available())


def one_call_peak_mib(step, device):
    """Peak memory of one ``step()`` above the memory before it, in MiB: the CUDA allocator's
    peak, or the ru_maxrss increase on the CPU (meaningful in a fresh process only: ru_maxrss never
    goes down)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # KiB on Linux


@contextmanager
def cuda_profiler_range(enabled=True):
    """cudaProfilerStart/Stop around the timed region (after the warm-up), so `nsys profile
    --capture-range=cudaProfilerApi` records the measured calls only (bench/README.md)."""
    if not enabled:
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    try:
        yield
    finally:
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()


def selected_dtypes(args):
    """The dtypes of ``--dtype`` (all: fp32 then bf16)."""
    return [d for d in (torch.float32, torch.bfloat16) if args.dtype in ("all", str(d)[6:])]


def where(device):
    """The GPU's name, or the CPU thread count, for the benchmarks' header lines."""
    return (
        torch.cuda.get_device_name() if device == "cuda" else f"{torch.get_num_threads()} threads"
    )


def _time_once(fn, device, flush):
    if device == "cuda":
        flush.zero_()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        return s.elapsed_time(e)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def interleaved_median_ms(fns, device, reps, slow_seconds=7.0):
    """Median ms of each fn in the dict {name: fn}, timed round-robin (rep 1 of every fn, then
    rep 2, ...) so that drift in the machine's speed hits every fn alike and ratios stay honest.

    The warm-up call is timed; a fn slower than slow_seconds on the CPU keeps that one time (some
    peers run at ~1 GFLOPS on CPUs without native bf16). A fn raising RuntimeError gets NaN.
    """
    flush = torch.empty(64 << 20, dtype=torch.int8, device=device) if device == "cuda" else None
    times = {name: [] for name in fns}
    live = []
    for name, fn in fns.items():
        try:
            once = _time_once(fn, device, flush)
        except RuntimeError as e:  # a peer refusing a shape is reported, not fatal
            print(f"  {name}: failed: {str(e).splitlines()[0]}")
            times[name] = [float("nan")]
            continue
        if device != "cuda" and once > slow_seconds * 1e3:
            times[name] = [once]
        else:
            live.append(name)
    with cuda_profiler_range(device == "cuda"):
        for _ in range(reps):
            for name in live:
                with nvtx_range(name):
                    times[name].append(_time_once(fns[name], device, flush))
    return {name: statistics.median(t) for name, t in times.items()}
