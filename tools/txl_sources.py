"""TXL-PBC by microscope, for figures per source: writes OUT/BCCD, OUT/PBC and OUT/Raabin, each a YOLO dataset
(data.yaml and image lists train.txt, val.txt) of TXL-PBC's images from that source, told apart by their size as
TXL-PBC's README gives them: BCCD 640x480, Raabin-WBC 575x575, PBC (CellaVision crops) 360x363 and 366x369.

    python tools/txl_sources.py --txl data/TXL-PBC --output data/txl-sources
    python create_data_lists.py --data-folder data/txl-sources/BCCD data/txl-sources/PBC data/txl-sources/Raabin \
        --train-split train --test-split val --output-folder data/lists-txl-sources --guard data/BCCD:test

The lists then hold TXL-PBC's images and labels (the lists point at TXL-PBC's own files), each entry's source
"BCCD:val", "PBC:val" or "Raabin:val", and eval.py reports its figures per source.

With --samples 10 25 50 --held-out 50, each source also gets splits train-10, train-25 and train-50 (the first 10, 25
and 50 of a seeded shuffle of its train images: each sample holds the smaller ones) and held-out (the last 50 of the
shuffle, in no sample): the corrected images and the lab's own held-out images of a fine-tune from another
microscope's model (tools/adaptation.py).
"""
import random
import argparse
import os
import sys

from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the project's flat modules, one folder up (run as `python tools/txl_sources.py`)
from misc import UserError, run_cli  # noqa: E402

SOURCES = {(640, 480): "BCCD", (575, 575): "Raabin", (360, 363): "PBC", (366, 369): "PBC"}


def main(args):
    names_line = None
    with open(os.path.join(args.txl, "data.yaml"), encoding="utf-8") as f:
        names_line = next(line for line in f if line.startswith("names:"))  # TXL-PBC's: names: ['WBC', 'RBC', ...]
    for split in ("train", "val"):
        folder = os.path.join(args.txl, "images", split)
        by_source = {name: [] for name in sorted(set(SOURCES.values()))}
        for name in sorted(os.listdir(folder)):
            with Image.open(os.path.join(folder, name)) as im:
                size = im.size
            if size not in SOURCES:
                raise UserError(f"{os.path.join(folder, name)}: {size[0]}x{size[1]}, not a size of TXL-PBC's sources")
            by_source[SOURCES[size]].append(os.path.abspath(os.path.join(folder, name)))
        for source, paths in by_source.items():
            splits = {split: paths}
            if split == "train" and (args.samples or args.held_out):
                shuffled = random.Random(f"{args.seed} {source}").sample(paths, len(paths))
                if max(args.samples or [0]) + args.held_out > len(paths):
                    raise UserError(f"{source}: {len(paths)} train images, fewer than --samples and --held-out need")
                splits.update({f"train-{n}": sorted(shuffled[:n]) for n in args.samples})
                splits["held-out"] = sorted(shuffled[len(paths) - args.held_out:]) if args.held_out else []
            os.makedirs(os.path.join(args.output, source), exist_ok=True)
            for name, members in splits.items():
                with open(os.path.join(args.output, source, f"{name}.txt"), "w", encoding="utf-8") as f:
                    f.write("".join(p + "\n" for p in members))
                print(f"{source} {name}: {len(members)} images")
    extra = [f"train-{n}" for n in args.samples] + (["held-out"] if args.held_out else [])
    for source in set(SOURCES.values()):
        with open(os.path.join(args.output, source, "data.yaml"), "w", encoding="utf-8") as f:
            f.write("".join(f"{name}: {name}.txt\n" for name in ["train", "val", *extra]) + names_line)


def get_args_parser():
    parser = argparse.ArgumentParser("txl_sources.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--txl", default="data/TXL-PBC", help="TXL-PBC (its data.yaml, images/train, images/val)")
    parser.add_argument("--output", default="data/txl-sources", help="where the three datasets are written")
    parser.add_argument("--samples", type=int, nargs="*", default=[], metavar="N",
                        help="also splits train-N: N of each source's train images, seeded, each sample within the larger")
    parser.add_argument("--held-out", type=int, default=0, metavar="K",
                        help="also a split held-out: K train images of each source in no sample")
    parser.add_argument("--seed", type=int, default=0, help="seed of the samples")
    return parser


if __name__ == "__main__":
    run_cli(main, get_args_parser())
