"""The README's main job runs: a quick benchmark pass prints the table (numbers are not judged)."""
import subprocess
import sys


def test_bench_quick_runs_and_prints_table():
    p = subprocess.run([sys.executable, "-m", "mixops.bench", "--quick", "--reps", "1", "--device", "cpu"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    for needle in ("floor (dense)", "mixops", "torch._grouped_mm", "per-expert loop", "x floor"):
        assert needle in p.stdout


def test_routing_bench_quick_runs_and_prints_table():
    p = subprocess.run([sys.executable, "-m", "mixops.bench", "routing", "--quick", "--reps", "1",
                        "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    for needle in ("mixops ms", "torch ms", "speedup", "float32", "bfloat16"):
        assert needle in p.stdout
