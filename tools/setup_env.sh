#!/usr/bin/env bash
# Set up (or re-use) the project's virtual environment and install mmge into it.
#
#   bash tools/setup_env.sh            # CPU machine (this is what CI runs)
#   MMGE_VENV=/path/to/venv bash tools/setup_env.sh
#
# The stack and its pinned versions are explained in docs/get_started.md.
# A second run on the same machine is fast: every dependency step is skipped when its
# result is already importable (pip re-uses the cached mmcv wheel), and mmge itself is
# reinstalled from the checkout in seconds.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MMGE_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

log() { printf '[setup_env] %s\n' "$*"; }

if [ ! -x "$PY" ]; then
  log "creating virtual environment at $VENV"
  python3 -m venv "$VENV"
fi
PIP=("$PY" -m pip --disable-pip-version-check)
# numpy < 2 and friends, for every pip call (see the file).
export PIP_CONSTRAINT="$ROOT/tools/constraints.txt"

# Run from / so that the checkout itself is not importable as "mmge".
have() { (cd / && "$PY" -c "$1") >/dev/null 2>&1; }

# 1. torch + torchvision. '!=2.13.0+cpu' keeps pip off a local CPU-only torch wheel
#    that torchvision's PyPI build cannot load (docs/get_started.md). setuptools is
#    pinned in the same step to a release that torch 2.13 accepts and that still has the
#    pkg_resources mmcv's setup.py and mmengine import (tools/constraints.txt).
if ! have 'import torch, torchvision, pkg_resources, numpy, sys; from torchvision.ops import nms; sys.exit(numpy.__version__ >= "2" or not torch.__version__.startswith("2.13."))'; then
  log "installing torch and torchvision (large download, about 2 minutes)"
  # PyPI's torch brings about 5 GB of CUDA libraries; say so up front when the disk that
  # holds the venv (or pip's temporary directory) has less free, rather than leave only
  # pip's "No space left on device" halfway through.
  for dir in "$VENV" "${TMPDIR:-/tmp}"; do
    free_kb=$(df -Pk "$dir" 2>/dev/null | awk 'NR==2 {print $4}')
    if [ -n "$free_kb" ] && [ "$free_kb" -lt $((6 * 1024 * 1024)) ]; then
      log "WARNING: only $((free_kb / 1024)) MiB free on the disk holding $dir;" \
          "torch + torchvision need about 6 GiB there (set TMPDIR or MMGE_VENV elsewhere)"
    fi
  done
  "${PIP[@]}" install -q --no-cache-dir "torch==2.13.0,!=2.13.0+cpu" "torchvision==0.28.0" "numpy>=1.24,<2" \
    "setuptools>=77.0.3,<81" wheel
fi

# 2. mmcv with its compiled ops. It has to be built against the installed torch, so no
#    build isolation. The first build takes about 9 minutes on 2 cores; pip caches the wheel.
if ! have 'from mmcv.ops import RoIAlign, nms'; then
  log "building mmcv 2.1.0 with ops (first time: about 9 minutes; cached afterwards)"
  MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "${PIP[@]}" install -q --no-build-isolation "mmcv==2.1.0"
fi

# 3. The OpenMMLab libraries, pycocotools, pytest and the ONNX test's onnx, onnxruntime and
#    onnxscript (setup.py's requirements).
if ! have 'import mmengine, mmdet, mmpretrain, pycocotools, pytest, onnx, onnxruntime, onnxscript'; then
  log "installing mmengine, mmdet, mmpretrain, pycocotools, pytest and onnx(runtime)"
  "${PIP[@]}" install -q --no-build-isolation "$ROOT[tests]"
fi

# 4. mmge itself, from this checkout, every time (a few seconds). A regular install, not an
#    editable one: mmengine looks for the configs that `_base_ = 'mmge::configs/...'` names
#    next to the installed package, and does not find them through a PEP 660 editable install.
log "installing mmge from $ROOT"
"${PIP[@]}" install -q --no-build-isolation --no-deps --force-reinstall "$ROOT"

# 5. GE's native CPU kernels in the checkout too (mmge/_ge_cpu*.so, a second), so that
#    code run from the checkout (the tests, `python -c 'import mmge'`) has them as well.
log "building GE's CPU kernels in place"
(cd "$ROOT" && "$PY" setup.py -q build_ext --inplace >/dev/null)

"$PY" - <<'PYEOF'
import torch, torchvision, mmengine, mmcv, mmdet, mmpretrain, pycocotools
from mmcv.ops import RoIAlign  # noqa: F401  (fails if mmcv was built without ops)
print('[setup_env] ready: torch %s, torchvision %s, mmengine %s, mmcv %s, mmdet %s, mmpretrain %s'
      % (torch.__version__, torchvision.__version__, mmengine.__version__,
         mmcv.__version__, mmdet.__version__, mmpretrain.__version__))
PYEOF
