"""The logic of bench/gpu_check.sh: build, test, sanitize, measure and profile mixops on a GPU
machine in one short run, as a table of steps.

Each step is a bash command with its own time limit, run in its own process group (a step that
hangs is killed with its children, and the run goes on); the whole run has a budget (default 8
minutes) and a step never gets more than what is left of it. After every step its section is
appended to the Markdown report `gpu_check.md` in the output folder ($OUT if set, else --out), and
its whole output to `gpu_check.log`, so a kill loses one step, never the report. A step whose tool
is missing, or whose tool refuses the device (compute-sanitizer on gVisor says "Device not
supported"), is "skipped: reason", not a failure; steps that need the build are skipped when it
failed. The exit status is 1 when any step failed or timed out, else 0.

Steps are a table (STEPS, in gpu_check_steps.py); `--steps-file FILE.json` replaces it (a list of
objects with the Step fields), which is how tests inject fake steps. `--dry-run` checks the local
files and tools, lists the tools checked on the device, prints the plan and exits 0 without
running anything.
"""

import argparse
import datetime
import importlib.util
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("MIXOPS_GPU_WORK", "/tmp/mixops-gpu"))  # unpacked carry, site dir
CARRY = ROOT / ".gpu"  # what bench/gpu_prepare.sh made here
REPORT, LOG = "gpu_check.md", "gpu_check.log"


def _sibling(name):
    """bench/<name>.py, loaded by its path: this file runs as a script and tests load it by path,
    so bench/ need not be on sys.path."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_steps = _sibling("gpu_check_steps")
Step, STEPS, load_steps = _steps.Step, _steps.STEPS, _steps.load_steps
SANITIZER_REFUSALS, DEVICE_TOOLS = _steps.SANITIZER_REFUSALS, _steps.DEVICE_TOOLS


def parse_args(argv=None, steps=None):
    p = argparse.ArgumentParser(
        prog="bench/gpu_check.sh",
        description="Build, test, sanitize, measure and profile mixops on a GPU in one run.",
    )
    p.add_argument(
        "--out",
        default=os.environ.get("OUT") or "gpu_check_out",
        help="report folder (default $OUT, else ./gpu_check_out)",
    )
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="STEP",
        help="run only this step (repeatable; comma lists work too)",
    )
    p.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="STEP",
        help="leave this step out (repeatable)",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=480.0,
        help="seconds for the whole run (default 480); each step gets at most what is left",
    )
    p.add_argument(
        "--min-step-s",
        type=float,
        default=5.0,
        help="a step is skipped when less than this is left of the budget (default 5)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check local files and tools, print the plan, run nothing",
    )
    p.add_argument(
        "--steps-file",
        default=os.environ.get("MIXOPS_GPU_CHECK_STEPS", ""),
        help="JSON list of steps replacing the built-in table",
    )
    p.add_argument(
        "--gpu",
        choices=["auto", "yes", "no"],
        default="auto",
        help="whether a CUDA GPU is there (auto: ask $PY's torch)",
    )
    p.add_argument(
        "--python",
        default=os.environ.get("PY") or sys.executable,
        help="the Python that builds and runs mixops (default: this one)",
    )
    args = p.parse_args(argv)
    table = load_steps(args.steps_file) if args.steps_file else (steps or STEPS)
    names = [s.name for s in table]
    for opt in ("only", "skip"):
        picked = [n for v in getattr(args, opt) for n in v.split(",") if n]
        bad = [n for n in picked if n not in names]
        if bad:
            p.error(f"--{opt}: unknown step(s) {', '.join(bad)}; steps: {', '.join(names)}")
        setattr(args, opt, picked)
    args.steps = [
        s for s in table if (not args.only or s.name in args.only) and s.name not in args.skip
    ]
    return args


def _env(args, out):
    env = dict(os.environ)
    env.update(PY=args.python, OUT=str(out), ROOT=str(ROOT), WORK=str(WORK), PYTHONUNBUFFERED="1")
    # bench/ holds the pytest plugin the cuda_tests step loads; $WORK/site the carried wheels.
    paths = [str(ROOT / "bench")]
    if (WORK / "pythonpath").is_file():  # the build fell back to an in-place build
        paths.insert(0, (WORK / "pythonpath").read_text().strip())
    if (WORK / "site").is_dir():
        paths.append(str(WORK / "site"))
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    if (WORK / "arch").is_file():  # what the build step built for (tests/test_build.py reads it)
        env["TORCH_CUDA_ARCH_LIST"] = (WORK / "arch").read_text().strip()
    if (WORK / "cutlass" / "include" / "cutlass" / "cutlass.h").exists():
        env.setdefault("CUTLASS_DIR", str(WORK / "cutlass"))
    return env


def has_gpu(args):
    if args.gpu != "auto":
        return args.gpu == "yes", f"--gpu {args.gpu}"
    try:
        r = subprocess.run(
            [args.python, "-c", "import torch; print(torch.cuda.is_available())"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"torch probe failed: {e}"
    ok = r.stdout.strip().endswith("True")
    return ok, "torch.cuda.is_available()" if ok else "torch sees no CUDA GPU"


def run_cmd(cmd, limit, env, log_path):
    """Run `bash -c cmd` in its own process group with its output in log_path; kill the group at
    the limit. Returns (returncode or None on timeout, seconds)."""
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["bash", "-c", cmd],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=max(limit, 0.1))
        except subprocess.TimeoutExpired:
            rc = None
            for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
    return rc, time.monotonic() - t0


def _tail(text, n):
    lines = text.rstrip("\n").splitlines()
    cut = len(lines) - n
    return ([f"... ({cut} lines above in {LOG})"] if cut > 0 else []) + lines[max(cut, 0) :]


class Report:
    """gpu_check.md (appended after each step) and gpu_check.log (every step's whole output)."""

    def __init__(self, out):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.md, self.log = self.out / REPORT, self.out / LOG

    def append(self, text):
        with open(self.md, "a") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def header(self, args, gpu_reason):
        try:
            commit = subprocess.run(
                ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
            ).stdout.strip()
        except OSError:
            commit = ""
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        self.append(
            f"# mixops GPU check\n\n{now}, host {platform.node()}, commit {commit or '?'}, "
            f"python {args.python}, GPU: {gpu_reason}, budget {args.budget:.0f} s, steps: "
            f"{', '.join(s.name for s in args.steps)}\n\n"
        )

    def step(self, step, status, seconds, limit, output):
        with open(self.log, "a") as f:
            f.write(f"\n===== {step.name}: {status} ({seconds:.1f} s) =====\n$ {step.cmd}\n")
            f.write(output)
        body = f"\n## {step.name}: {status}\n\n{step.what}\n\n"
        if seconds or limit:
            body += f"{seconds:.1f} s of a {limit:.0f} s limit. `{step.cmd}`\n\n"
        if output.strip():
            body += "```text\n" + "\n".join(_tail(output, step.tail)) + "\n```\n"
        self.append(body)

    def summary(self, results, total):
        rows = "\n".join(f"| {n} | {s} | {t:.1f} |" for n, s, t in results)
        self.append(
            f"\n## Summary ({total:.0f} s)\n\n| step | status | s |\n|---|---|---:|\n{rows}\n"
        )


def skip_reason(step, done, gpu, tools_on_path=shutil.which):
    """Why a step cannot run now (None: it can)."""
    for name in step.after:
        if name in done and done[name] != "ok":
            return f"{name} did not pass"
    missing = [t for t in step.tools if tools_on_path(t) is None]
    if missing:
        return f"{', '.join(missing)} not on PATH"
    if step.gpu and not gpu:
        return "no CUDA GPU"
    return None


def classify(step, rc, output):
    """ok / failed / timed out / skipped (the tool refused the device)."""
    if rc is None:
        return "timed out"
    for pat in step.refuse:
        m = re.search(pat, output)
        if m:
            line = output[output.rfind("\n", 0, m.start()) + 1 :].splitlines()[0]
            return f"skipped: the tool refused the device ({line.strip()[:120]})"
    return "ok" if rc == 0 else f"failed (exit {rc})"


def dry_run(args):
    print(f"gpu_check dry run: {len(args.steps)} steps, budget {args.budget:.0f} s")
    problems = []
    for rel in sorted({f for s in args.steps for f in s.files}):
        path = ROOT / rel
        ok = path.is_file()
        if ok and path.suffix == ".py":
            r = subprocess.run(
                [sys.executable, "-m", "py_compile", str(path)], capture_output=True, text=True
            )
            ok = r.returncode == 0
        elif ok and path.suffix == ".sh":
            ok = subprocess.run(["bash", "-n", str(path)]).returncode == 0
        print(f"  file  {rel}: {'ok' if ok else 'MISSING OR BROKEN'}")
        if not ok:
            problems.append(rel)
    py_ok = bool(shutil.which(args.python)) or Path(args.python).is_file()
    tools = {"bash": shutil.which("bash"), "git (optional)": shutil.which("git") or "absent"}
    tools[f"python {args.python}"] = py_ok
    for tool, found in tools.items():
        print(f"  tool  {tool}: {'ok' if found else 'MISSING'}")
        if not found:
            problems.append(tool)
    carried = sorted(p.name for p in CARRY.iterdir()) if CARRY.is_dir() else []
    print(
        f"  carry .gpu/: {', '.join(carried) if carried else 'absent (run bench/gpu_prepare.sh)'}"
    )
    for tool in DEVICE_TOOLS:
        print(f"  tool  {tool}: checked there")
    print("\nplan (a step gets min(its limit, what is left of the budget)):")
    total = 0.0
    for i, s in enumerate(args.steps, 1):
        total += s.limit_s
        needs = ", ".join([*(f"after {a}" for a in s.after), *s.tools, *(["GPU"] if s.gpu else [])])
        print(
            f"  {i:2}. {s.name:<20} {s.limit_s:5.0f} s  {s.what}"
            + (f"  [{needs}]" if needs else "")
        )
    print(f"  sum of limits {total:.0f} s; budget {args.budget:.0f} s; report: {args.out}/{REPORT}")
    if problems:
        print(f"dry run: missing or broken: {', '.join(problems)}")
        return 1
    print("dry run: ok")
    return 0


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    t_start = time.monotonic()
    out = Path(args.out)
    report = Report(out)
    gpu, why = has_gpu(args)
    report.header(args, why)
    env = _env(args, out)
    done, results, bad = {}, [], 0
    for i, step in enumerate(args.steps, 1):
        left = args.budget - (time.monotonic() - t_start)
        reason = skip_reason(step, done, gpu)
        if reason is None and left < args.min_step_s:
            reason = f"no time left in the {args.budget:.0f} s budget"
        print(f"[{i}/{len(args.steps)}] {step.name} ", end="", flush=True)
        if reason:
            status, secs, limit, output = f"skipped: {reason}", 0.0, 0.0, ""
        else:
            env = _env(args, out)  # $WORK/site and CUTLASS appear after the unpack step
            limit = min(step.limit_s, left)
            rc, secs = run_cmd(step.cmd, limit, env, out / f".{step.name}.part")
            part = out / f".{step.name}.part"
            output = part.read_text(errors="replace")
            part.unlink()
            status = classify(step, rc, output)
            if rc is None:
                status = f"timed out after {limit:.0f} s"
        done[step.name] = "ok" if status == "ok" else status
        bad += status.startswith(("failed", "timed out"))
        print(f"{status} ({secs:.1f} s)", flush=True)
        if output:
            print("\n".join("    " + ln for ln in _tail(output, min(step.tail, 15))), flush=True)
        report.step(step, status, secs, limit, output)
        results.append((step.name, status, secs))
    total = time.monotonic() - t_start
    report.summary(results, total)
    print(
        f"gpu_check: {len(results) - bad} of {len(results)} steps ok or skipped, {bad} failed "
        f"or timed out, {total:.0f} s; report {out / REPORT}"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
