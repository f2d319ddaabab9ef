#!/usr/bin/env bash
# CUDA compiler launcher: runs "$@" (ccache nvcc ... or nvcc ...) and keeps a copy of its stderr
# (the -Xptxas=-v register/spill report) in $REPORT_DIR/<object name>.txt, for tests/test_build.py.
set -o pipefail
report_dir=$1; shift
obj=unknown
prev=""
for arg in "$@"; do
  if [[ "$prev" == "-o" ]]; then obj=$(basename "$arg"); fi
  prev=$arg
done
"$@" 2> >(tee "$report_dir/$obj.txt" >&2)
rc=$?
wait
exit $rc
