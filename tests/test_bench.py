"""The benchmarks run: a quick pass of each job prints its table (numbers are not judged); the
README's main job (moe, the default) also writes its chart."""

import subprocess
import sys


def test_grouped_mm_bench_quick_runs_and_prints_table():
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "mixops.bench",
            "grouped_mm",
            "--quick",
            "--reps",
            "1",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr
    for needle in ("floor (dense)", "mixops", "torch._grouped_mm", "per-expert loop", "x floor"):
        assert needle in p.stdout


def test_routing_bench_quick_runs_and_prints_table():
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "mixops.bench",
            "routing",
            "--quick",
            "--reps",
            "1",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr
    for needle in ("mixops ms", "torch ms", "speedup", "float32", "bfloat16"):
        assert needle in p.stdout


def test_moe_bench_quick_runs_prints_tables_and_writes_png(tmp_path):
    png = tmp_path / "moe.png"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "mixops.bench",
            "--quick",
            "--reps",
            "1",
            "--device",
            "cpu",
            "--png",
            str(png),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr
    for needle in (
        "config",
        "dtype",
        "pass",
        "impl",
        "median ms",
        "x floor",
        "mixops speedup",
        "mixops",
        "HF eager",
        "HF grouped_mm",
        "floor",
        "fwd+bwd",
        "coarse-8x2",
        "fine-64x8",
        "float32",
        "bfloat16",
        "checked: mixops output and input gradient",
        "peak memory",
        "mixops/HF grouped_mm",
        str(png),
    ):
        assert needle in p.stdout, needle
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def quick_run(job):
    """stdout of ``python -m mixops.bench <job> --quick --reps 1 --device cpu`` (must succeed)."""
    p = subprocess.run(
        [sys.executable, "-m", "mixops.bench", job, "--quick", "--reps", "1", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_moa_bench_quick_runs_and_prints_table():
    out = quick_run("moa")
    for needle in (
        "CPU capability",
        "bf16 GEMM native",
        "checked: mixops output and input gradient == HF JetMoE's",
        "config",
        "dtype",
        "mixops",
        "HF JetMoE",
        "floor",
        "x HF",
        "x floor",
        "fwd+bwd",
        "E16-k4",
        "E64-k4",
        "float32",
        "bfloat16",
    ):
        assert needle in out, needle


def test_mod_bench_quick_runs_and_prints_tables():
    out = quick_run("mod")
    for needle in (
        "CPU capability",
        "bf16 GEMM native",
        "checked: MoD output and input gradient == masked-dense oracle",
        "Table 1, MoD",
        "MoD ms",
        "dense ms",
        "floor ms",
        "x floor",
        "x dense",
        "overhead % floor",
        "Table 2, expert choice vs token choice",
        "token-choice ms",
        "expert-choice ms",
        "EC/TC",
        "fwd+bwd",
        "float32",
        "bfloat16",
    ):
        assert needle in out, needle


def _quick(job, *extra):
    p = subprocess.run(
        [sys.executable, "-m", "mixops.bench", job, "--quick", "--reps", "1", *extra],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_multi_process_benches_quick_run_and_print_tables():
    out = _quick("ep", "--world", "2")
    for needle in ("expert-parallel benchmark: world 2", "no-link ms", "hidden"):
        assert needle in out
    out = _quick("scmoe", "--world", "2")
    for needle in ("shortcut-connected MoE benchmark: world 2", "standard", "shortcut", "60%"):
        assert needle in out
