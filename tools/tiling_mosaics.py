"""Does detect.py count a large image as well as a BCCD field? Mosaics of BCCD TEST images, tiled.

    $ python tools/tiling_mosaics.py --checkpoint weights/ssd300_bccd.pt --output results/tiling_mosaics.json

From the first --images TEST images (test.txt's order; 36 by default) it builds 2x2 mosaics (1280x960),
3x3 mosaics (1920x1440) and, from the first --enlarged 2x2 ones, mosaics enlarged 2x (2560x1920, bicubic)
that are run with --scale 2, as a user whose microscope shows cells twice BCCD's size would. Their
annotations follow from the originals (shifted; doubled). For each kind of mosaic and each class:
  * the cells counted on the mosaics at detect.py's defaults (the checkpoint's counting thresholds), tiled
    and resized whole (--tile off), against the sum of the counts on their source images (each resized
    whole, as detect.py does a BCCD field): a tiled mosaic should count what its sources count;
  * the VOC07 mAP (utils.calculate_mAP at eval.py's setting, 0.01 / 0.45 / 200) on the mosaics, tiled and
    whole, beside the mAP on their source images.
Detections come from detect.detect_image, as detect.py makes them; each window's one forward pass serves
both settings. Writes --output (JSON: the figures, command, commit, date, device) and prints a table.
A mosaic has seams that a real large image has not: a window across one sees the borders of two images
side by side, and the cells they cut, which each source image shows at its border.
About 500 forward passes with the defaults: one per window and source image (the two settings share them).
"""
import argparse
import hashlib
import os
import sys
import time

import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the project's flat modules, one folder up (run as `python tools/tiling_mosaics.py`)

from datasets import BCCDDataset  # noqa: E402
from detect import detect_image, load_model  # noqa: E402
from tiling import RBC_WIDTH, tile_windows, tiling  # noqa: E402
from misc import (UserError, bf16_is_fast, format_min_score, parse_max_overlap, parse_min_score,  # noqa: E402
                  repo_relative, resolve_device, run_cli, run_info, write_json_atomic)
from utils import bccd_labels, calculate_mAP, class_names  # noqa: E402

EVAL_SETTING = (0.01, 0.45, 200)  # eval.py's, the paper's and the tutorial's: min_score, max_overlap, top_k


def get_args_parser():
    p = argparse.ArgumentParser("tiling_mosaics.py", description="Counts and mAP of tiled detection on mosaics of "
                                "BCCD TEST images.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by train.py")
    p.add_argument("--data-folder", default="data/lists", help="JSON lists from create_data_lists.py (TEST = test.txt)")
    p.add_argument("--output", default="results/tiling_mosaics.json", help="write the results as JSON here")
    p.add_argument("--images", type=int, default=36, help="the first this many TEST images make the mosaics "
                   "(36: 9 2x2 and 4 3x3 mosaics)")
    p.add_argument("--enlarged", type=int, default=3, help="this many 2x2 mosaics are also enlarged 2x")
    p.add_argument("--min-score", default=None,
                   help="counting: detect.py's --min-score (0.5, RBC=0.35,WBC=0.25 or 0.35,0.25,0.3; default: the "
                   "checkpoint's)")
    p.add_argument("--max-overlap", type=float, default=None,
                   help="counting: detect.py's --max-overlap (default: the checkpoint's)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    return p


class OneForwardPass(torch.nn.Module):
    """The model, keeping its outputs for the inputs it last saw: detect_image at the counting setting and then at
    the mAP setting costs one forward pass per window (as eval.py's one pass serves both). forget() between images."""

    def __init__(self, model):
        super().__init__()
        self.model, self.field, self.outputs = model, model.field, {}
        self.label_map, self.min_score, self.max_overlap = model.label_map, model.min_score, model.max_overlap

    def forward(self, images):
        key = tuple(images.shape), hashlib.sha1(images.float().cpu().numpy().tobytes()).hexdigest()
        if key not in self.outputs:
            self.outputs[key] = self.model(images)
        return self.outputs[key]

    def detect_objects(self, *args, **kwargs):
        return self.model.detect_objects(*args, **kwargs)

    def forget(self):
        self.outputs.clear()


def mosaic(sources, n):
    """n x n sources (image, boxes (k, 4) pixels, labels, difficulties), row by row -> one such item."""
    width, height = sources[0][0].size
    image = Image.new("RGB", (n * width, n * height))
    boxes = []
    for k, (im, b, _, _) in enumerate(sources):
        x, y = (k % n) * width, (k // n) * height
        image.paste(im, (x, y))
        boxes.append(b + torch.tensor([x, y, x, y], dtype=torch.float))
    return image, torch.cat(boxes), torch.cat([s[2] for s in sources]), torch.cat([s[3] for s in sources])


def enlarge(item, factor=2):
    image, boxes, labels, difficulties = item
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.BICUBIC), boxes * factor, \
        labels, difficulties


def run(model, image, count_at, tile, scale, amp):
    """((boxes, labels) counted at count_at, (boxes, labels, scores) at EVAL_SETTING) of detect_image on `image`."""
    min_score, max_overlap = count_at
    counted = detect_image(image, model, min_score, max_overlap, 200, tile=tile, scale=scale, amp=amp)[:2]
    evaluated = detect_image(image, model, *EVAL_SETTING, tile=tile, scale=scale, amp=amp)
    model.forget()
    return counted, evaluated


def per_class(labels):
    return torch.bincount(labels, minlength=len(bccd_labels) + 1)[1:]  # (classes,), background dropped


def away_from_seams(boxes, labels, n, size, band):
    """The labels of the boxes (pixels of an n x n mosaic of `size` (width, height)) whose centre lies more than
    `band` pixels from every seam between its source images."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    far = torch.ones(len(boxes), dtype=torch.bool)
    for axis in (0, 1):
        seams = torch.arange(1, n) * size[axis] / n
        far &= ((centre[:, axis, None] - seams[None]).abs() > band).all(1)
    return labels[far]


def placed(boxes, k, n, source_size, scale):
    """Boxes of the k-th source image (row by row) in pixels of its n x n mosaic, enlarged `scale` times."""
    x, y = (k % n) * source_size[0], (k // n) * source_size[1]
    return (boxes + torch.tensor([x, y, x, y], dtype=torch.float)) * scale


def main(args):
    if args.images < 4 or args.enlarged < 0:
        raise UserError(f"--images must be at least 4 (one 2x2 mosaic) and --enlarged >= 0, not {args.images} and "
                        f"{args.enlarged}")
    if args.max_overlap is not None:
        parse_max_overlap(args.max_overlap)
    device = resolve_device(args.device)
    amp = bf16_is_fast(device)
    model = OneForwardPass(load_model(args.checkpoint, device))
    classes = class_names(model.label_map)
    min_score = model.min_score if args.min_score is None else parse_min_score(args.min_score, classes,
                                                                                  default=model.min_score)
    max_overlap = model.max_overlap if args.max_overlap is None else args.max_overlap
    test_set = BCCDDataset(args.data_folder, "test", keep_difficult=True)
    if args.images > len(test_set):
        raise UserError(f"--images {args.images}: {args.data_folder} has {len(test_set)} TEST images")
    sources = []
    for path, objects in zip(test_set.images[:args.images], test_set.objects):
        with Image.open(path) as im:
            sources.append((im.convert("RGB"), torch.tensor(objects["boxes"], dtype=torch.float).reshape(-1, 4),
                            torch.tensor(objects["labels"]), torch.tensor(objects["difficulties"])))
    sizes = {im.size for im, *_ in sources}
    if len(sizes) > 1:
        raise UserError(f"{args.data_folder}: the TEST images have several sizes ({sorted(sizes)}); mosaics need one")
    count_at = (min_score, max_overlap)
    start = time.perf_counter()

    print(f"{len(sources)} source images, each resized whole ...", flush=True)
    source_runs = [run(model, im, count_at, "auto", 1.0, amp) for im, *_ in sources]

    groups = {"2x2": [list(range(k, k + 4)) for k in range(0, len(sources) - 3, 4)],
              "3x3": [list(range(k, k + 9)) for k in range(0, len(sources) - 8, 9)]}
    kinds = {"2x2": (2, 1, groups["2x2"]), "3x3": (3, 1, groups["3x3"]),
             "2x2 enlarged 2x": (2, 2, groups["2x2"][:args.enlarged])}
    results = {}
    for name, (n, scale, members) in kinds.items():
        if not members:
            continue
        items = [mosaic([sources[i] for i in group], n) for group in members]
        if scale != 1:
            items = [enlarge(item, scale) for item in items]
        width, height = items[0][0].size
        windows = tile_windows(width, height, tiling(model.field, "auto", scale))
        print(f"{name}: {len(items)} mosaics of {width}x{height}, {len(windows or [1])} windows each ...", flush=True)
        runs = {"tiled": [run(model, item[0], count_at, "auto", scale, amp) for item in items],
                "whole": [run(model, item[0], count_at, "off", 1.0, amp) for item in items]}
        from_sources = torch.stack([sum(per_class(source_runs[i][0][1]) for i in group) for group in members])  # (M, C)
        counts = {"sources": from_sources, "annotated": torch.stack([per_class(item[2]) for item in items]),
                  **{way: torch.stack([per_class(r[0][1]) for r in runs[way]]) for way in runs}}
        band, source_size = RBC_WIDTH * scale, sources[0][0].size
        away = {"sources": torch.stack([per_class(away_from_seams(
                    torch.cat([placed(source_runs[i][0][0], k, n, source_size, scale) for k, i in enumerate(group)]),
                    torch.cat([source_runs[i][0][1] for i in group]), n, (width, height), band)) for group in members]),
                "tiled": torch.stack([per_class(away_from_seams(*r[0], n, (width, height), band))
                                      for r in runs["tiled"]])}
        truth = [list(t) for t in zip(*[item[1:] for item in items])]  # boxes, labels, difficulties: lists over mosaics

        def m_ap(dets, truth):
            aps, mean = calculate_mAP(*[list(x) for x in zip(*dets)], *truth)
            return {"mAP": round(mean, 4), "AP": {k: round(v, 4) for k, v in aps.items()}}

        used = [i for group in members for i in group]
        source_truth = [[sources[i][k] for i in used] for k in (1, 2, 3)]
        results[name] = {
            "mosaics": len(items), "size": [width, height], "scale": scale, "windows": len(windows or [1]),
            "seam_band": band,
            "source_images": [os.path.basename(test_set.images[i]) for i in used],
            "counts": {label: {**{key: int(c[:, k].sum()) for key, c in counts.items()},
                               **{f"{way}_mae_vs_sources": round((counts[way][:, k] - from_sources[:, k]).abs()
                                                                 .float().mean().item(), 2) for way in runs},
                               **{f"{way}_away_from_seams": int(c[:, k].sum()) for way, c in away.items()}}
                       for k, label in enumerate(bccd_labels)},
            "mAP_VOC07": {"sources": m_ap([source_runs[i][1] for i in used], source_truth),
                          **{way: m_ap([r[1] for r in runs[way]], truth) for way in runs}}}
    seconds = time.perf_counter() - start

    print_table(results, (format_min_score(min_score, classes), max_overlap))
    write_json_atomic({**run_info(device), "checkpoint": repo_relative(args.checkpoint), "field": list(model.field),
                       "count_setting": {"min_score": min_score, "max_overlap": max_overlap, "top_k": 200,
                                         "classes": classes},
                       "map_setting": dict(zip(("min_score", "max_overlap", "top_k"), EVAL_SETTING)),
                       "amp": amp, "seconds": round(seconds, 1), "kinds": results}, args.output, indent=2)
    print(f"{seconds:.0f} s on {device}; results written to {args.output}")


def print_table(results, count_at):
    print(f"\ncells counted at min_score {count_at[0]}, max_overlap {count_at[1]} (all mosaics of a kind together); "
          f"MAE: mean absolute difference per mosaic from the sum of its sources' counts")
    print(f"{'mosaics':<24}{'class':<11}{'annotated':>10}{'sources':>9}{'tiled':>7}{'whole':>7}{'MAE tiled':>11}"
          f"{'MAE whole':>11}")
    for name, r in results.items():
        for label, c in r["counts"].items():
            print(f"{name:<24}{label:<11}{c['annotated']:>10}{c['sources']:>9}{c['tiled']:>7}{c['whole']:>7}"
                  f"{c['tiled_mae_vs_sources']:>11}{c['whole_mae_vs_sources']:>11}")
    print(f"\ncells counted away from the seams (box centre more than one red cell's width from each)")
    print(f"{'mosaics':<24}{'class':<11}{'sources':>9}{'tiled':>7}{'tiled/sources':>15}")
    for name, r in results.items():
        for label, c in r["counts"].items():
            s, t = c["sources_away_from_seams"], c["tiled_away_from_seams"]
            print(f"{name:<24}{label:<11}{s:>9}{t:>7}{f'{t / s - 1:+.1%}' if s else '-':>15}")
    print(f"\n{'VOC07 mAP':<24}{'size':>10}{'windows':>9}{'sources':>9}{'tiled':>7}{'whole':>7}")
    for name, r in results.items():
        m = r["mAP_VOC07"]
        print(f"{name:<24}{'x'.join(map(str, r['size'])):>10}{r['windows']:>9}{m['sources']['mAP']:>9.4f}"
              f"{m['tiled']['mAP']:>7.4f}{m['whole']['mAP']:>7.4f}")


if __name__ == "__main__":
    run_cli(main, get_args_parser())
