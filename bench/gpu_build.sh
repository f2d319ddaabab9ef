#!/usr/bin/env bash
# gpu_check step "build": mixops with CUDA kernels for this GPU's architecture only, on every core,
# installed against the machine's own torch (pip --no-build-isolation --no-deps). GPU_ARCH
# overrides the detection (e.g. GPU_ARCH=9.0a to try the build on a machine without a GPU).
set -euo pipefail
PY=${PY:-python3}
arch=${GPU_ARCH:-}
if [ -z "$arch" ]; then
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ' || true)
  [ -n "$cap" ] || cap=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  arch=$cap
  [ "$cap" = "9.0" ] && arch="9.0a"  # Hopper: the wgmma/TMA kernels need sm_90a
fi
export TORCH_CUDA_ARCH_LIST="$arch" MIXOPS_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}"
mkdir -p "$WORK" && echo "$arch" > "$WORK/arch"  # gpu_check exports it to the later steps (tests)
echo "mixops build: TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$MAX_JOBS CUTLASS_DIR=${CUTLASS_DIR:-<nvidia-cutlass package>}"
t0=$(date +%s)
rm -f "$WORK/pythonpath"
if ! "$PY" -m pip install --no-build-isolation --no-deps --no-cache-dir -v "$ROOT"; then
  # pip itself may be what failed (a missing build tool); the CMake build folder is in the tree,
  # so building in place reuses whatever compiled. gpu_check then puts python/ on PYTHONPATH.
  echo "pip install failed after $(( $(date +%s) - t0 )) s; building in place instead"
  (cd "$ROOT" && "$PY" setup.py build_ext --inplace)
  echo "$ROOT/python" > "$WORK/pythonpath"
fi
echo "build + install: $(( $(date +%s) - t0 )) s"
cd /tmp && "$PY" -c "import json, mixops; print(json.dumps(mixops.build_info()))"
