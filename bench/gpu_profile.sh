#!/usr/bin/env bash
# gpu_check step "moe_profile": one fwd+bwd MoE step with a per-stage summary from torch.profiler
# (bench/profile_moe.py); then, where nsys is on PATH, the same under Nsight Systems with the
# capture range the script brackets (cudaProfilerStart/Stop) and nsys's own summaries.
PY=${PY:-python3}
"$PY" bench/profile_moe.py || exit $?
if command -v nsys >/dev/null; then
  echo; echo "== nsys =="
  rep="$WORK/moe_step"
  if timeout 45 nsys profile --trace=cuda,nvtx,osrt --capture-range=cudaProfilerApi \
       --capture-range-end=stop --force-overwrite=true -o "$rep" "$PY" bench/profile_moe.py >/dev/null \
     && [ -f "$rep.nsys-rep" ]; then
    timeout 30 nsys stats --report nvtx_sum,cuda_gpu_kern_sum --format table "$rep.nsys-rep" | head -80
  else
    echo "nsys wrote no report here; the torch.profiler summary above stands"
  fi
else
  echo; echo "nsys: not on PATH (the torch.profiler summary above stands)"
fi
exit 0
