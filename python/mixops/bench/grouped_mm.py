"""Grouped GEMM benchmark: mixops.grouped_mm beside torch._grouped_mm, a per-expert loop, and the
floor (one dense matmul with the same FLOPs), forward and forward+backward (input and weight
gradients), balanced and Zipf-skewed groups, fp32 and bf16."""

import argparse
from dataclasses import dataclass

import torch

import mixops

from .timing import interleaved_median_ms, nvtx_range, selected_dtypes, where


@dataclass(frozen=True)
class Shape:
    experts: int
    m: int
    k: int
    n: int


FULL_SHAPES = [Shape(8, 4096, 1024, 4096), Shape(64, 16384, 1024, 512)]
QUICK_SHAPES = [Shape(8, 512, 128, 256), Shape(64, 2048, 128, 64)]


def group_sizes(shape, dist):
    """Rows per expert summing to m: equal, or Zipf (s = 1.2) with the largest expert first."""
    if dist == "balanced":
        w = torch.ones(shape.experts, dtype=torch.float64)
    else:
        w = 1.0 / torch.arange(1, shape.experts + 1, dtype=torch.float64) ** 1.2
    sizes = torch.floor(w / w.sum() * shape.m).long()
    sizes[0] += shape.m - int(sizes.sum())
    return sizes


def native_lowp_matmul(dtype, device):
    """Whether torch has a native GEMM for this dtype here (CPUs without AVX512-BF16/AMX or
    AVX512-FP16 fall back to a ~1 GFLOPS loop for bf16/fp16 matmul)."""
    if device == "cuda" or dtype in (torch.float32, torch.float64):
        return True
    caps = torch._C._cpu._get_cpu_capability()
    if dtype == torch.bfloat16:
        return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    return bool(caps.get("avx512_fp16") or caps.get("amx_fp16"))


def _impls(sizes):
    split = [int(s) for s in sizes]

    def loop(a, b, o):
        return torch.cat([ai @ b[g] for g, ai in enumerate(torch.split(a, split))])

    return {
        "mixops": lambda a, b, o: mixops.grouped_mm(a, b, o),
        "torch._grouped_mm": lambda a, b, o: torch._grouped_mm(a, b, offs=o),
        "per-expert loop": loop,
    }


def _run_case(shape, dist, dtype, device, reps, impls=()):
    sizes = group_sizes(shape, dist)
    off = torch.cumsum(sizes, 0).to(torch.int32).to(device)
    x = torch.randn(shape.m, shape.k, dtype=dtype, device=device)
    w = torch.randn(shape.experts, shape.k, shape.n, dtype=dtype, device=device) / shape.k**0.5
    gy = torch.randn(shape.m, shape.n, dtype=dtype, device=device)
    # Floor: the same FLOPs as one dense [m, k] x [k, n] product (and its two gradients). Where
    # torch has no native GEMM for the dtype (bf16 on CPUs without AVX512-BF16), the floor is the
    # same dense product in fp32, the fastest way torch has to do those FLOPs here (stricter).
    floor_dtype = dtype if native_lowp_matmul(dtype, device) else torch.float32
    w_dense = torch.randn(shape.k, shape.n, dtype=floor_dtype, device=device)
    x_floor = x.to(floor_dtype)
    gy_floor = gy.to(floor_dtype)

    def fwd_bwd(fn, a, b, g=gy):
        a = a.detach().requires_grad_(True)
        b = b.detach().requires_grad_(True)
        fn(a, b).backward(g)

    fwd = {"floor (dense)": lambda: x_floor @ w_dense}
    fb = {"floor (dense)": lambda: fwd_bwd(lambda a, b: a @ b, x_floor, w_dense, gy_floor)}
    for name, fn in _impls(sizes).items():
        if impls and name not in impls:
            continue
        fwd[name] = (lambda f: lambda: f(x, w, off))(fn)
        fb[name] = (lambda f: lambda: fwd_bwd(lambda a, b: f(a, b, off), x, w))(fn)
    with torch.no_grad(), nvtx_range(f"forward {shape} {dtype}"):
        t_fwd = interleaved_median_ms(fwd, device, reps)
    with nvtx_range(f"forward+backward {shape} {dtype}"):
        t_fb = interleaved_median_ms(fb, device, reps)
    return {name: (t_fwd[name], t_fb[name]) for name in fwd}


def run(args):
    device = args.device
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    shapes = [s for s in shapes if args.experts in (0, s.experts)]
    impls = {"mixops", *[i for i in args.impls.split(",") if i]} if args.impls else ()
    dtypes = selected_dtypes(args)
    if args.dist != "all":
        dists = (args.dist,)
    else:
        dists = ("balanced", "zipf")
    for dtype in dtypes:
        if not native_lowp_matmul(dtype, device):
            print(
                f"note: this CPU has no native {dtype} GEMM; the {dtype} floor is the dense "
                "product in float32, and slow peers are timed once"
            )
    print(
        f"mixops grouped_mm benchmark on {device} "
        f"({where(device)}), "
        f"torch {torch.__version__}; median ms of {args.reps} reps"
    )
    header = (
        f"{'case':<34} {'impl':<18} {'fwd ms':>9} {'x floor':>8} {'fwd+bwd ms':>11} "
        f"{'x floor':>8} {'mixops speedup fwd / fwd+bwd':>30}"
    )

    def table_rows(case, rows):
        floor_f, floor_fb = rows["floor (dense)"]
        if "mixops" not in rows:
            return
        ours_f, ours_fb = rows["mixops"]
        for name, (f, fb) in rows.items():
            speed = (
                ""
                if name in ("mixops", "floor (dense)")
                else f"{f / ours_f:.2f}x / {fb / ours_fb:.2f}x"
            )
            yield (
                f"{case:<34} {name:<18} {f:>9.2f} {f / floor_f:>8.2f} {fb:>11.2f} "
                f"{fb / floor_fb:>8.2f} {speed:>30}"
            )

    results = []
    total = len(dtypes) * len(shapes) * len(dists)
    for dtype in dtypes:
        for shape in shapes:
            for dist in dists:
                case = (
                    f"E={shape.experts} M={shape.m} K={shape.k} N={shape.n} "
                    f"{dist} {str(dtype).replace('torch.', '')}"
                )
                print(f"[{len(results) + 1}/{total}] {case}", flush=True)
                rows = _run_case(shape, dist, dtype, device, args.reps, impls)
                for line in table_rows(case, rows):  # as it goes, for long runs
                    print("    " + line, flush=True)
                results.append((case, rows))
    print()
    print(header)
    print("-" * len(header))
    for case, rows in results:
        for line in table_rows(case, rows):
            print(line)
        print()
    return results


def add_args(p: argparse.ArgumentParser):
    """grouped_mm's own options (--quick, --reps, --dtype, --experts are shared)."""
    p.add_argument(
        "--dist",
        default="all",
        choices=["all", "balanced", "zipf"],
        help="group sizes: balanced, Zipf-skewed, or both (all)",
    )
    p.add_argument(
        "--impls",
        default="",
        help="comma list of peers to time beside mixops and the "
        "floor (default: all: torch._grouped_mm,per-expert loop)",
    )
