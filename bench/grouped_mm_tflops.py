"""Grouped GEMM throughput at real MoE sizes: mixops.grouped_mm against torch._grouped_mm and a
dense matmul of the same FLOPs (cuBLAS on a GPU), in TFLOP/s.

Shapes (routed rows = tokens x top-k, grouped by expert):

    model            E    K     N      rows    one GEMM
    qwen3-30b-a3b    128  2048  1536   65536   up-projection
    deepseek-v3      256  7168  2048   65536   up-projection
    mixtral          8    4096  14336  16384   up-projection

Modes, each 2 * rows * K * N FLOPs:

    fwd    x [rows, K] @ w [E, K, N]              -> [rows, N]   (2-D x 3-D)
    dgrad  gy [rows, N] @ w^T [E, N, K] (a view)  -> [rows, K]   (2-D x 3-D, transposed b)
    wgrad  x^T [K, rows] @ gy [rows, N]           -> [E, K, N]   (2-D x 2-D, groups over rows)

Routing: balanced (equal rows per expert) and Zipf (s = 1.2, largest expert first; the skew of
mixops.bench.grouped_mm). Times: medians of CUDA-event timings with the L2 flushed before each
call, peers interleaved (mixops.bench.timing.interleaved_median_ms, which also brackets the timed
region with cudaProfilerStart/Stop for nsys). Each case also checks mixops against
torch._grouped_mm (max |diff| relative to max |torch|).

    python bench/grouped_mm_tflops.py [--models qwen3-30b-a3b,mixtral] [--json out.json]
    python bench/grouped_mm_tflops.py --tiny --device cpu --dtype float32   # a smoke run
"""

import argparse
import json
import sys
from dataclasses import asdict, dataclass

import torch

import mixops
from mixops.bench.grouped_mm import Shape, group_sizes
from mixops.bench.timing import interleaved_median_ms, where


@dataclass(frozen=True)
class Model:
    name: str
    experts: int
    k: int
    n: int
    rows: int


MODELS = [
    Model("qwen3-30b-a3b", 128, 2048, 1536, 65536),
    Model("deepseek-v3", 256, 7168, 2048, 65536),
    Model("mixtral", 8, 4096, 14336, 16384),
]
MODES = ("fwd", "dgrad", "wgrad")
DISTS = ("balanced", "zipf")
IMPLS = ("mixops", "torch._grouped_mm", "dense")


def tiny(m):
    """The same expert count at sizes a CPU runs in moments (the --tiny smoke run)."""
    return Model(m.name, m.experts, 64, 48, 8 * m.experts)


def mode_fns(mode, x, w, gy, off, w_dense):
    """{impl: fn} computing one mode; all three do 2 * rows * K * N FLOPs."""
    if mode == "fwd":
        return {
            "mixops": lambda: mixops.grouped_mm(x, w, off),
            "torch._grouped_mm": lambda: torch._grouped_mm(x, w, offs=off),
            "dense": lambda: x @ w_dense,
        }
    if mode == "dgrad":
        wt = w.transpose(-1, -2)
        return {
            "mixops": lambda: mixops.grouped_mm(gy, wt, off),
            "torch._grouped_mm": lambda: torch._grouped_mm(gy, wt, offs=off),
            "dense": lambda: gy @ w_dense.t(),
        }
    xt = x.t()
    return {
        "mixops": lambda: mixops.grouped_mm(xt, gy, off),
        "torch._grouped_mm": lambda: torch._grouped_mm(xt, gy, offs=off),
        "dense": lambda: xt @ gy,
    }


def rel_diff(fns):
    """max |mixops - torch._grouped_mm| / max |torch._grouped_mm| (NaN if torch refuses), in fp32
    over slices of the first dimension (a DeepSeek-V3 weight gradient is 3.8 G elements)."""
    try:
        ref = fns["torch._grouped_mm"]()
    except RuntimeError:
        return float("nan")
    ours = fns["mixops"]()
    step = max(1, (1 << 27) // max(1, ref[0].numel()))
    err = top = 0.0
    for i in range(0, ref.shape[0], step):
        r, o = ref[i : i + step].float(), ours[i : i + step].float()
        err = max(err, (o - r).abs().max().item())
        top = max(top, r.abs().max().item())
    return err / max(top, 1e-30)


def run_model(m, dtype, device, reps, dists=DISTS, modes=MODES):
    """One row per (dist, mode): TFLOP/s of each impl and the ratios."""
    torch.manual_seed(0)  # made on the device: DeepSeek-V3's w is 3.8 G elements
    x = torch.randn(m.rows, m.k, device=device, dtype=dtype)
    w = torch.randn(m.experts, m.k, m.n, device=device, dtype=dtype).mul_(m.k**-0.5)
    gy = torch.randn(m.rows, m.n, device=device, dtype=dtype)
    w_dense = torch.randn(m.k, m.n, device=device, dtype=dtype).mul_(m.k**-0.5)
    flops = 2.0 * m.rows * m.k * m.n
    rows = []
    for dist in dists:
        sizes = group_sizes(Shape(m.experts, m.rows, m.k, m.n), dist)
        off = torch.cumsum(sizes, 0).to(torch.int32).to(device)
        for mode in modes:
            fns = mode_fns(mode, x, w, gy, off, w_dense)
            with torch.no_grad():
                diff = rel_diff(fns)
                ms = interleaved_median_ms(fns, device, reps)
            tf = {k: flops / (v * 1e-3) / 1e12 for k, v in ms.items()}
            rows.append(
                {
                    "model": m.name,
                    "dist": dist,
                    "mode": mode,
                    "ms": ms,
                    "tflops": tf,
                    "vs_torch": tf["mixops"] / tf["torch._grouped_mm"],
                    "vs_dense": tf["mixops"] / tf["dense"],
                    "rel_diff_vs_torch": diff,
                    "largest_group": int(sizes.max()),
                }
            )
            print(_fmt_row(rows[-1]), flush=True)
    del x, w, gy, w_dense
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


HEADER = (
    "| model | routing | mode | mixops TFLOP/s | torch._grouped_mm | dense | mixops / torch "
    "| mixops / dense | rel diff vs torch |\n|---|---|---|---:|---:|---:|---:|---:|---:|"
)


def _fmt_row(r):
    t = r["tflops"]
    return (
        f"| {r['model']} | {r['dist']} | {r['mode']} | {t['mixops']:.4g} | "
        f"{t['torch._grouped_mm']:.4g} | {t['dense']:.4g} | {r['vs_torch']:.2f} | "
        f"{r['vs_dense']:.2f} | {r['rel_diff_vs_torch']:.1e} |"
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--models", default=",".join(m.name for m in MODELS))
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--tiny", action="store_true", help="small sizes, same expert counts (smoke)")
    p.add_argument("--json", default="", help="also write the rows here")
    args = p.parse_args(argv)
    names = [s for s in args.models.split(",") if s]
    unknown = set(names) - {m.name for m in MODELS}
    if unknown:
        p.error(f"unknown models {sorted(unknown)}; known: {[m.name for m in MODELS]}")
    dtype = getattr(torch, args.dtype)
    print(
        f"grouped_mm TFLOP/s on {args.device} ({where(args.device)}), {args.dtype}, torch "
        f"{torch.__version__}, median of {args.reps} reps (CUDA events, L2 flushed)\n"
    )
    print(HEADER, flush=True)
    rows = []
    for m in MODELS:
        if m.name in names:
            rows += run_model(tiny(m) if args.tiny else m, dtype, args.device, args.reps)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"models": [asdict(m) for m in MODELS], "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
