#!/usr/bin/env bash
# Chains of warm-restart schedules, each chosen on val.txt before the next starts (the chains of 2026-12-06:
# results/2026-12-06-cpu/README.md writes each one out with these three steps).
#
#   tools/warm_chain.sh train OUT [train.py flags]      # train.py --out-dir OUT with the flags; if OUT holds a
#                                                       # checkpoint, resume it instead; skip OUT once marked done
#   tools/warm_chain.sh val OUT [NAME [eval.py flags]]  # OUT's checkpoint on val.txt (data/lists-val), fp32, with the
#                                                       # count sweep -> OUT/NAME.json and OUT/NAME.log (NAME: eval-val)
#   tools/warm_chain.sh beats MAP OUT...                # exit status 0 if the mean mAP of OUT/eval-val.json > MAP
#
# Runs in the repository root, with $PYTHON (default python) and OMP_NUM_THREADS (default 2).
set -u
cd "$(dirname "$0")/.."  # the repository root
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
P=${PYTHON:-python}
usage() { sed -n '2,11s/^# \{0,1\}//p' tools/warm_chain.sh; exit 2; }
[ $# -ge 2 ] || usage
step=$1
shift
case $step in
  train)
    out=$1
    shift
    [ -f "$out/done" ] && exit 0
    if [ -f "$out/checkpoint.pt" ]; then $P train.py --resume "$out/checkpoint.pt"
    else $P train.py --out-dir "$out" "$@"; fi && touch "$out/done" ;;
  val)
    out=$1 name=${2:-eval-val}
    shift $(($# > 1 ? 2 : 1))
    [ -f "$out/$name.json" ] || $P eval.py --checkpoint "$out/checkpoint.pt" --data-folder data/lists-val --tta off \
        --count-sweep --no-amp --workers 0 --output "$out/$name.json" "$@" > "$out/$name.log" 2>&1 ;;
  beats)
    [ $# -ge 2 ] || usage
    $P -c '
import json, sys
try:
    m = [json.load(open(f"{d}/eval-val.json"))["mAP"] for d in sys.argv[2:]]
except (OSError, ValueError, KeyError) as e:
    sys.exit(f"warm_chain.sh beats: no val.txt mAP to compare: {e}")
sys.exit(sum(m) / len(m) <= float(sys.argv[1]))' "$@" ;;
  *) usage ;;
esac
