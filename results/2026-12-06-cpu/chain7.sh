#!/usr/bin/env bash
# issue 20, 2026-12-06 (third session): the seed spread of a 25-epoch warm schedule. The sixth schedule's twin
# again with --seed 1 (from the fifth twin), then the fifth's with --seed 1 (from the fourth twin, twin3z):
# is +0.0012 (sixth over fifth) more than one seed's noise? Then the from-scratch 120-epoch twin resumes.
set -u
cd "$(dirname "$0")/../.."  # the repository root (this copy is in results/2026-12-06-cpu; it ran as runs/chain7.sh)
while pgrep -f "train.py --resume runs/trainval6" > /dev/null; do sleep 20; done
export OMP_NUM_THREADS=2
P=python
COMMON="--flips d4 --ema-decay 0.995 --batch-size 8 --lr 0.002 --warmup 50 --epochs 25 --channels-last --workers 1 --max-zoom 2"
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
run twin6s1 data/lists-val runs/twin5/checkpoint.pt --seed 1 --val-every 5 || exit 1
val twin6s1
run twin5s1 data/lists-val runs/twin3z/checkpoint.pt --seed 1 --val-every 5 || exit 1
val twin5s1
[ -f runs/scratch120/done ] || { $P train.py --resume runs/scratch120/checkpoint.pt && touch runs/scratch120/done; }
