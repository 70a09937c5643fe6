"""Counting errors of a detect.py run against annotations: counts.csv beside a list set's TEST (create_data_lists).

    python detect.py data/TXL-PBC/images/val --output-dir runs/count-val
    python tools/count_check.py runs/count-val/counts.csv --data-folder data/lists-txl-sources --output count.json

Per class: the error, the sum over images of |counted - annotated| / the number annotated, and the bias, the sum of
(counted - annotated) / the number annotated; over all images and per source (the dataset each list entry came from).
Images of the lists that counts.csv lacks, or the other way round, are an error: the two must be the same images.
The images whose counts differ from their annotations are listed per class (--list prints them): where a count is
wrong, or an annotation.

--against OTHER.csv compares two runs on the same images (two models, or two settings): per class, the difference of
their errors in points, with a 95 % interval from a paired bootstrap over the images (BOOTSTRAP resamples, seeded),
and the shares of resamples in which this run's error is the lower and the same. An interval that holds 0 is a
difference these images cannot tell from chance.
"""
import argparse
import csv
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the project's flat modules, one folder up (run as `python tools/count_check.py`)
from misc import UserError, check_not_an_input, run_cli, write_json_atomic  # noqa: E402
from utils import check_label_map, read_json  # noqa: E402

BOOTSTRAP = 10_000  # --against: resamples of the images


def errors(rows, names):
    """{class: {"annotated", "counted", "error", "bias"}} of rows [(counted {class: n}, annotated {class: n})]."""
    out = {}
    for name in names:
        counted = [c[name] for c, _ in rows]
        annotated = [a[name] for _, a in rows]
        total = sum(annotated)
        out[name] = {"annotated": total, "counted": sum(counted),
                     "error": sum(abs(c - a) for c, a in zip(counted, annotated)) / total if total else None,
                     "bias": (sum(counted) - total) / total if total else None}
    return out


def read_counts(path, names, annotated, folder):
    """counts.csv of detect.py -> ({real path: {class: n}}, {real path: row}), for exactly the images of annotated."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a byte-order mark, as spreadsheets save it
            table = list(csv.DictReader(f))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    try:
        row_of = {os.path.realpath(row["image"]): row for row in table}
        counted = {p: {n: int(row[n]) for n in names} for p, row in row_of.items()}
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: not the counts.csv of detect.py with these lists' classes ({e!r})") from None
    if any(n < 0 for c in counted.values() for n in c.values()):
        raise UserError(f"{path}: a negative count: not the counts.csv of detect.py")
    if len(row_of) != len(table):
        raise UserError(f"{path}: {len(table) - len(row_of)} image(s) counted twice")
    if set(counted) != set(annotated):
        relative = not set(counted) & set(annotated) and any(not os.path.isabs(row["image"]) for row in table)
        raise UserError(f"{path}: {len(set(counted) - set(annotated))} image(s) not in {folder}'s TEST, "
                        f"{len(set(annotated) - set(counted))} of TEST not counted: count the same images"
                        + ("; its paths are relative to the folder detect.py ran in: run count_check.py there"
                           if relative else ""))
    return counted, row_of


def paired_bootstrap(this, other, truth, resamples=BOOTSTRAP, seed=0):
    """Per-image counts (n_images,) of two runs and the annotations -> the difference of their errors (this - other),
    its 95 % interval over resamples of the images, and the shares of resamples where this run's error is the lower
    and the same."""
    this, other, truth = (np.asarray(a, dtype=np.float64) for a in (this, other, truth))
    gain, rng = np.abs(this - truth) - np.abs(other - truth), np.random.default_rng(seed)
    diffs, step = [], max(1, 2**24 // len(truth))  # resamples at a time: index arrays of at most 16M entries
    for start in range(0, resamples, step):
        index = rng.integers(0, len(truth), size=(min(step, resamples - start), len(truth)))
        total = truth[index].sum(1)
        diffs.append(gain[index].sum(1)[total > 0] / total[total > 0])  # a resample without an annotated object: none
    diff = np.concatenate(diffs)
    low, high = np.percentile(diff, [2.5, 97.5])
    return {"difference": float(gain.sum() / truth.sum()), "interval": [float(low), float(high)],
            "lower_share": float((diff < 0).mean()), "same_share": float((diff == 0).mean()), "resamples": len(diff)}


def read_lists(folder):
    """TEST of the lists in `folder` as {real path: its objects}, and the class names in label order; lists that are
    not create_data_lists.py's are a one-line UserError naming the file."""
    images, objects, label_map = (read_json(os.path.join(folder, name), "list") for name in
                                  ("TEST_images.json", "TEST_objects.json", "label_map.json"))
    label_map = check_label_map(label_map, os.path.join(folder, "label_map.json"))
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise UserError(f"{os.path.join(folder, 'TEST_images.json')}: not a list of image paths")
    if not isinstance(objects, list) or len(objects) != len(images) or not all(
            isinstance(o, dict) and isinstance(o.get("labels"), list) and isinstance(o.get("source", ""), str) and
            all(type(label) is int and 0 < label < len(label_map) for label in o["labels"]) for o in objects):
        raise UserError(f"{os.path.join(folder, 'TEST_objects.json')}: not an entry with the labels of the classes of "
                        f"label_map.json for each of the {len(images)} image(s) of TEST_images.json")
    annotated = {os.path.realpath(p): o for p, o in zip(images, objects)}
    if len(annotated) != len(images):
        raise UserError(f"{os.path.join(folder, 'TEST_images.json')}: {len(images) - len(annotated)} image(s) listed "
                        f"twice")
    return annotated, [n for n, label in sorted(label_map.items(), key=lambda item: item[1]) if label], label_map


def main(args):
    folder = args.data_folder
    if args.output:
        check_not_an_input(args.output, "--output", data_folder=folder, others=(args.counts, args.against))
    annotated, names, label_map = read_lists(folder)
    counted, row_of = read_counts(args.counts, names, annotated, folder)
    other = read_counts(args.against, names, annotated, folder)[0] if args.against else None  # before any output
    truths = {path: {n: o["labels"].count(label_map[n]) for n in names}  # difficult ones too, as eval.py counts
              for path, o in annotated.items()}
    rows, differ = {}, {n: [] for n in names}
    for path, o in annotated.items():
        truth = truths[path]
        rows.setdefault(o.get("source", "?"), []).append((counted[path], truth))
        for n in names:
            if counted[path][n] != truth[n]:
                differ[n].append({"image": row_of[path]["image"], "source": o.get("source", "?"),  # as counts.csv says
                                  "counted": counted[path][n], "annotated": truth[n]})
    report = {"counts": args.counts, "images": len(annotated), "all": errors([r for rs in rows.values() for r in rs], names),
              "by_source": {s: {"images": len(rs), **errors(rs, names)} for s, rs in rows.items()} if len(rows) > 1 else {},
              "differ": differ}
    for where, figures in [("all", report["all"])] + list(report["by_source"].items()):
        print(f"{where:<14}" + "  ".join(f"{n} {e['error']:.1%} ({e['bias']:+.1%})" if e["error"] is not None
                                         else f"{n} -" for n, e in ((n, figures[n]) for n in names)))
    for n in names if args.list else ():
        for d in sorted(differ[n], key=lambda d: -abs(d["counted"] - d["annotated"])):  # ties in the lists' order
            print(f"{n}  counted {d['counted']}, annotated {d['annotated']}  {d['source']}  {d['image']}")
    print("images whose counts differ: " + ", ".join(f"{n} {len(differ[n])}" for n in names))
    if args.against:
        report["against"] = {"counts": args.against, "classes": dict.fromkeys(names)}
        print(f"against {args.against}: this run's error - that run's, in points, with a 95 % interval (paired "
              f"bootstrap over the {len(annotated)} images, {BOOTSTRAP} resamples)")
        for n in names:
            truth = [truths[p][n] for p in annotated]
            if not sum(truth):
                print(f"{n:<10} none annotated")
                continue
            b = report["against"]["classes"][n] = paired_bootstrap(
                [counted[p][n] for p in annotated], [other[p][n] for p in annotated], truth)
            print(f"{n:<10} {100 * b['difference']:+.1f} [{100 * b['interval'][0]:+.1f}, {100 * b['interval'][1]:+.1f}]"
                  f"  lower in {b['lower_share']:.0%} of resamples, the same in {b['same_share']:.0%}")
    if args.output:
        write_json_atomic(report, args.output, indent=2)


def get_args_parser():
    parser = argparse.ArgumentParser("count_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("counts", help="counts.csv of a detect.py run")
    parser.add_argument("--data-folder", default="data/lists", help="lists whose TEST holds the same images")
    parser.add_argument("--output", default=None, help="write the figures as JSON here (with every image whose counts "
                        "differ from its annotations)")
    parser.add_argument("--against", default=None, metavar="OTHER_CSV", help="counts.csv of another run on the same "
                        "images: the difference of the errors, with a 95 %% interval (paired bootstrap over images)")
    parser.add_argument("--list", action="store_true", help="also print those images, the largest differences first: "
                        "the ones to look at")
    return parser


if __name__ == "__main__":
    run_cli(main, get_args_parser())
