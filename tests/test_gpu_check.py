"""bench/gpu_check.sh in its CPU-checkable parts: argument parsing, the dry run, step skipping,
the report written after every step, and the time limit (a fake GPU step that sleeps past it is
killed, marked timed out, and the next step still runs). Fake steps come from --steps-file. Also
smoke runs of the device-side scripts on the CPU (sanitize cases, grouped_mm TFLOP/s, profile)."""

import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gc = _load("gpu_check")


def _steps_file(tmp_path, steps):
    p = tmp_path / "steps.json"
    p.write_text(json.dumps(steps))
    return str(p)


def _run(args, timeout=60):
    return subprocess.run(
        ["bash", str(BENCH / "gpu_check.sh"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"PATH": "/usr/bin:/bin", "PY": sys.executable},
    )


def test_parse_only_skip_and_defaults(monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    a = gc.parse_args(["--only", "build,cuda_tests", "--only", "env"])
    assert [s.name for s in a.steps] == ["env", "build", "cuda_tests"]
    assert a.out == "gpu_check_out" and a.budget == 480 and not a.dry_run
    a = gc.parse_args(["--skip", "sanitize_racecheck", "--budget", "100"])
    assert "sanitize_racecheck" not in [s.name for s in a.steps] and a.budget == 100
    monkeypatch.setenv("OUT", "/tmp/somewhere")
    assert gc.parse_args([]).out == "/tmp/somewhere"


def test_parse_rejects_unknown_steps(capsys):
    with pytest.raises(SystemExit):
        gc.parse_args(["--only", "nonsense"])
    assert "unknown step(s) nonsense" in capsys.readouterr().err


def test_step_table_is_sane():
    names = [s.name for s in gc.STEPS]
    assert len(names) == len(set(names))
    for s in gc.STEPS:
        assert all(a in names[: names.index(s.name)] for a in s.after), s.name
        assert 0 < s.limit_s <= 300
    for required in (
        "build",
        "cuda_tests",
        "sanitize_memcheck",
        "grouped_mm_tflops",
        "moe_bench",
        "moe_profile",
        "ep_overlap",
        "moa_bench",
        "mod_bench",
    ):
        assert required in names


def test_dry_run_prints_the_plan():
    r = _run(["--dry-run", "--out", "/nonexistent/never-written"])
    assert r.returncode == 0, r.stdout + r.stderr
    for s in gc.STEPS:
        assert s.name in r.stdout
    assert "checked there" in r.stdout and "compute-sanitizer" in r.stdout
    assert "dry run: ok" in r.stdout
    assert not Path("/nonexistent/never-written").exists()


def test_skip_reasons():
    step = gc.Step("s", 10, "true", tools=["nvcc"], after=["build"])
    on_path = {"nvcc": "/usr/bin/nvcc"}.get
    assert gc.skip_reason(step, {"build": "ok"}, True, on_path) is None
    assert gc.skip_reason(step, {"build": "failed (exit 2)"}, True, on_path) == "build did not pass"
    assert gc.skip_reason(step, {"build": "ok"}, True, {}.get) == "nvcc not on PATH"
    assert gc.skip_reason(step, {"build": "ok"}, False, on_path) == "no CUDA GPU"


def test_classify_refusal_and_failure():
    step = gc.Step("san", 10, "x", refuse=gc.SANITIZER_REFUSALS)
    out = "========= COMPUTE-SANITIZER\n========= Error: Device not supported\nerror 999\n"
    assert gc.classify(step, 1, out).startswith("skipped: the tool refused the device")
    assert gc.classify(step, 3, "boom\n") == "failed (exit 3)"
    assert gc.classify(step, 0, "fine\n") == "ok"
    assert gc.classify(step, None, "") == "timed out"


def test_fake_steps_timeout_skip_and_report(tmp_path):
    """The fake GPU step sleeps past its 1 s limit (in a grandchild too): it is killed and marked
    timed out, the next step runs, and the report holds every step in order."""
    steps = [
        {"name": "first", "limit_s": 10, "cmd": "echo hello from first", "gpu": False},
        {"name": "slow_gpu", "limit_s": 1, "cmd": "echo started; bash -c 'sleep 30'; echo never"},
        {"name": "after_slow", "limit_s": 10, "cmd": "cat $OUT/gpu_check.md", "gpu": False},
        {"name": "no_tool", "limit_s": 10, "cmd": "true", "tools": ["no-such-tool-xyz"]},
        {"name": "needs_slow", "limit_s": 10, "cmd": "true", "after": ["slow_gpu"]},
        {
            "name": "refused",
            "limit_s": 10,
            "cmd": "echo '== Error: Device not supported'; exit 1",
            "refuse": ["Device not supported"],
        },
        {"name": "broken", "limit_s": 10, "cmd": "echo bad; exit 3"},
    ]
    out = tmp_path / "out"
    t0 = time.monotonic()
    r = _run(["--steps-file", _steps_file(tmp_path, steps), "--gpu", "yes", "--out", str(out)])
    took = time.monotonic() - t0
    assert took < 20, r.stdout
    assert r.returncode == 1, r.stdout + r.stderr  # a step timed out and one failed
    md = (out / "gpu_check.md").read_text()
    status = {
        "first": "ok",
        "slow_gpu": "timed out after 1 s",
        "after_slow": "ok",
        "no_tool": "skipped: no-such-tool-xyz not on PATH",
        "needs_slow": "skipped: slow_gpu did not pass",
        "refused": "skipped: the tool refused the device (== Error: Device not supported)",
        "broken": "failed (exit 3)",
    }
    pos = [md.index(f"## {n}: {s}") for n, s in status.items()]
    assert pos == sorted(pos), md
    assert "hello from first" in md and "started" in md and "\nnever\n" not in md
    # after_slow printed the report as it stood: the earlier steps were already in it.
    after = md[md.index("## after_slow") :]
    assert "## first: ok" in after and "## slow_gpu: timed out" in after
    assert "## Summary" in md
    log = (out / "gpu_check.log").read_text()
    assert "===== slow_gpu: timed out" in log and "bad" in log


def test_budget_and_gpu_absent(tmp_path):
    steps = [
        {"name": "gpu_only", "limit_s": 10, "cmd": "true"},
        {"name": "long", "limit_s": 30, "cmd": "sleep 20", "gpu": False},
        {"name": "late", "limit_s": 30, "cmd": "true", "gpu": False},
    ]
    out = tmp_path / "o"
    t0 = time.monotonic()
    r = _run(
        [
            "--steps-file",
            _steps_file(tmp_path, steps),
            "--gpu",
            "no",
            "--out",
            str(out),
            "--budget",
            "2",
            "--min-step-s",
            "1",
        ]
    )
    assert time.monotonic() - t0 < 15
    md = (out / "gpu_check.md").read_text()
    assert "## gpu_only: skipped: no CUDA GPU" in md
    assert "## long: timed out after 2 s" in md
    assert "## late: skipped: no time left in the 2 s budget" in md, r.stdout


def test_only_runs_one_step(tmp_path):
    steps = [
        {"name": "a", "limit_s": 5, "cmd": "echo step-a", "gpu": False},
        {"name": "b", "limit_s": 5, "cmd": "echo step-b", "gpu": False},
    ]
    out = tmp_path / "o"
    r = _run(
        [
            "--steps-file",
            _steps_file(tmp_path, steps),
            "--only",
            "b",
            "--out",
            str(out),
            "--gpu",
            "no",
        ]
    )
    assert r.returncode == 0
    md = (out / "gpu_check.md").read_text()
    assert "## b: ok" in md and "## a:" not in md


def test_cuda_tests_plugin_selects_cuda_tests():
    plugin = _load("cuda_tests_only")

    def item(nodeid, reason=None):
        marks = [SimpleNamespace(kwargs={"reason": reason})] if reason else []
        return SimpleNamespace(nodeid=nodeid, iter_markers=lambda name: iter(marks))

    assert plugin.is_cuda_test(item("tests/test_grouped_mm_cuda.py::test_x"))
    assert plugin.is_cuda_test(item("tests/test_permute.py::test_y[cuda-float32]"))
    assert plugin.is_cuda_test(item("tests/test_check_errors.py::t", "no CUDA device/kernels"))
    assert plugin.is_cuda_test(
        item("tests/test_build.py::test_sass[sm_90a-GMMA]", "CPU-only build")
    )
    assert not plugin.is_cuda_test(item("tests/test_permute.py::test_y[cpu-float32]"))
    assert not plugin.is_cuda_test(item("tests/test_simt_router.py::test_cuda_like"))


# The device-side scripts, on the CPU with small shapes (each a few seconds).


def test_sanitize_cases_pass_on_cpu(capsys):
    assert _load("sanitize_cases").main(["--device", "cpu"]) == 0
    assert "8 ok, 0 failed" in capsys.readouterr().out


def test_grouped_mm_tflops_smoke(tmp_path, capsys):
    js = tmp_path / "t.json"
    mod = _load("grouped_mm_tflops")
    args = ["--tiny", "--device", "cpu", "--dtype", "float32", "--models", "mixtral", "--reps", "1"]
    assert mod.main([*args, "--json", str(js)]) == 0
    rows = json.loads(js.read_text())["rows"]
    assert {(r["dist"], r["mode"]) for r in rows} == {
        (d, m) for d in ("balanced", "zipf") for m in ("fwd", "dgrad", "wgrad")
    }
    assert all(r["rel_diff_vs_torch"] < 1e-5 for r in rows)
    assert "| mixtral | zipf | wgrad |" in capsys.readouterr().out


def test_profile_moe_stage_summary(capsys):
    assert _load("profile_moe").main(["--tiny", "--device", "cpu", "--ranges-off-gpu"]) == 0
    out = capsys.readouterr().out
    for stage in ("router", "permute", "gate_up_gemm", "activation", "down_gemm", "unpermute"):
        assert f"| mixops.moe.{stage} | 1 |" in out
    assert "GeneratedBackwardFor_mixops_grouped_mm" in out


def test_transformers_range_matches_pyproject_and_prepare(monkeypatch):
    """tests/helpers.py's supported range = pyproject's `transformers` extra = the bench
    requirements; gpu_prepare.sh carries a version inside it; newer versions skip."""
    tomllib = pytest.importorskip("tomllib")
    from helpers import TRANSFORMERS_BELOW, TRANSFORMERS_MIN, skip_unsupported_transformers

    spec = f"transformers>={TRANSFORMERS_MIN},<{TRANSFORMERS_BELOW}"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert spec in extras["transformers"]
    assert spec in (ROOT / "requirements-bench.txt").read_text()
    prepared = re.search(r"TRANSFORMERS_VERSION-([0-9.]+)", (BENCH / "gpu_prepare.sh").read_text())
    assert prepared and prepared.group(1).startswith(TRANSFORMERS_MIN + ".")
    transformers = pytest.importorskip("transformers")
    monkeypatch.setattr(transformers, "__version__", TRANSFORMERS_BELOW + ".0")
    with pytest.raises(pytest.skip.Exception, match="outside the supported range"):
        skip_unsupported_transformers()


def test_benchmarks_bracket_the_timed_region_for_nsys(monkeypatch):
    """mixops.bench.timing.cuda_profiler_range: cudaProfilerStart after a sync, Stop after a
    sync, also when the timed body raises; nothing at all off CUDA."""
    import torch

    from mixops.bench.timing import cuda_profiler_range

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: calls.append("sync"))
    monkeypatch.setattr(torch.cuda.profiler, "start", lambda: calls.append("start"))
    monkeypatch.setattr(torch.cuda.profiler, "stop", lambda: calls.append("stop"))
    with cuda_profiler_range(True):
        calls.append("timed")
    assert calls == ["sync", "start", "timed", "sync", "stop"]
    calls.clear()
    with pytest.raises(ValueError), cuda_profiler_range(True):
        raise ValueError
    assert calls == ["sync", "start", "sync", "stop"]
    calls.clear()
    with cuda_profiler_range(False):
        pass
    assert calls == []
