#!/usr/bin/env bash
# The GPU path in one prepared run (< 10 min on one H200); see docs/performance.md, "GPU check".
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine (carry .whl: benchmarks/gpu_wheels.sh)
#   bash benchmarks/gpu_check.sh --cpu-dry-run   # here: every step on the CPU at tiny sizes
#
# Installs the wheels in .whl/ (if any) into /tmp/mvfm_site without touching the machine's own packages, builds
# this checkout's package metadata there (so ns-train finds mvfm-features / mvfm-splat), then runs
# benchmarks/gpu_check.py, which prints a summary table and writes gpu_check.json (+ logs) to $OUT when set.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SITE=${MVFM_SITE:-/tmp/mvfm_site}
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  echo "installing $(ls .whl/*.whl | wc -l) carried wheels into $SITE"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || { echo "gpu_check: installing the carried wheels failed"; exit 3; }
  # this package's entry points (ns-train's method registry) without a build: metadata only, code from the checkout
  $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$SITE" . \
    || { echo "gpu_check: installing this checkout failed (setuptools missing?)"; exit 3; }
  export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
exec $PY benchmarks/gpu_check.py "$@"
