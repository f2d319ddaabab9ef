#!/usr/bin/env bash
# gpu_check step "unpack": the carried folder .gpu/ (bench/gpu_prepare.sh) into $WORK:
#   .gpu/cutlass.tar.xz -> $WORK/cutlass (include/, tools/util/include; gpu_check sets CUTLASS_DIR)
#   .gpu/wheels/*.whl   -> $WORK/site (put on PYTHONPATH by gpu_check), kept only if transformers
#                          imports from it with this machine's packages; else removed and the
#                          machine's own transformers is used (HF tests skip outside our range).
set -euo pipefail
PY=${PY:-python3}
C="$ROOT/.gpu"
mkdir -p "$WORK"
if [ -f "$C/cutlass.tar.xz" ]; then
  rm -rf "$WORK/cutlass" && mkdir -p "$WORK/cutlass"
  tar -xJf "$C/cutlass.tar.xz" -C "$WORK/cutlass"
  grep -h -E '#define CUTLASS_(MAJOR|MINOR|PATCH) ' "$WORK/cutlass/include/cutlass/version.h" | tr '\n' ' '
  echo "-> $WORK/cutlass"
else
  echo "no .gpu/cutlass.tar.xz: the build looks for CUTLASS_DIR or the nvidia-cutlass package"
fi
rm -rf "$WORK/site"
shopt -s nullglob
wheels=("$C"/wheels/*.whl)
if [ ${#wheels[@]} -gt 0 ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" "${wheels[@]}"
  echo "wheels into $WORK/site: $(cd "$C/wheels" && ls)"
  if ! PYTHONPATH="$WORK/site" "$PY" -c "import transformers as t; from transformers import MixtralConfig; print('carried transformers', t.__version__, 'imports')"; then
    echo "the carried transformers does not import here (its dependencies?): removed; the machine's own is used"
    rm -rf "$WORK/site"
  fi
fi
"$PY" -c "import transformers as t; print('machine transformers', t.__version__)" 2>/dev/null || echo "machine has no transformers"
