"""Evaluate a checkpoint on BCCD's TEST split, or another VOC dataset's (tutorial, "Evaluation").

    $ python eval.py                                   # the shipped model (weights/ssd300_bccd.pt) on data/lists
    $ python eval.py --checkpoint runs/ssd300/checkpoint.pt --output runs/ssd300/eval.json
    $ python eval.py --checkpoint runs/val/checkpoint.pt --data-folder data/lists-val --count-sweep
    $ python eval.py --plots runs/ssd300/plots         # PR curves, counts, confusion matrix, scores (matplotlib)
    $ torchrun --nproc_per_node=2 eval.py --checkpoint runs/ssd300/checkpoint.pt   # split across processes
    $ python eval.py --checkpoint weights/ssd300_bccd-int8.xml   # an export of export.py, on the CPU

Detections are made at min_score 0.01, max_overlap 0.45 and top_k 200, the setting of the paper
and the tutorial, so results compare. Reported: VOC2007 11-point AP at IoU > 0.5 per class and
their mean (the tutorial's mAP), all-point AP at IoU > 0.5 (VOC2010+), and COCO-style AP averaged
over IoU thresholds 0.5, 0.55, ..., 0.95 (101-point interpolation, VOC matching rules). The classes
are the checkpoint's, and the lists must be of the same classes (label_map.json). A class without
(non-difficult) objects in TEST has no AP: it is reported as "not in TEST" and left out of the means.
Also reported: each class's recall at that setting, the share of its objects found at all. VOC2007's AP takes the
precision at recall 1 as 0 when that is below 1, so one object missed caps a class's 11-point AP at 10/11 = 0.909.

Counting, what detect.py is for, is scored too: the cells it counts per image at its own defaults
(those recorded in the checkpoint, else the tutorial's min_score 0.2 and max_overlap 0.5;
--count-min-score, --count-max-overlap) against the annotated ones. --count-sweep tries a grid of
thresholds and prints, per class, the min_score that counts best (sweep_counts): run it on a validation split
(lists made with --train-split train --test-split val), never on TEST, to choose detect.py's.
--plots DIR draws both as PNGs (plots.eval_plots; needs matplotlib: pip install -r requirements-plots.txt).
"""
import argparse
import os
import shlex
import time
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from datasets import BCCDDataset
from detect import DEFAULT_CHECKPOINT, MAP_MAX_OVERLAP, MAP_MIN_SCORE, TOP_K, TTA_VIEWS, load_model, run_model
from exported import device_flag, is_export
from misc import (UserError, available_cpus, bf16_is_fast, check_not_an_input, check_workers, check_writable,
                  format_min_score, ignore_stop_signals, init_distributed, iterate, parse_max_overlap, parse_min_score,
                  repo_relative, run_cli, run_info, write_json_atomic)
from plots import EVAL_PNGS, eval_plots, require_matplotlib
from utils import bccd_labels, calculate_mAP, check_same_classes, class_names, match_detections

COCO_THRESHOLDS = tuple(0.5 + 0.05 * i for i in range(10))
SWEEP_MIN_SCORES = tuple(round(0.1 + 0.05 * i, 2) for i in range(17))  # 0.1, 0.15, ..., 0.9
SWEEP_RULE = "per class the lowest min_score within one cell of the lowest counting error"  # sweep_counts' choice
SWEEP_MAX_OVERLAPS = (0.3, 0.4, 0.45, 0.5, 0.6)


def get_args_parser():
    p = argparse.ArgumentParser("eval.py", description="Evaluate SSD300 on the TEST split of its lists.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="checkpoint.pt written by train.py (default: "
                   "the shipped model), or its export by export.py (.onnx, .xml)")
    p.add_argument("--data-folder", default="data/lists", help="JSON lists from create_data_lists.py")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--workers", type=int, default=min(2, available_cpus()),
                   help="DataLoader worker processes (default: 2, or 1 on a 1-CPU machine)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on with CUDA, and on CPUs with native bf16 where it is faster: misc.bf16_is_fast)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last memory format (default: on with CUDA)")
    p.add_argument("--tta", choices=tuple(TTA_VIEWS), default=None, help="test-time augmentation: also run the "
                   "model on the images flipped horizontally (h), vertically too (hv), or transposed too (d4: 8 views), "
                   "and average the predictions (default: the checkpoint's record, else off)")
    p.add_argument("--ema", action="store_true", help="evaluate the checkpoint's moving average of the weights "
                   "(train.py --ema-decay) instead of its weights")
    p.add_argument("--count-min-score", default=None, metavar="S", help="counting: detect.py's --min-score, 0.5, "
                   "RBC=0.35,WBC=0.25 or 0.35,0.25,0.3 (default: detect.py's, from the checkpoint)")
    p.add_argument("--count-max-overlap", type=float, default=None, help="counting: detect.py's --max-overlap "
                   "(default: detect.py's, from the checkpoint)")
    p.add_argument("--count-sweep", action="store_true", help="also count at every min_score of "
                   f"{SWEEP_MIN_SCORES[0]}-{SWEEP_MIN_SCORES[-1]} and max_overlap of {SWEEP_MAX_OVERLAPS} and report the "
                   "best per class: to choose detect.py's thresholds on a validation split, never on TEST")
    p.add_argument("--plots", default=None, metavar="DIR", help="also write PNG plots here: precision-recall curves, "
                   "counted vs annotated per image, a confusion matrix and score histograms (needs matplotlib)")
    return p


class Detections(NamedTuple):
    """What detect_dataset collects, as the tutorial's eval.py does: lists over images of CPU tensors, boxes
    fractional. The first six are calculate_mAP's arguments (Detections.for_map)."""
    det_boxes: list  # (n_d, 4) per image
    det_labels: list  # (n_d,)
    det_scores: list  # (n_d,)
    true_boxes: list  # (n_t, 4)
    true_labels: list  # (n_t,)
    true_difficulties: list  # (n_t,)
    counted: list  # per image, the labels detected at each of detect_dataset's count_at settings, in their order
    counted_boxes: list  # per image, the boxes detected at the first count_at setting (None without one)

    @property
    def for_map(self):
        """(det_boxes, det_labels, det_scores, true_boxes, true_labels, true_difficulties), as calculate_mAP takes them."""
        return self[:6]

    def counted_at(self, k):
        """The labels detected per image at the k-th count_at setting."""
        return [labels[k] for labels in self.counted]


@torch.no_grad()
def detect_dataset(model, loader, amp=False, channels_last=False, min_score=MAP_MIN_SCORE,
                   max_overlap=MAP_MAX_OVERLAP, top_k=TOP_K, progress=False, count_at=()):
    """Run the model over a loader of BCCDDataset('test') items: its Detections.

    count_at: settings (min_score, max_overlap) at which the same network outputs are also decoded, for counting
    (Detections.counted; the first setting's boxes too, Detections.counted_boxes).
    """
    model.eval()
    results = Detections([], [], [], [], [], [], [], [])
    for images, boxes, labels, difficulties in tqdm(iterate(loader), total=len(loader), disable=not progress,
                                                    desc="evaluating"):
        locs, scores = run_model(model, images, amp=amp, channels_last=channels_last)
        dets = model.detect_objects(locs, scores, min_score=min_score, max_overlap=max_overlap, top_k=top_k)
        for store, items in zip(results, (*dets, boxes, labels, difficulties)):
            store.extend(t.cpu() for t in items)
        counted = [model.detect_objects(locs, scores, *setting, top_k=top_k) for setting in count_at]  # per setting
        results.counted.extend(tuple(c[1][i].cpu() for c in counted) for i in range(len(boxes)))
        results.counted_boxes.extend(counted[0][0][i].cpu() if counted else None for i in range(len(boxes)))
    return results


def label_names(model):
    """{label: class name} of the model's classes, background left out, as calculate_mAP takes them."""
    return {label: name for label, name in model.rev_label_map.items() if label != 0}


def evaluate(model, loader, amp=False, channels_last=False):
    """VOC2007 mAP of `model` on `loader`: (dict class -> AP, mAP). Used by train.py --val-every."""
    return calculate_mAP(*detect_dataset(model, loader, amp=amp, channels_last=channels_last).for_map,
                         label_names=label_names(model))


def check_scorable(test_set):
    """A TEST whose mAP means something: at least one object not marked difficult (calculate_mAP scores no other)."""
    if not any(d == 0 for objects in test_set.objects for d in objects["difficulties"]):
        raise UserError(f"{os.path.join(test_set.data_folder, 'TEST_objects.json')}: no object to score (none, or only "
                        f"difficult ones): an mAP would mean nothing")


def compute_metrics(det_boxes, det_labels, det_scores, true_boxes, true_labels, true_difficulties, label_names):
    """The figures eval.py reports, as a JSON-ready dict. label_names: {label: class name}, background left
    out. A class without (non-difficult) objects has no AP (calculate_mAP leaves it out): "not_in_test" lists them."""
    args = (det_boxes, det_labels, det_scores, true_boxes, true_labels, true_difficulties)
    aps, mean_ap = calculate_mAP(*args, label_names=label_names)
    aps_all, mean_ap_all = calculate_mAP(*args, interpolation="all", label_names=label_names)
    coco = [calculate_mAP(*args, iou_threshold=t, interpolation="101point", label_names=label_names)
            for t in COCO_THRESHOLDS]
    aps_coco = {name: sum(c[0][name] for c in coco) / len(coco) for name in aps}
    recall = {name: int(tp.sum()) / n for name, (_, tp, n) in match_detections(*args, label_names=label_names).items()}
    return {"mAP": mean_ap, "AP": aps, "recall": recall,
            "mAP_all_point": mean_ap_all, "AP_all_point": aps_all,
            "mAP_coco": sum(c[1] for c in coco) / len(coco), "AP_coco": aps_coco,
            "not_in_test": [name for _, name in sorted(label_names.items()) if name not in aps]}


def count_errors(det_labels, true_labels, names=bccd_labels):
    """How well the detections count each class, per image: lists over images of label tensors, and the class
    names in label order (label 1, 2, ...) -> {class: {"true_mean", "predicted_mean", "mae" (mean absolute error),
    "bias" (mean signed error), "relative_error" (sum of absolute errors / number of annotated objects) and
    "relative_bias" (sum of signed errors / number of annotated objects; both None without annotated objects)}}."""
    n = len(names) + 1

    def per_image(labels):  # (images, classes) counts, background dropped
        return torch.stack([torch.bincount(l.long(), minlength=n) for l in labels])[:, 1:].double()

    error = per_image(det_labels) - per_image(true_labels)
    true = per_image(true_labels)
    return {name: {"true_mean": true[:, k].mean().item(), "predicted_mean": (true[:, k] + error[:, k]).mean().item(),
                   "mae": error[:, k].abs().mean().item(), "bias": error[:, k].mean().item(),
                   "relative_error": (error[:, k].abs().sum() / true[:, k].sum()).item() if true[:, k].any() else None,
                   "relative_bias": (error[:, k].sum() / true[:, k].sum()).item() if true[:, k].any() else None}
            for k, name in enumerate(names)}


def by_source(results, sources, names, label_names):
    """{source: {"images", "mAP", "AP", "counts"}} for each dataset a TEST list combines (create_data_lists records
    where each image came from): the VOC07 APs and count_errors of its images alone. {} for a single source."""
    if len(set(sources)) < 2:
        return {}
    out = {}
    for source in dict.fromkeys(sources):
        part = [i for i, s in enumerate(sources) if s == source]
        aps, mean_ap = calculate_mAP(*([column[i] for i in part] for column in results.for_map), label_names=label_names)
        out[source] = {"images": len(part), "mAP": mean_ap, "AP": aps,
                       "counts": count_errors([results.counted_at(0)[i] for i in part],
                                              [results.true_labels[i] for i in part], names)}
    return out


def sweep_counts(counted, true_labels, names=bccd_labels):
    """Choose counting thresholds: counted[(min_score, max_overlap)] = detections' labels per image at that
    setting -> {"errors": {max_overlap: {class: [error at each of SWEEP_MIN_SCORES]}}, "chosen": {"max_overlap",
    "min_score": {class: best}, "error": {class: its error}}}. The error is count_errors' relative error (the sum
    of absolute errors / annotated objects), or its mean absolute error for a class with no annotated object.

    Per class, the lowest min_score whose error is within one object of the lowest (1 / the annotated objects): a
    cell in hundreds is chance, and where scores fall, on another microscope, a lower threshold loses fewer cells;
    then the max_overlap whose chosen per-class errors sum lowest. Classes are suppressed separately and an image
    holds far fewer than top_k cells, so each class's count depends on its own min_score only."""
    annotated = {name: sum(int((t == k + 1).sum()) for t in true_labels) for k, name in enumerate(names)}
    errors = {}
    for mo in SWEEP_MAX_OVERLAPS:
        at = [count_errors(counted[(ms, mo)], true_labels, names) for ms in SWEEP_MIN_SCORES]
        errors[mo] = {name: [c[name]["mae"] if c[name]["relative_error"] is None else c[name]["relative_error"]
                             for c in at] for name in names}
    def lowest_within_one(e, n):  # index of the lowest min_score within one object of the lowest error
        return next(i for i, v in enumerate(e) if v <= min(e) + (1 / n if n else 0.) + 1e-9)

    best = {mo: {name: lowest_within_one(e, annotated[name]) for name, e in per.items()} for mo, per in errors.items()}
    mo = min(SWEEP_MAX_OVERLAPS, key=lambda m: sum(errors[m][name][i] for name, i in best[m].items()))
    return {"min_scores": list(SWEEP_MIN_SCORES), "errors": errors,
            "chosen": {"max_overlap": mo, "min_score": {name: SWEEP_MIN_SCORES[i] for name, i in best[mo].items()},
                       "error": {name: errors[mo][name][i] for name, i in best[mo].items()}}}


def main(args):
    rank, world, device = init_distributed(device_flag(args.device, args.checkpoint))
    try:
        run(args, rank, world, device)
    finally:
        if world > 1:
            dist.destroy_process_group()


def run(args, rank, world, device):
    if not 1 <= args.batch_size <= 10**5:
        raise UserError(f"--batch-size must be 1 to 100,000, not {args.batch_size}")
    check_workers(args.workers)
    if args.count_min_score is not None:
        parse_min_score(args.count_min_score, source="--count-min-score")  # the classes once the model is known
    if args.count_max_overlap is not None:
        parse_max_overlap(args.count_max_overlap, "--count-max-overlap")
    if args.output is not None and rank == 0:
        check_writable(args.output, "--output")
        check_not_an_input(args.output, "--output", args.checkpoint, args.data_folder)
    if args.plots is not None and rank == 0:  # before the long pass: matplotlib and the folder are there
        require_matplotlib()
        check_writable(args.plots, "--plots", folder=True, create=False)
        for name in EVAL_PNGS:
            check_writable(os.path.join(args.plots, name), "--plots", create=False)
    amp = bf16_is_fast(device) if args.amp is None else args.amp
    channels_last = device.type == "cuda" if args.channels_last is None else args.channels_last
    model = load_model(args.checkpoint, device, tta=args.tta, ema=args.ema)  # detect.py's: BatchNorm folded
    if is_export(args.checkpoint):
        amp = channels_last = False  # the runtime runs it as exported (its precision is in model.metadata)
    names = class_names(model.label_map)
    count_min_score, count_max_overlap = model.min_score, model.max_overlap  # detect.py's counting defaults
    if args.count_min_score is not None:
        count_min_score = parse_min_score(args.count_min_score, names, "--count-min-score", default=count_min_score)
    if args.count_max_overlap is not None:
        count_max_overlap = args.count_max_overlap
    count_at = [(count_min_score, count_max_overlap)]
    if args.count_sweep:
        count_at += [(ms, mo) for mo in SWEEP_MAX_OVERLAPS for ms in SWEEP_MIN_SCORES]
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    test_set = BCCDDataset(args.data_folder, "test", keep_difficult=True)  # difficult objects are needed to score
    check_same_classes(model.label_map, test_set.label_map, args.checkpoint, args.data_folder)
    check_scorable(test_set)
    shard = list(range(rank, len(test_set), world))  # each process a disjoint share, nothing padded
    loader = DataLoader(Subset(test_set, shard), batch_size=args.batch_size, collate_fn=BCCDDataset.collate_fn,
                        num_workers=args.workers, pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals)
    start = time.perf_counter()
    # one pass: the evaluation's detections, and the labels detect.py would count (same network outputs)
    results = detect_dataset(model, loader, amp=amp, channels_last=channels_last, progress=rank == 0,
                             count_at=count_at)
    if world > 1:  # gather every process's detections on rank 0, back in dataset order
        gathered = [None] * world if rank == 0 else None
        dist.gather_object((shard, results), gathered, dst=0)
        if rank != 0:
            return
        order = [i for s, _ in gathered for i in s]
        position = sorted(range(len(order)), key=order.__getitem__)
        merged = ([x for part in parts for x in part] for parts in zip(*(r for _, r in gathered)))  # per field
        results = Detections(*([column[p] for p in position] for column in merged))
    seconds = time.perf_counter() - start

    counts = count_errors(results.counted_at(0), results.true_labels, names)
    counted = {setting: results.counted_at(k) for k, setting in enumerate(count_at) if k > 0}  # the sweep's settings
    metrics = compute_metrics(*results.for_map, label_names=label_names(model))
    w = max(12, *(len(name) + 2 for name in names))  # the class column
    print(f"\n{'class':<{w}}{'AP@0.5 (VOC07)':>16}{'AP@0.5 (all pt)':>17}{'AP@[.5:.95]':>13}{'recall':>9}")
    for name in names:
        if name in metrics["AP"]:
            print(f"{name:<{w}}{metrics['AP'][name]:>16.4f}{metrics['AP_all_point'][name]:>17.4f}"
                  f"{metrics['AP_coco'][name]:>13.4f}{metrics['recall'][name]:>9.2%}")
        else:
            print(f"{name:<{w}}{'not in TEST (no AP; left out of the means)':>46}")
    print(f"{'mAP':<{w}}{metrics['mAP']:>16.4f}{metrics['mAP_all_point']:>17.4f}{metrics['mAP_coco']:>13.4f}")
    print(f"\ncounting at min_score {format_min_score(count_min_score, names)}, max_overlap {count_max_overlap} (per image):")
    print(f"{'class':<{w}}{'annotated':>10}{'counted':>10}{'mean abs. error':>17}{'error / annotated':>19}{'bias':>8}")
    for name, c in counts.items():
        relative = "-" if c["relative_error"] is None else f"{c['relative_error']:.1%}"
        bias = "-" if c["relative_bias"] is None else f"{c['relative_bias']:+.0%}"
        print(f"{name:<{w}}{c['true_mean']:>10.2f}{c['predicted_mean']:>10.2f}{c['mae']:>17.2f}{relative:>19}{bias:>8}")
    tags = [test_set.objects[i].get("source") for i in range(len(test_set))]  # a list's "source": the dataset's
    sources = by_source(results, [t if isinstance(t, str) else "?" for t in tags], names, label_names(model))
    if sources:
        print("\nby source (create_data_lists' datasets): VOC07 AP, and counting error / annotated (bias)")
        print(f"{'source':<24}{'images':>7}{'mAP':>8}" + "".join(f"{name:>{max(len(name), 6) + 2}}" for name in names)
              + "".join(f"{'count ' + name:>{len(name) + 17}}" for name in names))
        for source, s in sources.items():
            c = [(s["counts"][name]["relative_error"], s["counts"][name]["relative_bias"]) for name in names]
            print(f"{source:<24}{s['images']:>7}{s['mAP']:>8.4f}"
                  + "".join(f"{s['AP'].get(name, float('nan')):>{max(len(name), 6) + 2}.4f}" for name in names)
                  + "".join(f"{'-' if e is None else f'{e:.1%} ({b:+.0%})':>{len(name) + 17}}" for name, (e, b) in zip(names, c)))
    sweep = sweep_counts(counted, results.true_labels, names) if args.count_sweep else None
    if sweep:
        print(f"\ncounting sweep: error / annotated at each min_score, per max_overlap (choose on a validation split)")
        print(f"{'max_overlap':<12}{'class':<{w}}" + "".join(f"{ms:>6}" for ms in SWEEP_MIN_SCORES))
        for mo, per in sweep["errors"].items():
            for name, e in per.items():
                print(f"{mo:<12}{name:<{w}}" + "".join(f"{100 * v:>5.0f}%" for v in e))
        chosen = sweep["chosen"]
        best = format_min_score([chosen["min_score"][name] for name in names], names)
        print(f"chosen: --max-overlap {chosen['max_overlap']} --min-score {shlex.quote(best)} ("
              + ", ".join(f"{name} {e:.1%}" for name, e in chosen["error"].items()) + " error / annotated)")
    print(f"({len(test_set)} images, {seconds:.1f} s on {device}{' x' + str(world) if world > 1 else ''}, "
          f"bf16 autocast {'on' if amp else 'off'}{', test-time augmentation ' + model.tta if model.tta != 'off' else ''})")
    if args.output is not None:
        write_json_atomic({"classes": names, **metrics, "checkpoint": repo_relative(args.checkpoint), "images": len(test_set),
                           "min_score": MAP_MIN_SCORE, "max_overlap": MAP_MAX_OVERLAP, "top_k": TOP_K,
                           "tta": model.tta, "ema": args.ema,
                           "counts": {"min_score": count_min_score, "max_overlap": count_max_overlap, **counts},
                           **({"count_sweep": sweep} if sweep else {}), **({"by_source": sources} if sources else {}),
                           "device": str(device),
                           "processes": world, "amp": amp, "seconds": round(seconds, 3),
                           "train_args": {k: repo_relative(v) if isinstance(v, str) and os.path.isabs(v) else v
                                          for k, v in (model.train_args or {}).items()} or None,
                           **run_info(device)}, args.output, indent=2)
        print(f"results written to {args.output}")
    if args.plots is not None:
        written = eval_plots(args.plots, names, results, count_min_score, count_max_overlap, metrics,
                             model.label_color_map)
        print(f"plots written to {args.plots}: {', '.join(os.path.basename(p) for p in written)}")


if __name__ == "__main__":
    run_cli(main, get_args_parser())
