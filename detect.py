"""Detect and count blood cells in images (tutorial, "Inference").

    $ python detect.py img/                  # count cells with the shipped model (weights/ssd300_bccd.pt)
    $ python detect.py --checkpoint runs/ssd300/checkpoint.pt smear1.jpg smears/ --output-dir detections
    $ python detect.py --checkpoint runs/ssd300/checkpoint.pt scan-4k.jpg --rbc-width 160   # red cells ~160 px wide

From Python, as in the tutorial:
    from PIL import Image
    from detect import detect, detect_image, load_model
    model = load_model()                     # the shipped model; or load_model("runs/ssd300/checkpoint.pt")
    detect(Image.open("smear.jpg"), model=model).show()   # at the model's counting thresholds
    boxes, labels, scores = detect_image(Image.open("scan-4k.jpg"), model, scale=1.5)  # boxes in pixels

This file reads top to bottom: the tutorial's path (load_model -> preprocess -> predict -> annotate -> detect_image ->
detect), the test-time flips (--tta), then the command line. The command line takes image files and folders (searched
recursively; any image PIL opens, and whole-slide scans, read by region: slides.py) and writes, in --output-dir, each
image annotated, counts.csv, detections.json and report.html, as the images are done (files.py); it prints the counts.
An image much larger than the model's training field (BCCD's 640x480) is cut into overlapping windows of that field's
size (x --scale) whose detections are merged (tiling.py); --tile off resizes every image whole, as the tutorial does.
"""
import argparse
import functools
import math
import numbers
import os
import sys
import time

import torch
from PIL import Image, ImageDraw, ImageFont

from exported import device_flag, is_export, load_export, sha256
from files import (ImageFiles, Results, check_writable_folder, drawable, find_images, open_image,  # noqa: F401
                   printable, report_settings)
from labels import FORMATS
from misc import (Terminated, UserError, bf16_choice, bf16_is_fast, check_workers, format_min_score, load_checkpoint,
                  parse_max_overlap, parse_min_score, resolve_device, run_cli)
from model import ASPECT_RATIOS, FMAP_DIMS, SSD300, no_cells_in_blank
from report import Report
from tiling import BCCD_FIELD, RBC_WIDTH, flag_reading, in_batches, prepare, tile_windows, tiling, to_pixels
from utils import class_names, normalize, pil_to_tensor, resize

# The model that ships with the project (README, "The shipped model"): used when no checkpoint is given
DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "ssd300_bccd.pt")
# The tutorial's detection thresholds, used for checkpoints that record no counting thresholds of their own
TUTORIAL_MIN_SCORE, TUTORIAL_MAX_OVERLAP = 0.2, 0.5
TOP_K = 200  # at most this many detections per model input (the tutorial's)
# The tutorial's and the paper's setting for scoring mAP (eval.py): nearly every detection, ranked by score
MAP_MIN_SCORE, MAP_MAX_OVERLAP = 0.01, 0.45


# ---------------------------------------------------------------------------------------------
# The tutorial's path, top to bottom: load_model -> preprocess -> predict -> annotate -> detect_image -> detect
# ---------------------------------------------------------------------------------------------

def load_model(checkpoint=None, device="cpu", tta=None, ema=False):
    """The model of a train.py checkpoint (default: the shipped model), on `device`, ready for inference (eval mode,
    BatchNorm folded); or of an export.py export (.onnx, .xml), an exported.ExportedSSD300 on the CPU.

    It knows its classes: model.label_map (name -> label), model.rev_label_map (label -> name),
    model.label_color_map; its counting thresholds: model.min_score, model.max_overlap (counting_defaults); and
    model.field, the (width, height) of the images it was trained on (the checkpoint's record; BCCD_FIELD for
    checkpoints older than the record): detect_image tiles larger images with windows of that size. model.tta: the
    test-time augmentation run_model applies (TTA_VIEWS; default: the checkpoint's record, else "off");
    model.train_args: the train.py arguments the checkpoint records (None when it records none). ema: the
    checkpoint's moving average of the weights (train.py --ema-decay) instead of its weights.
    """
    checkpoint = DEFAULT_CHECKPOINT if checkpoint is None else checkpoint
    if checkpoint == DEFAULT_CHECKPOINT and not os.path.isfile(checkpoint):
        raise UserError(f"{checkpoint}: the shipped model is missing from this copy of the project; restore it "
                        f"(git checkout -- weights) or give --checkpoint")
    device = device if isinstance(device, torch.device) else resolve_device(str(device))
    if is_export(checkpoint):  # an export of export.py: its network runs in ONNX Runtime or OpenVINO, the rest here
        if device.type != "cpu":
            raise UserError(f"{checkpoint}: an export runs on the CPU (ONNX Runtime, OpenVINO): use --device cpu, or "
                            f"the checkpoint.pt on {device}")
        if ema:
            raise UserError(f"--ema: {checkpoint} is an export, of the one set of weights export.py was given")
        model = load_export(checkpoint)
        ckpt = model.metadata  # what the checkpoint held beside its weights
    else:
        ckpt = load_checkpoint(checkpoint)
        if ema:
            if "ema" not in ckpt:
                raise UserError(f"--ema: {checkpoint} holds no moving average of its weights (train.py --ema-decay)")
            ckpt = {**ckpt, "model": ckpt["ema"]}
        model = SSD300.from_checkpoint(ckpt, checkpoint)
    model.min_score, model.max_overlap = counting_defaults(ckpt, class_names(model.label_map), checkpoint)
    field = ckpt.get("field", BCCD_FIELD)
    if not (isinstance(field, (list, tuple)) and len(field) == 2 and
            all(isinstance(v, int) and not isinstance(v, bool) and 8 <= v <= 65535 for v in field)):
        raise UserError(f"{checkpoint}: its 'field' must be [width, height] in pixels (8 to 65535), not {field!r}")
    model.field = tuple(field)
    model.tta = check_tta(ckpt.get("tta", "off") if tta is None else tta, checkpoint if tta is None else "tta")
    model.train_args = ckpt.get("args")
    if not isinstance(model.train_args, (dict, type(None))):
        raise UserError(f"{checkpoint}: its 'args' (the train.py arguments) must be a dict, not "
                        f"{type(model.train_args).__name__}")
    return model.to(device, memory_format=torch.channels_last).eval().fuse_batch_norm()


def check_tta(tta, source="--tta"):
    if not isinstance(tta, str) or tta not in TTA_VIEWS:
        raise UserError(f"{source}: test-time augmentation is one of {', '.join(TTA_VIEWS)}, not {tta!r}")
    return tta


def preprocess(image):
    """uint8 (3, H, W) -> uint8 (3, 300, 300), as TEST images are transformed (predict normalizes)."""
    _, h, w = image.shape
    return resize(image, (0, 0, w, h), image.new_zeros(0, 4, dtype=torch.float))[0]


@torch.no_grad()
def run_model(model, images, amp=None, channels_last=True):
    """images: uint8 (N, 3, 300, 300), as BCCDDataset and preprocess give them -> the model's (locs, scores).
    amp: bf16 autocast (default: where it is fast, misc.bf16_is_fast). With test-time augmentation (model.tta, set by
    load_model: TTA_VIEWS) each flipped view's predictions are mapped back and averaged. A blank input gets nothing but
    background (a dark frame, bare glass: model.BLANK_SPREAD)."""
    device, views, locs, probs = next(model.parameters()).device, TTA_VIEWS[getattr(model, "tta", "off")], 0, 0
    amp = bf16_is_fast(device) if amp is None else amp
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    pixels = images.to(device, non_blocking=True, memory_format=memory_format)
    images = normalize(pixels)
    for view in views:
        x = flip_view(images, view)
        if any(view):
            x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            view_locs, view_scores = model(x)  # (N, P, 4), (N, P, C)
        if len(views) == 1:
            return view_locs, no_cells_in_blank(pixels, view_scores)
        view_locs, view_probs = unflip_predictions(view_locs.float(), view_scores.float().softmax(-1), view)
        locs, probs = locs + view_locs, probs + view_probs
    return locs / len(views), no_cells_in_blank(pixels, (probs / len(views)).log())  # softmax of log(p) is p


def predict(model, images, min_score=0.2, max_overlap=0.5, top_k=TOP_K, amp=None, channels_last=True):
    """images: uint8 (N, 3, 300, 300) -> lists over images of (boxes fractional (n, 4), labels (n,), scores (n,))."""
    locs, scores = run_model(model, images, amp, channels_last)
    return model.detect_objects(locs, scores, min_score=min_score, max_overlap=max_overlap, top_k=top_k)


def annotate(image, boxes, labels, scores, rev_label_map, label_color_map):
    """Draw boxes (pixels) with their class colour, name and score (scores None: names only, as for annotations)
    on a copy of a PIL image. rev_label_map: label -> class name; label_color_map: class name -> colour."""
    image = image.convert("RGB")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    width = max(1, round(max(image.size) / 320))
    scores = [None] * len(labels) if scores is None else scores.tolist()
    for box, label, score in zip(boxes.tolist(), labels.tolist(), scores):
        name = rev_label_map[label]
        color = label_color_map[name]
        draw.rectangle(box, outline=color, width=width)
        text = name if score is None else f"{name} {score:.2f}"
        if not isinstance(font, ImageFont.FreeTypeFont):  # PIL's bitmap font (Pillow < 10.1, no FreeType): Latin-1 only
            text = text.encode("latin-1", "replace").decode("latin-1")
        left, top, right, bottom = draw.textbbox((box[0], box[1]), text, font=font)
        y = box[1] - (bottom - top) - 2 if box[1] - (bottom - top) - 2 >= 0 else box[1]
        draw.rectangle([box[0], y, box[0] + right - left + 4, y + bottom - top + 2], fill=color)
        draw.text((box[0] + 2, y), text, fill="white", font=font)
    return image


def detect_image(image, model, min_score=None, max_overlap=None, top_k=TOP_K, tile="auto", scale=1.0, amp=None,
                 batch_size=None):
    """Detect cells in a PIL image of any size: (boxes (n, 4) in pixels of the image, labels (n,), scores (n,)),
    CPU tensors, by decreasing score.

    An image more than 1.25 times as wide or as tall as the field the model was trained on (model.field, x scale) is
    cut into overlapping windows of that size, run through the model batch_size at a time, and their detections merged
    (tiling.tile_windows, tiling.merge_windows); a smaller one is resized whole, as in the tutorial. tile: 'auto',
    'off' or a window (width, height) / 'WxH'. scale: cells appear this many times as large as in the training images
    (tiling.rbc_scale converts a red cell's width in pixels). top_k: per model input (per window when tiled).
    min_score (one value, or one per class) and max_overlap default to the model's counting thresholds.
    batch_size: windows per forward pass (default: 16 on CUDA, 1 on a CPU). amp: bf16 autocast (default: where fast).
    """
    min_score, max_overlap = check_call(image, model, min_score, max_overlap, top_k, batch_size)
    top_k, batch_size = int(top_k), None if batch_size is None else int(batch_size)  # NumPy's integers too
    device = next(model.parameters()).device
    if amp is not None and not isinstance(amp, bool):
        raise TypeError(f"amp: True, False or None (where fast), not {amp!r}")
    amp = bf16_is_fast(device) if amp is None else amp
    tiles = tiling(getattr(model, "field", BCCD_FIELD), tile, scale)
    if tile_windows(image.width, image.height, tiles) is None:  # the tutorial's path: the image resized whole
        x = preprocess(pil_to_tensor(image))[None]
        (boxes, labels, scores), = zip(*predict(model, x, min_score, max_overlap, top_k, amp))
        return to_pixels(boxes.cpu(), *image.size), labels.cpu(), scores.cpu()
    run = functools.partial(predict, model, min_score=min_score, max_overlap=max_overlap, top_k=top_k, amp=amp)
    item = (None, image.size, *prepare(pil_to_tensor(image), tiles))
    (_, boxes, labels, scores), = in_batches(run, [item], tiles, batch_size or default_batch_size(device), max_overlap)
    return boxes, labels, scores


def detect(original_image, min_score=None, max_overlap=None, top_k=TOP_K, *, model, amp=None, tile="auto",
           scale=1.0):
    """Detect cells in a PIL image and return it annotated (the tutorial's detect()).

    model: from load_model(). min_score (one value or one per class) and max_overlap default to the model's
    counting thresholds. Returns a new PIL image with one colour per class, label and score. A large image
    is tiled (tile, scale: see detect_image).
    """
    boxes, labels, scores = detect_image(original_image, model, min_score, max_overlap, top_k, tile, scale, amp)
    return annotate(original_image, boxes, labels, scores, model.rev_label_map, model.label_color_map)


# ---------------------------------------------------------------------------------------------
# Helpers of that path: counting thresholds, the Python API's arguments
# ---------------------------------------------------------------------------------------------

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
        max_overlap = parse_max_overlap(float(recorded["max_overlap"]), "max_overlap")
    except (KeyError, TypeError, ValueError, UserError) as e:
        raise UserError(f"{source}: unusable count_thresholds {recorded!r:.200} ({e})") from None
    return min_score, max_overlap


def check_call(image, model, min_score, max_overlap, top_k, batch_size):
    """detect_image's arguments, checked as the command line's are: (min_score, max_overlap) with the model's
    defaults filled in. TypeError for a wrong kind of object, UserError for a value out of range."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"image: a PIL image (PIL.Image.open(path)), not {type(image).__name__}")
    if not (isinstance(model, torch.nn.Module) and hasattr(model, "detect_objects")):  # SSD300, or one wrapped
        raise TypeError(f"model: an SSD300 from load_model(), not {type(model).__name__}")
    if min(image.size) < 1:
        raise UserError(f"an empty image ({image.width}x{image.height} pixels)")
    classes = class_names(model.label_map)
    if min_score is None:
        min_score = getattr(model, "min_score", TUTORIAL_MIN_SCORE)
    elif is_real(min_score):
        min_score = parse_min_score([min_score], classes, "min_score")
    elif isinstance(min_score, (list, tuple)) and all(is_real(v) for v in min_score):
        min_score = parse_min_score(list(min_score), classes, "min_score")
    else:
        raise TypeError(f"min_score: a number, or one per class, not {min_score!r}")
    max_overlap = getattr(model, "max_overlap", TUTORIAL_MAX_OVERLAP) if max_overlap is None else max_overlap
    max_overlap = parse_max_overlap(max_overlap, "max_overlap")
    for name, value in (("top_k", top_k), ("batch_size", 1 if batch_size is None else batch_size)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not 1 <= value <= 10**5:
            raise UserError(f"{name} must be an integer from 1 to 100,000, not {value!r}")
    return min_score, max_overlap


def is_real(value):
    """A number (Python's or NumPy's, not a bool)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def default_batch_size(device):
    return 16 if device.type == "cuda" else 1  # on a CPU one at a time is the fastest per image


# ---------------------------------------------------------------------------------------------
# Test-time augmentation: the model also sees the image flipped (and transposed), and the predictions of each view are
# mapped back to the image and averaged, prior by prior, before decoding and NMS. The priors form a grid that every
# flip and the transpose map onto itself (a prior of aspect ratio a onto one of 1/a), so each view's prior j' answers
# for a prior j of the image, and its offsets map back exactly: a horizontal flip negates g_cx, a vertical one g_cy, a
# transpose swaps (g_cx, g_cy) and (g_w, g_h). Averaging over the views makes the result the same for the image flipped
# in any of those ways.
# ---------------------------------------------------------------------------------------------

_VIEWS = [(h, v, t) for t in (False, True) for v in (False, True) for h in (False, True)]  # (hflip, vflip, transpose)
TTA_VIEWS = {"off": _VIEWS[:1], "h": _VIEWS[:2], "hv": _VIEWS[:4], "d4": _VIEWS}  # 1, 2, 4 or 8 forward passes


def flip_view(images, view):
    """images (..., H, W) flipped horizontally, vertically, then transposed, as view (hflip, vflip, transpose) says."""
    hflip, vflip, transpose = view
    if hflip:
        images = images.flip(-1)
    if vflip:
        images = images.flip(-2)
    return images.transpose(-1, -2) if transpose else images


@functools.lru_cache(maxsize=None)
def prior_permutation(view, device="cpu"):
    """(P,) for each prior of the image, the prior of the flipped view (hflip, vflip, transpose) that lies where
    the view puts it: from the layout of model.create_prior_boxes (map by map, row by row, column by column, the
    boxes of a location in ASPECT_RATIOS' order after the extra square), where a horizontal flip takes column j
    of a d x d map to d-1-j, a vertical one row i to d-1-i, and a transpose swaps row and column and a box of
    aspect ratio a with that of 1/a."""
    hflip, vflip, transpose = view
    index, offset = [], 0
    for d, ratios in zip(FMAP_DIMS, ASPECT_RATIOS):
        kinds = [1., 1., *ratios[1:]]  # a location's boxes: ratio 1, the extra square, the others
        inverse = torch.tensor([k if k < 2 else 2 + [math.isclose(1 / r, q) for q in ratios[1:]].index(True)
                                for k, r in enumerate(kinds)])
        i, j, k = torch.meshgrid(torch.arange(d), torch.arange(d), torch.arange(len(kinds)), indexing="ij")
        j = d - 1 - j if hflip else j
        i = d - 1 - i if vflip else i
        i, j, k = (j, i, inverse[k]) if transpose else (i, j, k)
        index.append(offset + ((i * d + j) * len(kinds) + k).flatten())
        offset += d * d * len(kinds)
    return torch.cat(index).to(device)


def unflip_predictions(locs, probs, view):
    """A flipped view's locs (N, P, 4) and class probabilities (N, P, C) -> those of the image, prior by prior."""
    index = prior_permutation(view, locs.device)
    locs, probs = locs[:, index], probs[:, index]
    hflip, vflip, transpose = view
    if transpose:
        locs = locs[..., [1, 0, 3, 2]]
    sign = locs.new_tensor([-1. if hflip else 1., -1. if vflip else 1., 1., 1.])
    return locs * sign, probs


# ---------------------------------------------------------------------------------------------
# The command line: many files, read in worker processes while the model runs
# ---------------------------------------------------------------------------------------------

def get_args_parser():
    p = argparse.ArgumentParser("detect.py", description="Detect and count blood cells in images.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders of images")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="checkpoint.pt written by train.py (default: the "
                   "shipped model, trained on BCCD), or its export by export.py (.onnx, .xml: faster on a CPU)")
    p.add_argument("--output-dir", default="detections", help="annotated images, counts.csv and detections.json go here")
    p.add_argument("--min-score", default=None, metavar="S", help="keep detections scoring above this: 0.5 for every "
                   "class, RBC=0.35,WBC=0.25 for the classes named (the others keep their default), or 0.35,0.25,0.3 "
                   "one per class in the model's order (default: the thresholds recorded in the checkpoint, chosen for "
                   f"counting on a validation split; else the tutorial's {TUTORIAL_MIN_SCORE})")
    p.add_argument("--max-overlap", type=float, default=None, help="NMS: suppress boxes overlapping a better one by more "
                   f"(IoU) (default: the checkpoint's, else the tutorial's {TUTORIAL_MAX_OVERLAP})")
    p.add_argument("--top-k", type=int, default=TOP_K, help="keep at most this many detections per image (per window "
                   "of a tiled image)")
    p.add_argument("--tile", default="auto", help="auto: cut images more than 1.25 times as wide or tall as the "
                   "training field (x --scale) into overlapping windows of its size; off: resize every image whole; "
                   "WxH: windows of W x H pixels")
    p.add_argument("--scale", type=float, default=None, help="cells appear this many times as large as in BCCD "
                   "(default 1: as large); the windows follow")
    p.add_argument("--rbc-width", type=float, default=None, metavar="PX", help="or: a red cell is about PX pixels "
                   f"wide (BCCD's median: {RBC_WIDTH}); sets --scale PX/{RBC_WIDTH}; a slide: its own um/px if none")
    p.add_argument("--max-pixels", type=int, default=None, metavar="N", help="read a JPEG or PNG of up to N pixels "
                   "whole, beyond PIL's limit (about 6 bytes a pixel of memory); slides and pyramidal TIFFs need not")
    p.add_argument("--batch-size", type=int, default=None, help="images or windows per forward pass (default: 16 on "
                   "CUDA; 1 on a CPU, where it is the fastest per image)")
    p.add_argument("--workers", type=int, default=None, help="processes reading images while the model runs (default: "
                   "2 on CUDA; 0 on a CPU, whose cores the model already uses)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on with CUDA, and on CPUs with AMX or an AMD CPU's AVX512-BF16, by "
                   "their features, never a timing: misc.bf16_choice)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True, help="take up a run that stopped "
                   "in --output-dir (Ctrl-C, a kill, a power loss) where it stopped, if its settings are these; "
                   "--no-resume counts every image again")
    p.add_argument("--save-labels", choices=FORMATS, default=None, help="also write the boxes as pre-annotations to "
                   "correct in LabelImg, CVAT or Label Studio, in labels/ of --output-dir (labels.py)")
    p.add_argument("--tta", choices=tuple(TTA_VIEWS), default=None, help="test-time augmentation: also run the model "
                   "on each image flipped horizontally (h: 2x the time), vertically too (hv: 4x), or transposed too "
                   "(d4: 8x), and average the predictions (default: the checkpoint's record, else off)")
    return p


def check_args(args):
    if args.min_score is not None:
        parse_min_score(args.min_score)  # the form and the numbers; the classes once the model is known
    if args.max_overlap is not None:
        parse_max_overlap(args.max_overlap)
    if not 1 <= args.top_k <= 10**5 or (args.batch_size is not None and not 1 <= args.batch_size <= 10**5):
        raise UserError("--top-k and --batch-size must be 1 to 100,000")
    check_workers(args.workers)
    flag_reading(BCCD_FIELD, args.tile, args.scale, args.rbc_width, args.max_pixels)  # the checkpoint's field: later


def say_errors(errors):
    for e in errors:
        print(f"detect.py: error: {e}", file=sys.stderr)


def detect_files(args):
    """The command line's run: every image of args.inputs counted, and the output folder written (files.Results), a
    stopped run taken up. Returns {"images": counted by this run, "seconds", "precision", "output_dir"} (bench.py)."""
    check_args(args)
    check_writable_folder(args.output_dir)
    device = resolve_device(device_flag(args.device, args.checkpoint))
    model = load_model(args.checkpoint, device, tta=args.tta)
    amp, why = bf16_choice(device) if args.amp is None else (args.amp, "--amp" if args.amp else "--no-amp")
    precision = "bf16" if amp else "fp32"
    if is_export(args.checkpoint):  # its runtime runs it as exported, whatever --amp says
        precision, why = f"{model.metadata.get('precision')} ({model.runtime})", "as exported"
    classes = class_names(model.label_map)
    min_score = model.min_score if args.min_score is None else parse_min_score(args.min_score, classes,
                                                                                  default=model.min_score)
    max_overlap = model.max_overlap if args.max_overlap is None else args.max_overlap
    tiles, cells = flag_reading(model.field, args.tile, args.scale, args.rbc_width, args.max_pixels)
    batch_size = args.batch_size or default_batch_size(device)
    paths, missing, repeats, outputs = find_images(args.inputs, skip=args.output_dir)
    if not paths:
        raise UserError(f"{missing[0]}: no such file or folder" if missing else
                        f"no images found in {' '.join(map(printable, args.inputs))}")
    settings = {"model_sha256": sha256(args.checkpoint), "classes": classes, "max_overlap": max_overlap,
                "min_score": min_score if isinstance(min_score, list) else [min_score] * len(classes),
                "top_k": args.top_k, "tiling": tiles, "tta": model.tta, "precision": precision, "device": device.type,
                "batch_size": batch_size}  # a stopped run is taken up with the same only
    report = Report(args.output_dir, classes, min_score,
                    report_settings(args, model, min_score, max_overlap, tiles, device, (precision, why)), len(paths))
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")  # any file name prints, whatever the terminal's encoding
    errors = [f"{printable(m)}: no such file or folder" for m in missing]  # all said at the end (or when interrupted)
    with Results(args.output_dir, classes, model.rev_label_map, report, settings, args.resume, args.save_labels) as results:
        names = results.start(paths)
        todo = [i for i, p in enumerate(paths) if printable(p) not in results.done]
        results.say_start(paths, repeats, outputs)
        start = time.perf_counter()
        run = functools.partial(predict, model, min_score=min_score, max_overlap=max_overlap, top_k=args.top_k, amp=amp)
        workers = args.workers if args.workers is not None else (2 if device.type == "cuda" else 0)
        images = ImageFiles.read([paths[i] for i in todo], tiles, workers, errors, cells)  # slides: slides.py
        try:
            for (k, image, windows), boxes, labels, scores in in_batches(run, images, tiles, batch_size, max_overlap):
                pil, drawn, about = drawable(image, boxes)  # a slide's overview, downscaled; else the image
                annotated = annotate(pil, drawn, labels, scores, model.rev_label_map, model.label_color_map)
                failed = results.add(paths[todo[k]], names[todo[k]], annotated, len(windows or [None]), boxes, labels,
                                     scores, about)
                if failed:  # counted all the same, and said at the end
                    errors.append(f"the annotated image {printable(str(failed))}")
        except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: run_cli says this in one line, after the errors
            say_errors(errors)
            raise type(stop)(f"{'terminated' if isinstance(stop, Terminated) else 'interrupted'} after "
                             f"{len(results.done) + results.n} of {len(paths)} image(s){results.held()}") from None
    if results.n + len(results.done) == 0:  # every file was unreadable
        say_errors(errors[:-1])
        raise UserError(f"{errors[-1]}; no image could be read, nothing written")
    seconds = time.perf_counter() - start
    before = f" (and {len(results.done)} counted before)" if results.done else ""
    print(f"{results.n} image(s){before} in {seconds:.1f} s at min_score {format_min_score(min_score, classes)}, "
          f"max_overlap {max_overlap:g}; precision {precision}; results in {args.output_dir}")
    say_errors(errors)
    if errors:
        sys.exit(1)
    return {"images": results.n, "seconds": seconds, "precision": precision, "output_dir": args.output_dir}


def main(args):
    return detect_files(args)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
