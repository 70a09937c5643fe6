"""Do a dataset's annotations box the cells cut by the image's edge, and how little of a cell do they box?

    $ python tools/edge_cells.py --data-folder data/txl-lists --split train

train.py's zoom-in crops cut cells as the image's edge does. `--crop-keep centre` (the paper's) keeps a cut cell's
box only when the cell's centre is inside the crop; `--crop-keep visible` keeps it when more than
utils.CROP_MIN_VISIBLE of its area is. Where the annotations box cut cells down to small slivers (TXL-PBC's do), the
paper's rule leaves slivers in the crops unboxed, and the model learns to ignore what it is scored on.

For each class of the lists' split: the boxes, how many touch the image's edge (within 0.5 % of its size), and how
much of a cell those show: the box's short side over the median long side of the class's boxes clear of the edge in
the same image (images without such a box are left out), as percentiles.
"""
import argparse
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the project's flat modules, one folder up (run as `python tools/edge_cells.py`)

from datasets import BCCDDataset  # noqa: E402
from formats import image_size  # noqa: E402
from misc import run_cli  # noqa: E402

PERCENTILES = (1, 5, 10, 25, 50)
EDGE = 0.005  # a box within 0.5 % of the image's size from its border touches the edge


def get_args_parser():
    p = argparse.ArgumentParser("edge_cells.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-folder", default="data/txl-lists", help="JSON lists from create_data_lists.py")
    p.add_argument("--split", default="train", choices=("train", "test"))
    return p


def touches_edge(boxes, width=1, height=1):
    """boxes (n, 4) xy, numpy or torch, in pixels of a width x height image or fractional -> (n,) bool."""
    return ((boxes[:, 0] <= EDGE * width) | (boxes[:, 1] <= EDGE * height) |
            (boxes[:, 2] >= (1 - EDGE) * width) | (boxes[:, 3] >= (1 - EDGE) * height))


def shown(boxes, width, height):
    """boxes (n, 4) pixels of one class in an image -> (touching the edge (n,) bool, share of a cell each shows)."""
    at_edge = touches_edge(boxes, width, height)
    sides = boxes[:, 2:] - boxes[:, :2]
    clear = sides[~at_edge].max(1) if (~at_edge).any() else np.zeros(0)
    return at_edge, sides.min(1) / np.median(clear) if len(clear) else np.full(len(boxes), np.nan)


def main(args):
    data = BCCDDataset(args.data_folder, args.split)
    names = {v: k for k, v in data.label_map.items() if v}
    totals = {label: [0, 0, []] for label in names}  # boxes, at the edge, share shown by those
    for path, objects in zip(data.images, data.objects):
        width, height = image_size(path)
        boxes, labels = np.array(objects["boxes"], dtype=float).reshape(-1, 4), np.array(objects["labels"])
        for label, t in totals.items():
            at_edge, share = shown(boxes[labels == label], width, height)
            t[0] += len(at_edge)
            t[1] += int(at_edge.sum())
            t[2] += [s for s in share[at_edge] if np.isfinite(s)]
    print(f"{'class':<12}{'boxes':>7}{'at the edge':>13}   share of a cell shown, percentiles {PERCENTILES}")
    for label, (n, n_edge, shares) in totals.items():
        pct = " ".join(f"{v:.2f}" for v in np.percentile(shares, PERCENTILES)) if shares else "-"
        print(f"{names[label]:<12}{n:>7}{n_edge:>13}   {pct} (of {len(shares)})")


if __name__ == "__main__":
    run_cli(main, get_args_parser())
