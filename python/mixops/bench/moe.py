"""MoE-layer benchmark, the default job of `python -m mixops.bench`: mixops.nn.MoE beside HF
transformers' MixtralSparseMoeBlock with its "eager" (per-expert loop) and "grouped_mm" experts, and
the floor (the same GEMM FLOPs as dense matmuls, no routing); forward, forward+backward with fresh
gradients and with accumulating ones, fp32 and bf16, all timed in one interleaved run per case.
Prints a median-ms table, a peak-memory table of forward+backward, writes a bar chart of "x floor"
(--png), and ends with decode.py's table (1-16 tokens per step against the memory bandwidth).

Every module gets the same weights (mixops' parameters copied into the HF blocks), so routing is
identical; in fp32 mixops' output and input gradient must equal HF eager's before anything is
timed. Peak memory on CPU comes from ru_maxrss in a fresh process per measurement (a fork of a
forkserver that has imported torch, mixops and transformers once), on CUDA from the allocator.
"""

import argparse
import gc
import math
import multiprocessing
import sys
from dataclasses import replace

import torch
from tqdm import tqdm

from . import decode
from .grouped_mm import native_lowp_matmul
from .moe_cases import (
    ACCUM,
    FLOOR,
    FULL,
    IMPLS,
    MOE_PASSES,
    PEERS,
    QUICK,
    build,
    build_all,
    check_same,
    floor_steps,
    fwd_bwd_step,
    fwd_step,
    init_weights,
    inputs,
    peer,
)
from .moe_cases import PASSES as PASSES  # moa.py and mod.py import it from here
from .timing import (
    interleaved_median_ms,
    nvtx_range,
    one_call_peak_mib,
    selected_dtypes,
    where,
)

_HF_MODULE = "transformers.models.mixtral.modeling_mixtral"


# -- peak memory of one forward+backward --------------------------------------------------------
def peak_mem_mib(cfg, dtype_name, impl, device):
    """MiB that one fwd+bwd of impl adds at its peak: CUDA allocator peak minus the memory before,
    or the ru_maxrss increase (CPU; call in a fresh process: ru_maxrss never goes down). A tiny
    fwd+bwd first faults in the code pages and workspaces, so only the pass's data is counted."""
    dtype = getattr(torch, dtype_name)

    def ready(c):
        module = init_weights(build(c, impl, device, dtype))
        x, gy = inputs(c, device, dtype)
        step = fwd_bwd_step(module, x, gy, impl)
        return step if impl == "mixops" else peer(step)

    try:
        ready(replace(cfg, tokens=16, hidden=32, ffn=16))()
        step = ready(cfg)
        gc.collect()
        return one_call_peak_mib(step, device)
    except RuntimeError as e:
        if impl == "mixops":
            raise
        print(f"  peak memory {cfg.name} {dtype_name} {impl}: failed: {str(e).splitlines()[0]}")
        return float("nan")


def measure_peak_mem(configs, dtypes, device):
    """{(config name, dtype name, impl): MiB}; on CPU each measurement in its own process."""
    jobs = [(cfg, str(dt)[6:], impl) for cfg in configs for dt in dtypes for impl in IMPLS]
    mem = {}
    pool = None
    if device != "cuda":
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        if ctx.get_start_method() == "forkserver":
            ctx.set_forkserver_preload(["torch", "mixops.nn", _HF_MODULE, __name__])
        pool = ctx.Pool(1, maxtasksperchild=1)
    try:
        for cfg, dt, impl in tqdm(jobs, desc="peak memory", file=sys.stderr, disable=None):
            args = (cfg, dt, impl, device)
            mem[cfg.name, dt, impl] = (
                pool.apply(peak_mem_mib, args) if pool else peak_mem_mib(*args)
            )
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return mem


# -- the run ------------------------------------------------------------------------------------
def time_case(mods, x, gy, floor, pas, device, reps, label):
    if pas == "fwd":
        fns = {name: fwd_step(m, x, name) for name, m in mods.items()}
    else:
        acc = pas == ACCUM
        fns = {name: fwd_bwd_step(m, x, gy, name, acc) for name, m in mods.items()}
    fns = {name: fn if name == "mixops" else peer(fn) for name, fn in fns.items()}
    fns[FLOOR] = floor[MOE_PASSES.index(pas)]
    with torch.set_grad_enabled(pas != "fwd"), nvtx_range(label):
        return interleaved_median_ms(fns, device, reps)


def table_rows(case, ms):
    cfg, dt, pas = case
    for name in (*IMPLS, FLOOR):
        speed = f"{ms[name] / ms['mixops']:.2f}x" if name in PEERS else ""
        yield (
            f"{cfg:<11} {dt:<9} {pas:<13} {name:<14} {ms[name]:>11.3f} "
            f"{ms[name] / ms[FLOOR]:>8.2f} {speed:>15}"
        )


def summary(case, ms):
    return (
        f"{' '.join(case)}: mixops {ms['mixops'] / ms[FLOOR]:.2f}x floor, speedup "
        f"{ms['HF eager'] / ms['mixops']:.2f}x vs HF eager, "
        f"{ms['HF grouped_mm'] / ms['mixops']:.2f}x vs HF grouped_mm"
    )


def write_png(results, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(7.0, 1.4 * len(results)), 5.0))
    width = 0.8 / len(IMPLS)
    for i, impl in enumerate(IMPLS):
        vals = [ms[impl] / ms[FLOOR] for _, ms in results]
        xs = [c + (i - (len(IMPLS) - 1) / 2) * width for c in range(len(results))]
        bars = ax.bar(xs, [v if math.isfinite(v) else 0.0 for v in vals], width, label=impl)
        ax.bar_label(bars, [f"{v:.2f}" if math.isfinite(v) else "n/a" for v in vals], fontsize=7)
    ax.axhline(1.0, color="black", lw=0.8, ls="--", label="floor (dense GEMMs)")
    ax.set_yscale("log")
    ax.set_ylabel("median time / floor (lower is better)")
    ax.set_xticks(range(len(results)), ["\n".join(case) for case, _ in results], fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args):
    import transformers

    device = args.device
    configs = [c for c in (QUICK if args.quick else FULL) if args.experts in (0, c.experts)]
    dtypes = selected_dtypes(args)
    cpu = "" if device == "cuda" else f", CPU capability {torch.backends.cpu.get_cpu_capability()}"
    title = (
        f"mixops MoE-layer benchmark on {device} ({where(device)}{cpu}), torch "
        f"{torch.__version__}, transformers {transformers.__version__}; median ms of {args.reps} reps"
    )
    print(title)
    print(
        "impls: mixops.nn.MoE, HF MixtralSparseMoeBlock (experts 'eager' and 'grouped_mm'); "
        "floor = the same GEMMs dense over tokens*k rows, no routing"
    )
    print(
        f"passes: fwd; fwd+bwd = fresh gradients (every parameter's .grad None before each step); "
        f"{ACCUM} = .grad kept, so backward adds into it (x.grad still reset; the floor keeps "
        "its weights' .grad)"
    )
    for dtype in dtypes:
        if not native_lowp_matmul(dtype, device):
            print(
                f"note: this CPU has no native {str(dtype)[6:]} GEMM; the {str(dtype)[6:]} floor is the dense "
                "product in float32, and peers slower than 7 s are timed once"
            )
    for cfg in configs:
        check_same(cfg, device)
    print(
        f"checked: mixops output and input gradient == HF eager's in float32 "
        f"(rtol 1e-4, atol 1e-5) for {', '.join(c.name for c in configs)}",
        flush=True,
    )

    results = []
    total = len(configs) * len(dtypes) * len(MOE_PASSES)
    bar = tqdm(total=total, desc="moe bench", file=sys.stderr, disable=None)
    for cfg in configs:
        for dtype in dtypes:
            dt = str(dtype)[6:]
            mods, x, gy = build_all(cfg, device, dtype)
            floor_dtype = dtype if native_lowp_matmul(dtype, device) else torch.float32
            floor = floor_steps(cfg, device, floor_dtype)
            for pas in MOE_PASSES:
                case = (cfg.name, dt, pas)
                ms = time_case(mods, x, gy, floor, pas, device, args.reps, " ".join(case))
                results.append((case, ms))
                bar.update(1)
                tqdm.write(f"[{len(results)}/{total}] {summary(case, ms)}")
                sys.stdout.flush()
            del mods, x, gy, floor
            gc.collect()
    bar.close()

    header = (
        f"{'config':<11} {'dtype':<9} {'pass':<13} {'impl':<14} {'median ms':>11} "
        f"{'x floor':>8} {'mixops speedup':>15}"
    )
    print()
    print(header)
    print("-" * len(header))
    for case, ms in results:
        for line in table_rows(case, ms):
            print(line)
        print()
    print("summary (speedup = peer ms / mixops ms):")
    for case, ms in results:
        print("  " + summary(case, ms))

    mem = {}
    if not args.no_peak_mem:
        how = (
            "CUDA allocator peak" if device == "cuda" else "ru_maxrss increase, fresh process each"
        )
        print(f"\npeak memory of one fwd+bwd, MiB above the memory before it ({how})")
        mem = measure_peak_mem(configs, dtypes, device)
        head = (
            f"{'config':<11} {'dtype':<9} {'mixops':>9} {'HF eager':>9} {'HF grouped_mm':>14} "
            f"{'mixops/HF grouped_mm':>21} {'mixops/HF eager':>16}"
        )
        print(head)
        print("-" * len(head))
        for cfg in configs:
            for dtype in dtypes:
                m = [mem[cfg.name, str(dtype)[6:], impl] for impl in IMPLS]
                print(
                    f"{cfg.name:<11} {str(dtype)[6:]:<9} {m[0]:>9.1f} {m[1]:>9.1f} {m[2]:>14.1f} "
                    f"{m[0] / m[2]:>21.2f} {m[0] / m[1]:>16.2f}"
                )

    if args.png:
        write_png(results, args.png, title)
        print(f"\nchart of x floor written to {args.png}")
    if not args.no_decode:
        print()
        decode.run(args)
    return results, mem


def add_args(p: argparse.ArgumentParser):
    """moe's own options (--device, --quick, --reps, --dtype, --experts are shared)."""
    p.add_argument(
        "--png",
        default="mixops_bench_moe.png",
        help="where to write the x-floor bar chart ('' for none)",
    )
    p.add_argument(
        "--no-peak-mem",
        action="store_true",
        help="skip the peak-memory measurement of fwd+bwd",
    )
    p.add_argument(
        "--no-decode",
        action="store_true",
        help="skip the decode table (python -m mixops.bench decode) after moe's tables",
    )
