"""Record in a checkpoint the counting thresholds that count best on your held-out images: detect.py counts with them.

    $ python set_thresholds.py --checkpoint runs/mine/checkpoint.pt --data-folder data/mine

Runs `eval.py --count-sweep` on the TEST images of --data-folder, which must be held out (create_data_lists.py
--test-fraction 0.3 holds out 30 %; never images the model was trained on: refused where the checkpoint's lists
name them), prints its report, and writes into the checkpoint, as the shipped model carries them, its
"count_thresholds": per class the min_score, and the max_overlap, that count best there (eval.sweep_counts). detect.py
and eval.py then count at them unless given --min-score, --max-overlap. A class with no object among the held-out
images keeps the checkpoint's threshold. A few held-out images choose roughly: 10 or more, with every class, choose
better. The checkpoint stays one train.py can resume (a resumed run drops the thresholds, which its new weights
would not fit); the file is replaced whole (a temporary file, then moved), or written to --output. eval.py's report
of the sweep is kept beside it, in count-sweep.json.
"""
import argparse
import datetime
import json
import os

import eval as eval_script
from detect import counting_defaults
from misc import (UserError, check_not_an_input, check_writable, format_min_score, load_checkpoint, lock_folder, run_cli,
                  save_atomic)
from utils import bccd_labels, class_names

SWEEP_JSON = "count-sweep.json"  # eval.py's report, kept beside the checkpoint written


def get_args_parser():
    p = argparse.ArgumentParser("set_thresholds.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="the train.py checkpoint (say, of train.py --fine-tune)")
    p.add_argument("--data-folder", required=True, help="lists (create_data_lists.py) whose TEST is held-out images")
    p.add_argument("--output", default=None, help="write the checkpoint with its thresholds here (default: over "
                   "--checkpoint)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    return p


def trained_on(ckpt):
    """The images of the run's TRAIN (real paths), where its lists (its args' --data-folder, as given to train.py:
    relative to the folder it ran in) are still at hand; else None, and a note says what cannot be checked."""
    folder = (ckpt.get("args") or {}).get("data_folder")
    path = os.path.join(folder, "TRAIN_images.json") if isinstance(folder, str) else ""
    try:
        with open(path) as f:
            return {os.path.realpath(p) for p in json.load(f) if isinstance(p, str)}
    except (OSError, ValueError, TypeError):
        relative = isinstance(folder, str) and not os.path.isabs(folder)
        print(f"note: the run's lists ({folder or 'not recorded'}) are not found from here: whether its TEST images "
              f"were trained on cannot be checked{'; run set_thresholds.py from the folder train.py ran in' * relative}")
        return None


def main(args):
    output = args.output or args.checkpoint
    ckpt = load_checkpoint(args.checkpoint)  # a train.py checkpoint (an export is refused: it holds no state_dict)
    check_writable(output, "--output" if args.output else "--checkpoint")
    check_not_an_input(output, "--output", data_folder=args.data_folder)
    folder = os.path.dirname(os.path.abspath(output))
    fd = lock_folder(folder, f"{folder}: a train.py is writing there; set the thresholds once it has ended")
    try:
        sweep = held_out_sweep(args, ckpt, os.path.join(folder, SWEEP_JSON))
        names = class_names(ckpt["label_map"]) if "label_map" in ckpt else list(bccd_labels)
        before, _ = counting_defaults(ckpt, names, args.checkpoint)
        before = before if isinstance(before, list) else [before] * len(names)
        chosen = sweep["count_sweep"]["chosen"]
        absent = [name for name in names if not sweep["counts"][name]["true_mean"]]
        min_score = {name: before[k] if name in absent else chosen["min_score"][name] for k, name in enumerate(names)}
        ckpt["count_thresholds"] = {
            "min_score": min_score, "max_overlap": chosen["max_overlap"],
            "chosen_on": f"{sweep['images']} held-out images of {args.data_folder} (set_thresholds.py, "
                         f"{datetime.date.today().isoformat()}): {eval_script.SWEEP_RULE}"
                         + (f"; {', '.join(absent)}: none there, kept" if absent else "")}
        save_atomic(ckpt, output)
    finally:
        os.close(fd)
    errors = ", ".join(f"{name} {chosen['error'][name]:.1%}" for name in names if name not in absent)
    print(f"count_thresholds written to {output}: --min-score {format_min_score(list(min_score.values()), names)} "
          f"--max-overlap {chosen['max_overlap']} (error / annotated on {sweep['images']} held-out images: {errors}"
          f"{'; kept for ' + ', '.join(absent) + ', not among them' if absent else ''}); detect.py counts with them")


def held_out_sweep(args, ckpt, report):
    """eval.py --count-sweep on TEST of --data-folder, refused where TEST holds images the checkpoint's run trained
    on: its report, written to `report` (JSON) and returned."""
    try:
        with open(os.path.join(args.data_folder, "TEST_images.json")) as f:
            held_out = {os.path.realpath(p) for p in json.load(f) if isinstance(p, str)}
    except (OSError, ValueError) as e:
        raise UserError(f"{args.data_folder}: no readable TEST_images.json ({e}); make the lists with "
                        f"create_data_lists.py --test-fraction 0.3") from None
    seen = sorted(held_out & (trained_on(ckpt) or set()))
    if seen:
        raise UserError(f"{args.data_folder}: {len(seen)} of its TEST images were trained on (such as {seen[0]}): "
                        f"thresholds chosen there would count too well; hold out images the model has not seen")
    eval_script.main(eval_script.get_args_parser().parse_args([
        "--checkpoint", args.checkpoint, "--data-folder", args.data_folder, "--count-sweep", "--output", report,
        "--device", args.device, "--workers", str(args.workers)]))
    with open(report) as f:
        return json.load(f)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
