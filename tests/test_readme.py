"""Every Python code block of README.md runs, as a new user would run it: each in a fresh
interpreter (a subprocess in an empty folder, with a timeout), so a failing block names itself
(its README line and section) and no block leans on another's state. Shell blocks are not run.

A block that mentions ``transformers`` is skipped, saying why, when HF transformers is missing (it
is in requirements-test.txt, so CI runs them); one that mentions ``torchtitan`` likewise when
torchtitan is missing (CI installs requirements-torchtitan.txt). A block preceded by the comment
``<!-- readme-test: ranks=N -->`` is run as torchrun would run it: N processes with RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR (127.0.0.1) and MASTER_PORT (a free port) set."""

import importlib.util
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
TIMEOUT_S = 300  # a block, all ranks together (imports on a busy machine take most of it)
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)\s*$")
DIRECTIVE = re.compile(r"<!--\s*readme-test:\s*(?P<body>.*?)\s*-->")
KNOWN = {"ranks"}


@dataclass
class Block:
    line: int  # README line of the opening fence (1-based)
    lang: str
    code: str
    section: str
    options: dict

    @property
    def name(self):
        return f"README.md:{self.line} ({self.section})"


def blocks(text=None):
    """Every fenced block of the README, in order (indented ones in lists too, dedented)."""
    lines = (README.read_text() if text is None else text).splitlines()
    out, section, i = [], "top", 0
    while i < len(lines):
        if lines[i].startswith("#"):
            section = lines[i].lstrip("#").strip()
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, indent = i, m.group("indent")
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        if j == len(lines):
            raise ValueError(f"README.md:{start + 1}: unclosed code block")
        body = [ln[len(indent) :] if ln.startswith(indent) else ln for ln in lines[i + 1 : j]]
        options = {}
        k = start - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        d = DIRECTIVE.search(lines[k]) if k >= 0 else None
        if d:
            for item in d.group("body").split():
                key, _, value = item.partition("=")
                if key not in KNOWN:
                    raise ValueError(f"README.md:{k + 1}: unknown readme-test option {key!r}")
                options[key] = value
        code = textwrap.dedent("\n".join(body)) + "\n"
        out.append(Block(start + 1, m.group("lang"), code, section, options))
        i = j + 1
    return out


def python_blocks():
    return [b for b in blocks() if b.lang == "python"]


def skip_reason(block):
    """Why the block cannot run here (HF transformers or torchtitan missing), or None."""
    needs_hf = re.search(r"\btransformers\b", block.code)
    if needs_hf and importlib.util.find_spec("transformers") is None:
        return f"{block.name} needs HF transformers (pip install -r requirements-test.txt)"
    needs_titan = re.search(r"\btorchtitan\b", block.code)
    if needs_titan and importlib.util.find_spec("torchtitan") is None:
        return (
            f"{block.name} needs torchtitan (pip install --no-deps -r requirements-torchtitan.txt)"
        )
    return None


# A rank runs its block as a script and, once it ended without an exception, leaves without
# finalizing the interpreter: torch 2.14's gloo worker threads free a finished collective's Python
# tensors after the call returned (taking the GIL), and one doing so while the interpreter
# finalizes aborts the process ("terminate called without an active exception"), about one run in
# five on 2 cores, after the block's own code all ran (see tests/dist_harness.exit_now).
RANK_RUNNER = (
    "import os, runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__'); "
    "sys.stdout.flush(); sys.stderr.flush(); os._exit(0)"
)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(block, folder):
    """Run the block (N ranks when it asks for them); returns [(rank, returncode, output)]."""
    script = folder / f"readme_line_{block.line}.py"
    script.write_text(block.code)
    ranks = int(block.options.get("ranks", 0))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    worlds = [None] if not ranks else list(range(ranks))
    port = str(_free_port())
    procs, logs = [], []
    for rank in worlds:
        e = dict(env)
        if rank is not None:
            e.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks))
            e.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        cmd = [sys.executable, str(script)]
        if rank is not None:
            cmd[1:1] = ["-c", RANK_RUNNER]
        logs.append(folder / f"output_rank{rank or 0}.txt")
        with open(logs[-1], "w") as log:  # a file, not a pipe: no rank blocks on a full pipe
            procs.append(subprocess.Popen(cmd, cwd=folder, env=e, stdout=log, stderr=log))
    end = time.monotonic() + TIMEOUT_S
    results = []
    for rank, p, log in zip(worlds, procs, logs):
        try:
            rc = p.wait(timeout=max(1.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            p.wait()
            rc = f"timeout after {TIMEOUT_S} s"
        results.append((rank, rc, log.read_text()))
    return results


def test_the_readme_has_the_examples_a_new_user_needs():
    bs = python_blocks()
    assert len(bs) >= 10, [b.name for b in bs]
    quick = [b for b in bs if b.section == "Quickstart"]
    assert len(quick) == 2 and bs[:2] == quick, "the quickstart's MoE and patch_model come first"
    ops = next(b for b in bs if b.section.startswith("Routing"))
    assert quick[-1].line < ops.line, "the quickstart comes before the op internals"
    assert "MoE(" in quick[0].code and "patch_model(" in quick[1].code
    assert any(b.options.get("ranks") for b in bs), "expert parallelism runs on several ranks"


def test_the_extractor_reads_indented_blocks_and_directives():
    text = (
        "# A\n\n- item\n\n  ```python\n  x = 1\n  ```\n\n<!-- readme-test: ranks=2 -->\n"
        "```python\ny = 2\n```\n\n```bash\nls\n```\n"
    )
    a, b, c = blocks(text)
    assert (a.line, a.code, a.options, a.section) == (5, "x = 1\n", {}, "A")
    assert (b.code, b.options) == ("y = 2\n", {"ranks": "2"})
    assert c.lang == "bash"
    with pytest.raises(ValueError, match="unknown readme-test option 'rank'"):
        blocks("<!-- readme-test: rank=2 -->\n```python\nz = 3\n```\n")


def test_a_hanging_block_is_killed_at_the_timeout(monkeypatch, tmp_path):
    monkeypatch.setattr(sys.modules[__name__], "TIMEOUT_S", 3)
    hang = Block(
        1, "python", "import time\nprint('started', flush=True)\ntime.sleep(600)\n", "t", {}
    )
    t0 = time.monotonic()
    [(rank, rc, out)] = _run(hang, tmp_path)
    assert rc == "timeout after 3 s" and "started" in out and time.monotonic() - t0 < 60


def test_blocks_needing_transformers_skip_with_the_reason_when_it_is_missing(monkeypatch):
    hf, plain = blocks("```python\nimport transformers\n```\n```python\nimport torch\n```\n")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "transformers" else find_spec(n, *a)
    )
    assert "needs HF transformers" in skip_reason(hf) and skip_reason(plain) is None
    monkeypatch.undo()
    want = find_spec("transformers") is None
    assert (skip_reason(hf) is not None) == want  # installed (requirements-test.txt): it runs


@pytest.mark.parametrize("block", python_blocks(), ids=lambda b: f"line{b.line}")
def test_readme_block_runs(block, tmp_path):
    if skip_reason(block):
        pytest.skip(skip_reason(block))
    results = _run(block, tmp_path)
    bad = [(rank, rc, out) for rank, rc, out in results if rc != 0]
    if bad:
        report = "\n".join(
            f"--- {'' if rank is None else f'rank {rank}: '}exit {rc}\n{out[-4000:]}"
            for rank, rc, out in bad
        )
        pytest.fail(f"{block.name} failed:\n{block.code}\n{report}", pytrace=False)


def test_blocks_needing_torchtitan_skip_with_the_reason_when_it_is_missing(monkeypatch):
    (titan,) = blocks("```python\nfrom torchtitan.config import OverrideConfig\n```\n")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "torchtitan" else find_spec(n, *a)
    )
    assert "needs torchtitan" in skip_reason(titan)
    monkeypatch.undo()
    assert (skip_reason(titan) is not None) == (find_spec("torchtitan") is None)
