#!/usr/bin/env bash
# GE on one NVIDIA GPU, in one run that writes one markdown report:
#   1. the op tests on CUDA (the Triton kernels and the ops against their
#      reference implementations, values and gradients, fp32/bf16/fp16);
#   2. ge_benchmark.py, bf16 autocast, channels-last, at batch 32 and 128
#      (plain, SE, the formula, mmge, mmge compiled; every variant);
#   3. the Faster R-CNN C4 iteration at 800x1333, GE-theta E8 against its
#      baseline (detection_benchmark.py; needs mmcv's CUDA ops).
# A step that fails or outruns its time limit is reported as such and the
# next one runs. At most 8 minutes on a GPU (the steps' time limits).
#
#   bash tools/benchmark/gpu_check.sh [--report FILE] [--dry-run]
#
# --report FILE  where the report goes (default: gpu_report.md)
# --dry-run      the same steps on the CPU at tiny sizes and GE-theta only,
#                to check the script itself on a machine without a GPU
# The Python that runs it: $PYTHON, else .venv/bin/python, else python.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
REPORT=gpu_report.md
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --report) REPORT="${2:?--report needs a file}"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (--report FILE, --dry-run)" >&2
       exit 2 ;;
  esac
done
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi

if [ "$DRY" = 1 ]; then
  DEVICE=(--device cpu)
  SMALL=(--batch 2 --size 96 --repeats 1)
  LARGE=(--batch 4 --size 96 --repeats 1)
  DET=(--device cpu --size 96 128 --batch 1 --repeats 1 --boxes 2 --rois 8)
  ONLY=(--variants theta)
  SLOW=4  # the CPU compiles and runs several times slower: longer limits
  export TRITON_INTERPRET=1
else
  DEVICE=(--device cuda)
  SMALL=(--batch 32 --repeats 7)
  LARGE=(--batch 128 --repeats 5)
  DET=(--device cuda --size 800 1333 --batch 2 --repeats 5)
  ONLY=()
  SLOW=1
  if ! "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "gpu_check.sh: torch sees no CUDA device (use --dry-run to check the script on a CPU)" >&2
    exit 1
  fi
fi
BENCH=("$PYTHON" tools/benchmark/ge_benchmark.py "${DEVICE[@]}" --amp bf16 --channels-last
       ${ONLY[@]+"${ONLY[@]}"})

{
  echo "# GE on the GPU: op tests and benchmarks"
  echo
  "$PYTHON" - <<'EOF'
import subprocess
import torch
commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'],
                        capture_output=True, text=True).stdout.strip()
where = torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'
try:
    import triton
    tri = triton.__version__
except ImportError:
    tri = 'not installed'
print(f'{where}; torch {torch.__version__}, CUDA {torch.version.cuda}, '
      f'Triton {tri}; commit {commit or "unknown"}')
EOF
  date -u '+%Y-%m-%d %H:%M UTC'
  [ "$DRY" = 1 ] && echo && echo "**Dry run on the CPU at tiny sizes: no figure here is a GPU's.**"
} > "$REPORT"

# step TITLE SECONDS COMMAND...: run COMMAND with a time limit, its output
# into the report
step() {
  local title="$1" limit=$(($2 * SLOW))
  shift 2
  echo "[gpu_check] $title" >&2
  local start=$SECONDS out rc
  out="$(timeout "$limit" "$@" 2>&1)"
  rc=$?
  {
    echo
    echo "## $title"
    echo
    echo '```bash'
    echo "$*"
    echo '```'
    echo
    if [ $rc -eq 0 ]; then
      echo "$out" | grep -v -E '^(W[0-9]{4} |\[| +warnings\.warn|.*Warning: |  import pkg_resources|  _bootstrap)' | cat -s
    else
      [ $rc -eq 124 ] && echo "**Stopped at its ${limit} s limit.**" || echo "**Failed (exit $rc).**"
      echo
      echo '```'
      echo "$out" | tail -25
      echo '```'
    fi
    echo
    echo "($((SECONDS - start)) s)"
  } >> "$REPORT"
}

step "Op tests" 120 "$PYTHON" -m pytest -q -p no:cacheprovider \
  tests/test_triton_kernels.py tests/test_ops.py tests/test_gather_op.py
step "ResNet-50, batch ${SMALL[1]}" 90 "${BENCH[@]}" "${SMALL[@]}" \
  --rows control SE formula mmge
step "ResNet-50, batch ${LARGE[1]}" 90 "${BENCH[@]}" "${LARGE[@]}" \
  --rows SE mmge
step "ResNet-50 compiled, batch ${SMALL[1]}" 120 "${BENCH[@]}" "${SMALL[@]}" \
  --compile default --rows SE mmge
step "Faster R-CNN C4 iteration" 60 "$PYTHON" \
  tools/benchmark/detection_benchmark.py "${DET[@]}"
echo "[gpu_check] report: $REPORT" >&2
