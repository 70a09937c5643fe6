"""How well do the priors fit a dataset's cells? Each box's best Jaccard overlap with any prior, per class.

    $ python tools/prior_match.py --data-folder data/txl-lists --split train
    $ python tools/prior_match.py --data-folder data/txl-lists --prior-scales 0.04 0.12 0.3 0.48 0.66 0.84

Training matches a box to every prior it overlaps by more than 0.5 (MultiBoxLoss's threshold), and to its best
prior in any case; a box whose best overlap is below 0.5 is learnt from one prior only. For each class of the lists'
split: its boxes' size at the model's 300x300 input (the square root of the area, percentiles), and the median best
overlap and the share of boxes below 0.5, as the images are shown to the model (zoom 1), and shrunk as train.py's
zoom-out shrinks them at 2x (--zoom). Priors: --checkpoint's, else --prior-scales (default: train.py's).
"""
import argparse
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the project's flat modules, one folder up (run as `python tools/prior_match.py`)

from datasets import BCCDDataset  # noqa: E402
from formats import image_size  # noqa: E402
from misc import UserError, load_checkpoint, run_cli  # noqa: E402
from model import create_prior_boxes, valid_prior_scales  # noqa: E402
from train import BCCD_PRIOR_SCALES  # noqa: E402
from utils import cxcy_to_xy, find_jaccard_overlap  # noqa: E402

PERCENTILES = (5, 25, 50, 75, 95)
THRESHOLD = 0.5  # MultiBoxLoss's


def get_args_parser():
    p = argparse.ArgumentParser("prior_match.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-folder", default="data/txl-lists", help="JSON lists from create_data_lists.py")
    p.add_argument("--split", default="train", choices=("train", "test"))
    p.add_argument("--checkpoint", default=None, help="take its model's prior scales")
    p.add_argument("--prior-scales", type=float, nargs=6, default=list(BCCD_PRIOR_SCALES), metavar="S")
    p.add_argument("--zoom", type=float, nargs="+", default=[1.0, 2.0], help="zoom-outs to measure at")
    return p


def best_overlaps(boxes, scales, zoom=1.0):
    """boxes (n, 4) fractional xy -> (n,) each one's best Jaccard overlap with the priors of `scales`, the boxes shrunk
    by `zoom` towards the image's top-left corner, as a zoom-out places the image in a canvas `zoom` times its size."""
    priors = cxcy_to_xy(create_prior_boxes(scales)).clamp(0, 1)
    return find_jaccard_overlap(boxes / zoom, priors).max(1).values if len(boxes) else torch.zeros(0)


def main(args):
    scales = args.prior_scales
    if args.checkpoint:
        scales = (load_checkpoint(args.checkpoint).get("model_args") or {}).get("prior_scales", scales)
    if not valid_prior_scales(scales):
        raise UserError(f"prior scales must be six numbers in (0, 1], not {scales}")
    if any(not 1 <= z <= 16 for z in args.zoom):
        raise UserError(f"--zoom must lie between 1 and 16, not {args.zoom}")
    data = BCCDDataset(args.data_folder, args.split, keep_difficult=True)
    boxes, labels = [], []
    for path, objects in zip(data.images, data.objects):
        width, height = image_size(path)
        boxes.append(torch.tensor(objects["boxes"], dtype=torch.float).reshape(-1, 4) / torch.tensor(
            [width, height, width, height]))
        labels.append(torch.tensor(objects["labels"], dtype=torch.long))
    boxes, labels = torch.cat(boxes), torch.cat(labels)
    print(f"priors {' '.join(f'{s:g}' for s in scales)}; {len(data.images)} images of {args.data_folder} "
          f"{args.split.upper()}")
    print(f"{'class':<12}{'boxes':>7}   size at 300x300, px, percentiles {PERCENTILES}   "
          + "   ".join(f"zoom {z:g}: median best, < {THRESHOLD}" for z in args.zoom))
    for name, label in data.label_map.items():
        mine = boxes[labels == label]
        if not label or not len(mine):
            continue
        side = ((mine[:, 2] - mine[:, 0]) * (mine[:, 3] - mine[:, 1])).sqrt() * 300
        sizes = " ".join(f"{v:.0f}" for v in torch.quantile(side, torch.tensor(PERCENTILES) / 100).tolist())
        fits = []
        for z in args.zoom:
            best = best_overlaps(mine, scales, z)
            fits.append(f"{best.median():.2f}, {(best < THRESHOLD).float().mean():.0%}")
        print(f"{name:<12}{len(mine):>7}   {sizes:<44}" + "   ".join(f"{f:>25}" for f in fits))


if __name__ == "__main__":
    run_cli(main, get_args_parser())
