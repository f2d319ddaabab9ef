"""Loading mixops._C with a clear error when it was built against another torch."""

import importlib
import json
from pathlib import Path

import torch

_META = Path(__file__).parent / "_build" / "build_meta.json"


def _build_meta():
    try:
        return json.loads(_META.read_text())
    except FileNotFoundError:
        return None


def _torch_release(version):
    return version.split("+")[0]


def load_extension():
    meta = _build_meta()
    running = _torch_release(torch.__version__)
    if meta is not None and meta["torch_version"] != running:
        raise ImportError(
            f"mixops was built against torch {meta['torch_version']} but torch {running} is "
            "installed; rebuild mixops against the installed torch: "
            "pip install --no-build-isolation --force-reinstall --no-deps ."
        )
    try:
        return importlib.import_module("mixops._C")
    except ImportError as e:
        raise ImportError(
            f"mixops: cannot load the compiled extension mixops._C ({e}). Build it with "
            "`pip install --no-build-isolation .` (see README.md)"
            + (f"; it was built against torch {meta['torch_version']}" if meta else "")
        ) from e


def build_info():
    """What this mixops binary was built with.

    Returns a dict: ``torch_version`` (torch it was compiled against), ``torch_runtime`` (the
    torch imported now), ``cuda_version`` (toolkit, "" for a CPU-only build), ``cutlass_version``,
    ``archs`` (list of compiled CUDA targets, e.g. ``["sm_80", "sm_90a", "compute_80"]``),
    ``with_cuda`` (CUDA kernels are in the build) and ``has_sm90`` (Hopper wgmma/TMA kernels).
    """
    from . import _C

    info = dict(_C.build_info())
    info["archs"] = [a for a in info["archs"].split(",") if a]
    info["torch_runtime"] = torch.__version__
    return info
