"""Make the model file that ships with the project (weights/ssd300_bccd.pt) from a train.py checkpoint.

    $ python tools/ship_model.py runs/trainval6/checkpoint.pt --sweep results/shipped/eval-val-sweep.json \
          --train-split trainval --twin-val results/shipped/eval-val-sweep.json --log runs/trainval6/log.jsonl

Writes the fp16 state_dict, model_args and label_map, the counting thresholds chosen on a validation split
(--sweep: the JSON of `eval.py --count-sweep` there: val.txt, or TXL-PBC's val) and the model's provenance as plain
data: training command, commit, data split, epochs, seed, hardware, date, wall time; then runs eval.py
on exactly that file (TEST, and the validation split), and detect.py on img/, both in fp32 on this machine, and
records their figures in the file (the regression test, tests/test_shipped_model.py, checks them).
Weights are never changed by the second save. Every replacement of the shipped file stays in git
history for good (48 MB): replace it only with a model that is better on the validation split.
"""
import argparse
import csv
import json
import os
import sys
import tempfile

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the project's flat modules, one folder up (run as `python tools/ship_model.py`)

from eval import SWEEP_RULE  # noqa: E402
from misc import UserError, load_checkpoint, repo_relative, run_cli, run_info, run_python, save_atomic  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser("ship_model.py", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="the train.py checkpoint to ship (its last epoch)")
    p.add_argument("--sweep", required=True, help="eval.py --count-sweep --output JSON, made on a validation split")
    p.add_argument("--train-split", required=True, help="what it was trained on: BCCD's ImageSets split (train or "
                   "trainval), or the lists' folder (say, data/txl-lists: TXL-PBC's train split)")
    p.add_argument("--log", default=None, help="its log.jsonl, for the training wall time")
    p.add_argument("--trained-on", default=None, help="hardware, when the checkpoint does not record it")
    p.add_argument("--train-commit", default=None, help="commit trained, when the checkpoint does not record it")
    p.add_argument("--train-date", default=None, help="date trained, when the checkpoint does not record it")
    p.add_argument("--train-command", default=None, help="the command that started the run, when the checkpoint's "
                   "args are those of a resume")
    p.add_argument("--note", default=None, help="anything else about the training (interruptions, resumes)")
    p.add_argument("--ema", action="store_true", help="ship the checkpoint's moving average of the weights "
                   "(train.py --ema-decay), chosen on val.txt, instead of its last weights")
    p.add_argument("--tta", default="off", help="the test-time augmentation detect.py and eval.py apply by default "
                   "(detect.py --tta), chosen on val.txt; the sweep must have been made with it")
    p.add_argument("--twin-val", default=None, help="eval.py --output JSON of the train.txt model of the same recipe "
                   "on val.txt, for a model trained on trainval (where val.txt was seen in training)")
    p.add_argument("--test-lists", default="data/lists", help="lists whose TEST is test.txt")
    p.add_argument("--val-lists", default="data/lists-val", help="lists whose TEST is the validation split (val.txt, "
                   "or TXL-PBC's val: data/lists-txl-sources)")
    p.add_argument("--eval-dir", default="results/shipped", help="where the eval JSONs and the figure go")
    p.add_argument("--bccd-folder", default="data/BCCD", help="BCCD, for the figure's annotations")
    p.add_argument("--figure-image", default="BloodImage_00019", help="a TEST image: annotated vs detected")
    p.add_argument("--out", default="weights/ssd300_bccd.pt")
    return p


def evaluate(path, lists, output):
    run_python(["eval.py", "--checkpoint", path, "--data-folder", lists, "--device", "cpu", "--no-amp", "--output",
                output])
    with open(output) as f:
        result = json.load(f)
    return {k: result[k] for k in ("mAP", "AP", "recall", "mAP_all_point", "AP_all_point", "mAP_coco", "AP_coco",
                                   "counts", "images", "command", "commit", "date", "device_name")}


def figure(checkpoint, bccd_folder, image_id, out):
    """BCCD's annotation of a TEST image beside what the model counts there (at its thresholds, fp32)."""
    from PIL import Image, ImageDraw
    from detect import annotate, detect_image, load_model
    from utils import parse_annotation
    model = load_model(checkpoint)
    names = {v: k for k, v in model.label_map.items()}
    image = Image.open(os.path.join(bccd_folder, "JPEGImages", image_id + ".jpg")).convert("RGB")
    objects, _ = parse_annotation(os.path.join(bccd_folder, "Annotations", image_id + ".xml"), image.size)
    truth = torch.tensor(objects["boxes"]), torch.tensor(objects["labels"]), None
    boxes, labels, scores = detect_image(image, model, amp=False)
    panels = [annotate(image, *truth, names, model.label_color_map), annotate(image, boxes, labels, scores, names,
                                                                               model.label_color_map)]
    w, h = image.size
    canvas = Image.new("RGB", (2 * w + 10, h + 24), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (panel, what, lab) in enumerate(zip(panels, ("annotated (BCCD)", "counted (shipped model)"),
                                               (truth[1], labels))):
        canvas.paste(panel, (k * (w + 10), 24))
        counts = ", ".join(f"{int((lab == v).sum())} {n}" for v, n in sorted(names.items()) if v)
        draw.text((k * (w + 10) + 4, 6), f"{image_id}, {what}: {counts}", fill="black")
    canvas.save(out, quality=90)


def main(args):
    ckpt = load_checkpoint(args.checkpoint)
    if args.ema:
        ckpt["model"] = ckpt["ema"]
    with open(args.sweep) as f:
        sweep = json.load(f)
    if sweep.get("tta", "off") != args.tta:
        raise UserError(f"--sweep {args.sweep} was made with test-time augmentation {sweep.get('tta', 'off')}, "
                        f"not --tta {args.tta}")
    chosen = sweep["count_sweep"]["chosen"]
    train_args = {k: repo_relative(v) if isinstance(v, str) and os.path.isabs(v) else v  # no machine paths
                  for k, v in ckpt["args"].items()}
    info = ckpt.get("run_info") or {}
    seconds = None
    if args.log:
        with open(args.log) as f:
            seconds = round(sum(json.loads(line)["seconds"] for line in f if line.strip()), 1)
    flags = " ".join(f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                     for k, v in train_args.items() if v is not None and not isinstance(v, bool))
    flags += "".join(f" --{'' if v else 'no-'}{k.replace('_', '-')}" for k, v in train_args.items() if isinstance(v, bool))
    shipped = {
        "model": {k: v.half() if v.is_floating_point() else v for k, v in ckpt["model"].items()},
        "model_args": ckpt["model_args"],
        "label_map": ckpt["label_map"],
        "tta": args.tta,
        "count_thresholds": {"min_score": chosen["min_score"], "max_overlap": chosen["max_overlap"],
                             "chosen_on": f"{sweep['images']} images of {sweep['command']} (commit {sweep['commit']}, "
                                          f"{sweep['date']}): {SWEEP_RULE}"},
        "provenance": {
            "train_command": args.train_command or f"python train.py {flags}",
            "train_args": {k: v for k, v in train_args.items() if k != "resume"}, "note": args.note,
            "train_split": f"ImageSets/Main/{args.train_split}.txt" if args.train_split in ("train", "trainval")
                           else args.train_split,
            "epochs": ckpt["epoch"] + 1, "iterations": ckpt["iteration"], "seed": train_args["seed"],
            "commit": info.get("commit") or args.train_commit, "hardware": info.get("device_name") or args.trained_on,
            "date": info.get("date") or args.train_date, "train_seconds": seconds,
            "torch": info.get("torch") or torch.__version__, "weights": "fp16 copy of the last checkpoint's " + (
                "moving average of the weights (EMA)" if args.ema else "weights"),
        },
    }
    os.makedirs(args.eval_dir, exist_ok=True)
    save_atomic(shipped, args.out)
    shipped["provenance"]["test"] = evaluate(args.out, args.test_lists, os.path.join(args.eval_dir, "eval-test.json"))
    if args.train_split != "trainval":  # val.txt is part of trainval: a score there would be a training score
        shipped["provenance"]["val"] = evaluate(args.out, args.val_lists, os.path.join(args.eval_dir, "eval-val.json"))
    elif args.twin_val:
        with open(args.twin_val) as f:
            twin = json.load(f)
        shipped["provenance"]["val_of_the_train_txt_twin"] = {k: twin[k] for k in ("mAP", "AP", "counts", "images",
                                                                                  "command", "commit", "date")}
    with tempfile.TemporaryDirectory() as tmp:
        run_python(["detect.py", "img", "--checkpoint", args.out, "--device", "cpu", "--no-amp", "--output-dir", tmp])
        with open(os.path.join(tmp, "counts.csv"), newline="") as f:
            rows = list(csv.DictReader(f))
    shipped["provenance"]["sample_counts"] = {os.path.basename(r.pop("image")): {k: int(v) for k, v in r.items()}
                                              for r in rows}
    shipped["provenance"]["figures"] = {"made_by": "python " + " ".join(sys.argv), **run_info(torch.device("cpu"))}
    figure(args.out, args.bccd_folder, args.figure_image, os.path.join(args.eval_dir, f"{args.figure_image}-annotated-vs-detected.jpg"))
    save_atomic(shipped, args.out)
    print(json.dumps(shipped["provenance"], indent=1))
    print(f"{args.out}: {os.path.getsize(args.out) / 2**20:.1f} MiB")


if __name__ == "__main__":
    run_cli(main, get_args_parser())
