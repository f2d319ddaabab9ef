"""The benchmarks run: a quick pass of each job prints its table (timings are not judged; the
multi-process jobs' traced shares must lie in [0, 100]%); the README's main job (moe, the default)
also writes its chart and ends with the decode table. The traced share's interval arithmetic (bench/_overlap.py) is checked
against hand-computed intervals."""

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
    for needle in ("mixops ms", "torch ms", "speedup", "float32", "bfloat16", "routing rules"):
        assert needle in p.stdout
    for needle in ("top_p", "cum_threshold", "relu", "torch/mixops", "top-k ms"):
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
        "fwd+bwd+accum",
        "CPU capability",
        "coarse-8x2",
        "fine-64x8",
        "float32",
        "bfloat16",
        "checked: mixops output and input gradient",
        "peak memory",
        "mixops/HF grouped_mm",
        str(png),
        "mixops MoE decode benchmark",
    ):
        assert needle in p.stdout, needle
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the accumulating pass: config dtype pass impl median-ms x-floor [speedup, peers only]
    rows = [line.split() for line in p.stdout.splitlines()]
    rows = [(r[:2], *_split_impl(r[3:])) for r in rows if r[2:3] == ["fwd+bwd+accum"]]
    got = sorted((*case, impl) for case, impl, _ in rows)
    want = [
        (c, d, impl)
        for c in ("coarse-8x2", "fine-64x8")
        for d in ("bfloat16", "float32")
        for impl in ("HF eager", "HF grouped_mm", "floor", "mixops")
    ]
    assert got == want, p.stdout
    for _, impl, nums in rows:
        ms, x_floor = (float(v) for v in nums[:2])  # a peer's may be nan (it failed)
        assert impl.startswith("HF") or (ms > 0 and x_floor > 0), (impl, nums)
    _check_decode_rows(p.stdout)


def _split_impl(fields):
    """(impl, the fields after it) from a table row's fields that start with the impl (the HF
    ones are two words)."""
    n = 2 if fields[:1] == ["HF"] else 1
    return " ".join(fields[:n]), fields[n:]


def _check_decode_rows(out, dtypes=("float32", "bfloat16")):
    """The decode table of ``out``: one row per (dtype, tokens, impl), each of whose numbers
    parses (ms/call, experts, MiB read, GB/s, read GB/s, % read), and the target line."""
    import math

    rows = [line.split() for line in out.splitlines()]
    rows = [(r[:2], *_split_impl(r[2:])) for r in rows if r[:1] in [[d] for d in dtypes]]
    rows = [(d, int(t), impl, nums) for (d, t), impl, nums in rows if t.isdigit()]
    got = sorted(r[:3] for r in rows)
    impls = ("HF eager", "HF grouped_mm", "mixops")
    assert got == sorted((d, t, i) for d in dtypes for t in (1, 4, 16) for i in impls), out
    for *_, impl, nums in rows:
        assert len(nums) == 6 and nums[-1].endswith("%"), nums
        ms, experts, mib, gbs, read, pct = (float(v.rstrip("%")) for v in nums)
        assert math.isfinite(read) and read > 0 and 1 <= experts <= 8 and mib > 0, nums
        if impl == "mixops":  # a peer's may be nan (it failed)
            assert ms > 0 and gbs > 0 and pct > 0, nums
    assert "read GB/s = the machine's read bandwidth" in out
    assert "target (issue 29): mixops bfloat16 at 1 token >= 60%" in out or "bfloat16" not in dtypes


def test_decode_bench_quick_runs_and_prints_table():
    out = _quick("decode", "--device", "cpu", "--dtype", "bfloat16", "--decode-layers", "2")
    for needle in ("CPU capability", "avx512_bf16", "threads", "experts", "% read"):
        assert needle in out, needle
    _check_decode_rows(out, ("bfloat16",))


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


def _table_rows(out, pass_col):
    """The table rows of a benchmark's stdout: the lines whose ``pass_col``-th field is a pass."""
    rows = [line.split() for line in out.splitlines()]
    return [r for r in rows if len(r) > pass_col and r[pass_col] in ("fwd", "fwd+bwd")]


def _percent(field):
    assert field.endswith("%"), field
    return float(field[:-1])


def test_multi_process_benches_quick_run_and_print_tables():
    out = _quick("ep", "--world", "2")
    for needle in ("expert-parallel benchmark: world 2", "no-link ms", "hidden", "traced"):
        assert needle in out
    head = next(line for line in out.splitlines() if line.startswith("pass"))
    assert head.split()[:4] == ["pass", "n", "traced", "hidden"], head  # traced: the headline
    assert "traced = " in out and "target >= " in out.split("traced = ")[1].split("hidden")[0]
    rows = _table_rows(out, 0)
    assert sorted((r[0], int(r[1])) for r in rows) == sorted(
        (p, n) for p in ("fwd", "fwd+bwd") for n in (1, 4, 8)
    ), out
    for r in rows:
        assert 0.0 <= _percent(r[2]) <= 100.0, r
    out = _quick("scmoe", "--world", "2")
    for needle in ("shortcut-connected MoE benchmark: world 2", "standard", "shortcut", "60%"):
        assert needle in out
    rows = _table_rows(out, 1)
    assert len(rows) == 8, out  # 2 speeds x 2 passes x 2 schedules
    for r in rows:
        assert 0.0 <= _percent(r[-1]) <= 100.0, r


def test_ep_bench_fsdp_quick_runs_and_prints_table():
    """The FSDP2 mode (2 x 2 mesh, 4 processes: about 25 s on 2 cores) prints the same table:
    every pass and n, traced shares in [0, 100]%, the other columns finite."""
    import math

    out = _quick("ep", "--fsdp", "--world", "4", "--ep", "2")
    for needle in ("world 4, FSDP2 on a dp 2 x ep 2 mesh", " cores, CPU capability ", "FSDP2: "):
        assert needle in out, needle
    head = next(line for line in out.splitlines() if line.startswith("pass"))
    assert head.split()[:4] == ["pass", "n", "traced", "hidden"], head
    rows = _table_rows(out, 0)
    assert sorted((r[0], int(r[1])) for r in rows) == sorted(
        (p, n) for p in ("fwd", "fwd+bwd") for n in (1, 4, 8)
    ), out
    for r in rows:
        assert 0.0 <= _percent(r[2]) <= 100.0, r
        assert math.isfinite(_percent(r[3])), r
        assert all(math.isfinite(float(v)) and float(v) > 0 for v in r[4:7]), r


def _trace(comms, computes):
    return [["comm", "a2a", a, b, 1] for a, b in comms] + [
        ["compute", "experts", a, b] for a, b in computes
    ]


def test_union_merges_overlapping_nested_and_touching_intervals():
    from mixops.bench._overlap import union

    spans = [(4, 8), (2, 5), (12, 15), (13, 14), (15, 16), (7, 7), (9, 8)]
    assert union(spans) == [[2, 8], [12, 16]]
    assert union([]) == []


def test_covered_share_against_hand_computed_intervals():
    from mixops.bench._overlap import covered_share

    # One exchange [0, 10]: compute [2, 5] and [4, 8] overlap (their union [2, 8]: 6, not
    # 3 + 4), [-3, 1] counts only inside the exchange (1), [12, 15] lies outside it (0).
    trace = _trace([(0, 10)], [(2, 5), (4, 8), (-3, 1), (12, 15)])
    assert covered_share(trace) == 0.7
    # A nested interval adds nothing; compute after the exchange nothing.
    assert covered_share(_trace([(0, 10)], [(1, 9), (2, 3), (10, 20)])) == 0.8
    # Two exchanges [0, 10] and [20, 24]; one compute [8, 22] covers 2 of each: 4 / 14.
    assert covered_share(_trace([(0, 10), (20, 24)], [(8, 22)])) == 4 / 14
    # Exchanges queued on the link overlap each other: each counts its own covered time,
    # (3 + 3) / (10 + 10).
    assert covered_share(_trace([(0, 10), (5, 15)], [(6, 9)])) == 0.3
    # Unfinished records (end None) are left out, as are the bytes field and other names.
    trace = _trace([(0, 10)], [(0, 5)])
    trace += [["comm", "combine", 11, None, 8], ["compute", "experts.backward", 5, None]]
    assert covered_share(trace) == 0.5
    # Fully covered; nothing covered; no link time at all.
    assert covered_share(_trace([(1, 2), (3, 4)], [(0, 5)])) == 1.0
    assert covered_share(_trace([(0, 10)], [(10, 11), (-1, 0)])) == 0.0
    assert covered_share(_trace([], [(0, 1)])) == 0.0


def test_titan_bench_quick_runs_and_prints_table():
    """bfloat16 only and no peak-memory processes (a few seconds); one peak-memory measurement
    runs here, in this process."""
    import math

    import pytest

    pytest.importorskip("torchtitan.models.common.moe", reason="torchtitan is not installed")
    out = _quick("titan", "--device", "cpu", "--dtype", "bfloat16", "--no-peak-mem")
    for needle in (
        "CPU capability",
        "torchtitan 0.",
        "checked: mixops output and input gradient match torchtitan's",
        "torchtitan ms",
        "mixops ms",
        "speedup",
        "torchtitan MiB",
        "mixops MiB",
        "target fine-64x6",
        "target coarse-8x2",
    ):
        assert needle in out, needle
    rows = _table_rows(out, 2)
    assert sorted((r[0], r[2]) for r in rows) == sorted(
        (c, p) for c in ("fine-64x6", "coarse-8x2") for p in ("fwd", "fwd+bwd")
    ), out
    for r in rows:
        assert r[1] == "bfloat16" and r[5].endswith("x"), r
        assert float(r[3]) > 0 and float(r[4]) > 0 and float(r[5][:-1]) > 0, r

    from mixops.bench import titan

    mib = titan.peak_mem_mib(titan.QUICK[1], "bfloat16", "mixops", "fwd+bwd", "cpu")
    assert math.isfinite(mib) and mib >= 0.0


def test_lora_bench_quick_runs_and_prints_tables():
    """bfloat16 only and no peak-memory processes; one peak-memory measurement runs here, in
    this process."""
    import math

    out = _quick("lora", "--device", "cpu", "--dtype", "bfloat16", "--no-peak-mem")
    for needle in (
        "CPU capability",
        "peft 0.",
        "checked: mixops output and input gradient == PEFT's in float32",
        "checked: mixops adapter path and layer == the per-expert loop's in float32",
        "Section 1: MoE LoRA fine-tuning step",
        "PEFT/mixops",
        "no-LoRA ms",
        "Section 2: LoRAMoE adapter path",
        "loop/mixops",
        "target",
    ):
        assert needle in out, needle
    rows = _table_rows(out, 3)  # section 1: config dtype rank pass ...
    assert sorted((r[0], r[3]) for r in rows) == sorted(
        (c, p) for c in ("fine-64x8", "coarse-8x2") for p in ("fwd", "fwd+bwd")
    ), out
    for r in rows:
        assert r[1] == "bfloat16" and r[2] == "8" and r[7].endswith("x"), r
        assert min(float(v) for v in r[4:7]) > 0, r
    rows = _table_rows(out, 2)  # section 2: config dtype pass ...
    assert sorted(r[2] for r in rows) == ["fwd", "fwd+bwd"], out
    for r in rows:
        assert r[1] == "bfloat16" and float(r[3]) > 0 and r[5].endswith("x"), r

    from mixops.bench import lora, moe_cases

    for impl in lora.IMPLS:
        mib = lora.peak_mem_mib(moe_cases.QUICK[0], "bfloat16", impl, 8, "cpu")
        assert math.isfinite(mib) and mib >= 0.0, impl


def test_hetero_bench_quick_runs_and_prints_tables():
    out = _quick("hetero", "--device", "cpu")
    for needle in (
        "CPU capability",
        "checked: padded layer and per-expert loop == packed layer in float32",
        "packed/padded",
        "FLOP ratio",
        "packed weights MiB",
    ):
        assert needle in out, needle
    rows = _table_rows(out, 1)  # dtype pass packed padded loop ...
    assert sorted((r[0], r[1]) for r in rows) == sorted(
        (d, p) for d in ("float32", "bfloat16") for p in ("fwd", "fwd+bwd")
    ), out
    for r in rows:
        assert min(float(v) for v in r[2:5]) > 0 and 0 < float(r[6]) <= 1, r
