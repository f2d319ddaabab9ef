"""Static checks that keep the source layout honest, run with a plain C++ compiler and CMake
(no GPU, no build of the extension needed):

* every family's torch-free header (and core's) compiles alone without torch or CUDA headers;
* the kernels we write live in *_kernel.cuh headers with no launch syntax, torch or CUTLASS;
* every op family has the same files in the same places;
* the grouped_mm path choice (csrc/grouped_mm/path.h) on several GPUs;
* the per-file CUDA arch flags (cmake/MixopsArchs.cmake) for several TORCH_CUDA_ARCH_LISTs;
* no Python file of the package is longer than MAX_PY_LINES lines;
* nothing in mixops.nn imports mixops.parallel (parallel builds on nn, never the reverse).
"""

import ast
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
FAMILIES = ["grouped_mm", "routing", "permute", "activation"]
CXX = shutil.which("g++") or shutil.which("c++")
needs_cxx = pytest.mark.skipif(CXX is None, reason="needs a C++ compiler")

TORCH_FREE_HEADERS = [
    "core/macros.h",
    "core/dtype.h",
    "core/align.h",
    "core/det_math.h",
    "core/errors.h",
    "grouped_mm/grouped_mm.h",
    "grouped_mm/path.h",
    "routing/routing.h",
    "routing/topc.h",
    "permute/permute.h",
    "activation/activation.h",
]


@needs_cxx
@pytest.mark.parametrize("header", TORCH_FREE_HEADERS)
def test_torch_free_header_compiles_alone(header, tmp_path):
    src = tmp_path / "only.cpp"
    src.write_text(f'#include "{header}"\n#include "{header}"\nint main() {{ return 0; }}\n')
    # Only csrc on the include path: a torch, c10 or CUDA include cannot resolve.
    proc = subprocess.run(
        [CXX, "-std=c++20", "-fsyntax-only", "-Wall", "-Werror", f"-I{CSRC}", str(src)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr


def _kernel_headers():
    return sorted(CSRC.glob("*/*_kernel.cuh"))


def test_kernel_headers_exist_for_every_family():
    families = {h.parent.name for h in _kernel_headers()}
    assert set(FAMILIES) <= families


@pytest.mark.parametrize("header", _kernel_headers(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_kernel_header_has_no_launch_torch_or_cutlass(header):
    text = header.read_text()
    code = re.sub(r"//[^\n]*", "", text)  # comments may name these things
    assert "<<<" not in code, "launches belong in the .cu file"
    includes = re.findall(r'#include\s*[<"]([^>"]+)[>"]', code)
    bad = [
        i
        for i in includes
        if i.split("/")[0] in {"ATen", "c10", "torch", "cutlass", "cute"} or "cutlass" in i
    ]
    assert not bad, f"{header.name} includes {bad}"
    assert "cudaStream_t" not in code and "cudaLaunch" not in code


def _includes(path, seen=None):
    """Every csrc header `path` includes, directly or through other csrc headers."""
    seen = set() if seen is None else seen
    for name in re.findall(r'#include\s*"([^"]+)"', path.read_text()):
        h = CSRC / name
        if h.is_file() and h not in seen:
            seen.add(h)
            _includes(h, seen)
    return seen


def _plain_kernels(header):
    """The non-template __global__ functions a header defines (each translation unit that
    includes it emits the kernel and its host stub with external linkage)."""
    code = re.sub(r"//[^\n]*", "", header.read_text())
    names = []
    for m in re.finditer(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(", code):
        before = code[: m.start()]
        prefix = before[max(before.rfind(";"), before.rfind("}")) + 1 :]
        if "template" not in prefix:
            names.append(m.group(1))
    return names


def test_plain_kernels_reach_one_translation_unit():
    # The SIMT drivers compile several .cu files as one translation unit, so only the CUDA link
    # would see a non-template kernel defined by two .cu files ("multiple definition").
    units = {f: _includes(f) for f in CSRC.rglob("*.cu")}
    for header in _kernel_headers():
        plain = _plain_kernels(header)
        users = sorted(str(f.relative_to(CSRC)) for f, inc in units.items() if header in inc)
        assert not plain or len(users) <= 1, (
            f"{header.name} defines non-template kernels {plain} and reaches {users}"
        )


def test_plain_kernel_scan_finds_kernels():
    assert "scatter_kernel" in _plain_kernels(CSRC / "permute" / "unpermute_kernel.cuh")
    assert "unpermute_kernel" not in _plain_kernels(CSRC / "permute" / "unpermute_kernel.cuh")


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_has_the_same_files(family):
    d = CSRC / family
    for name in [f"{family}.h", "check.h", "check.cpp", "cpu.cpp", "cuda.cpp", "launch.h"]:
        assert (d / name).is_file(), f"csrc/{family}/{name} is missing"
    assert (ROOT / "python" / "mixops" / "ops" / f"{family}.py").is_file()
    assert list(d.glob("*.cu")), f"csrc/{family} has no CUDA launch file"


def test_no_launch_syntax_in_host_files():
    # Launches go through core/cuda_launch.h's launch_kernel (the one <<<>>> of the tree, which
    # the SIMT harness replaces), called from .cu files and the CUTLASS templates they include.
    for f in CSRC.rglob("*"):
        if f.suffix in {".h", ".cpp", ".cu", ".cuh"} and f.is_file() and f.name != "cuda_launch.h":
            code = re.sub(r"//[^\n]*", "", f.read_text())
            assert "<<<" not in code, f"{f.relative_to(ROOT)} launches a kernel"


@needs_cxx
def test_grouped_mm_path_choice(tmp_path):
    exe = tmp_path / "path_test"
    subprocess.run(
        [
            CXX,
            "-std=c++20",
            "-O1",
            "-Wall",
            "-Werror",
            f"-I{CSRC}",
            str(ROOT / "tests" / "cpp" / "grouped_mm_path_test.cpp"),
            "-o",
            str(exe),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    proc = subprocess.run([str(exe)], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stdout


CMAKE = shutil.which("cmake")


def _arch_flags(arch_list):
    proc = subprocess.run(
        [
            CMAKE,
            f"-DMIXOPS_ARCH_LIST={arch_list}",
            "-P",
            str(ROOT / "cmake" / "print_arch_flags.cmake"),
        ],
        capture_output=True,
        text=True,
    )
    return proc


def _codes(flags, kind):
    """'sm' or 'compute' targets named by a list of -gencode flags."""
    return {m.group(1) for f in flags for m in [re.search(rf"code={kind}_(\w+)$", f)] if m}


@pytest.mark.skipif(CMAKE is None, reason="needs cmake")
@pytest.mark.parametrize(
    "arch_list, sm80_sass, sm80_ptx, all_sass, all_ptx, sm90, warns",
    [
        ("8.0;9.0a", {"80", "90a"}, {"80"}, {"80", "90a"}, {"80"}, True, False),
        # CUTLASS 2 files never get PTX below 8.0 (compute_75 PTX JIT-compiled on a newer GPU reaches
        # CUTLASS's NOT_IMPLEMENTED trap); +PTX adds PTX for that arch.
        (
            "7.5 8.0 8.6 9.0+PTX",
            {"80", "86", "90"},
            {"80", "90"},
            {"75", "80", "86", "90"},
            {"75", "90"},
            False,
            True,
        ),
        ("7.5", set(), {"80"}, {"75"}, {"75"}, False, False),
        ("9.0a", {"90a"}, {"90"}, {"90a"}, {"90"}, True, False),
        ("8.6+PTX;9.0;9.0a", {"86", "90", "90a"}, {"86"}, {"86", "90", "90a"}, {"86"}, True, False),
    ],
)
def test_per_file_arch_flags(arch_list, sm80_sass, sm80_ptx, all_sass, all_ptx, sm90, warns):
    proc = _arch_flags(arch_list)
    assert proc.returncode == 0, proc.stderr
    flags = json.loads(proc.stderr)  # message(NOTICE) prints to stderr
    assert _codes(flags["SM80"], "sm") == sm80_sass
    assert _codes(flags["SM80"], "compute") == sm80_ptx
    assert _codes(flags["ALL"], "sm") == all_sass
    assert _codes(flags["ALL"], "compute") == all_ptx
    assert (flags["SM90"] == ["-gencode=arch=compute_90a,code=sm_90a"]) == sm90
    assert (flags["has_sm90"] == "ON") == sm90
    assert ("9.0 but not 9.0a" in flags["warnings"]) == warns


@pytest.mark.skipif(CMAKE is None, reason="needs cmake")
@pytest.mark.parametrize(
    "arch_list, message",
    [
        ("7.0;8.0", "below 7.5"),
        ("sm_80", "cannot parse CUDA arch"),
        ("", "empty CUDA arch list"),
    ],
)
def test_bad_arch_lists_are_clear_errors(arch_list, message):
    proc = _arch_flags(arch_list)
    assert proc.returncode != 0 and message in proc.stderr


PACKAGE = ROOT / "python" / "mixops"
MAX_PY_LINES = 400  # split a longer module along its seams (issue 23)


def test_no_python_file_of_the_package_is_too_long():
    long = {
        str(f.relative_to(ROOT)): n
        for f in sorted(PACKAGE.rglob("*.py"))
        if (n := len(f.read_text().splitlines())) > MAX_PY_LINES
    }
    assert not long, f"over {MAX_PY_LINES} lines: {long}"


def _imported_modules(source, package):
    """The absolute names of the modules that ``source`` (a module of ``package``, e.g.
    "mixops.nn") imports anywhere, relative imports resolved; ``from a import b`` gives ``a.b``."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = parts[: len(parts) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)
    return names


def _parallel(names):
    return sorted(n for n in names if n == "mixops.parallel" or n.startswith("mixops.parallel."))


def test_nn_does_not_import_parallel():
    # The scan sees every spelling of the import.
    for src in (
        "from ..parallel import slow_link",
        "from ..parallel.comm import traced_call",
        "from .. import parallel",
        "import mixops.parallel.comm",
        "from mixops import parallel",
        "def f():\n    from ..parallel import comm",
    ):
        assert _parallel(_imported_modules(src, "mixops.nn")), src
    assert not _parallel(_imported_modules("from .._trace import traced", "mixops.nn"))

    bad = {}
    for f in sorted((PACKAGE / "nn").rglob("*.py")):
        package = ".".join(("mixops", *f.relative_to(PACKAGE).parent.parts))
        found = _parallel(_imported_modules(f.read_text(), package))
        if found:
            bad[str(f.relative_to(ROOT))] = found
    assert not bad, f"mixops.nn imports mixops.parallel: {bad}"
