"""The leakage guard's distances, measured: how far (in bits of create_data_lists' 256-bit hash) copies of an image
are from it, and how close other pictures come, on BCCD and TXL-PBC. The threshold MAX_HASH_DISTANCE sits between.

    python tools/guard_calibration.py --bccd data/BCCD --txl data/TXL-PBC --output results/guard-calibration.json

Copies: TXL-PBC's re-annotated BCCD fields against BCCD (the same pictures, another name), and 3 disguised copies of
each of BCCD's 72 TEST images (resized to 416x416, 320x240 or 1280x960, at random flipped and rotated by 90
degrees, saved as JPEG of quality 60-95). Others: every TXL-PBC image's nearest BCCD image other than its own, each
BCCD image's nearest other BCCD image (BCCD holds neighbouring fields of the same smears), and each disguised copy's
nearest BCCD image other than its source.
"""
import argparse
import glob
import io
import json
import os
import sys

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the project's flat modules, one folder up (run as `python tools/guard_calibration.py`)
from create_data_lists import HASH_GRID, MAX_HASH_DISTANCE, d4_orbit, perceptual_hashes, thumbnail  # noqa: E402
from misc import run_cli, write_json_atomic  # noqa: E402


def distances(ours, theirs):
    """(n, m) Hamming distances of thumbnails to the nearest of the 8 flips/rotations of each reference."""
    a = perceptual_hashes(ours).astype(np.float32) * 2 - 1
    b = perceptual_hashes(d4_orbit(theirs).reshape(-1, HASH_GRID, HASH_GRID)).astype(np.float32) * 2 - 1
    return ((a.shape[1] - a @ b.T) / 2).reshape(len(ours), len(theirs), 8).min(2)


def disguised(path, rng):
    with Image.open(path) as im:
        im = im.convert("RGB")
    for size in ((416, 416), (320, 240), (1280, 960)):
        copy = im.resize(size, Image.BILINEAR)
        copy = copy.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else copy
        copy = copy.transpose(Image.ROTATE_90) if rng.random() < 0.5 else copy
        buffer = io.BytesIO()
        copy.save(buffer, "JPEG", quality=int(rng.integers(60, 96)))
        buffer.seek(0)
        yield buffer


def main(args):
    bccd = sorted(glob.glob(os.path.join(args.bccd, "JPEGImages", "*.jpg")))
    with open(os.path.join(args.bccd, "ImageSets", "Main", "test.txt")) as f:
        test = [os.path.join(args.bccd, "JPEGImages", line.strip() + ".jpg") for line in f if line.strip()]
    txl = sorted(glob.glob(os.path.join(args.txl, "images", "*", "*.jpg")))
    thumbs_bccd = np.stack([thumbnail(p) for p in bccd])
    d_txl = distances(np.stack([thumbnail(p) for p in txl]), thumbs_bccd)
    is_field = np.array([Image.open(p).size == (640, 480) for p in txl])
    nearest = np.sort(d_txl, 1)
    rng = np.random.default_rng(0)
    copies = [(bccd.index(p), b) for p in test for b in disguised(p, rng)]
    d_copies = distances(np.stack([thumbnail(b) for _, b in copies]), thumbs_bccd)
    own = d_copies[np.arange(len(copies)), [i for i, _ in copies]]
    d_copies[np.arange(len(copies)), [i for i, _ in copies]] = np.inf
    d_bccd = distances(thumbs_bccd, thumbs_bccd)
    np.fill_diagonal(d_bccd, np.inf)
    report = {
        "max_hash_distance": MAX_HASH_DISTANCE, "bits": int(perceptual_hashes(thumbs_bccd[:1]).shape[1]),
        "txl_bccd_fields": {"images": int(is_field.sum()), "distance_to_own_max": float(nearest[is_field, 0].max()),
                            "distance_to_others_min": float(nearest[is_field, 1].min())},
        "txl_other_sources": {"images": int((~is_field).sum()), "distance_to_bccd_min": float(nearest[~is_field, 0].min())},
        "bccd_among_itself": {"images": len(bccd), "distance_to_others_min": float(d_bccd.min()),
                              "pairs_within_32": int((d_bccd <= 32).sum() // 2)},
        "disguised_bccd_test": {"copies": len(copies), "distance_to_own_max": float(own.max()),
                                "distance_to_others_min": float(d_copies.min())},
    }
    print(json.dumps(report, indent=2))
    if args.output:
        write_json_atomic(report, args.output, indent=2)


def get_args_parser():
    parser = argparse.ArgumentParser("guard_calibration.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bccd", default="data/BCCD", help="BCCD (VOC: JPEGImages, ImageSets/Main/test.txt)")
    parser.add_argument("--txl", default="data/TXL-PBC", help="TXL-PBC (images/train, images/val)")
    parser.add_argument("--output", default=None, help="write the figures as JSON here")
    return parser


if __name__ == "__main__":
    run_cli(main, get_args_parser())
