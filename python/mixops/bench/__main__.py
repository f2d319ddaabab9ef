"""python -m mixops.bench: the main benchmark job (grouped GEMM for now)."""
import argparse

import torch

from . import grouped_mm


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mixops.bench", description=__doc__)
    p.add_argument("which", nargs="?", default="grouped_mm", choices=["grouped_mm"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    grouped_mm.add_args(p)
    args = p.parse_args(argv)
    grouped_mm.run(args)


if __name__ == "__main__":
    main()
