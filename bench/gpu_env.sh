#!/usr/bin/env bash
# gpu_check step "env": what this machine is (GPU, driver, Python, packages, tools), for the report.
# Reads only; never fails the run for a missing tool.
PY=${PY:-python3}
echo "host $(hostname), kernel $(uname -r), $(nproc) cores, $(free -g 2>/dev/null | awk '/Mem:/{print $2 " GiB"}')"
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi: not usable"
"$PY" - <<'PYEOF'
import sys
import torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
PYEOF
command -v nvcc >/dev/null && nvcc --version | tail -2
for t in compute-sanitizer ncu nsys cuobjdump ccache; do
  printf '%-18s %s\n' "$t" "$(command -v "$t" || echo 'not on PATH')"
done
"$PY" -m pip list 2>/dev/null | grep -i -E '^(torch|triton|transformers|pytest|cmake|ninja|pybind11|numpy|setuptools|wheel|huggingface.hub|tokenizers|safetensors|regex|typer|nvidia-cutlass|matplotlib|tqdm) '
df -h /tmp | tail -1
exit 0
