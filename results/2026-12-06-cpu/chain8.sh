#!/usr/bin/env bash
# issue 20, 2026-12-06 (fourth session): after the from-scratch 120-epoch twin finishes (and is scored on val.txt,
# raw and moving average), a seventh warm schedule of 25 epochs on both sixth-schedule twins (seed 0 from twin6,
# seed 1 from twin6s1); if their mean fp32 val.txt mAP beats the sixth's (0.8605528 and 0.8618967, mean 0.8612247),
# the same schedule on trainval from runs/trainval6. Rule written before any seventh run started.
set -u
cd /work/main
while pgrep -f "train.py --resume runs/scratch120" > /dev/null; do sleep 20; done
export OMP_NUM_THREADS=2
P=/work/venv/bin/python
COMMON="--flips d4 --ema-decay 0.995 --batch-size 8 --lr 0.002 --warmup 50 --epochs 25 --channels-last --workers 1 --max-zoom 2"
run() {  # run DIR DATA INIT EXTRA...
  local d=$1 data=$2 init=$3; shift 3
  [ -f runs/$d/done ] && return 0
  if [ -f runs/$d/checkpoint.pt ]; then $P train.py --resume runs/$d/checkpoint.pt
  else $P train.py --data-folder $data --out-dir runs/$d --init-weights $init $COMMON "$@"; fi
  [ $? -eq 0 ] && touch runs/$d/done
}
val() {  # val DIR [NAME EXTRA...]
  local d=$1 name=${2:-eval-val}; shift; [ $# -gt 0 ] && shift
  [ -f runs/$d/$name.json ] || $P eval.py --checkpoint runs/$d/checkpoint.pt --data-folder data/lists-val --tta off \
      --count-sweep --no-amp --workers 0 --output runs/$d/$name.json "$@" > runs/$d/$name.log 2>&1
}
[ -f runs/scratch120/done ] || { $P train.py --resume runs/scratch120/checkpoint.pt && touch runs/scratch120/done; } || exit 1
val scratch120
val scratch120 eval-val-ema --ema
run twin7 data/lists-val runs/twin6/checkpoint.pt --seed 0 --val-every 5 || exit 1
val twin7
run twin7s1 data/lists-val runs/twin6s1/checkpoint.pt --seed 1 --val-every 5 || exit 1
val twin7s1
if $P -c "import json,sys; m=[json.load(open(f'runs/{d}/eval-val.json'))['mAP'] for d in ('twin7','twin7s1')]; sys.exit(sum(m)/2 <= 0.8612247)"; then
  run trainval7 data/lists runs/trainval6/checkpoint.pt --seed 0 || exit 1
fi
