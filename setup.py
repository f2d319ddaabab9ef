"""Build mixops from source: setuptools hands the extension to CMake + ninja (see CMakeLists.txt).

Environment knobs (all optional):
  MIXOPS_CUDA=0|1          force the CUDA kernels off/on (default: on when torch has CUDA and nvcc exists)
  TORCH_CUDA_ARCH_LIST     CUDA archs, default "8.0;9.0a" (Ampere and Hopper kernels)
  CUTLASS_DIR              CUTLASS root; default: the headers of the nvidia-cutlass wheel
  CUDA_HOME                CUDA toolkit root; default: found from nvcc on PATH
  MAX_JOBS                 parallel compile jobs (default: all cores)
  MIXOPS_BUILD_TYPE        CMake build type (default Release)
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _toolkit_root():
    """The folder whose bin/ holds the real nvcc (PATH may hold a wrapper script)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and (Path(os.environ[var]) / "bin" / "nvcc").exists():
            return Path(os.environ[var])
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:  # nvcc --dryrun names its own bin folder, whatever wraps it
        out = subprocess.run([nvcc, "--dryrun", "--version"], capture_output=True, text=True).stderr
        m = re.search(r"_HERE_=(\S+)", out)
        if m and (Path(m.group(1)) / "nvcc").exists():
            return Path(m.group(1)).parent
    except OSError:
        pass
    return Path(os.path.realpath(nvcc)).parent.parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def run(self):
        # setuptools clears self.inplace while it builds (it copies the .so afterwards), so the
        # build-facts folder of an in-place build must be decided here.
        self._in_source = bool(self.inplace)
        super().run()

    def build_extension(self, ext):
        import pybind11
        import torch

        out_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        # A stable build folder in the source tree, so rebuilds are incremental (plus ccache).
        build_dir = Path(os.environ.get("MIXOPS_BUILD_DIR", ROOT / "build" / "cmake")).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)

        want = os.environ.get("MIXOPS_CUDA", "auto").lower()
        toolkit = _toolkit_root()
        if want in ("1", "on", "true"):
            if toolkit is None:
                sys.exit("mixops: MIXOPS_CUDA=1 but nvcc was not found; set CUDA_HOME")
            cuda = "ON"
        elif want in ("0", "off", "false"):
            cuda = "OFF"
        else:
            cuda = "ON" if (torch.version.cuda and toolkit is not None) else "OFF"

        args = [
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DPYTHON_EXECUTABLE={sys.executable}",
            "-DPYBIND11_FINDPYTHON=ON",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('MIXOPS_BUILD_TYPE', 'Release')}",
            f"-DMIXOPS_CUDA={cuda}",
            f"-DMIXOPS_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '8.0;9.0a')}",
            "-G",
            "Ninja",
        ]
        if os.environ.get("CUTLASS_DIR"):
            args.append(f"-DCUTLASS_DIR={os.environ['CUTLASS_DIR']}")
        if cuda == "ON":
            args += [
                f"-DCMAKE_CUDA_COMPILER={toolkit / 'bin' / 'nvcc'}",
                f"-DCUDAToolkit_ROOT={toolkit}",
            ]
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True)

        built = next(build_dir.glob("_C*.so"))
        out_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built, out_path)
        # Build facts next to the extension: torch version check at import, tests/test_build.py.
        # An editable install imports the package from the source tree, so they go there too.
        targets = [out_path.parent / "_build"]
        if (
            getattr(self, "editable_mode", False)
            or self.inplace
            or getattr(self, "_in_source", False)
        ):
            targets.append(ROOT / "python" / "mixops" / "_build")
        for meta_dir in targets:
            shutil.rmtree(meta_dir, ignore_errors=True)
            meta_dir.mkdir(parents=True)
            shutil.copy2(build_dir / "_build_meta.json", meta_dir / "build_meta.json")
            if (build_dir / "ptxas").is_dir():
                shutil.copytree(build_dir / "ptxas", meta_dir / "ptxas")
            else:  # CPU-only build: package_data still names the folder
                (meta_dir / "ptxas").mkdir()


setup(
    ext_modules=[CMakeExtension("mixops._C")],
    cmdclass={"build_ext": CMakeBuild},
)
