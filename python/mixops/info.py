"""python -m mixops.info: print what this mixops build contains."""

import torch

import mixops


def main():
    info = mixops.build_info()
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    print(f"{'cuda_available':<{width}}  {torch.cuda.is_available()}")
    print(f"{'cpu_capability':<{width}}  {torch.backends.cpu.get_cpu_capability()}")
    # grouped_mm's kernel for groups of <= 16 rows (decoding) on this CPU
    print(f"{'cpu_thin_kernel':<{width}}  {mixops._C._cpu_thin_kernel()}")


if __name__ == "__main__":
    main()
