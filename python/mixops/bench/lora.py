"""LoRA benchmark (`python -m mixops.bench lora`, issue 26): expert LoRA fine-tuning on an MoE layer
and LoRAMoE's adapter path, mixops beside its peers, median ms of interleaved runs.

Section 1, an MoE LoRA fine-tuning step (frozen base, rank-r adapters on every expert's
``gate_up_proj`` and ``down_proj``, ranks --ranks), on the moe bench's "coarse-8x2" and
"fine-64x8" shapes, forward and forward+backward (input and adapter gradients): mixops.nn.MoE
with its adapters (two thin grouped GEMMs per projection on the permuted rows), PEFT's
``LoraConfig(target_parameters=["experts.gate_up_proj", "experts.down_proj"])`` on HF's
MixtralSparseMoeBlock with "grouped_mm" experts (PEFT folds ``W + scale * B A`` for every expert
on every forward), and the frozen mixops layer without adapters (the reference line). Then the
peak memory of one fwd+bwd of each (ru_maxrss increase in a fresh process on CPU, as moe.py).

Section 2, LoRAMoE's adapter path (``sum_j w_j scale B_{e_j} A_{e_j} x`` over a token's top-k of
E LoRA experts, on a frozen Linear): mixops (router logits -> router_topk -> permute ->
lora_delta -> unpermute) against MixLoRA's per-expert loop; the frozen base Linear, and whole
layers (mixops.nn.LoRAMoE where it exists; base + loop) for context.

Before timing, in float32: mixops' output and input gradient equal PEFT's (section 1, every rank)
and the loop's (section 2) within rtol 1e-4, atol 1e-5: same weights, same routing.
"""

import argparse
import gc
import multiprocessing
import os
import sys
import warnings
from dataclasses import replace
from importlib.metadata import version

import torch

from .grouped_mm import native_lowp_matmul
from .lora_cases import (
    IMPLS,
    MOE_TARGET,
    MOL_FULL,
    MOL_IMPLS,
    MOL_QUICK,
    TARGETS,
    MoL,
    build,
    check_same,
    mol_check,
)
from .moe_cases import FULL, QUICK, fwd_bwd_step, fwd_step, inputs, peer
from .timing import interleaved_median_ms, nvtx_range, one_call_peak_mib, selected_dtypes, where

PASSES = ("fwd", "fwd+bwd")
_PRELOAD = ["torch", "mixops.nn", "transformers.models.mixtral.modeling_mixtral", "peft"]


def _steps(mods, x, gy, pas):
    """{impl: the timed call}; a peer's failure reads as RuntimeError (NaN), mixops' stops."""
    fns = {
        name: fwd_step(m, x, name) if pas == "fwd" else fwd_bwd_step(m, x, gy, name)
        for name, m in mods.items()
    }
    return {name: fn if name.startswith("mixops") else peer(fn) for name, fn in fns.items()}


# -- peak memory (section 1) --------------------------------------------------------------------
def peak_mem_mib(cfg, dtype_name, impl, rank, device):
    """MiB that one fwd+bwd of impl adds at its peak (CPU: call in a fresh process). A tiny
    fwd+bwd first faults in the code pages and workspaces, so only the pass's data is counted."""
    dtype = getattr(torch, dtype_name)
    warnings.filterwarnings("ignore", category=UserWarning)

    def ready(c):
        x, gy = inputs(c, device, dtype)
        return _steps({impl: build(c, impl, rank, device, dtype)}, x, gy, "fwd+bwd")[impl]

    try:
        ready(replace(cfg, tokens=16, hidden=32, ffn=16))()
        step = ready(cfg)
        gc.collect()
        return one_call_peak_mib(step, device)
    except RuntimeError as e:
        if impl.startswith("mixops"):
            raise
        print(f"  peak memory {cfg.name} {dtype_name} r={rank} {impl}: failed: {e}".splitlines()[0])
        return float("nan")


def measure_peak_mem(configs, dtypes, ranks, device):
    """{(config name, dtype name, rank, impl): MiB}; the layer without adapters once per config
    and dtype (stored under every rank); on CPU each measurement in its own process."""
    jobs = [(c, str(dt)[6:], impl, r) for c in configs for dt in dtypes for r in ranks
            for impl in IMPLS if r == ranks[0] or impl != "mixops no LoRA"]  # fmt: skip
    pool = None
    if not device.startswith("cuda"):
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        if ctx.get_start_method() == "forkserver":
            ctx.set_forkserver_preload([*_PRELOAD, __name__])
        pool = ctx.Pool(1, maxtasksperchild=1)
    mem = {}
    try:
        for c, dt, impl, r in jobs:
            job = (c, dt, impl, r, device)
            mib = pool.apply(peak_mem_mib, job) if pool else peak_mem_mib(*job)
            for rr in ranks if impl == "mixops no LoRA" else (r,):
                mem[c.name, dt, rr, impl] = mib
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return mem


# -- the sections -------------------------------------------------------------------------------
def _progress(i, total, label, ms, ref, names):
    ratios = ", ".join(f"{n} {ms[n]:.2f} ms ({ms[n] / ms[ref]:.2f}x)" for n in names)
    print(f"[{i}/{total}] {label}: {ref} {ms[ref]:.2f} ms, {ratios}", file=sys.stderr, flush=True)


def run_moe(configs, dtypes, ranks, device, reps):
    results = []
    total = len(configs) * len(dtypes) * len(ranks) * len(PASSES)
    for cfg in configs:
        for dtype in dtypes:
            for rank in ranks:
                mods = {impl: build(cfg, impl, rank, device, dtype) for impl in IMPLS}
                x, gy = inputs(cfg, device, dtype)
                for pas in PASSES:
                    case = (cfg.name, str(dtype)[6:], rank, pas)
                    label = " ".join(map(str, case))
                    with torch.set_grad_enabled(pas != "fwd"), nvtx_range(label):
                        ms = interleaved_median_ms(_steps(mods, x, gy, pas), device, reps)
                    results.append((case, ms))
                    _progress(len(results), total, label, ms, "mixops", IMPLS[1:])
                del mods, x, gy
                gc.collect()
    return results


def _met(speedup, target):
    return "met" if speedup >= target else "MISSED"


def print_moe(results, mem, device):
    head = (
        f"{'config':<11} {'dtype':<9} {'rank':>4} {'pass':<8} {'mixops ms':>10} {'PEFT ms':>10} "
        f"{'no-LoRA ms':>11} {'PEFT/mixops':>12} {'no-LoRA/mixops':>15} {'target':>7} {'met':>6}"
    )
    print("\nSection 1: MoE LoRA fine-tuning step (PEFT = PEFT's ParamWrapper on HF grouped_mm)")
    print(head)
    print("-" * len(head))
    for (name, dt, rank, pas), ms in results:
        m, p, n = (ms[i] for i in IMPLS)
        target, met = "", ""
        if pas == "fwd+bwd":
            target, met = f"{TARGETS[name]:.1f}x", _met(p / m, TARGETS[name])
        print(
            f"{name:<11} {dt:<9} {rank:>4} {pas:<8} {m:>10.2f} {p:>10.2f} {n:>11.2f} "
            f"{p / m:>11.2f}x {n / m:>14.2f}x {target:>7} {met:>6}"
        )
    if mem:
        how = "CUDA allocator" if device.startswith("cuda") else "ru_maxrss, fresh process each"
        print(f"\npeak memory of one fwd+bwd, MiB above the memory before it ({how})")
        head = (
            f"{'config':<11} {'dtype':<9} {'rank':>4} {'mixops':>9} {'PEFT':>9} {'no-LoRA':>9} "
            f"{'mixops/PEFT':>12} {'less than PEFT':>15}"
        )
        print(head)
        print("-" * len(head))
        for (name, dt, rank, pas), _ in results:
            if pas != "fwd+bwd":
                continue
            m, p, n = (mem[name, dt, rank, i] for i in IMPLS)
            print(
                f"{name:<11} {dt:<9} {rank:>4} {m:>9.1f} {p:>9.1f} {n:>9.1f} {m / p:>12.2f} "
                f"{'yes' if m < p else 'NO':>15}"
            )


def _mol_step(m, meth, x, gy, params, pas):
    fn = getattr(m, meth)
    if pas == "fwd":
        return lambda: fn(x)

    def fwd_bwd():
        x.grad = None
        for p in params:
            p.grad = None
        fn(x).backward(gy)

    return fwd_bwd


def run_mol(c, dtypes, device, reps):
    results = []
    for dtype in dtypes:
        m = MoL(c, device, dtype)
        g = torch.Generator(device=device).manual_seed(6)
        x = torch.randn(c.tokens, c.hidden, generator=g, device=device, dtype=dtype)
        gy = torch.randn(c.tokens, c.hidden, generator=g, device=device, dtype=dtype)
        x.requires_grad_(True)
        params = list(m.parameters())
        for pas in PASSES:
            fns = {name: _mol_step(m, meth, x, gy, params, pas) for name, meth in MOL_IMPLS.items()}
            case = (c.name, str(dtype)[6:], pas)
            label = " ".join(case)
            with torch.set_grad_enabled(pas != "fwd"), nvtx_range(label):
                ms = interleaved_median_ms(fns, device, reps)
            results.append((case, ms))
            _progress(len(results), 2 * len(dtypes), label, ms, "mixops", ["per-expert loop"])
        del m, x, gy, params
        gc.collect()
    return results


def print_mol(c, results):
    print(
        f"\nSection 2: LoRAMoE adapter path ({c.name}: {c.tokens} tokens, {c.hidden} -> "
        f"{c.hidden}, E {c.experts}, top-{c.topk}, r {c.rank}); layer = base Linear + adapters"
    )
    head = (
        f"{'config':<10} {'dtype':<9} {'pass':<8} {'mixops ms':>10} {'loop ms':>9} "
        f"{'loop/mixops':>12} {'target':>7} {'met':>6} {'base ms':>8} {'layer ms':>9} "
        f"{'base+loop ms':>13} {'(base+loop)/layer':>18}"
    )
    print(head)
    print("-" * len(head))
    for (name, dt, pas), ms in results:
        m, lp, b, lay, bl = (ms[k] for k in MOL_IMPLS)
        print(
            f"{name:<10} {dt:<9} {pas:<8} {m:>10.3f} {lp:>9.3f} {lp / m:>11.2f}x "
            f"{MOE_TARGET:>6.1f}x {_met(lp / m, MOE_TARGET):>6} {b:>8.3f} {lay:>9.3f} "
            f"{bl:>13.3f} {bl / lay:>17.2f}x"
        )


def run(args):
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    device = args.device
    configs = [c for c in (QUICK if args.quick else FULL) if args.experts in (0, c.experts)]
    configs = sorted(configs, key=lambda c: c.name != "fine-64x8")
    dtypes = sorted(selected_dtypes(args), key=lambda d: d != torch.bfloat16)
    ranks = args.ranks[:1] if args.quick else args.ranks
    mol = MOL_QUICK if args.quick else MOL_FULL
    parts = ("moe", "loramoe") if args.part == "all" else (args.part,)
    from peft.tuners.lora.layer import ParamWrapper

    assert ParamWrapper._activate_lora.__module__.startswith("peft"), "PEFT's path is patched"
    print(
        f"mixops LoRA benchmark on {device} ({where(device)}, {os.cpu_count()} cores), CPU "
        f"capability {torch.backends.cpu.get_cpu_capability()}, bf16 GEMM native: "
        f"{native_lowp_matmul(torch.bfloat16, device)}; torch {torch.__version__}, transformers "
        f"{version('transformers')}, peft {version('peft')}; median ms of {args.reps} reps"
    )
    for c in configs if "moe" in parts else ():
        for rank in ranks:
            check_same(c, rank, device)
    if "moe" in parts:
        print(
            f"checked: mixops output and input gradient == PEFT's in float32 (rtol 1e-4, atol "
            f"1e-5) for {', '.join(c.name for c in configs)}, ranks {', '.join(map(str, ranks))}"
        )
    if "loramoe" in parts:
        mol_check(mol, device)
        print(
            f"checked: mixops adapter path and layer == the per-expert loop's in float32 "
            f"(rtol 1e-4, atol 1e-5) for {mol.name}",
            flush=True,
        )
    moe = run_moe(configs, dtypes, ranks, device, args.reps) if "moe" in parts else []
    mol_results = run_mol(mol, dtypes, device, args.reps) if "loramoe" in parts else []
    mem = {}
    if moe and not args.no_peak_mem:
        mem = measure_peak_mem(configs, dtypes, ranks, device)
    if moe:
        print_moe(moe, mem, device)
    if mol_results:
        print_mol(mol, mol_results)
    return moe, mem, mol_results


def _ranks(text):
    ranks = tuple(int(v) for v in text.split(","))
    if not ranks or min(ranks) < 1:
        raise argparse.ArgumentTypeError(f"ranks must be positive ints, got {text!r}")
    return ranks


def add_args(p: argparse.ArgumentParser):
    """lora's own options (it reads moe's --no-peak-mem; --device, --quick, --reps, --dtype,
    --experts are shared)."""
    p.add_argument(
        "--ranks",
        type=_ranks,
        default=(8, 16, 64),
        help="the LoRA ranks of section 1, comma-separated (--quick: the first one) "
        "(default: 8,16,64)",
    )
    p.add_argument(
        "--part",
        default="all",
        choices=["all", "moe", "loramoe"],
        help="which section: moe (LoRA on an MoE layer's experts), loramoe (a mixture of LoRA "
        "experts) or all",
    )
