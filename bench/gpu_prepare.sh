#!/usr/bin/env bash
# Run HERE (with network or the local pip mirror) before a GPU check: put what the GPU machine lacks
# into the ignored folder .gpu/, to carry along with the working tree (64 MiB in all):
#   .gpu/cutlass.tar.xz   CUTLASS headers from the nvidia-cutlass wheel: include/ (cutlass, cute)
#                         and tools/util/include, as cmake/MixopsCuda.cmake reads them
#   .gpu/wheels/          transformers in the range our HF integration supports (pyproject's
#                         `transformers` extra), for Python 3.12; its dependencies are already
#                         there (the unpack step keeps it only if it imports)
# Prints the paths to carry. TRANSFORMERS_VERSION overrides the version; empty: carry none.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$(command -v python3 || command -v python)}
CUTLASS_VERSION=4.2.0.0  # requirements-build.txt's pin
TRANSFORMERS_VERSION=${TRANSFORMERS_VERSION-5.24.0}
GPU_PYTHON=${GPU_PYTHON:-3.12}
D=.gpu
rm -rf "$D" && mkdir -p "$D/wheels"
tmp=$(mktemp -d) && trap 'rm -rf "$tmp"' EXIT

# CUTLASS: the installed wheel's copy, else the wheel itself (never installed).
src=$("$PY" -c "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source'))" 2>/dev/null || true)
if [ -z "$src" ] || [ ! -f "$src/include/cutlass/cutlass.h" ]; then
  "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "nvidia-cutlass==$CUTLASS_VERSION"
  (cd "$tmp" && unzip -q nvidia_cutlass-*.whl 'cutlass_library/source/include/*' 'cutlass_library/source/tools/util/include/*')
  src="$tmp/cutlass_library/source"
fi
tar -cJf "$D/cutlass.tar.xz" -C "$src" include tools/util/include
echo "CUTLASS headers from $src -> $D/cutlass.tar.xz"

if [ -n "$TRANSFORMERS_VERSION" ]; then
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$GPU_PYTHON" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    -d "$D/wheels" "transformers==$TRANSFORMERS_VERSION"
fi
echo "wheels: $(ls "$D/wheels" | tr '\n' ' ')"
size=$(du -sk "$D" | cut -f1)
tree=$(git ls-files -z | xargs -0 du -ck 2>/dev/null | tail -1 | cut -f1)
echo "size: $D $((size / 1024)) MiB + working tree $((tree / 1024)) MiB (limit 64 MiB)"
if [ $((size + tree)) -gt $((60 * 1024)) ]; then
  echo "gpu_prepare: too big to carry" >&2
  exit 1
fi
echo "carry: $D"
