"""A large tiled pyramidal TIFF of BCCD fields, written tile by tile; and merging many windows timed, without a model.

    $ python tools/big_slide.py pyramid /tmp/big.tif --size 20000 --upscale 4   # then: python detect.py /tmp/big.tif
    $ python tools/big_slide.py merge --windows 50000                             # merge_windows on 50,000 windows

pyramid: level 0 repeats a 4x4 mosaic of the first 16 BCCD images (--images), each enlarged --upscale times (nearest
neighbour), over --size x --size pixels; levels 1, 2, ... halve it, down to about 1,000 px. JPEG tiles of 256 px
(imagecodecs), written from a generator: the writer holds one tile, never a level. The file records --upscale's
microns per pixel (resolution tags in centimetres: BCCD's 7.5 um / 106 px, divided by --upscale), so that detect.py
finds the level where red cells are BCCD's size (level log2(upscale)) by itself. Needs requirements-slides.txt.

merge: a grid of 90 px cells 150 px apart seen by the windows of a large image at scale 1 (each window reports the
cells that show in it, cut by its edges), merged by tiling.merge_windows; prints the seconds, the boxes, the cells
counted (it must be every cell once) and the peak resident memory of the process.
"""
import argparse
import glob
import math
import os
import resource
import sys
import time

import numpy as np
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the project's flat modules, one folder up (run as `python tools/big_slide.py`)

from misc import UserError, run_cli  # noqa: E402
from slides import BCCD_MPP, require  # noqa: E402
from tiling import BCCD_FIELD, merge_windows, tile_windows, tiling  # noqa: E402

TILE = 256


def get_args_parser():
    p = argparse.ArgumentParser("big_slide.py", description="A large pyramidal TIFF; merging many windows timed.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("what", choices=("pyramid", "merge"), help="write a pyramid, or time the merging")
    p.add_argument("output", nargs="?", default=None, help="pyramid: the TIFF to write")
    p.add_argument("--size", type=int, default=20000, help="pyramid: level 0 is this many pixels square")
    p.add_argument("--upscale", type=int, default=4, help="pyramid: BCCD's fields enlarged this many times at level 0")
    p.add_argument("--images", default="data/BCCD/JPEGImages", help="pyramid: BCCD's images (the first 16)")
    p.add_argument("--windows", type=int, default=50000, help="merge: about this many windows")
    return p


def tiles(period, size, step):
    """The tiles of a size x size level, row by row, of the period image repeated, each pixel of level 0 `step`
    pixels of the period image apart (step < 1: enlarged by nearest neighbour)."""
    h, w = period.shape[:2]
    for y in range(0, size, TILE):
        rows = (np.arange(y, y + TILE) * step).astype(np.int64) % h
        for x in range(0, size, TILE):
            cols = (np.arange(x, x + TILE) * step).astype(np.int64) % w
            yield period[rows[:, None], cols[None, :]]


def write_pyramid(output, size, upscale, images):
    tifffile = require("tifffile")
    require("imagecodecs")
    paths = sorted(glob.glob(os.path.join(images, "*.jpg")))[:16]
    if len(paths) < 16:
        raise UserError(f"--images {images}: 16 JPEG images needed, found {len(paths)}")
    fields = [np.asarray(Image.open(p).convert("RGB").resize(BCCD_FIELD)) for p in paths]
    period = np.concatenate([np.concatenate(fields[r * 4:r * 4 + 4], 1) for r in range(4)], 0)  # 2560x1920
    levels = [size >> k for k in range(int(math.log2(size / 1000)) + 1)]
    per_cm = 1e4 / (BCCD_MPP / upscale)  # pixels per centimetre at level 0
    start = time.perf_counter()
    with tifffile.TiffWriter(output, bigtiff=True) as tif:
        for k, side in enumerate(levels):
            options = dict(subifds=len(levels) - 1, resolution=(per_cm, per_cm), resolutionunit="CENTIMETER") \
                if k == 0 else dict(subfiletype=1)
            tif.write(tiles(period, side, 2 ** k / upscale), shape=(side, side, 3), dtype=np.uint8, tile=(TILE, TILE),
                      compression="jpeg", compressionargs={"level": 90}, photometric="rgb", **options)
    print(f"{output}: levels {', '.join(f'{s}x{s}' for s in levels)}, {os.path.getsize(output) / 2**20:.0f} MiB, "
          f"{BCCD_MPP / upscale:.4f} um per pixel at level 0, in {time.perf_counter() - start:.0f} s")


def time_merge(n_windows):
    tiles_ = tiling(BCCD_FIELD)
    width = round(math.sqrt(n_windows * 286 * 126 * 4))  # a 4:1 image of about n_windows windows
    size = (width, width // 4)
    windows = tile_windows(*size, tiles_, limit=10**7)
    xs, ys = torch.meshgrid(torch.arange(60., size[0] - 100, 150), torch.arange(60., size[1] - 100, 150), indexing="ij")
    cells = torch.stack([xs.flatten(), ys.flatten(), xs.flatten() + 90, ys.flatten() + 90], 1)
    g = torch.Generator().manual_seed(0)
    boxes, labels, scores = [], [], []
    ix = torch.searchsorted(cells[:, 0].contiguous(), torch.tensor([w[0] - 90. for w in windows]))
    jx = torch.searchsorted(cells[:, 0].contiguous(), torch.tensor([float(w[2]) for w in windows]))
    for (x0, y0, x1, y1), i, j in zip(windows, ix.tolist(), jx.tolist()):
        seen = cells[i:j].clone()  # cells in x-major order: those that may meet the window
        seen[:, 0::2] = seen[:, 0::2].clamp(x0, x1)
        seen[:, 1::2] = seen[:, 1::2].clamp(y0, y1)
        seen = seen[((seen[:, 2:] - seen[:, :2]) > 0).all(1)]
        boxes.append((seen - torch.tensor([x0, y0, x0, y0])) / torch.tensor([x1 - x0, y1 - y0] * 2))
        labels.append(torch.ones(len(seen), dtype=torch.long))
        scores.append(torch.rand(len(seen), generator=g))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    start = time.perf_counter()
    merged, _, _ = merge_windows(boxes, labels, scores, windows, size, tiles_.margin, 0.45)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(f"{len(windows):,} windows of a {size[0]}x{size[1]} image, {sum(map(len, boxes)):,} boxes: merged in "
          f"{seconds:.1f} s; {len(merged):,} cells counted of {len(cells):,}; peak resident memory {peak:.0f} MiB "
          f"({before:.0f} MiB before merging)")


def main(args):
    if args.what == "pyramid":
        if not args.output:
            raise UserError("pyramid: give the TIFF to write, e.g. /tmp/big.tif")
        write_pyramid(args.output, args.size, args.upscale, args.images)
    else:
        time_merge(args.windows)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
