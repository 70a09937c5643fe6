"""How tiled detection's merging copes with boxes whose edges scatter: simulated, without a model.

    $ python tools/tiling_scatter.py --output results/tiling_scatter.json

2x2 and 3x3 mosaics of the first --images TEST images' annotations (the cells are where BCCD's are) are cut
into detect.py's windows. In every window a simulated detector reports every cell that shows at least a
fifth of its area, cut to the window, each box edge moved by a normal error of --scatter times the cell's
width or height, drawn anew in every window (a worst case: a real model's views of one cell are alike).
detect.merge_windows then merges them; the table gives the cells counted against the annotated ones.
"""
import argparse
import os
import sys

import torch
from torchvision.ops import box_area

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the project's flat modules, one folder up (run as `python tools/tiling_scatter.py`)

from datasets import BCCDDataset  # noqa: E402
from tiling import BCCD_FIELD, merge_windows, tile_windows, tiling  # noqa: E402
from misc import UserError, run_cli, run_info, write_json_atomic  # noqa: E402
from utils import resize  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser("tiling_scatter.py", description="Simulated merging of scattered boxes.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-folder", default="data/lists", help="JSON lists from create_data_lists.py (TEST = test.txt)")
    p.add_argument("--images", type=int, default=36, help="the first this many TEST images make the mosaics")
    p.add_argument("--scatter", type=float, nargs="+", default=[0, 0.02, 0.04, 0.06, 0.08, 0.12],
                   help="standard deviation of each box edge, as a fraction of the cell's size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="results/tiling_scatter.json", help="write the results as JSON here")
    return p


def scattered_detections(cells, labels, windows, image_size, scatter, g, min_part=0.2):
    width, height = image_size
    canvas = torch.zeros(3, height, width, dtype=torch.uint8)  # resize() maps the boxes; the pixels do not matter
    boxes, out_labels, scores = [], [], []
    for x0, y0, x1, y1 in windows:
        shown = torch.cat([torch.max(cells[:, :2], torch.tensor([max(x0, 0), max(y0, 0)], dtype=torch.float)),
                           torch.min(cells[:, 2:], torch.tensor([min(x1, width), min(y1, height)], dtype=torch.float))], 1)
        seen = (shown[:, 2:] > shown[:, :2]).all(1) & (box_area(shown) >= min_part * box_area(cells))
        shown = shown + torch.randn(len(shown), 4, generator=g) * scatter * (cells[:, 2:] - cells[:, :2]).repeat(1, 2)
        shown = torch.cat([torch.min(shown[:, :2], shown[:, 2:] - 1), shown[:, 2:]], 1)
        boxes.append(resize(canvas, (x0, y0, x1, y1), shown[seen])[1])  # fractions of the window, clipped to it
        out_labels.append(labels[seen])
        scores.append(torch.rand(int(seen.sum()), generator=g) * 0.5 + 0.5)
    return boxes, out_labels, scores


def main(args):
    test_set = BCCDDataset(args.data_folder, "test")
    if not 9 <= args.images <= len(test_set):  # one 3x3 mosaic at least
        raise UserError(f"--images must be 9 to {len(test_set)}, not {args.images}")
    objects = test_set.objects[:args.images]
    width, height = BCCD_FIELD
    tiles = tiling(BCCD_FIELD)
    g = torch.Generator().manual_seed(args.seed)
    results = {}
    for n in (2, 3):
        size = (n * width, n * height)
        windows = tile_windows(*size, tiles)
        mosaics = []
        for k in range(0, args.images - n * n + 1, n * n):
            offsets = [torch.tensor([j % n * width, j // n * height] * 2, dtype=torch.float) for j in range(n * n)]
            mosaics.append((torch.cat([torch.tensor(objects[k + j]["boxes"]).reshape(-1, 4) + offsets[j]
                                       for j in range(n * n)]),
                            torch.cat([torch.tensor(objects[k + j]["labels"]) for j in range(n * n)])))
        rows = {}
        for scatter in args.scatter:
            counted = sum(len(merge_windows(*scattered_detections(cells, labels, windows, size, scatter, g), windows,
                                            size, tiles.margin, 0.5)[0]) for cells, labels in mosaics)
            annotated = sum(len(cells) for cells, _ in mosaics)
            rows[str(scatter)] = {"annotated": annotated, "counted": counted,
                                  "difference": round(counted / annotated - 1, 4)}
        results[f"{n}x{n}"] = {"mosaics": len(mosaics), "size": list(size), "windows": len(windows), "by_scatter": rows}
    print(f"{'mosaics':<10}{'scatter':>9}{'annotated':>11}{'counted':>9}{'difference':>12}")
    for name, r in results.items():
        for scatter, row in r["by_scatter"].items():
            print(f"{name:<10}{float(scatter):>9.0%}{row['annotated']:>11}{row['counted']:>9}{row['difference']:>+12.1%}")
    write_json_atomic({**run_info(torch.device("cpu")), "mosaics": results}, args.output, indent=2)
    print(f"results written to {args.output}")


if __name__ == "__main__":
    run_cli(main, get_args_parser())
