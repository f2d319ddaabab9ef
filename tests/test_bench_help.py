"""`python -m mixops.bench --help` describes every option and says which benchmarks use it; the
lists agree with what each benchmark module reads from its arguments."""

import importlib
import inspect
import os
import re
import subprocess
import sys

import pytest

from mixops.bench.__main__ import JOBS, parser

USED_BY = re.compile(r"^(.*?)\s*\[used by: ([^\]]+)\]$", re.S)


def _options():
    """{option string: (help text without the users, [benchmarks])} from the real parser."""
    out = {}
    for action in parser()._actions:
        if not action.option_strings or "-h" in action.option_strings:
            continue
        m = USED_BY.match(action.help or "")
        assert m, f"{action.option_strings[-1]}: help {action.help!r} names no users"
        users = m.group(2).split(", ")
        out[action.option_strings[-1]] = (m.group(1), list(JOBS) if users == ["all"] else users)
    return out


def _reads(job):
    """The options a benchmark module reads: ``args.<dest>``, and --dtype through
    ``selected_dtypes(args)``."""
    src = inspect.getsource(importlib.import_module(f"mixops.bench.{job}"))
    dests = set(re.findall(r"\bargs\.([a-z_]+)", src))
    if "selected_dtypes(args)" in src:
        dests.add("dtype")
    return {"--" + d.replace("_", "-") for d in dests}


def test_help_runs_and_lists_every_benchmark_and_option():
    r = subprocess.run(
        [sys.executable, "-m", "mixops.bench", "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "100"},
    )
    assert r.returncode == 0, r.stderr
    for job in JOBS:
        assert re.search(rf"^  {job}\s", r.stdout, re.M), f"{job} is not described"
    for opt in _options():
        assert opt in r.stdout
    flat = " ".join(r.stdout.split())  # argparse wraps the helps
    assert flat.count("[used by: ") == len(_options())


def test_every_option_has_a_description():
    for opt, (text, _) in _options().items():
        text = re.sub(r"\s*\(default: [^)]*\)$", "", text)  # the default alone says nothing
        assert len(text) >= 10, f"{opt} has no description: {text!r}"


def test_the_users_of_each_option_are_the_benchmarks_that_read_it():
    options = _options()
    reads = {job: _reads(job) for job in JOBS}
    for opt, (_, users) in options.items():
        want = [job for job in JOBS if opt in reads[job]]
        assert users == want, f"{opt}: help says {users}, the sources read it in {want}"
    for job, opts in reads.items():  # and nothing a benchmark reads is missing from the parser
        assert opts <= set(options), f"{job} reads {sorted(opts - set(options))}, not options"


@pytest.mark.parametrize("job", list(JOBS))
def test_each_benchmark_parses_with_its_defaults(job):
    args = parser().parse_args([job])
    assert args.which == job
