#!/usr/bin/env bash
# issue 20, 2026-12-06 (second session): a fifth schedule, 25 epochs, same recipe as the fourth (--max-zoom 2),
# on the fourth schedule's train.txt twin; if it beats that twin on val.txt (fp32 0.84963), the same schedule
# on trainval from the shipped file.
set -u
cd "$(dirname "$0")/../.."  # the repository root (this copy is in results/2026-12-06-cpu; it ran as runs/chain5.sh)
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
run twin5 data/lists-val runs/twin3z/checkpoint.pt --val-every 5 || exit 1
val twin5
if $P -c "import json,sys; sys.exit(json.load(open('runs/twin5/eval-val.json'))['mAP'] <= 0.84963)"; then
  run trainval5 data/lists weights/ssd300_bccd.pt || exit 1
fi
