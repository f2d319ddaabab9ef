"""python -m mixops.bench [moe | decode | moa | mod | ep | scmoe | grouped_mm | routing | titan | lora |
hetero]: benchmarks that time mixops beside its peers in one run and print medians and ratios.

  moe         (the default) the whole MoE layer against HF transformers' Mixtral block (fwd,
              fwd+bwd with fresh and with accumulating gradients), then the decode table
  decode      the MoE layer at 1, 4 and 16 tokens per step (decoding) against the measured
              memory read bandwidth
  moa         the MoA (mixture of attention heads) layer against HF's JetMoE attention
  mod         the MoD (mixture of depths) wrapper against its floor and the dense block, and MoE
              expert choice against token choice
  ep          the expert-parallel layer's overlap of communication with compute (gloo processes,
              a simulated link)
  scmoe       the shortcut-connected layer's schedule against the standard one under that link
  grouped_mm  grouped GEMM, the op underneath the expert layers
  routing     router_topk + permute + unpermute against plain PyTorch
  titan       torchtitan's MoE layer against the same layer through the mixops override
  lora        LoRA fine-tuning of an MoE layer's experts against PEFT, and LoRAMoE's adapter path
              against a per-expert loop
  hetero      experts of different widths (packed) against the layer padded to its widest expert
              and a per-expert loop

Each option's help ends with the benchmarks that use it; the others ignore it."""

import argparse

import torch

from . import decode, ep, grouped_mm, hetero, lora, moa, mod, moe, routing, scmoe, titan

JOBS = {
    "moe": moe,
    "decode": decode,
    "moa": moa,
    "mod": mod,
    "ep": ep,
    "scmoe": scmoe,
    "grouped_mm": grouped_mm,
    "routing": routing,
    "titan": titan,
    "lora": lora,
    "hetero": hetero,
}

# The benchmarks that read each shared option (tests/test_bench_help.py checks these lists
# against each benchmark module's source). ep and scmoe run fp32 on the CPU (gloo processes).
SHARED_USED_BY = {
    "--device": ("moe", "decode", "moa", "mod", "grouped_mm", "routing", "titan", "lora", "hetero"),
    "--quick": tuple(JOBS),
    "--reps": tuple(JOBS),
    "--dtype": ("moe", "decode", "moa", "mod", "grouped_mm", "routing", "titan", "lora", "hetero"),
    "--experts": ("moe", "moa", "grouped_mm", "routing", "titan", "lora"),
}
# Options a benchmark adds that others read too ({option: the other benchmarks}).
ALSO_USED_BY = {"--world": ("scmoe",), "--no-peak-mem": ("titan", "lora")}


def _help(text, jobs, default):
    """``text``, the option's default (unless off or already told) and its users."""
    if not (default is None or default is False or default in ("", [])) and "default" not in text:
        text += f" (default: {default})"
    jobs = tuple(j for j in JOBS if j in jobs)  # in JOBS' order
    users = "all" if jobs == tuple(JOBS) else ", ".join(jobs)
    return f"{text} [used by: {users}]".lstrip()


class _JobOptions:
    """What a benchmark's ``add_args`` sees: its options go to its own argument group, each help
    ending with the benchmarks that use the option."""

    def __init__(self, parser, name):
        self.group = parser.add_argument_group(f"{name} options")
        self.name = name

    def add_argument(self, *flags, **kwargs):
        opt = next((f for f in flags if f.startswith("--")), flags[0])
        text = kwargs.get("help", "")
        users = (self.name, *ALSO_USED_BY.get(opt, ()))
        kwargs["help"] = _help(text, users, kwargs.get("default"))
        return self.group.add_argument(*flags, **kwargs)

    def __getattr__(self, name):  # anything else (set_defaults, ...): the group's
        return getattr(self.group, name)


def parser():
    p = argparse.ArgumentParser(
        prog="python -m mixops.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "which",
        nargs="?",
        default="moe",
        choices=list(JOBS),
        metavar="benchmark",
        help=f"which benchmark to run: {', '.join(JOBS)} (see above; default: moe)",
    )
    shared = p.add_argument_group("options shared by several benchmarks")
    for flags, kwargs in (
        (
            ("--device",),
            dict(
                default="cuda" if torch.cuda.is_available() else "cpu",
                help="where to run: cpu, cuda or cuda:N",
            ),
        ),
        (("--quick",), dict(action="store_true", help="small shapes (a smoke run)")),
        (("--reps",), dict(type=int, default=7, help="timed repetitions per case (the median)")),
        (
            ("--dtype",),
            dict(
                default="all",
                choices=["all", "float32", "bfloat16"],
                help="the dtypes to time (all: float32 and bfloat16)",
            ),
        ),
        (
            ("--experts",),
            dict(type=int, default=0, help="only shapes with this many experts (0: every shape)"),
        ),
    ):
        kwargs["help"] = _help(kwargs["help"], SHARED_USED_BY[flags[0]], kwargs.get("default"))
        shared.add_argument(*flags, **kwargs)
    for name, job in JOBS.items():
        job.add_args(_JobOptions(p, name))
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    JOBS[args.which].run(args)


if __name__ == "__main__":
    main()
