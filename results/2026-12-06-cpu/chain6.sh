#!/usr/bin/env bash
# issue 20, 2026-12-06 (second session): a sixth schedule, 25 epochs, the same recipe, on the fifth schedule's
# train.txt twin; if it beats that twin on val.txt (fp32 0.85932), the same schedule on trainval from the fifth
# trainval run. Starts after chain5.sh.
set -u
cd "$(dirname "$0")/../.."  # the repository root (this copy is in results/2026-12-06-cpu; it ran as runs/chain6.sh)
while pgrep -f chain5.sh > /dev/null; do sleep 20; done
export OMP_NUM_THREADS=2
P=python
COMMON="--flips d4 --ema-decay 0.995 --batch-size 8 --lr 0.002 --warmup 50 --epochs 25 --channels-last --workers 1 --seed 0 --max-zoom 2"
run() {  # run DIR DATA INIT EXTRA...
  local d=$1 data=$2 init=$3; shift 3
  [ -f runs/$d/done ] && return 0
  if [ -f runs/$d/checkpoint.pt ]; then $P train.py --resume runs/$d/checkpoint.pt
  else $P train.py --data-folder $data --out-dir runs/$d --init-weights $init $COMMON "$@"; fi
  [ $? -eq 0 ] && touch runs/$d/done
}
val() {  # val DIR
  [ -f runs/$1/eval-val.json ] || $P eval.py --checkpoint runs/$1/checkpoint.pt --data-folder data/lists-val --tta off \
      --count-sweep --no-amp --workers 0 --output runs/$1/eval-val.json > runs/$1/eval-val.log 2>&1
}
[ -f runs/trainval5/done ] || exit 1
run twin6 data/lists-val runs/twin5/checkpoint.pt --val-every 5 || exit 1
val twin6
if $P -c "import json,sys; sys.exit(json.load(open('runs/twin6/eval-val.json'))['mAP'] <= 0.8593237)"; then
  run trainval6 data/lists runs/trainval5/checkpoint.pt || exit 1
fi
