#!/usr/bin/env bash
# Everything that needs a GPU, in one call on a lent GPU box (under 10 minutes):
#   1. install mvportrait without touching torch/triton (the image ships torch + triton; the box
#      is offline, so missing small pure-Python deps are only tried, never required),
#   2. run every GPU-marked test (`pytest -m gpu`) plus the kernel tests compiled on the GPU,
#   3. run the kernel benchmarks (benchmarks/bench_kernels.py and any other non-CPU bench_*.py),
#      which write benchmarks/results/*.json.
# Logs and a copy of the results go to $OUT when it is set (the device runner's output folder).
#
#   bash benchmarks/gpu_suite.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
QUICK=${1:-}
LOGS=${OUT:-benchmarks/results}/gpu_suite_logs
mkdir -p "$LOGS" benchmarks/results
status=0
t0=$(date +%s)

echo "== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY - <<'EOF' || { echo "torch with CUDA is required"; exit 2; }
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
assert torch.cuda.is_available()
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton missing: Triton paths will be skipped")
EOF

echo "== install (no deps, no build isolation: never replaces torch)"
if ! $PY -m pip install --no-deps --no-build-isolation -q -e . >"$LOGS/pip.log" 2>&1; then
    echo "editable install failed (see pip.log); using PYTHONPATH=$PWD"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
for mod in safetensors av tqdm pytest; do
    $PY -c "import $mod" 2>/dev/null || $PY -m pip install -q "$mod" >>"$LOGS/pip.log" 2>&1 \
        || echo "warning: $mod missing and not installable here"
done
unset TRITON_INTERPRET  # compiled kernels on the GPU

echo "== GPU-marked tests"
timeout 200 $PY -m pytest -m gpu tests -q -rs --junitxml="$LOGS/pytest_gpu.xml" 2>&1 | tee "$LOGS/pytest_gpu.log"
rc=${PIPESTATUS[0]}; [ "$rc" -ne 0 ] && { echo "GPU tests failed (rc=$rc)"; status=1; }

echo "== kernel tests compiled on the GPU (small sizes)"
timeout 150 $PY -m pytest tests/kernels -m "not gpu" -q -x 2>&1 | tee "$LOGS/pytest_kernels.log"
rc=${PIPESTATUS[0]}; [ "$rc" -ne 0 ] && { echo "kernel tests failed (rc=$rc)"; status=1; }

echo "== kernel benchmarks"
for bench in benchmarks/bench_kernels.py $(ls benchmarks/bench_*.py | grep -v -e '_cpu\.py$' -e 'bench_kernels\.py$'); do
    left=$(( 570 - ($(date +%s) - t0) ))
    if [ "$left" -lt 30 ]; then echo "skipping $bench: time budget spent"; status=1; continue; fi
    args=""; [ "$bench" = benchmarks/bench_kernels.py ] && args="$QUICK"
    echo "-- $bench $args (limit ${left}s)"
    timeout "$left" $PY "$bench" $args 2>&1 | tee "$LOGS/$(basename "$bench" .py).log"
    rc=${PIPESTATUS[0]}; [ "$rc" -ne 0 ] && { echo "$bench failed (rc=$rc)"; status=1; }
done

if [ -n "${OUT:-}" ]; then cp benchmarks/results/*.json "$OUT"/ 2>/dev/null || true; fi
echo "== done in $(( $(date +%s) - t0 ))s, status $status"
exit $status
