"""Timing helpers shared by the benchmarks: medians over repeats, CUDA events on GPU, NVTX ranges."""
import statistics
import time
from contextlib import contextmanager

import torch

try:
    import nvtx as _nvtx
except ImportError:  # nvtx is a dependency, but a benchmark should not die without it
    _nvtx = None


@contextmanager
def nvtx_range(name):
    """An NVTX range (visible in `nsys profile`) around a benchmark stage; no-op off GPU."""
    if _nvtx is not None and torch.cuda.is_available():
        with _nvtx.annotate(name):
            yield
    else:
        yield


def median_ms(fn, device, reps, warmup=1, max_seconds=20.0):
    """Median wall time of fn() in milliseconds (CUDA: events, L2 flushed between reps).

    A call slower than max_seconds / 3 on the CPU is timed once (its warm-up run is the
    measurement): some peers run at ~1 GFLOPS on CPUs without native bf16 and would take minutes.
    """
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        once = time.perf_counter() - t0
        if device != "cuda" and once > max_seconds / 3:
            return once * 1e3
    times = []
    flush = torch.empty(64 << 20, dtype=torch.int8, device=device) if device == "cuda" else None
    start_all = time.perf_counter()
    for _ in range(reps):
        if device == "cuda":
            flush.zero_()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - start_all > max_seconds and len(times) >= 3:
            break
    return statistics.median(times)
