"""torchtitan MoE benchmark (`python -m mixops.bench titan`): torchtitan's own MoE layer
(torchtitan.models.common.moe.MoE: its router, LocalTokenDispatcher, GroupedExperts on
torch._grouped_mm) beside the same layer through the mixops override (mixops.integrations.torchtitan:
router_topk, permute, grouped_mm, gated_activation, unpermute), forward and forward+backward, timed
in one interleaved run per case. Prints one table: median ms of each, the speedup
(torchtitan / mixops) and the peak memory of each pass.

torchtitan computes its experts in bfloat16 whatever the model dtype, and so does the override
(expert_dtype="bfloat16", its default): the main rows hold the model in bfloat16; the float32 rows
(float32 parameters, router in float32, experts cast to bfloat16 per call by both) are the second
case. Two configs: a DeepSeek-V3-style fine-grained layer (64 experts of hidden 256, top-6,
sigmoid scores with 8 expert groups of which 4 are kept, expert bias, route norm, route scale 2.5,
shared experts of hidden 512) and a Mixtral-style coarse one (8 experts, top-2, softmax, route
norm, no shared experts).

Both layers hold the same weights (torchtitan's state dict loaded into the mixops layer: the same
names). Before anything is timed, in float32 (where both route identically) mixops' output and
input gradient must match torchtitan's to bfloat16 accuracy. Peak memory on CPU is the ru_maxrss
increase in a fresh process per measurement (as moe.py), on CUDA the allocator's peak.
"""

import argparse
import gc
import multiprocessing
import sys
import warnings
from dataclasses import dataclass, replace
from functools import partial

import torch

from .grouped_mm import native_lowp_matmul
from .moe_cases import fwd_bwd_step, fwd_step, inputs, peer
from .timing import (
    interleaved_median_ms,
    nvtx_range,
    one_call_peak_mib,
    selected_dtypes,
    where,
)

_TT_MOE = "torchtitan.models.common.moe"


@dataclass(frozen=True)
class Config:
    name: str
    tokens: int
    hidden: int
    ffn: int  # per routed expert
    experts: int
    topk: int
    score: str  # "sigmoid" or "softmax"
    groups: int | None = None  # expert groups (group-limited routing), with `kept` kept
    kept: int | None = None
    route_scale: float = 1.0
    bias: bool = False  # torchtitan's expert_bias_E (aux-loss-free load balancing)
    shared: int = 0  # hidden of the shared experts (0: none)
    target: float = 1.0  # the fwd+bwd speedup the issue asks for


def _fine(tokens, hidden, ffn):
    return Config("fine-64x6", tokens, hidden, ffn, 64, 6, "sigmoid", 8, 4, 2.5, True, 2 * ffn, 1.5)


def _coarse(tokens, hidden, ffn):
    return Config("coarse-8x2", tokens, hidden, ffn, 8, 2, "softmax", target=1.1)


FULL = (_fine(1024, 1024, 256), _coarse(1024, 1024, 2048))
QUICK = (_fine(64, 64, 32), _coarse(64, 64, 64))
IMPLS = ("torchtitan", "mixops")
PASSES = ("fwd", "fwd+bwd")
TOL = 2e-2  # max |mixops - torchtitan| / max |torchtitan|: bfloat16 experts in both


def _describe(c):
    route = f"{c.score}, route norm, scale {c.route_scale}"
    if c.groups:
        route += f", {c.groups} groups ({c.kept} kept)"
    if c.bias:
        route += ", expert bias"
    shared = f"shared hidden {c.shared}" if c.shared else "no shared experts"
    return (
        f"{c.name}: T {c.tokens}, D {c.hidden}, E {c.experts} x F {c.ffn}, top-{c.topk}, "
        f"{route}, {shared}"
    )


# -- the layers ---------------------------------------------------------------------------------
def tt_config(c):
    """torchtitan's ``MoE.Config`` for ``c`` (the standard, EP=1 token dispatcher)."""
    from torch import nn
    from torchtitan.models.common.config_utils import (
        make_ffn_config,
        make_moe_config,
        make_routed_experts_config,
        make_router_config,
    )

    init = {"weight": partial(nn.init.trunc_normal_, std=0.02)}
    experts_init = {k: init["weight"] for k in ("w1_EFD", "w2_EDF", "w3_EFD")}
    shared = None
    if c.shared:
        shared = make_ffn_config(
            dim=c.hidden, hidden_dim=c.shared, w1_param_init=init, w2w3_param_init=init
        )
    return make_moe_config(
        num_experts=c.experts,
        router=make_router_config(
            dim=c.hidden,
            num_experts=c.experts,
            gate_param_init=init,
            top_k=c.topk,
            score_func=c.score,
            route_norm=True,
            route_scale=c.route_scale,
            num_expert_groups=c.groups,
            num_limited_groups=c.kept,
        ),
        routed_experts=make_routed_experts_config(
            dim=c.hidden,
            hidden_dim=c.ffn,
            num_experts=c.experts,
            top_k=c.topk,
            param_init=experts_init,
            comm_backend="standard",
        ),
        shared_experts=shared,
        load_balance_coeff=1e-3 if c.bias else None,
    )


def build(c, impl, device, dtype, seed=0):
    """The layer of ``impl`` in ``dtype`` on ``device``, built on meta and materialised (no
    float32 transient: ru_maxrss stays honest), parameters drawn in place (std fan_in ** -0.5,
    the same values for the same seed whichever impl), expert bias small and random."""
    cfg = tt_config(c)
    if impl == "mixops":
        from mixops.integrations.torchtitan import to_mixops

        cfg = to_mixops(cfg)
    with torch.device("meta"):
        module = cfg.build()
    module = module.to(dtype).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            p.normal_(0.0, p.shape[-1] ** -0.5, generator=g)
        module.tokens_per_expert_E.zero_()
        if module.expert_bias_E is not None:
            module.expert_bias_E.normal_(0.0, 1e-2, generator=g)
    return module


def build_pair(c, device, dtype):
    """{impl: layer} with torchtitan's state dict loaded into the mixops layer, plus x and gy."""
    mods = {"torchtitan": build(c, "torchtitan", device, dtype)}
    mods["mixops"] = build(c, "mixops", device, dtype, seed=1)
    mods["mixops"].load_state_dict(mods["torchtitan"].state_dict())
    return mods, *inputs(c, device, dtype)


def check_close(c, device):
    """float32 model (router in float32 in both: identical routing), bfloat16 experts in both:
    mixops' output and input gradient within TOL of torchtitan's, relative to its max."""
    mods, x, gy = build_pair(c, device, torch.float32)
    out = {}
    for name, m in mods.items():
        xi = x.detach().clone().requires_grad_(True)
        y = m(xi)
        y.backward(gy)
        out[name] = (y.detach(), xi.grad)
    for i, what in enumerate(("output", "input gradient")):
        ref, ours = out["torchtitan"][i].float(), out["mixops"][i].float()
        err = ((ours - ref).abs().max() / ref.abs().max()).item()
        if not err <= TOL:
            raise AssertionError(
                f"{c.name} float32: mixops {what} differs from torchtitan's by {err:.3g} "
                f"of its max (tolerance {TOL})"
            )


def steps(mods, x, gy, pas):
    """{impl: the timed call}; torchtitan's failure reads as RuntimeError (NaN), mixops' stops."""
    make = fwd_step if pas == "fwd" else partial(fwd_bwd_step, gy=gy)
    fns = {name: make(m, x, name=name) for name, m in mods.items()}
    return {name: fn if name == "mixops" else peer(fn) for name, fn in fns.items()}


# -- peak memory --------------------------------------------------------------------------------
def peak_mem_mib(c, dtype_name, impl, pas, device):
    """MiB that one pass of impl adds at its peak: CUDA allocator peak minus the memory before,
    or the ru_maxrss increase (CPU; call in a fresh process: ru_maxrss never goes down). A tiny
    pass first faults in the code pages and workspaces, so only the pass's data is counted."""
    dtype = getattr(torch, dtype_name)
    warnings.filterwarnings("ignore", message="In CPU autocast")

    def ready(cfg):
        mods = {impl: build(cfg, impl, device, dtype)}
        x, gy = inputs(cfg, device, dtype)
        return steps(mods, x, gy, pas)[impl]

    try:
        with torch.set_grad_enabled(pas != "fwd"):
            ready(replace(c, tokens=16, hidden=32, ffn=16, shared=32 if c.shared else 0))()
            step = ready(c)  # no gc.collect(): a full one takes ~0.5 s with torchtitan imported
            return one_call_peak_mib(step, device)
    except RuntimeError as e:
        if impl == "mixops":
            raise
        print(f"  peak memory {c.name} {dtype_name} {pas} {impl}: failed: {e}".splitlines()[0])
        return float("nan")


def measure_peak_mem(configs, dtypes, device):
    """{(config name, dtype name, pass, impl): MiB}; on CPU each measurement in its own process."""
    jobs = [
        (c, str(dt)[6:], impl, pas)
        for c in configs
        for dt in dtypes
        for pas in PASSES
        for impl in IMPLS
    ]
    pool = None
    if not device.startswith("cuda"):
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        if ctx.get_start_method() == "forkserver":
            ctx.set_forkserver_preload(
                ["torch", _TT_MOE, "mixops.integrations.torchtitan", __name__]
            )
        pool = ctx.Pool(1, maxtasksperchild=1)
    mem = {}
    try:
        for c, dt, impl, pas in jobs:
            job = (c, dt, impl, pas, device)
            mem[c.name, dt, pas, impl] = (
                pool.apply(peak_mem_mib, job) if pool else peak_mem_mib(*job)
            )
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return mem


# -- the run ------------------------------------------------------------------------------------
def ratio(a, b):
    return f"{a / b:.2f}x"


def print_table(results, mem):
    head = (
        f"{'config':<11} {'dtype':<9} {'pass':<8} {'torchtitan ms':>14} {'mixops ms':>10} "
        f"{'speedup':>8} {'torchtitan MiB':>15} {'mixops MiB':>11}"
    )
    print()
    print(head)
    print("-" * len(head))
    for (name, dt, pas), ms in results:
        m = [mem.get((name, dt, pas, impl)) for impl in IMPLS]
        m = ["-" if v is None else f"{v:.1f}" for v in m]
        print(
            f"{name:<11} {dt:<9} {pas:<8} {ms['torchtitan']:>14.3f} {ms['mixops']:>10.3f} "
            f"{ratio(ms['torchtitan'], ms['mixops']):>8} {m[0]:>15} {m[1]:>11}"
        )


def run(args):
    try:
        import torchtitan  # noqa: F401
        import torchtitan.models.common.moe  # noqa: F401

        import mixops.integrations.torchtitan  # noqa: F401
    except ImportError as e:
        print(f"titan benchmark skipped: torchtitan is not importable ({e})")
        return None
    from importlib.metadata import version

    warnings.filterwarnings("ignore", message="In CPU autocast")  # torchtitan's router on CPU
    device = args.device
    configs = [c for c in (QUICK if args.quick else FULL) if args.experts in (0, c.experts)]
    # bfloat16 (the model dtype torchtitan trains its experts in) first.
    dtypes = sorted(selected_dtypes(args), key=lambda d: d != torch.bfloat16)
    print(
        f"mixops torchtitan-MoE benchmark on {device} ({where(device)}), CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, torchtitan "
        f"{version('torchtitan')}, bf16 GEMM native: "
        f"{native_lowp_matmul(torch.bfloat16, device)}; median ms of {args.reps} reps"
    )
    print(
        "impls: torchtitan MoE (its router, LocalTokenDispatcher, GroupedExperts on "
        "torch._grouped_mm), the same layer with mixops' override (to_mixops); experts in "
        "bfloat16 in both, dtype = the model's"
    )
    print("configs: " + "; ".join(_describe(c) for c in configs))
    for c in configs:
        check_close(c, device)
    print(
        f"checked: mixops output and input gradient match torchtitan's in float32 (bfloat16 "
        f"experts; max diff <= {TOL} of max) for {', '.join(c.name for c in configs)}",
        flush=True,
    )
    results = []
    total = len(configs) * len(dtypes) * len(PASSES)
    for c in configs:
        for dtype in dtypes:
            dt = str(dtype)[6:]
            mods, x, gy = build_pair(c, device, dtype)
            for pas in PASSES:
                case = (c.name, dt, pas)
                with torch.set_grad_enabled(pas != "fwd"), nvtx_range(" ".join(case)):
                    ms = interleaved_median_ms(steps(mods, x, gy, pas), device, args.reps)
                results.append((case, ms))
                print(
                    f"[{len(results)}/{total}] {' '.join(case)}: torchtitan "
                    f"{ms['torchtitan']:.2f} ms, mixops {ms['mixops']:.2f} ms, "
                    f"{ratio(ms['torchtitan'], ms['mixops'])}",
                    file=sys.stderr,
                    flush=True,
                )
            del mods, x, gy
            gc.collect()

    mem = {} if args.no_peak_mem else measure_peak_mem(configs, dtypes, device)
    print_table(results, mem)
    print("speedup = torchtitan ms / mixops ms")
    if mem:
        how = "CUDA allocator" if device.startswith("cuda") else "ru_maxrss, fresh process each"
        print(f"MiB = peak memory of one pass above the memory before it ({how})")
    for (name, dt, pas), ms in results:
        target = next(c.target for c in configs if c.name == name)
        if pas == "fwd+bwd" and dt == "bfloat16":
            s = ms["torchtitan"] / ms["mixops"]
            verdict = "met" if s >= target else "missed"
            print(f"target {name} {dt} fwd+bwd: >= {target:.1f}x, measured {s:.2f}x ({verdict})")
    return results, mem


def add_args(p: argparse.ArgumentParser):
    """titan reads moe's --no-peak-mem (ALSO_USED_BY); --device, --quick, --reps, --dtype,
    --experts are shared."""
