# Sourced by benchmarks/gpu_suite.sh --train: starts the training jobs of the lent GPU in the background
# (the suite's `bg NAME LIMIT CMD...`; the suite's tests run beside them, then `join` waits) and
# defines `train_finish`, which converts what they wrote for the trip back ($TRAINED is packed into
# $OUT/stage2.tgz.partNN and $OUT/distill.tgz.partNN).
#  * stage2: the tiny FLAME2Video teacher, the four stages in one process (the clip pool is rendered
#    once), each fitted to its wall-clock budget (`--time-budget`, from the measured step rate).
#  * distill: consistency distillation of the SHIPPED stage-2 teacher (mvportrait/weights/stage2) into
#    a 2-step student, on training clips of the model's full 4 views x 8 frames, batch D2_BATCH.
# Training renders use the plain reference rasterizer (MVP_KERNELS=ref): training data must not
# depend on a kernel under test in the same call. Each job stops itself within its budget and
# writes its model; the outer limit only catches a hang.
S2_POOL=${S2_POOL:-1024}
S2_BUDGETS=${S2_BUDGETS:-25,85,25,25}   # autoencoder, spatial, temporal, view (seconds)
S2_BATCH=${S2_BATCH:-64,64,16,8}
D2_BUDGET=${D2_BUDGET:-150}
D2_BATCH=${D2_BATCH:-8}
D2_POOL=${D2_POOL:-512}
s2_limit=$(( $(echo "$S2_BUDGETS" | tr ',' '+') + 60 ))
if [ "${S2:-1}" = 1 ]; then
    MVP_KERNELS=ref OMP_NUM_THREADS=4 bg stage2 "$s2_limit" $PY -m mvportrait.cli train stage2 --stage all \
        --config tiny --device cuda --out "$TRAINED/stage2" --pool-size "$S2_POOL" --steps 100000 \
        --batch "$S2_BATCH" --time-budget "$S2_BUDGETS" --checkpoint-every 1000 --quiet
fi
if [ "${D2:-1}" = 1 ]; then
    MVP_KERNELS=ref OMP_NUM_THREADS=4 bg distill "$(( D2_BUDGET + 60 ))" $PY -m mvportrait.cli distill stage2 \
        --device cuda --out "$TRAINED/distill" --views 4 --frames 8 --batch "$D2_BATCH" --pool-size "$D2_POOL" \
        --steps 100000 --time-budget "$D2_BUDGET" --checkpoint-every 100000 --seed 0 -q
fi

train_finish() {
    cp "$LOGS"/stage2.log "$TRAINED/stage2/" 2>/dev/null
    cp "$LOGS"/distill.log "$TRAINED/distill/" 2>/dev/null
    rm -f "$TRAINED"/stage2/*/checkpoint.safetensors "$TRAINED"/distill/*/checkpoint.safetensors \
        "$TRAINED"/distill/checkpoint.safetensors  # optimizer state: not needed back here
    if [ -f "$TRAINED/stage2/final/config.json" ]; then  # in float16 (the float32 copy would not come back)
        $PY - "$TRAINED/stage2" <<'PYEOF' && rm -f "$TRAINED/stage2/final/model.safetensors"
import shutil, sys, torch
from mvportrait.models.stage2 import FLAME2VideoModel
run = sys.argv[1]
FLAME2VideoModel.from_pretrained(f"{run}/final").save_pretrained(f"{run}/fp16", dtype=torch.float16)
shutil.copy(f"{run}/final/train_summary.json", f"{run}/fp16/")
PYEOF
    fi
    du -sh "$TRAINED"/* 2>/dev/null
}
