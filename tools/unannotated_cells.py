"""Where a model's confident detections fall against BCCD's annotations, class by class.

    $ python tools/unannotated_cells.py --checkpoint runs/twin6/checkpoint.pt --data-folder data/lists-val \
          --output results/2026-12-06-cpu/unannotated-val.json --figure-dir results/2026-12-06-cpu

Runs the model on the lists' TEST images at the mAP's NMS (--max-overlap 0.45), keeps the detections scoring at
least --min-score, and matches them to the annotations of their class as VOC does (by score, IoU > 0.5, each
annotation once). Every detection is then a match, a duplicate of a matched annotation, near an annotation
(0.1 < IoU <= 0.5) or on no annotated box (IoU <= 0.1 with every annotation of its class); every annotation is
found or missed, and the missed touching the image's edge are counted (tools/edge_cells.py says why they matter).
A detection on no annotated box is either a false alarm or a cell the annotators left out: --figure draws images
with the annotations (green), the matches (blue) and the detections on no annotated box (red), so that a reader can
tell which.
"""
import argparse
import os
import sys

import torch
from PIL import Image, ImageDraw
from torchvision.ops import box_iou

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tools")]  # the project's flat modules, one folder up, and edge_cells

from datasets import BCCDDataset  # noqa: E402
from detect import load_model, predict  # noqa: E402
from edge_cells import touches_edge  # noqa: E402
from misc import UserError, check_writable, run_cli, run_info, save_image_atomic, write_json_atomic  # noqa: E402

KINDS = ("match", "duplicate", "near", "on_no_box")


def get_args_parser():
    p = argparse.ArgumentParser("unannotated_cells.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="train.py checkpoint (default: the shipped model)")
    p.add_argument("--data-folder", default="data/lists-val", help="JSON lists whose TEST is scored (val.txt here)")
    p.add_argument("--min-score", type=float, default=0.3, help="detections scoring at least this are kept")
    p.add_argument("--max-overlap", type=float, default=0.45, help="NMS overlap (the mAP's)")
    p.add_argument("--figure", nargs="*", default=["BloodImage_00260", "BloodImage_00221"],
                   help="TEST images to draw (names without extension)")
    p.add_argument("--figure-dir", default=None, help="write the drawn images here as unannotated-NAME.jpg")
    p.add_argument("--sample", type=int, default=0, help="draw this many of each --sample-class's detections on no "
                   "annotated box, at random, into a contact sheet (--figure-dir/unannotated-sample-CLASS.jpg)")
    p.add_argument("--sample-class", nargs="+", default=["RBC", "Platelets"])
    p.add_argument("--seed", type=int, default=0, help="for --sample")
    p.add_argument("--output", required=True, help="write the counts as JSON here")
    return p


def classify(boxes, scores, true_boxes):
    """Detections of one class and image (boxes (n, 4), scores (n,)) against its annotations (m, 4) -> the boxes in
    score order, the kind of each (KINDS indices, in that order) and whether each annotation was found."""
    order = scores.argsort(descending=True)
    iou = box_iou(boxes[order], true_boxes)  # (n, m)
    found = torch.zeros(len(true_boxes), dtype=torch.bool)
    kinds = []
    for row in iou:  # analysis, not a hot path: VOC's greedy matching, one detection after the other
        best, j = (row.max(0) if len(row) else (torch.tensor(0.), None))
        if best > 0.5:
            kinds.append(1 if found[j] else 0)
            found[j] = True
        else:
            kinds.append(2 if best > 0.1 else 3)
    return boxes[order], kinds, found


def contact_sheet(data, found, n, seed, size=128, columns=8):
    """n of `found` (image index, fractional box) at random, each cut from its image with a quarter of the box's size
    around it (the box drawn in red), in a grid of `columns`, numbered in reading order."""
    g = torch.Generator().manual_seed(seed)
    picked = [found[j] for j in torch.randperm(len(found), generator=g)[:n].tolist()]
    sheet = Image.new("RGB", (columns * size, -(-len(picked) // columns) * size), "white")
    for k, (i, box) in enumerate(picked):
        image = Image.open(data.images[i]).convert("RGB")
        x0, y0, x1, y1 = (box * torch.tensor([image.width, image.height] * 2)).tolist()
        pad = max(x1 - x0, y1 - y0) / 4
        ImageDraw.Draw(image).rectangle((x0, y0, x1, y1), outline=(255, 0, 0), width=3)
        crop = image.crop((int(x0 - pad), int(y0 - pad), int(x1 + pad), int(y1 + pad))).resize((size - 4, size - 4))
        sheet.paste(crop, (k % columns * size + 2, k // columns * size + 2))
        draw = ImageDraw.Draw(sheet)
        draw.rectangle((k % columns * size + 2, k // columns * size + 2, k % columns * size + 20,
                        k // columns * size + 14), fill="white")
        draw.text((k % columns * size + 4, k // columns * size + 3), str(k + 1), fill="black")
    return sheet


def main(args):
    check_writable(args.output, "--output")
    model = load_model(args.checkpoint, "cpu")
    data = BCCDDataset(args.data_folder, "test")
    names = {v: k for k, v in data.label_map.items() if v}
    if set(args.sample_class) - set(names.values()):
        raise UserError(f"--sample-class: the classes are {', '.join(names.values())}, not {args.sample_class}")
    totals = {n: {"annotated": 0, "found": 0, "missed_at_edge": 0, **{k: 0 for k in KINDS}} for n in names.values()}
    per_image = {}
    unannotated = {cls: [] for cls in args.sample_class}  # (image index, box) of detections on no annotated box
    figure = set(args.figure)
    for i in range(len(data)):
        image, true_boxes, true_labels, _ = data[i]
        (boxes,), (labels,), (scores,) = predict(model, image[None], min_score=args.min_score,
                                                 max_overlap=args.max_overlap, amp=False)
        name = os.path.splitext(os.path.basename(data.images[i]))[0]
        drawn = []
        for label, cls in names.items():
            own = labels == label
            ranked, kinds, found = classify(boxes[own], scores[own], true_boxes[true_labels == label])
            t = totals[cls]
            t["annotated"] += len(found)
            t["found"] += int(found.sum())
            t["missed_at_edge"] += int((touches_edge(true_boxes[true_labels == label]) & ~found).sum())
            for k in kinds:
                t[KINDS[k]] += 1
            if cls in unannotated:
                unannotated[cls] += [(i, b) for b, k in zip(ranked, kinds) if k == 3]
            per_image.setdefault(name, {})[cls] = {"annotated": len(found), "on_no_box": kinds.count(3)}
            if name in figure:
                drawn += [(b, k) for b, k in zip(ranked, kinds)]
                drawn += [(b, "annotated") for b in true_boxes[true_labels == label]]
        if name in figure and args.figure_dir:
            original = Image.open(data.images[i]).convert("RGB")
            w, h = original.size
            scale = torch.tensor([w, h, w, h])
            draw = ImageDraw.Draw(original)
            colours = {"annotated": ((0, 200, 0), 4), 0: ((0, 0, 255), 2), 3: ((255, 0, 0), 2)}
            for b, k in drawn:
                if k in colours:
                    draw.rectangle((b * scale).tolist(), outline=colours[k][0], width=colours[k][1])
            save_image_atomic(original, os.path.join(args.figure_dir, f"unannotated-{name}.jpg"), quality=85)
    for cls, found in unannotated.items() if args.sample and args.figure_dir else ():
        if found:
            save_image_atomic(contact_sheet(data, found, args.sample, args.seed),
                              os.path.join(args.figure_dir, f"unannotated-sample-{cls}.jpg"), quality=85)
    for cls, t in totals.items():
        kept = sum(t[k] for k in KINDS)
        print(f"{cls:>10}: {t['found']}/{t['annotated']} annotations found ({t['missed_at_edge']} of the missed at the "
              f"image's edge); of {kept} detections >= "
              f"{args.min_score:g}: {t['match']} match, {t['duplicate']} duplicate, {t['near']} near, "
              f"{t['on_no_box']} on no annotated box")
    write_json_atomic({"totals": totals, "per_image": per_image, "min_score": args.min_score,
                       "max_overlap": args.max_overlap, "checkpoint": args.checkpoint,
                       "data_folder": args.data_folder,
                       **run_info(torch.device("cpu"))}, args.output, indent=1)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
