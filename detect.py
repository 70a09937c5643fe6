"""Detect and count blood cells in images (tutorial, "Inference").

    $ python detect.py img/                  # count cells with the shipped model (weights/ssd300_bccd.pt)
    $ python detect.py --checkpoint runs/ssd300/checkpoint.pt smear1.jpg smears/ --output-dir detections

Writes, in --output-dir, each image annotated with its detections, counts.csv (image, then one
column per class of the checkpoint: RBC, WBC, Platelets for BCCD; UTF-8) and detections.json (boxes
in pixels of the original image, labels, scores), and prints the counts. Takes image files and
folders (searched recursively); any image PIL opens works, whatever its mode, bit depth, EXIF
orientation or size. A file that cannot be read is reported and skipped; the exit status is then 1.

From Python, as in the tutorial:
    from PIL import Image
    from detect import detect, load_model
    model = load_model()                     # the shipped model; or load_model("runs/ssd300/checkpoint.pt")
    detect(Image.open("smear.jpg"), model=model).show()   # at the model's counting thresholds
"""
import argparse
import csv
import io
import os
import sys
import time

import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps
from torch.utils.data import DataLoader, Dataset

from model import SSD300
from utils import (UserError, bf16_is_fast, class_names, image_extensions, load_checkpoint, normalize, pil_to_tensor,
                   resize, resolve_device, run_cli, write_json_atomic, write_text_atomic)

# The model that ships with the project (README, "The shipped model"): used when no checkpoint is given
DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "ssd300_bccd.pt")
# The tutorial's detection thresholds, used for checkpoints that record no counting thresholds of their own
TUTORIAL_MIN_SCORE, TUTORIAL_MAX_OVERLAP = 0.2, 0.5


def get_args_parser():
    p = argparse.ArgumentParser("detect.py", description="Detect and count blood cells in images.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders of images")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="checkpoint.pt written by train.py (default: the "
                   "shipped model, trained on BCCD)")
    p.add_argument("--output-dir", default="detections", help="annotated images, counts.csv and detections.json go here")
    p.add_argument("--min-score", type=float, nargs="+", default=None, metavar="S", help="keep detections scoring "
                   "above this: one value, or one per class in the model's order (default: the thresholds recorded in "
                   f"the checkpoint, chosen for counting on a validation split; else the tutorial's {TUTORIAL_MIN_SCORE})")
    p.add_argument("--max-overlap", type=float, default=None, help="NMS: suppress boxes overlapping a better one by more "
                   f"(IoU) (default: the checkpoint's, else the tutorial's {TUTORIAL_MAX_OVERLAP})")
    p.add_argument("--top-k", type=int, default=200, help="keep at most this many detections per image")
    p.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default: 16 on CUDA; 1 on "
                   "a CPU, where it is the fastest per image)")
    p.add_argument("--workers", type=int, default=None, help="processes reading images while the model runs (default: "
                   "2 on CUDA; 0 on a CPU, whose cores the model already uses)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on with CUDA and on CPUs with native bf16, such as AVX512-BF16 or AMX)")
    return p


def parse_min_score(values, names, source="--min-score"):
    """One min_score for all classes (a float), or one per class (a list in label order); checked."""
    if len(values) not in (1, len(names)):
        raise UserError(f"{source}: give one value or {len(names)}, one per class ({', '.join(names)}), not {len(values)}")
    if not all(0 <= v < 1 for v in values):  # also refuses nan
        raise UserError(f"{source} must lie in [0, 1), not {' '.join(map(str, values))}")
    return float(values[0]) if len(values) == 1 else [float(v) for v in values]


def format_min_score(min_score, names):
    if isinstance(min_score, float):
        return f"{min_score:g}"
    return " ".join(f"{name} {v:g}" for name, v in zip(names, min_score))


def counting_defaults(ckpt, classes, source="checkpoint"):
    """detect.py's (min_score, max_overlap) for a checkpoint of these classes (names in label order): its recorded
    "count_thresholds" ({"min_score": {class: value}, "max_overlap": value}, chosen for counting on a validation
    split: the shipped model has them), else the tutorial's 0.2 and 0.5. min_score is a float, or a list in label
    order."""
    recorded = ckpt.get("count_thresholds")
    if recorded is None:
        return TUTORIAL_MIN_SCORE, TUTORIAL_MAX_OVERLAP
    try:
        min_score = parse_min_score([recorded["min_score"][name] for name in classes], classes, "min_score")
        max_overlap = float(recorded["max_overlap"])
        if not 0 < max_overlap <= 1:
            raise ValueError(f"max_overlap {max_overlap} outside (0, 1]")
    except (KeyError, TypeError, ValueError, UserError) as e:
        raise UserError(f"{source}: unusable count_thresholds {recorded!r:.200} ({e})") from None
    return min_score, max_overlap


def load_model(checkpoint=None, device="cpu"):
    """The model of a train.py checkpoint (default: the shipped model), on `device`, ready for inference (eval mode,
    BatchNorm folded). It knows its classes: model.label_map (name -> label), model.rev_label_map (label -> name),
    model.label_color_map; and its counting thresholds: model.min_score, model.max_overlap (counting_defaults)."""
    checkpoint = checkpoint or DEFAULT_CHECKPOINT
    if checkpoint == DEFAULT_CHECKPOINT and not os.path.isfile(checkpoint):
        raise UserError(f"{checkpoint}: the shipped model is missing from this copy of the project; restore it "
                        f"(git checkout -- weights) or give --checkpoint")
    ckpt = load_checkpoint(checkpoint)
    model = SSD300.from_checkpoint(ckpt, checkpoint)
    model.min_score, model.max_overlap = counting_defaults(ckpt, class_names(model.label_map), checkpoint)
    device = torch.device(device)
    return model.to(device, memory_format=torch.channels_last).eval().fuse_batch_norm()


def open_image(path_or_file):
    """Open an image upright (EXIF orientation applied) as a uint8 RGB tensor (3, H, W)."""
    with Image.open(path_or_file) as im:
        return pil_to_tensor(ImageOps.exif_transpose(im))


def preprocess(image):
    """uint8 (3, H, W) -> uint8 (3, 300, 300), as TEST images are transformed (predict normalizes)."""
    _, h, w = image.shape
    return resize(image, (0, 0, w, h), image.new_zeros(0, 4, dtype=torch.float))[0]


@torch.no_grad()
def run_model(model, images, amp=True, channels_last=True):
    """images: uint8 (N, 3, 300, 300), as BCCDDataset and preprocess give them -> the model's (locs, scores)."""
    device = next(model.parameters()).device
    images = normalize(images.to(device, non_blocking=True,
                                 memory_format=torch.channels_last if channels_last else torch.preserve_format))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        return model(images)


def predict(model, images, min_score=0.2, max_overlap=0.5, top_k=200, amp=True, channels_last=True):
    """images: uint8 (N, 3, 300, 300) -> lists over images of (boxes fractional (n, 4), labels (n,), scores (n,))."""
    locs, scores = run_model(model, images, amp, channels_last)
    return model.detect_objects(locs, scores, min_score=min_score, max_overlap=max_overlap, top_k=top_k)


def annotate(image, boxes, labels, scores, rev_label_map, label_color_map):
    """Draw boxes (pixels) with their class colour, name and score on a copy of a PIL image.
    rev_label_map: label -> class name; label_color_map: class name -> colour (the model's)."""
    image = image.convert("RGB")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    width = max(1, round(max(image.size) / 320))
    for box, label, score in zip(boxes.tolist(), labels.tolist(), scores.tolist()):
        name = rev_label_map[label]
        color = label_color_map[name]
        draw.rectangle(box, outline=color, width=width)
        text = f"{name} {score:.2f}"
        if not isinstance(font, ImageFont.FreeTypeFont):  # PIL's bitmap font (Pillow < 10.1, no FreeType): Latin-1 only
            text = text.encode("latin-1", "replace").decode("latin-1")
        left, top, right, bottom = draw.textbbox((box[0], box[1]), text, font=font)
        y = box[1] - (bottom - top) - 2 if box[1] - (bottom - top) - 2 >= 0 else box[1]
        draw.rectangle([box[0], y, box[0] + right - left + 4, y + bottom - top + 2], fill=color)
        draw.text((box[0] + 2, y), text, fill="white", font=font)
    return image


def to_pixels(boxes, width, height):
    return boxes * boxes.new_tensor([width, height, width, height])


def detect(original_image, min_score=None, max_overlap=None, top_k=200, *, model, amp=None):
    """Detect cells in a PIL image and return it annotated (the tutorial's detect()).

    model: from load_model(). min_score (one value or one per class) and max_overlap default to the model's
    counting thresholds. Returns a new PIL image with one colour per class, label and score.
    """
    amp = bf16_is_fast(next(model.parameters()).device) if amp is None else amp
    min_score = getattr(model, "min_score", TUTORIAL_MIN_SCORE) if min_score is None else min_score
    max_overlap = getattr(model, "max_overlap", TUTORIAL_MAX_OVERLAP) if max_overlap is None else max_overlap
    image = pil_to_tensor(original_image)
    boxes, labels, scores = (x[0].cpu() for x in predict(model, preprocess(image)[None], min_score, max_overlap, top_k, amp))
    return annotate(original_image, to_pixels(boxes, *original_image.size), labels, scores, model.rev_label_map,
                    model.label_color_map)


# ---------------------------------------------------------------------------------------------
# the command line: many files, read in worker processes while the model runs
# ---------------------------------------------------------------------------------------------

def find_images(inputs):
    """Expand files and folders (recursively) into a sorted list of image paths; missing inputs are errors."""
    paths, missing = [], []
    for item in inputs:
        if os.path.isdir(item):
            for root, _, files in sorted(os.walk(item)):
                paths += sorted(os.path.join(root, f) for f in files if os.path.splitext(f)[1].lower() in image_extensions())
        elif os.path.isfile(item):
            paths.append(item)
        else:
            missing.append(item)
    return paths, missing


class ImageFiles(Dataset):
    """Reads and preprocesses image files; an unreadable file yields its error message instead."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        path = self.paths[i]
        try:
            image = open_image(path)
        except Exception as e:  # PIL raises many kinds: report and go on
            return i, None, f"{path}: cannot read image ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
        return i, image, preprocess(image)

    @staticmethod
    def collate_fn(batch):
        return batch


def output_names(paths):
    """A distinct output file name for every input (same name in two folders: add a counter)."""
    names, seen = [], {}
    for p in paths:
        stem, ext = os.path.splitext(os.path.basename(p))
        ext = ext.lower() if ext.lower() in (".jpg", ".jpeg", ".png") else ".png"
        name = stem + ext
        n = seen.get(name, 0)
        seen[name] = n + 1
        names.append(name if n == 0 else f"{stem}_{n}{ext}")
    return names


def check_args(args):
    if args.min_score is not None and not all(0 <= v < 1 for v in args.min_score):  # the count: once the model is known
        raise UserError(f"--min-score must lie in [0, 1), not {' '.join(map(str, args.min_score))}")
    if args.max_overlap is not None and not 0 < args.max_overlap <= 1:
        raise UserError(f"--max-overlap must be in (0, 1], not {args.max_overlap}")
    if args.top_k < 1 or (args.batch_size is not None and args.batch_size < 1) or (args.workers or 0) < 0:
        raise UserError("--top-k and --batch-size must be positive and --workers >= 0")


def main(args):
    check_args(args)
    device = resolve_device(args.device)
    amp = bf16_is_fast(device) if args.amp is None else args.amp
    model = load_model(args.checkpoint, device)
    classes, rev_label_map, colors = class_names(model.label_map), model.rev_label_map, model.label_color_map
    min_score = model.min_score if args.min_score is None else parse_min_score(args.min_score, classes)
    max_overlap = model.max_overlap if args.max_overlap is None else args.max_overlap
    paths, missing = find_images(args.inputs)
    errors = [f"{m}: no such file or folder" for m in missing]
    if not paths and not errors:
        raise UserError(f"no images found in {' '.join(args.inputs)}")
    names = output_names(paths)
    inputs = {os.path.realpath(p) for p in paths}
    clash = next((n for n in names if os.path.realpath(os.path.join(args.output_dir, n)) in inputs), None)
    if clash:
        raise UserError(f"--output-dir {args.output_dir}: writing {clash} there would overwrite an input image; "
                        f"choose another folder")
    os.makedirs(args.output_dir, exist_ok=True)

    batch_size = args.batch_size or (16 if device.type == "cuda" else 1)
    workers = args.workers if args.workers is not None else (2 if device.type == "cuda" else 0)
    loader = DataLoader(ImageFiles(paths), batch_size=batch_size, num_workers=workers,
                        collate_fn=ImageFiles.collate_fn)
    counts, records = [], []
    start = time.perf_counter()
    for batch in loader:
        good = [(i, image, x) for i, image, x in batch if image is not None]
        errors += [x for _, image, x in batch if image is None]
        if not good:
            continue
        dets = predict(model, torch.stack([x for _, _, x in good]), min_score, max_overlap, args.top_k, amp)
        for (i, image, _), boxes, labels, scores in zip(good, *dets):
            _, h, w = image.shape
            boxes, labels, scores = to_pixels(boxes.cpu(), w, h), labels.cpu(), scores.cpu()
            pil = Image.fromarray(image.permute(1, 2, 0).numpy())
            annotate(pil, boxes, labels, scores, rev_label_map, colors).save(os.path.join(args.output_dir, names[i]),
                                                                             quality=90)
            n = torch.bincount(labels, minlength=len(classes) + 1).tolist()
            counts.append({"image": paths[i], **{name: n[k + 1] for k, name in enumerate(classes)}})
            records.append({"image": paths[i], "output": names[i], "width": w, "height": h,
                            "boxes": [[round(v, 1) for v in b] for b in boxes.tolist()],
                            "labels": [rev_label_map[l] for l in labels.tolist()],
                            "scores": [round(s, 4) for s in scores.tolist()]})
    seconds = time.perf_counter() - start

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["image", *classes], lineterminator="\n")
    writer.writeheader()
    writer.writerows(counts)
    write_text_atomic(buf.getvalue(), os.path.join(args.output_dir, "counts.csv"))
    write_json_atomic(records, os.path.join(args.output_dir, "detections.json"), indent=1)

    width = max([len("image")] + [len(c["image"]) for c in counts])
    print(f"{'image':<{width}}  " + "  ".join(f"{name:>9}" for name in classes))
    for c in counts:
        print(f"{c['image']:<{width}}  " + "  ".join(f"{c[name]:>{max(9, len(name))}}" for name in classes))
    print(f"{len(counts)} image(s) in {seconds:.1f} s at min_score {format_min_score(min_score, classes)}, max_overlap "
          f"{max_overlap:g}; results in {args.output_dir}")
    for e in errors:
        print(f"{get_args_parser().prog}: error: {e}", file=sys.stderr)
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
