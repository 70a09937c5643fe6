#!/usr/bin/env bash
# The GPU runs behind results/2026-11-26-h200: the exact commands, in two calls of a GPU machine.
#
#   bash tools/run_gpu.sh tune     # bench.py, then 3 recipes trained on train.txt, scored on val.txt
#   RECIPE="..." bash tools/run_gpu.sh final   # the chosen recipe: seeds on trainval scored on test, and on train/val
#   bash tools/run_gpu.sh tune2    # next round (one call, at most ~9 min): the CUDA-only tests, CPU and data-pipeline
#                                    # checks, bench.py, then 3 recipes of 250 epochs side by side on train.txt, scored on val.txt
#
# Expects BCCD in data/BCCD (copied there, it is git-ignored) and writes everything under $OUT.
# Knobs for a CPU dry run: DEVICE=cpu EPOCHS=1 BATCH=2 WORKERS=0 TINY=4 BENCH_ARGS="--iters 1 --train-batch 2 --infer-batches 1"
set -u
case ${1:-} in
  tune|tune2|final) ;;
  *) sed -n '2,10s/^# \{0,1\}//p' "$0"; exit 2 ;;  # the usage above
esac
cd "$(dirname "$0")/.."  # the repository root
OUT=${OUT:-out}
STAGE=stage-$1  # everything but the weights is packed from here into $OUT/$1.tgz (the tool brings back 8 files)
mkdir -p "$OUT" "$STAGE"
export PYTHONUNBUFFERED=1
PHASE=$1
DEVICE=${DEVICE:-cuda}
EPOCHS=${EPOCHS:-$([ "$PHASE" = tune2 ] && echo 250 || echo 200)}
BATCH=${BATCH:-32}
WORKERS=${WORKERS:-5}
TINY=${TINY:-0}
BENCH_ARGS=${BENCH_ARGS:-}
COMMON="--device $DEVICE --batch-size $BATCH --workers $WORKERS --epochs $EPOCHS --checkpoint-every 50"
SEED_PRIORS="0.1 0.2 0.375 0.55 0.725 0.9"
SMALL_PRIORS="0.06 0.15 0.33 0.51 0.69 0.87"
log() { echo "[$(date +%T)] $*"; }

log "start $PHASE on $(hostname)"; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
python -c "import torch, torchvision, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'torchvision', torchvision.__version__)"
git rev-parse --short HEAD 2>/dev/null | sed 's/^/commit /'

make_lists() {  # $1 = output folder, $2 = train split, $3 = test split
  python create_data_lists.py --data-folder data/BCCD --output-folder "$1" --train-split "$2" --test-split "$3" 2>/dev/null
  if [ "$TINY" -gt 0 ]; then  # dry run: keep the first $TINY images of each split
    python - "$1" "$TINY" <<'EOF'
import json, sys
folder, n = sys.argv[1], int(sys.argv[2])
for s in ("TRAIN", "TEST"):
    for k in ("images", "objects"):
        p = f"{folder}/{s}_{k}.json"
        json.dump(json.load(open(p))[:n], open(p, "w"))
EOF
  fi
}

run_recipes() {  # $1 = timeout (s): every entry of RECIPES trained side by side on train.txt, scored on val.txt
  declare -A PIDS
  for name in "${!RECIPES[@]}"; do
    rm -rf "runs/$name"  # a fresh run (train.py refuses a folder that holds one)
    timeout "$1" python train.py --data-folder data/lists-val --out-dir "runs/$name" $COMMON --val-every 10 --seed 0 \
      ${RECIPES[$name]} > "$STAGE/train-$name.txt" 2>&1 &
    PIDS[$name]=$!
  done
  for name in "${!RECIPES[@]}"; do
    wait "${PIDS[$name]}"; echo "$name: train.py exit status $? (124: stopped by the timeout)"
  done
  for name in "${!RECIPES[@]}"; do
    cp "runs/$name/log.jsonl" "$STAGE/log-$name.jsonl" 2>/dev/null
    tail -c 600 "$STAGE/train-$name.txt" | tr '\r' '\n' | tail -3
    python -c "import json,sys; r=[json.loads(l) for l in open('runs/$name/log.jsonl')]; print('$name', 'epochs', len(r), 'final val mAP', r[-1].get('mAP'), r[-1].get('AP'), 'img/s', r[-1]['images_per_s'])" 2>/dev/null
  done
}

if [ "$PHASE" = tune ]; then
  make_lists data/lists-trainval trainval test
  make_lists data/lists-val train val
  log "bench"
  timeout 150 python bench.py --device "$DEVICE" --data-folder data/lists-trainval --workers 14 --json "$STAGE/bench-gpu.json" $BENCH_ARGS 2>&1 | tee "$STAGE/bench-gpu.txt"
  log "tune: 3 recipes side by side on train.txt, scored on val.txt every 10 epochs"
  declare -A RECIPES=(
    [A-seed-priors]="--prior-scales $SEED_PRIORS --max-zoom 4"
    [B-small-priors]="--prior-scales $SMALL_PRIORS --max-zoom 4"
    [C-small-priors-zoom2]="--prior-scales $SMALL_PRIORS --max-zoom 2"
  )
  run_recipes 240
elif [ "$PHASE" = tune2 ]; then
  make_lists data/lists-trainval trainval test
  make_lists data/lists-val train val
  timeout 60 python -m pytest tests -q -k "no_host_synchronization" 2>&1 | tail -3 | tee "$STAGE/cuda-tests.txt"
  log "CPU: nproc $(nproc), cgroup cpu.max '$(cat /sys/fs/cgroup/cpu.max 2>/dev/null)', $(grep -m1 'model name' /proc/cpuinfo)"
  python - <<'EOF' 2>&1 | tee "$STAGE/cpu-scaling.txt"
import multiprocessing as mp, time
def work(_):
    s = 0
    for i in range(30_000_000):
        s += i
for n in (1, 4, 8, 14, 16):  # equal times if the CPUs are real and free
    with mp.Pool(n) as pool:
        start = time.perf_counter(); pool.map(work, range(n)); print(f"{n} processes: {time.perf_counter() - start:.2f} s")
EOF
  for w in 4; do  # and 14 in bench.py below
    timeout 30 python bench.py --device "$DEVICE" --data-folder data/lists-trainval --only data --workers $w \
      --json "$STAGE/data-w$w.json" 2>&1 | grep "data images\|restarted"
  done
  log "bench"  # in two calls, so that a timeout loses only half
  timeout 130 python bench.py --device "$DEVICE" --data-folder data/lists-trainval --only train pipeline infer parts \
    --workers 14 --json "$STAGE/bench-gpu.json" $BENCH_ARGS 2>&1 | tee "$STAGE/bench-gpu.txt"
  timeout 50 python bench.py --device "$DEVICE" --data-folder data/lists-trainval --only data --workers 14 \
    --json "$STAGE/bench-gpu-data.json" $BENCH_ARGS 2>&1 | tee "$STAGE/bench-gpu-data.txt"
  tar czf "$OUT/$PHASE.tgz" "$STAGE"  # what is measured so far comes back even if the call is cut short
  log "tune2: 3 recipes side by side on train.txt, $EPOCHS epochs, scored on val.txt every 10 epochs"
  declare -A RECIPES=(
    [A-default]=""
    [B-lr0.008]="--lr 0.008"
    [C-paper-priors]="--prior-scales $SEED_PRIORS"
  )
  run_recipes ${TRAIN_TIMEOUT:-260}
elif [ "$PHASE" = final ]; then
  RECIPE=${RECIPE:?the recipe flags chosen on val}
  make_lists data/lists-trainval trainval test
  SEEDS=${SEEDS:-0 1}
  log "final: recipe '$RECIPE', seeds $SEEDS on trainval, and seed 0 on train.txt scored on val.txt, side by side"
  make_lists data/lists-val train val
  rm -rf runs/final-*  # fresh runs (train.py refuses a folder that holds one)
  timeout ${TRAIN_TIMEOUT:-330} python train.py --data-folder data/lists-val --out-dir runs/final-val $COMMON \
    --val-every 10 --seed 0 $RECIPE > "$STAGE/train-val.txt" 2>&1 &
  for seed in $SEEDS; do
    timeout ${TRAIN_TIMEOUT:-330} python train.py --data-folder data/lists-trainval --out-dir "runs/final-s$seed" $COMMON \
      --val-every 20 --seed $seed $RECIPE > "$STAGE/train-s$seed.txt" 2>&1 &
  done
  wait
  cp runs/final-val/log.jsonl "$STAGE/log-val.jsonl" 2>/dev/null
  tail -c 400 "$STAGE/train-val.txt" | tr '\r' '\n' | tail -2
  for seed in $SEEDS; do
    cp "runs/final-s$seed/log.jsonl" "$STAGE/log-s$seed.jsonl" 2>/dev/null
    tail -c 400 "$STAGE/train-s$seed.txt" | tr '\r' '\n' | tail -2
    python eval.py --checkpoint "runs/final-s$seed/checkpoint.pt" --data-folder data/lists-trainval --device "$DEVICE" \
      --output "$STAGE/eval-s$seed.json" 2>&1 | tail -7
  done
  log "annotated test images and a half-precision copy of seed 0's weights"
  python detect.py --checkpoint runs/final-s0/checkpoint.pt --device "$DEVICE" --output-dir "$STAGE/detect" \
    data/BCCD/JPEGImages/BloodImage_000{07,11,15,19}.jpg 2>&1 | tail -6
  python - "$OUT" <<'EOF'
import sys, torch
out = sys.argv[1]
ckpt = torch.load("runs/final-s0/checkpoint.pt", map_location="cpu", weights_only=True)
small = {k: ckpt[k] for k in ("model_args", "args", "label_map", "epoch", "iteration")}
small["model"] = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
torch.save(small, "weights-fp16.pt")
EOF
  split -b 15M -d weights-fp16.pt "$OUT/weights-fp16.pt.part"
  log "inference bench with the trained weights"
  timeout 60 python bench.py --device "$DEVICE" --data-folder data/lists-trainval --only infer \
    --checkpoint runs/final-s0/checkpoint.pt --json "$STAGE/bench-gpu-trained.json" $BENCH_ARGS 2>&1 | tail -8
fi
tar czf "$OUT/$PHASE.tgz" "$STAGE"
log "done"
