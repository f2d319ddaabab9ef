"""python -m mixops.bench [moe | moa | mod | ep | scmoe | grouped_mm | routing]: benchmarks that
time mixops beside its peers in one run and print medians and ratios. moe (the default) times the whole MoE layer
against HF transformers' Mixtral block; moa the MoA (mixture of attention heads) layer against HF's
JetMoE attention; mod the MoD (mixture of depths) wrapper against its floor and the dense block, and
MoE expert choice against token choice; ep the expert-parallel layer's overlap of communication with
compute (gloo processes, a simulated link); scmoe the shortcut-connected layer's schedule against
the standard one under the same link; grouped_mm and routing time the ops underneath them."""

import argparse

import torch

from . import ep, grouped_mm, moa, mod, moe, routing, scmoe

JOBS = {
    "moe": moe,
    "moa": moa,
    "mod": mod,
    "ep": ep,
    "scmoe": scmoe,
    "grouped_mm": grouped_mm,
    "routing": routing,
}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mixops.bench", description=__doc__)
    p.add_argument("which", nargs="?", default="moe", choices=list(JOBS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--dtype", default="all", choices=["all", "float32", "bfloat16"])
    p.add_argument("--experts", type=int, default=0, help="only shapes with this many experts")
    for job in JOBS.values():
        job.add_args(p)
    args = p.parse_args(argv)
    JOBS[args.which].run(args)


if __name__ == "__main__":
    main()
