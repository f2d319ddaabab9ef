"""Profile one forward+backward step of mixops.nn.MoE and print a per-stage summary.

The layer marks its stages with NVTX ranges (mixops.moe.router, permute, gate_up_gemm, activation,
down_gemm, unpermute, shared_experts). torch.profiler does not see NVTX, so while profiling each
range is mirrored as a torch.profiler.record_function of the same name; the summary gives, per
stage, the host time, the GPU time of the kernels it launched, and its share of the step. Backward
has no NVTX ranges: its autograd nodes are summarised by name instead.

The profiled step is bracketed with torch.cuda.profiler.start()/stop(), so under
`nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop` only it is captured.

    python bench/profile_moe.py                 # Qwen3-30B-A3B-sized layer, 8192 tokens, bf16
    python bench/profile_moe.py --tiny --device cpu   # a smoke run
"""

import argparse
import contextlib
import statistics
import sys

import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

from mixops.nn import MoE


@contextlib.contextmanager
def nvtx_as_record_function():
    """Mirror every torch.cuda.nvtx range push/pop as a record_function (for torch.profiler)."""
    nvtx = torch.cuda.nvtx
    push, pop = nvtx.range_push, nvtx.range_pop
    stack = []

    def _push(name):
        push(name)
        rf = record_function(name)
        rf.__enter__()
        stack.append(rf)

    def _pop():
        stack.pop().__exit__(None, None, None)
        return pop()

    nvtx.range_push, nvtx.range_pop = _push, _pop
    try:
        yield
    finally:
        nvtx.range_push, nvtx.range_pop = push, pop


def _device_us(e):
    for attr in ("device_time_total", "cuda_time_total"):  # the name changed in torch 2.x
        v = getattr(e, attr, None)
        if v is not None:
            return float(v)
    return 0.0


def _is_cpu_event(e):
    return str(getattr(e, "device_type", "CPU")).endswith("CPU")


def summarize(events, prefix, on_gpu):
    """Rows (name, calls, host ms, GPU ms, share) of every CPU range named prefix*, the share
    being of the step's GPU time (of its host time without a GPU)."""
    acc, step = {}, [0.0, 0.0]
    for e in events:
        if not _is_cpu_event(e):
            continue
        if e.name.startswith("mixops.step."):
            step[0] += e.cpu_time_total
            step[1] += _device_us(e)
        if e.name.startswith(prefix):
            calls, cpu, dev = acc.get(e.name, (0, 0.0, 0.0))
            acc[e.name] = (calls + 1, cpu + e.cpu_time_total, dev + _device_us(e))
    i = 2 if on_gpu else 1
    total = step[i - 1]
    rows = sorted(acc.items(), key=lambda kv: -kv[1][i])
    return [
        (name, calls, cpu / 1e3, dev / 1e3, (dev if on_gpu else cpu) / total if total else 0.0)
        for name, (calls, cpu, dev) in rows
    ]


def _print_table(title, rows, on_gpu):
    print(f"\n{title}\n")
    print(
        f"| range | calls | host ms | GPU ms | share of the step's {'GPU' if on_gpu else 'host'} time |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, calls, cpu, dev, share in rows:
        print(f"| {name} | {calls} | {cpu:.3f} | {dev:.3f} | {share:.1%} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--tiny", action="store_true", help="small layer (smoke run)")
    p.add_argument("--trace", default="", help="also write a Chrome trace here")
    p.add_argument("--ranges-off-gpu", action="store_true", help=argparse.SUPPRESS)  # tests
    args = p.parse_args(argv)
    if not args.ranges_off_gpu:
        return run(args)
    import mixops.nn.moe as moe_mod  # open the stage ranges on the CPU too (a test of this script)

    enabled = moe_mod._nvtx_enabled
    moe_mod._nvtx_enabled = lambda x: True
    try:
        return run(args)
    finally:
        moe_mod._nvtx_enabled = enabled


def run(args):
    dev, dtype = args.device, getattr(torch, args.dtype)
    # Qwen3-30B-A3B's MoE layer: hidden 2048, 128 experts of ffn 768, top-8, softmax + renorm.
    h, f, e, k, t = (64, 32, 16, 4, 256) if args.tiny else (2048, 768, 128, 8, args.tokens)
    torch.manual_seed(0)
    moe = MoE(h, f, e, k).to(dev, dtype)
    x = torch.randn(t, h, device=dev, dtype=dtype, requires_grad=True)
    gy = torch.randn(t, h, device=dev, dtype=dtype)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def step():
        moe.zero_grad(set_to_none=True)
        x.grad = None
        moe(x).backward(gy)

    for _ in range(3):  # warm-up: CUTLASS init, allocator, autograd graph caches
        step()
    sync()
    times = []
    for _ in range(5):
        if dev == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            sync()
            times.append(a.elapsed_time(b))
        else:
            import time

            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    print(
        f"MoE fwd+bwd: tokens {t}, hidden {h}, ffn {f}, experts {e}, top-{k}, {args.dtype} on "
        f"{dev}, torch {torch.__version__}: median {statistics.median(times):.3f} ms of 5 "
        "(unprofiled)"
    )

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    with nvtx_as_record_function(), profile(activities=acts) as prof:
        if dev == "cuda":
            torch.cuda.profiler.start()
        with record_function("mixops.step.forward"):
            y = moe(x)
        with record_function("mixops.step.backward"):
            y.backward(gy)
        sync()
        if dev == "cuda":
            torch.cuda.profiler.stop()
    events, on_gpu = prof.events(), dev == "cuda"
    _print_table("Step (profiled)", summarize(events, "mixops.step.", on_gpu), on_gpu)
    stages = summarize(events, "mixops.moe.", on_gpu)
    if stages:
        _print_table("Forward stages (NVTX ranges)", stages, on_gpu)
    else:
        print("\nno mixops.moe.* ranges (the layer opens them on CUDA only)")
    bwd = summarize(events, "autograd::engine::evaluate_function: ", on_gpu)
    _print_table("Backward (autograd nodes)", bwd[:12], on_gpu)
    sort = "self_device_time_total" if dev == "cuda" else "self_cpu_time_total"
    print(f"\nTop kernels and ops by {sort}:\n")
    print(prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=70))
    if args.trace:
        prof.export_chrome_trace(args.trace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
