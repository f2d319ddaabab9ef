"""The step table of bench/gpu_check.sh (bench/gpu_check.py runs it): each step's bash command,
time limit, tools, the steps it needs and the local files --dry-run checks, in the order they run,
plus the patterns of a tool refusing the device and the JSON form that --steps-file reads."""

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Step:
    name: str
    limit_s: float  # this step's own time limit
    cmd: str  # bash, run from the repo root; $PY, $OUT, $ROOT, $WORK are set
    what: str = ""  # one line for the plan and the report
    tools: list = field(default_factory=list)  # executables that must be on PATH, else skipped
    gpu: bool = True  # needs a CUDA GPU visible to $PY's torch
    after: list = field(default_factory=list)  # steps that must have passed ("build")
    refuse: list = field(default_factory=list)  # output regexes: the tool refused the device
    tail: int = 40  # output lines kept in the report
    files: list = field(default_factory=list)  # local files the step needs (checked by --dry-run)


# Output patterns meaning "this tool cannot run here" rather than "mixops is wrong".
SANITIZER_REFUSALS = [
    r"Device not supported",
    r"not supported on this (platform|device)",
    r"Unable to (find|initialize|attach)",
    r"LibraryNotLoaded",
]

_SAN = (
    "PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool {tool} --error-exitcode 1 "
    "--print-limit 20 {extra} $PY bench/sanitize_cases.py"
)
_PYTEST = "$PY -m pytest -q -rs -p no:cacheprovider -o addopts='-m \"not large\"'"

STEPS = [
    Step(
        "env",
        30,
        "bash bench/gpu_env.sh",
        "machine, driver, GPU, Python and packages, tools on PATH",
        gpu=False,
        files=["bench/gpu_env.sh"],
    ),
    Step(
        "unpack",
        60,
        "bash bench/gpu_unpack.sh",
        "CUTLASS headers and wheels from .gpu/ into $WORK (transformers kept only if it imports)",
        gpu=False,
        files=["bench/gpu_unpack.sh"],
    ),
    Step(
        "build",
        300,
        "bash bench/gpu_build.sh",
        "pip install --no-build-isolation --no-deps . for this GPU's arch only, all cores",
        tools=["nvcc"],
        after=["unpack"],
        tail=25,
        files=["bench/gpu_build.sh"],
    ),
    Step(
        "cuda_tests",
        150,
        # pytest-xdist and pytest-timeout where installed (the H200 image has both): ~3300
        # cases, torch.compile ones among them, on 16 cores; no test may eat the step.
        'X=$($PY -c "import xdist" 2>/dev/null && echo "-n 8"); '
        'T=$($PY -c "import pytest_timeout" 2>/dev/null && echo "--timeout=100"); '
        f"{_PYTEST} $X $T --durations=10 -p cuda_tests_only --ignore=tests/test_ep_cuda.py "
        "--junitxml=$OUT/cuda_tests.xml tests",
        "every CUDA test (tests/test_*_cuda.py and the cuda cases of tests parametrised over "
        "devices); HF tests skip outside the supported transformers range",
        after=["build"],
        tail=60,
        files=["bench/cuda_tests_only.py"],
    ),
    Step(
        "grouped_mm_tflops",
        120,
        "$PY bench/grouped_mm_tflops.py --json $OUT/grouped_mm_tflops.json",
        "grouped_mm bf16 TFLOP/s vs torch._grouped_mm and dense cuBLAS: Qwen3-30B-A3B, "
        "DeepSeek-V3, Mixtral; fwd/dgrad/wgrad; balanced and Zipf",
        after=["build"],
        tail=45,
        files=["bench/grouped_mm_tflops.py"],
    ),
    Step(
        "moe_bench",
        90,
        "$PY -m mixops.bench moe --quick --device cuda --png '' --no-peak-mem",
        "the MoE benchmark, quick form (mixops vs HF Mixtral eager / grouped_mm, and the floor)",
        after=["build"],
        tail=40,
    ),
    Step(
        "moe_profile",
        60,
        "bash bench/gpu_profile.sh",
        "one fwd+bwd MoE step profiled, per-stage summary (torch.profiler; nsys where present)",
        after=["build"],
        tail=80,
        files=["bench/gpu_profile.sh", "bench/profile_moe.py"],
    ),
    Step(
        "sanitize_memcheck",
        90,
        _SAN.format(tool="memcheck", extra="--leak-check no"),
        "compute-sanitizer memcheck, one case per kernel (bench/sanitize_cases.py)",
        tools=["compute-sanitizer"],
        after=["build"],
        refuse=SANITIZER_REFUSALS,
        files=["bench/sanitize_cases.py"],
    ),
    Step(
        "ep_overlap",
        60,
        f"{_PYTEST} -s -v tests/test_ep_cuda.py",
        "expert parallelism, world size 1 over NCCL, torch.cuda._sleep on the comm stream "
        "as the link: do the chunked and the shortcut-connected overlaps hold on real streams?",
        after=["build"],
        tail=20,
        files=["tests/test_ep_cuda.py"],
    ),
    Step(
        "moa_bench",
        60,
        "$PY -m mixops.bench moa --quick --device cuda",
        "MoA fwd and fwd+bwd vs its dense floor (and HF JetMoE attention), quick form",
        after=["build"],
        tail=30,
    ),
    Step(
        "mod_bench",
        60,
        "$PY -m mixops.bench mod --quick --device cuda",
        "MoD fwd and fwd+bwd vs its dense floor, quick form",
        after=["build"],
        tail=30,
    ),
    Step(
        "sanitize_racecheck",
        75,
        _SAN.format(tool="racecheck", extra="--racecheck-report hazard"),
        "compute-sanitizer racecheck (shared-memory hazards), one case per kernel",
        tools=["compute-sanitizer"],
        after=["build"],
        refuse=SANITIZER_REFUSALS,
        files=["bench/sanitize_cases.py"],
    ),
    Step(
        "sanitize_synccheck",
        60,
        _SAN.format(tool="synccheck", extra=""),
        "compute-sanitizer synccheck (barrier misuse), one case per kernel",
        tools=["compute-sanitizer"],
        after=["build"],
        refuse=SANITIZER_REFUSALS,
        files=["bench/sanitize_cases.py"],
    ),
]

# Tools each step's commands call on the device; --dry-run lists them as "checked there".
DEVICE_TOOLS = ["nvidia-smi", "nvcc", "compute-sanitizer", "nsys (optional)", "python3 + torch"]


def load_steps(path):
    """The step table from a JSON list of objects (Step's fields), for tests and one-off runs."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of steps")
    return [Step(**d) for d in data]
