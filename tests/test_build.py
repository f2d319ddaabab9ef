"""What was built: build_info, archs, ptxas spill report, tensor-core SASS, no libcuda, version check."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mixops
from mixops import _loader

INFO = mixops.build_info()
PKG = Path(mixops.__file__).parent
EXT = Path(mixops._C.__file__)
needs_cuda_build = pytest.mark.skipif(not INFO["with_cuda"], reason="CPU-only build")


def test_build_info_fields():
    assert INFO["torch_version"] == torch.__version__.split("+")[0]
    assert INFO["torch_runtime"] == torch.__version__
    assert isinstance(INFO["with_cuda"], bool) and isinstance(INFO["has_sm90"], bool)
    if INFO["with_cuda"]:
        assert re.fullmatch(r"\d+\.\d+(\.\d+)?", INFO["cuda_version"])
        assert re.fullmatch(r"\d+\.\d+\.\d+", INFO["cutlass_version"])


def test_info_command_prints_build_info():
    out = subprocess.run(
        [sys.executable, "-m", "mixops.info"], capture_output=True, text=True, check=True
    ).stdout
    assert "torch_version" in out and "cutlass_version" in out and "with_cuda" in out


@needs_cuda_build
def test_archs_sm80_and_sm90a():
    expected = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    if expected.replace(" ", ";") != "8.0;9.0a":
        pytest.skip(f"built for {expected}")
    assert {"sm_80", "sm_90a", "compute_80"} <= set(INFO["archs"])
    assert INFO["has_sm90"]


def _ptxas_reports():
    return sorted((PKG / "_build" / "ptxas").glob("*.txt"))


@needs_cuda_build
def test_ptxas_zero_spills_for_every_kernel():
    reports = _ptxas_reports()
    assert reports, "no ptxas -v reports were kept by the build"
    kernels = 0
    for report in reports:
        text = report.read_text()
        for line in text.splitlines():
            m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if m:
                kernels += 1
                assert m.group(1) == "0" and m.group(2) == "0", f"{report.name}: {line.strip()}"
    assert kernels >= 20, f"only {kernels} kernel reports found"
    names = {r.name for r in reports}
    assert any("sm90" in n for n in names) and any("sm80" in n for n in names)


def _cuobjdump():
    exe = shutil.which("cuobjdump")
    if exe is None:
        try:
            import nvidia.cu13 as cu13  # nvidia-cuda-cuobjdump / nvdisasm wheels

            cand = Path(list(cu13.__path__)[0]) / "bin" / "cuobjdump"
            exe = str(cand) if cand.exists() else None
        except ImportError:
            exe = None
    return exe


@needs_cuda_build
@pytest.mark.parametrize("arch, instr", [("sm_80", "HMMA"), ("sm_90a", "GMMA")])
def test_sass_has_tensor_core_instructions(arch, instr):
    if arch not in INFO["archs"]:  # a build for one GPU's arch only (bench/gpu_check.sh)
        pytest.skip(f"built for {', '.join(INFO['archs'])}")
    exe = _cuobjdump()
    if exe is None:
        pytest.skip(
            "cuobjdump not installed (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)"
        )
    env = dict(os.environ, PATH=f"{Path(exe).parent}:{os.environ.get('PATH', '')}")
    out = subprocess.run(
        [exe, "-sass", "-arch", arch, str(EXT)], capture_output=True, text=True, env=env, check=True
    ).stdout
    assert instr in out, f"no {instr} instruction in the {arch} SASS"


def test_no_cuda_driver_dependency():
    """import mixops must work without a GPU driver: the extension never links libcuda."""
    out = subprocess.run(
        ["readelf", "-d", str(EXT)], capture_output=True, text=True, check=True
    ).stdout
    needed = re.findall(r"\(NEEDED\).*\[(.+)\]", out)
    assert needed and not any(n.startswith("libcuda.so") for n in needed), needed


def test_torch_version_mismatch_is_a_clear_import_error(tmp_path, monkeypatch):
    meta = json.loads((PKG / "_build" / "build_meta.json").read_text())
    meta["torch_version"] = "1.0.0"
    fake = tmp_path / "build_meta.json"
    fake.write_text(json.dumps(meta))
    monkeypatch.setattr(_loader, "_META", fake)
    with pytest.raises(ImportError, match="built against torch 1.0.0 but torch .* is installed"):
        _loader.load_extension()


@pytest.mark.skipif(shutil.which("nvcc") is None or not torch.version.cuda, reason="needs nvcc")
def test_missing_cutlass_is_one_clear_message(tmp_path):
    root = Path(__file__).resolve().parents[1]
    setup_py = (root / "setup.py").read_text()
    assert "CUTLASS_DIR" in setup_py
    src = setup_py.split("\nsetup(")[0]  # the helpers only, not the setup() call
    ns = {"__file__": str(root / "setup.py"), "__name__": "setup_probe"}
    exec(compile(src, "setup.py", "exec"), ns)
    toolkit = ns["_toolkit_root"]()
    import pybind11

    proc = subprocess.run(
        [
            "cmake",
            "-S",
            str(root),
            "-B",
            str(tmp_path),
            "-G",
            "Ninja",
            "-DMIXOPS_CUDA=ON",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DPYTHON_EXECUTABLE={sys.executable}",
            "-DPYBIND11_FINDPYTHON=ON",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCUTLASS_DIR={tmp_path / 'no-cutlass-here'}",
            f"-DCMAKE_CUDA_COMPILER={toolkit / 'bin' / 'nvcc'}",
            f"-DCUDAToolkit_ROOT={toolkit}",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "CUTLASS headers not found" in text and "nvidia-cutlass" in text
    assert text.count("error:") == 0  # one message, no compiler error cascade


def test_cpu_only_build_works(tmp_path):
    """MIXOPS_CUDA=OFF builds a CPU-only extension whose ops run (what a CPU-only torch gets)."""
    root = Path(__file__).resolve().parents[1]
    import pybind11

    common = [
        f"-DPython_EXECUTABLE={sys.executable}",
        f"-DPYTHON_EXECUTABLE={sys.executable}",
        "-DPYBIND11_FINDPYTHON=ON",
        f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
    ]
    subprocess.run(
        [
            "cmake",
            "-S",
            str(root),
            "-B",
            str(tmp_path),
            "-G",
            "Ninja",
            "-DMIXOPS_CUDA=OFF",
            *common,
        ],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        ["cmake", "--build", str(tmp_path), "-j", str(os.cpu_count() or 1)],
        check=True,
        capture_output=True,
    )
    so = next(tmp_path.glob("_C*.so"))
    meta = json.loads((tmp_path / "_build_meta.json").read_text())
    assert meta["with_cuda"] in ("OFF", "0", "FALSE", "false", "")
    code = f"""
import torch
torch.ops.load_library({str(so)!r})
a = torch.randn(5, 3); b = torch.randn(2, 3, 4)
out = torch.ops.mixops.grouped_mm(a, b, torch.tensor([2, 4], dtype=torch.int32))
assert torch.allclose(out[:2], a[:2] @ b[0]) and torch.allclose(out[2:4], a[2:4] @ b[1])
assert torch.all(out[4] == 0)
print("CPU-ONLY OK")
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "CPU-ONLY OK" in p.stdout, p.stderr
