"""python -m mixops.info: print what this mixops build contains."""

import torch

import mixops


def main():
    info = mixops.build_info()
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    print(f"{'cuda_available':<{width}}  {torch.cuda.is_available()}")


if __name__ == "__main__":
    main()
