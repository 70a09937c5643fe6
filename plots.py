"""Plots of an evaluation and of a training run, drawn with matplotlib (an optional extra).

    $ pip install -r requirements-plots.txt                 # matplotlib; nothing else needs it
    $ python eval.py --plots runs/ssd300/plots               # eval.py's four figures (see eval_plots)
    $ python train.py --val-every 10                         # keeps <out-dir>/training.png up to date
    $ python plots.py --output training.png run=runs/ssd300/log.jsonl                         # any run's log
    $ python plots.py --output training.png seed0=runs/s0/log.jsonl seed1=runs/s1/log.jsonl   # runs side by side

matplotlib is imported only when a figure is drawn, and without pyplot (Figure and its Agg canvas):
no window, no global state, nothing left open between figures. Every PNG is written to a temporary file
and moved into place (misc.write_bytes_atomic), so a figure is never half written.
"""
import argparse
import io
import json
import math
import os

import torch

from misc import UserError, check_not_an_input, run_cli, write_bytes_atomic
from utils import match_detections

PIP_COMMAND = "pip install matplotlib"  # or: pip install -r requirements-plots.txt
DPI = 100
TRAINING_PNG = "training.png"  # train.py's, in its --out-dir
EVAL_PNGS = ("pr_curves.png", "counts.png", "confusion_matrix.png", "score_histograms.png")


def require_matplotlib():
    """matplotlib's Figure class; a UserError naming the pip command when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError(f"plots need matplotlib, which is not installed: {PIP_COMMAND}") from None
    return Figure


def figure(**kwargs):
    """A new matplotlib Figure, without pyplot."""
    return require_matplotlib()(**kwargs)


def save(fig, path):
    """The figure as a PNG at `path`, written atomically. Its texts are drawn as written: a run's name, a title or
    a class name with $ signs in it is not read as a math expression (which could fail to parse)."""
    from matplotlib.text import Text
    for text in fig.findobj(Text):
        text.set_parse_math(False)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    write_bytes_atomic(buffer.getbuffer(), path)
    return path


# ---------------------------------------------------------------------------------------------
# training: loss, lr and validation mAP against epoch, from train.py's log.jsonl
# ---------------------------------------------------------------------------------------------

PLOTTED = ("loss", "lr", "mAP", "mAP_ema")


def read_log(path):
    """train.py's log.jsonl -> its records in order of epoch, each epoch once (the last line logged for it wins).
    A line that is not a JSON record with an epoch (one cut short by a kill) is skipped, and so is a value of
    PLOTTED that is not a number."""
    records = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if isinstance(record, dict) and isinstance(record.get("epoch"), int):
                for key in PLOTTED:  # a value that is not a number (null, text) is not drawn
                    if key in record and (isinstance(record[key], bool) or not isinstance(record[key], (int, float))):
                        del record[key]
                records[record["epoch"]] = record
    return [records[e] for e in sorted(records)]


def run_records(log_path, earlier_log=None, until=0):
    """A run's records (read_log), after those of epochs 1..until in earlier_log when given and readable: the
    log of the run it was resumed from, in another --out-dir (resumed in its own, the log holds them already)."""
    before = []
    if earlier_log and os.path.isfile(earlier_log) and not os.path.samefile(earlier_log, log_path):
        try:
            before = [r for r in read_log(earlier_log) if r["epoch"] <= until]
        except OSError:
            pass
    records = {r["epoch"]: r for r in before + read_log(log_path)}
    return [records[e] for e in sorted(records)]


def plot_training(runs, path, title=None):
    """Draw runs ({name: records of read_log}; a name None is a run of its own, without a legend entry) as three
    panels against epoch: the training loss (log scale), the learning rate at the end of each epoch, and the
    validation mAP (train.py --val-every; mAP_ema dashed, when train.py --ema-decay logged it). Writes `path`."""
    fig = figure(figsize=(13, 3.8), layout="constrained")
    ax_loss, ax_lr, ax_map = fig.subplots(1, 3)
    colors = [f"C{i}" for i in range(10)]
    for (name, records), color in zip(runs.items(), colors * len(runs)):
        epochs = [r["epoch"] for r in records]
        marker = "o" if len(epochs) <= 30 else None  # a run of one epoch is one point
        ax_loss.plot(epochs, [r.get("loss", math.nan) for r in records], color=color, marker=marker, markersize=3,
                     label=name)
        ax_lr.plot(epochs, [r.get("lr", math.nan) for r in records], color=color, marker=marker, markersize=3,
                   label=name)
        for key, style, suffix in (("mAP", "-", ""), ("mAP_ema", "--", " EMA")):
            scored = [r for r in records if isinstance(r.get(key), (int, float))]
            if scored:
                label = f"{name or 'mAP'}{suffix}"
                ax_map.plot([r["epoch"] for r in scored], [r[key] for r in scored], style, color=color, marker="o",
                            markersize=3, label=label)
    ax_loss.set(xlabel="epoch", ylabel="MultiBox loss", title="training loss")
    if any(r.get("loss", 0) > 0 for records in runs.values() for r in records):
        ax_loss.set_yscale("log")
    ax_lr.set(xlabel="epoch", ylabel="learning rate", title="learning rate (end of epoch)")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax_map.set(xlabel="epoch", ylabel="VOC07 mAP", ylim=(0, 1), title="validation mAP (monitoring only)")
    if not ax_map.lines:
        ax_map.text(0.5, 0.5, "not validated\n(train.py --val-every N)", ha="center", va="center",
                    transform=ax_map.transAxes, color="0.4")
    for ax in (ax_loss, ax_lr, ax_map):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if any(line.get_label() and not line.get_label().startswith("_") for line in ax.lines):
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return save(fig, path)


class TrainingCurve:
    """train.py's <out-dir>/training.png, redrawn from log.jsonl when update() is called (after an epoch's record
    is logged: never inside a training step). The log holds each epoch once, a resumed run's too (train.trim_log);
    a run resumed into another --out-dir draws the epochs of the run it came from first (run_records): either way
    one continuous curve. The curve is a convenience: without matplotlib, or when the PNG cannot be written,
    training goes on and `say` is called once with a note."""

    def __init__(self, log_path, path, title=None, say=print, earlier_log=None, until=0):
        self.log_path, self.path, self.title, self.say, self.off = log_path, path, title, say, False
        self.earlier_log, self.until = earlier_log, until

    def update(self):
        if self.off:
            return
        try:
            plot_training({None: run_records(self.log_path, self.earlier_log, self.until)}, self.path, self.title)
        except Exception as e:  # UserError, OSError, or matplotlib's own: a convenience never stops a training
            self.off = True
            self.say(f"note: no training curve {self.path} ({e}); training goes on")


# ---------------------------------------------------------------------------------------------
# evaluation: eval.py --plots
# ---------------------------------------------------------------------------------------------

def confusion_matrix(det_boxes, det_labels, true_boxes, true_labels, n_classes, iou_threshold=0.5):
    """Detections against objects, over images (lists of tensors; labels 1..n_classes, 0 is background):
    (n_classes + 1, n_classes + 1) counts, row the predicted class, column the true one, background last (row:
    an object nothing detected; column: a detection of nothing). In each image, a detection and an object of any
    class pair up when their IoU > iou_threshold, the pairs taken by decreasing IoU, each detection and each
    object at most once (a detection keeps its best object, then an object its best detection: as Ultralytics's
    ConfusionMatrix does)."""
    from torchvision.ops import box_iou  # here, not at the top: misc.check_torch_pair
    matrix = torch.zeros(n_classes + 1, n_classes + 1, dtype=torch.long)
    background = n_classes
    for boxes, labels, objects, object_labels in zip(det_boxes, det_labels, true_boxes, true_labels):
        pred, true = labels.long() - 1, object_labels.long() - 1  # row / column indices
        iou = box_iou(boxes.float().reshape(-1, 4), objects.float().reshape(-1, 4))  # (n_d, n_t)
        d, t = (iou > iou_threshold).nonzero(as_tuple=True)
        order = iou[d, t].argsort(descending=True, stable=True)
        d, t = d[order], t[order]
        keep = _first(d, len(pred))
        d, t = d[keep], t[keep]
        keep = _first(t, len(true))
        d, t = d[keep], t[keep]
        matrix.index_put_((pred[d], true[t]), torch.ones(len(d), dtype=torch.long), accumulate=True)
        missed, spurious = torch.ones(len(true), dtype=torch.bool), torch.ones(len(pred), dtype=torch.bool)
        missed[t], spurious[d] = False, False
        matrix[background].index_add_(0, true[missed], torch.ones(int(missed.sum()), dtype=torch.long))
        matrix[:, background].index_add_(0, pred[spurious], torch.ones(int(spurious.sum()), dtype=torch.long))
    return matrix


def _first(x, n):
    """Mask of the first occurrence of each value in x (values in [0, n))."""
    position = torch.arange(len(x))
    first = torch.full((n,), len(x), dtype=torch.long).scatter_reduce(0, x, position, reduce="amin")
    return first[x] == position


def per_image_counts(labels, n_classes):
    """(images, n_classes) objects of each class (labels 1..n_classes) in each image."""
    return torch.stack([torch.bincount(l.long(), minlength=n_classes + 1)[1:] for l in labels]) if labels else \
        torch.zeros(0, n_classes, dtype=torch.long)


def eval_plots(folder, names, detections, min_score, max_overlap, metrics, colors=None):
    """eval.py --plots: write EVAL_PNGS in `folder` and return their paths.

    names: the class names in label order (label 1, 2, ...). detections: eval.detect_dataset's Detections (boxes
    fractional): det_boxes, det_labels, det_scores at min_score 0.01 and max_overlap 0.45, the objects, and
    counted_boxes, counted_at(0): the detections detect.py would count, at min_score (one value or one per
    class) and max_overlap. metrics: compute_metrics' dict (its AP).
    colors: {class name: colour} for the curves.
      pr_curves.png        precision against recall per class at IoU 0.5, its VOC07 AP in the legend, and the
                           point where the counting threshold cuts the curve;
      counts.png           counted against annotated cells per image, one panel per class, with y = x and
                           the counting error (all objects, difficult ones too, as eval.py counts them);
      confusion_matrix.png the counted detections against the objects at IoU 0.5, background included;
      score_histograms.png the scores of true and false positives per class (eval's detections, down to
                           min_score 0.01), with the counting thresholds marked.
    """
    os.makedirs(folder, exist_ok=True)
    thresholds = [min_score] * len(names) if isinstance(min_score, float) else list(min_score)
    colors = colors or {}
    label_names = {i + 1: name for i, name in enumerate(names)}
    matches = match_detections(*detections.for_map, label_names=label_names)  # IoU 0.5, VOC07 rules, as the AP
    paths = [os.path.join(folder, name) for name in EVAL_PNGS]
    width = 4.2 * len(names)

    fig = figure(figsize=(6.4, 4.8), layout="constrained")
    ax = fig.subplots()
    for k, name in enumerate(names):
        if name not in matches:
            continue
        scores, tp, n_objects = matches[name]
        cum_tp = tp.cumsum(0).double()
        precision = (cum_tp / torch.arange(1, len(tp) + 1)).tolist()
        recall = (cum_tp / n_objects).tolist()
        line, = ax.plot([0] + recall, (precision[:1] or [0]) + precision, drawstyle="steps-post",
                        color=colors.get(name), label=f"{name}: AP {metrics['AP'][name]:.3f}")
        at = int((scores >= thresholds[k]).sum()) - 1  # the last detection kept at the counting threshold
        if at >= 0:
            ax.plot(recall[at], precision[at], "o", color=line.get_color(), markersize=6)
    ax.plot([], [], "o", color="0.3", label="counting threshold")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.01), ylim=(0, 1.02),
           title=f"precision-recall at IoU 0.5 (mAP {metrics['mAP']:.3f}, VOC07 11-point)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    save(fig, paths[0])

    counted_labels = detections.counted_at(0)
    true = per_image_counts(detections.true_labels, len(names))
    counted = per_image_counts(counted_labels, len(names))
    fig = figure(figsize=(width, 4.5), layout="constrained")
    for k, (ax, name) in enumerate(zip(fig.subplots(1, len(names), squeeze=False)[0], names)):
        x, y = true[:, k].tolist(), counted[:, k].tolist()
        top = max(x + y + [1]) * 1.05
        ax.plot([-0.5, top], [-0.5, top], "--", color="0.5", linewidth=1, label="y = x")
        points, n = torch.unique(torch.stack([true[:, k], counted[:, k]], 1), dim=0, return_counts=True)
        ax.scatter(points[:, 0].tolist(), points[:, 1].tolist(), s=(12 * n).tolist(), alpha=0.6,
                   color=colors.get(name), edgecolors="none")
        error = (counted[:, k] - true[:, k]).abs().sum().item()
        relative = f" ({error / sum(x):.1%})" if sum(x) else ""
        ax.set(xlabel="annotated per image", ylabel="counted per image", xlim=(-0.5, top), ylim=(-0.5, top),
               title=f"{name}: mean abs. error {error / max(len(x), 1):.2f}{relative}")
        ax.set_aspect("equal")
        for axis in (ax.xaxis, ax.yaxis):
            axis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(f"counting at min_score {_format(thresholds, names)}, max_overlap {max_overlap:g} ({len(true)} "
                 f"images)\na dot's area: how many images; in brackets: the sum of absolute errors / annotated")
    save(fig, paths[1])

    matrix = confusion_matrix(detections.counted_boxes, counted_labels, detections.true_boxes, detections.true_labels,
                              len(names))
    labels = list(names) + ["background"]
    fig = figure(figsize=(1.3 * len(labels) + 2.2, 1.1 * len(labels) + 1.6), layout="constrained")
    ax = fig.subplots()
    shares = matrix.double() / matrix.sum(0, keepdim=True).clamp(min=1)  # of each true class (column)
    shares[-1, -1] = 0
    image = ax.imshow(shares.numpy(), cmap="Blues", vmin=0, vmax=1)
    for (i, j), n in zip(((i, j) for i in range(len(labels)) for j in range(len(labels))), matrix.flatten().tolist()):
        text = "-" if i == j == len(names) else str(n)
        ax.text(j, i, text, ha="center", va="center", color="white" if shares[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set(xlabel="annotated (true)", ylabel="counted (predicted)",
           title="at the counting thresholds, IoU 0.5\n(colour: share of each true class)")
    fig.colorbar(image, ax=ax, shrink=0.8)
    save(fig, paths[2])

    fig = figure(figsize=(width, 3.6), layout="constrained")
    bins = [i / 40 for i in range(41)]
    for k, (ax, name) in enumerate(zip(fig.subplots(1, len(names), squeeze=False)[0], names)):
        if name in matches:
            scores, tp, _ = matches[name]
        else:  # no (non-difficult) object of the class: every detection of it is false
            scores = torch.cat([s[l == k + 1] for s, l in zip(detections.det_scores, detections.det_labels)] + [torch.zeros(0)])
            tp = torch.zeros(len(scores), dtype=torch.bool)
        ax.hist([scores[tp].tolist(), scores[~tp].tolist()], bins=bins, histtype="step", linewidth=1.5,
                color=["tab:green", "tab:red"], label=["true positives", "false positives"])
        if len(scores):
            ax.set_yscale("log")
        ax.axvline(thresholds[k], color="0.2", linestyle="--", label=f"counting threshold {thresholds[k]:g}")
        ax.set(xlabel="score", ylabel="detections", xlim=(0, 1), title=name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper center")
    fig.suptitle("scores of eval.py's detections (min_score 0.01, max_overlap 0.45) at IoU 0.5")
    save(fig, paths[3])
    return paths


def _format(thresholds, names):
    return f"{thresholds[0]:g}" if len(set(thresholds)) == 1 else " ".join(
        f"{name} {t:g}" for name, t in zip(names, thresholds))


# ---------------------------------------------------------------------------------------------
# the command line: several training runs side by side (was results/plot_logs.py)
# ---------------------------------------------------------------------------------------------

def get_args_parser():
    p = argparse.ArgumentParser("plots.py", description="Draw train.py's log.jsonl files side by side: loss, lr and "
                                "validation mAP against epoch.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("logs", nargs="+", metavar="NAME=LOG", help="a label and a log.jsonl written by train.py")
    p.add_argument("--output", required=True, help="PNG to write")
    p.add_argument("--title", default=None, help="the figure's title")
    return p


def main(args):
    runs = {}
    for item in args.logs:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"{item}: give NAME=LOG, e.g. seed0=runs/s0/log.jsonl")
        if name in runs:
            raise UserError(f"{item}: the name {name!r} is given twice; give each run its own")
        try:
            runs[name] = read_log(path)
        except OSError as e:
            raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
        if not runs[name]:
            raise UserError(f"{path}: no epoch recorded (not a train.py log.jsonl?)")
    check_not_an_input(args.output, "--output", others=[item.partition("=")[2] for item in args.logs])
    print(f"written to {plot_training(runs, args.output, args.title)}")


if __name__ == "__main__":
    run_cli(main, get_args_parser())
