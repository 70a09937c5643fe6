"""Detect and count blood cells in images (tutorial, "Inference").

    $ python detect.py img/                  # count cells with the shipped model (weights/ssd300_bccd.pt)
    $ python detect.py --checkpoint runs/ssd300/checkpoint.pt smear1.jpg smears/ --output-dir detections
    $ python detect.py --checkpoint runs/ssd300/checkpoint.pt scan-4k.jpg --rbc-width 160   # red cells ~160 px wide

Writes, in --output-dir, each image annotated with its detections, counts.csv (image, then one
column per class of the checkpoint: RBC, WBC, Platelets for BCCD; UTF-8; a name a spreadsheet would take for
a formula, = + - @ first, gets a leading ': spreadsheet_text) and detections.json (boxes
in pixels of the original image, labels, scores), and prints the counts. Takes image files and folders (searched recursively); any image PIL opens works,
whatever its mode, bit depth, EXIF orientation or size. A file that cannot be read is reported and
skipped; the exit status is then 1.

The model sees 300x300 pixels. An image much larger than the field it was trained on (BCCD's
640x480) is cut into overlapping windows of that field's size (x --scale, for cells that appear
larger or smaller than in BCCD), which go through the model in batches, and their detections are
merged into one set for the image (tile_windows, merge_windows); --tile off resizes every image whole.

counts.csv and detections.json are written as the images are done: a run that is interrupted (Ctrl-C,
SIGTERM) or fails keeps what it finished. So is report.html, a page to review the run in a browser
(report.py): totals, every image with its counts and thumbnail (in thumbnails/), and the detections close to
the threshold. Where an earlier run's files are, the three are written as counts.partial.csv,
detections.partial.json and report.partial.html, and replace the earlier ones only when the run ends whole.

From Python, as in the tutorial:
    from PIL import Image
    from detect import detect, detect_image, load_model
    model = load_model()                     # the shipped model; or load_model("runs/ssd300/checkpoint.pt")
    detect(Image.open("smear.jpg"), model=model).show()   # at the model's counting thresholds
    boxes, labels, scores = detect_image(Image.open("scan-4k.jpg"), model, scale=1.5)  # boxes in pixels
"""

import argparse
import csv
import functools
import json
import math
import numbers
import os
import re
import sys
import time
import warnings
from typing import NamedTuple

import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps
from torch.utils.data import DataLoader, Dataset

from misc import (Terminated, UserError, bf16_is_fast, check_workers, check_writable, ignore_stop_signals,
                  format_min_score, load_checkpoint, lock_folder, parse_max_overlap, parse_min_score,
                  remove_stale_temporaries, resolve_device, run_cli, save_image_atomic, stop_signals_held)
from export import device_flag, is_export, load_export  # after misc, which checks torch and torchvision first
from model import ASPECT_RATIOS, FMAP_DIMS, SSD300
from report import REPORT, THUMBNAILS, Report, thumbnail_name
from utils import class_names, find_intersection, image_extensions, normalize, pil_to_tensor, resize, resize_placement

from torchvision.ops import batched_nms, box_area  # after misc, which says in one line when it does not fit torch

# The model that ships with the project (README, "The shipped model"): used when no checkpoint is given
DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "ssd300_bccd.pt")
# The tutorial's detection thresholds, used for checkpoints that record no counting thresholds of their own
TUTORIAL_MIN_SCORE, TUTORIAL_MAX_OVERLAP = 0.2, 0.5


# ---------------------------------------------------------------------------------------------
# The tutorial's path, top to bottom: load_model -> preprocess -> predict -> annotate -> detect_image -> detect
# ---------------------------------------------------------------------------------------------

def load_model(checkpoint=None, device="cpu", tta=None, ema=False):
    """The model of a train.py checkpoint (default: the shipped model), on `device`, ready for inference (eval mode,
    BatchNorm folded); or of an export.py export (.onnx, .xml), an export.ExportedSSD300 on the CPU.

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
    amp: bf16 autocast (default: where it is fast, misc.bf16_is_fast). With test-time augmentation (model.tta,
    set by load_model: see TTA_VIEWS) the predictions of each flipped view are mapped back and averaged."""
    device = next(model.parameters()).device
    amp = bf16_is_fast(device) if amp is None else amp
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    images = normalize(images.to(device, non_blocking=True, memory_format=memory_format))
    views = TTA_VIEWS[getattr(model, "tta", "off")]
    locs, probs = 0, 0
    for view in views:
        x = flip_view(images, view)
        if any(view):
            x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            view_locs, view_scores = model(x)  # (N, P, 4), (N, P, C)
        if len(views) == 1:
            return view_locs, view_scores
        view_locs, view_probs = unflip_predictions(view_locs.float(), view_scores.float().softmax(-1), view)
        locs, probs = locs + view_locs, probs + view_probs
    return locs / len(views), (probs / len(views)).log()  # detect_objects' softmax of log(p) is p


# ---------------------------------------------------------------------------------------------
# Test-time augmentation: the model also sees the image flipped (and transposed), and the
# predictions of each view are mapped back to the image and averaged, prior by prior, before
# decoding and NMS. The priors form a grid that every flip and the transpose map onto itself
# (a prior of aspect ratio a onto one of 1/a), so each view's prior j' answers for a prior j of
# the image, and its offsets map back exactly: a horizontal flip negates g_cx, a vertical one
# g_cy, a transpose swaps (g_cx, g_cy) and (g_w, g_h). Averaging over the views makes the result
# the same for the image flipped in any of those ways.
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


def predict(model, images, min_score=0.2, max_overlap=0.5, top_k=200, amp=None, channels_last=True):
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


def detect_image(image, model, min_score=None, max_overlap=None, top_k=200, tile="auto", scale=1.0, amp=None,
                 batch_size=None):
    """Detect cells in a PIL image of any size: (boxes (n, 4) in pixels of the image, labels (n,), scores (n,)),
    CPU tensors, by decreasing score.

    An image more than 1.25 times as wide or as tall as the field the model was trained on (model.field, x
    scale) is cut into overlapping windows of that size, run through the model batch_size at a time, and
    their detections merged (tile_windows, merge_windows); a smaller one is resized whole, as in the tutorial.
    tile: 'auto', 'off' or a window (width, height) / 'WxH'. scale: cells appear this many times as large
    as in the training images (rbc_scale converts a red cell's width in pixels). top_k: per model input (per
    window when tiled).
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
    windows, inputs = prepare(pil_to_tensor(image), tiles)
    (_, boxes, labels, scores), = detect_windows(model, [(None, image.size, windows, inputs)], tiles,
                                                 batch_size or default_batch_size(device), min_score, max_overlap,
                                                 top_k, amp)
    return boxes, labels, scores


def detect(original_image, min_score=None, max_overlap=None, top_k=200, *, model, amp=None, tile="auto", scale=1.0):
    """Detect cells in a PIL image and return it annotated (the tutorial's detect()).

    model: from load_model(). min_score (one value or one per class) and max_overlap default to the model's
    counting thresholds. Returns a new PIL image with one colour per class, label and score. A large image
    is tiled (tile, scale: see detect_image).
    """
    boxes, labels, scores = detect_image(original_image, model, min_score, max_overlap, top_k, tile, scale, amp)
    return annotate(original_image, boxes, labels, scores, model.rev_label_map, model.label_color_map)


# ---------------------------------------------------------------------------------------------
# Helpers of that path: counting thresholds, the Python API's arguments, boxes in pixels
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


def to_pixels(boxes, width, height):
    return boxes * boxes.new_tensor([width, height, width, height])


# ---------------------------------------------------------------------------------------------
# Large images: windows of the training field, through the model in batches, merged back
# ---------------------------------------------------------------------------------------------

# Tiling large images (see tile_windows and merge_windows). Sizes are pixels of a BCCD field, measured on BCCD's 364
# annotations (4,888 objects; every image 640x480); at --scale S they are S times as many pixels of the image. A model
# trained on another field sees it at 300x300 too: cells are taken to fill the same share of it as of BCCD's.
BCCD_FIELD = (640, 480)  # the field a checkpoint's model was trained on when the checkpoint does not record it
LARGEST_CELL = 338  # the widest BCCD object (a WBC of 338x251 px in BloodImage_00352); the tallest is 286 px
RBC_WIDTH = 106  # the median width of BCCD's 3,166 red cells that the image border does not cut (all 4,155: 105)
EDGE_MARGIN = 8  # a box edge this close to a window edge touches it: predicted edges scatter by a few pixels
# overlap of neighbouring windows: a cell up to LARGEST_CELL wide lies, in some window, EDGE_MARGIN away from its edges
OVERLAP = LARGEST_CELL + 2 * EDGE_MARGIN
TILE_ABOVE = 1.25  # an image wider or taller than this many windows is tiled; smaller ones are resized whole, as before
MAX_WINDOWS = 4096  # the windows of an image are held at once (300x300x3 bytes each: 1.1 GB at this many)
COVERED = 0.5  # a cut box with this much of its area inside another box of its class is a part of that cell


class Tiling(NamedTuple):
    """Windows of `window` (width, height) pixels whose neighbours overlap by at least `overlap` pixels; a box
    within `margin` pixels of a window edge inside the image is cut by it."""
    window: tuple
    overlap: int
    margin: float


def check_scale(scale, flag=None):
    if not (isinstance(scale, (int, float)) and 0.1 <= scale <= 100):
        raise UserError(f"{flag or '--scale ' + repr(scale)}: cells must be 0.1 to 100 times as large as BCCD's (red "
                        f"cells {RBC_WIDTH / 10:g} to {RBC_WIDTH * 100:g} px wide)")


def tiling(field, tile="auto", scale=1.0):
    """How to cut images for a model trained on images of `field` (width, height): a Tiling, or None (tile 'off').

    tile: 'auto' (windows of the field x scale), 'off', or a window (width, height), also as the text 'WxH'.
    scale: cells appear this many times as large as in the training images (see rbc_scale); with a window
    given, the scale is the larger of its ratios to the field. The overlap and the edge margin grow with
    the scale, as cells do. Bad values raise a one-line UserError.
    """
    check_scale(scale)
    given = tile
    if isinstance(tile, str) and tile not in ("auto", "off"):
        m = re.fullmatch(r"(\d+)x(\d+)", tile.strip().lower())
        tile = (int(m[1]), int(m[2])) if m else None
    if tile not in ("auto", "off") and not (isinstance(tile, (tuple, list)) and len(tile) == 2
                                            and all(isinstance(v, int) and v >= 1 for v in tile)):
        raise UserError(f"--tile must be auto, off or WIDTHxHEIGHT in pixels (e.g. 1280x960), not {given!r}")
    if tile == "off":
        return None
    if tile == "auto":
        window = (round(field[0] * scale), round(field[1] * scale))
    elif scale != 1:
        raise UserError("give a window (--tile WxH) or a scale (--scale, --rbc-width), not both")
    else:
        window = tuple(tile)
        scale = max(window[0] / field[0], window[1] / field[1])
    share = field_share(field)
    overlap = math.ceil(OVERLAP * share * scale)
    if overlap >= min(window):
        raise UserError(f"windows of {window[0]}x{window[1]} px must be larger than their overlap, {overlap} px (the "
                        f"largest BCCD cell and two edge margins, {OVERLAP} px of a BCCD field, at scale {scale:.3g})")
    return Tiling(window, overlap, EDGE_MARGIN * share * scale)


def field_share(field):
    """Pixels of a training field (width, height) per pixel of BCCD's: cells fill the same share of it."""
    return min(field[0] / BCCD_FIELD[0], field[1] / BCCD_FIELD[1])


def rbc_scale(rbc_width, field=BCCD_FIELD):
    """The scale at which a red cell is rbc_width pixels wide, for a model trained on images of `field`."""
    return rbc_width / (RBC_WIDTH * field_share(field))


def window_starts(length, size, overlap):
    """Where windows of `size` start along an image side of `length`, neighbours overlapping by >= `overlap`.

    The fewest windows that do, evenly spread: the first at 0, the last flush with the far border, the
    steps differing by at most a pixel. A side no longer than a window gets one window, centred on it.
    """
    if length <= size:
        return [-((size - length) // 2)]
    n = math.ceil((length - size) / (size - overlap)) + 1
    return [i * (length - size) // (n - 1) for i in range(n)]


def tile_windows(width, height, tiles):
    """The windows (x_min, y_min, x_max, y_max) of a width x height image, or None if it is resized whole.

    The rule: an image more than TILE_ABOVE times as wide or as tall as a window is tiled (an image of the
    training field's size, or up to 1.25 times it, is resized whole as before: the plain path shrinks its
    cells by at most a fifth); so is one that fits neither way round (a field turned on its side, 480x640 for
    BCCD's 640x480, is resized whole too). Along each side, window_starts. On a side shorter than a window (a long,
    narrow image) the window reaches past the image, and resize() fills the outside with the ImageNet mean,
    like training's zoom-out: cells keep their size. More than MAX_WINDOWS windows is a UserError.
    """
    if tiles is None:
        return None
    (w, h), overlap = tiles.window, tiles.overlap
    if max(width, height) <= TILE_ABOVE * max(w, h) and min(width, height) <= TILE_ABOVE * min(w, h):
        return None
    xs, ys = window_starts(width, w, overlap), window_starts(height, h, overlap)
    if len(xs) * len(ys) > MAX_WINDOWS:
        raise UserError(f"{width}x{height} px would be cut into {len(xs) * len(ys):,} windows of {w}x{h} px, more than "
                        f"{MAX_WINDOWS:,}: give a larger --scale or --rbc-width, a larger --tile, or --tile off")
    return [(x, y, x + w, y + h) for y in ys for x in xs]


def prepare(image, tiles):
    """uint8 (3, H, W) -> (windows or None, the model's inputs uint8 (n, 3, 300, 300)): n windows of a tiled
    image, or the whole image resized (windows None), exactly as preprocess() does it."""
    _, h, w = image.shape
    windows = tile_windows(w, h, tiles)
    if windows is None:
        return None, preprocess(image)[None]
    no_boxes = image.new_zeros(0, 4, dtype=torch.float)
    return windows, torch.stack([resize(image, window, no_boxes)[0] for window in windows])


def owned_regions(windows):
    """The part of the image each window owns, (n, 4) as (x_min, y_min, x_max, y_max): up to the middle of its
    overlaps with its neighbours, and without bound on the image's borders. The regions tile the image."""
    bounds = []
    for axis in (0, 1):
        starts = sorted({w[axis] for w in windows})
        size = windows[0][axis + 2] - windows[0][axis]
        middles = [(a + b + size) / 2 for a, b in zip(starts[1:], starts)]  # of each overlap
        lo, hi = dict(zip(starts, [-math.inf] + middles)), dict(zip(starts, middles + [math.inf]))
        bounds.append([(lo[w[axis]], hi[w[axis]]) for w in windows])
    return torch.tensor([[x0, y0, x1, y1] for (x0, x1), (y0, y1) in zip(*bounds)])


def window_boxes_to_image(boxes, visible, placed, dims=(300, 300)):
    """The inverse of resize()'s box mapping: boxes (n, 4) fractional in a resized window -> pixels of the image.

    visible, placed: (n, 4) each, every box's window's resize_placement() (the visible part in image pixels,
    where it landed in output pixels). Boxes are clipped to the visible part: a box over the canvas around
    it becomes narrower, or empty.
    """
    out_h, out_w = dims
    size = boxes.new_tensor([out_w, out_h, out_w, out_h])
    scale = (visible[:, 2:] - visible[:, :2]) / (placed[:, 2:] - placed[:, :2])  # (n, 2) image pixels per output pixel
    pixels = (boxes * size - placed) * scale.repeat(1, 2) + visible
    return torch.minimum(torch.maximum(pixels, visible[:, :2].repeat(1, 2)), visible[:, 2:].repeat(1, 2))


def merge_windows(boxes, labels, scores, windows, image_size, margin, max_overlap):
    """One image's detections from those of its windows: (boxes (n, 4) in pixels of the image, labels (n,),
    scores (n,)), by decreasing score.

    boxes, labels, scores: lists over the windows, as detect_objects gives them (boxes fractional).
    1. Boxes go back to pixels of the image (the inverse of resize's mapping), clipped to it; a box on the
       canvas around an image narrower than a window is dropped.
    2. Each window owns the middle of the image it shares with its neighbours (owned_regions), and a box
       counts only from the window that owns its centre (give or take `margin`): every place is counted
       from one window, as a BCCD field is counted once, and a false detection that some windows make
       there counts no more often. Neighbours overlap by more than a cell, so a cell up to LARGEST_CELL
       whose centre a window owns lies whole in it, at least `margin` away from its edges.
    3. A box within `margin` of a window edge that lies inside the image is cut. A cut box is dropped
       when a whole box of its class, or a larger cut one, holds COVERED of its area: of the parts of a
       cell larger than the overlap, which no window sees whole, the largest is kept. The image's border
       cuts nothing: cells there are cut by the image, as in BCCD, which annotates them.
    4. Class-wise NMS at max_overlap across windows: a cell whose centre two windows claim (where their
       regions meet) is counted once.
    """
    counts = torch.tensor([len(b) for b in boxes])
    frac, labels, scores = torch.cat(boxes).float().cpu(), torch.cat(labels).cpu(), torch.cat(scores).cpu()
    placements = [resize_placement(window, image_size) for window in windows]
    visible, placed = (torch.tensor([p[k] for p in placements], dtype=torch.float).repeat_interleave(counts, 0)
                       for k in (0, 1))  # (K, 4) each: every box's window's
    pixels = window_boxes_to_image(frac, visible, placed)  # (K, 4)
    win = torch.tensor(windows, dtype=torch.float).repeat_interleave(counts, 0)  # (K, 4)
    owned = owned_regions(windows).repeat_interleave(counts, 0)  # (K, 4)
    on_image = (pixels[:, 2:] > pixels[:, :2]).all(1)
    pixels, labels, scores, win, owned = (x[on_image] for x in (pixels, labels, scores, win, owned))
    centre = (pixels[:, :2] + pixels[:, 2:]) / 2
    keep = ((centre >= owned[:, :2] - margin) & (centre <= owned[:, 2:] + margin)).all(1)
    interior = torch.cat([win[:, :2] > 0, win[:, 2:] < win.new_tensor(image_size)], 1)  # (K, 4) edges inside the image
    near = torch.cat([pixels[:, :2] < win[:, :2] + margin, pixels[:, 2:] > win[:, 2:] - margin], 1)
    cut = (interior & near).any(1)  # (K,)
    area = box_area(pixels)
    rank = torch.empty(len(area), dtype=torch.long)
    rank[torch.argsort(area, descending=True, stable=True)] = torch.arange(len(area))  # larger boxes first
    by_x = torch.argsort(pixels[:, 0])  # every box q, in order of x_min, may drop a cut box d that it meets
    x_min, widest = pixels[by_x, 0], (pixels[:, 2] - pixels[:, 0]).max() if len(pixels) else 0
    owned_cut = (keep & cut).nonzero().squeeze(1)
    for d in owned_cut.split(1024) if len(owned_cut) else ():
        q = by_x[torch.searchsorted(x_min, pixels[d, 0].min() - widest):
                 torch.searchsorted(x_min, pixels[d, 2].max(), right=True)]
        inside = find_intersection(pixels[d], pixels[q]) >= COVERED * area[d, None]  # (d, q)
        by = ~cut[None, q] | (rank[None, q] < rank[d, None])  # a whole box, or a larger cut one
        keep[d] = ~(inside & by & (labels[d, None] == labels[q])).any(1)
    idx = keep.nonzero().squeeze(1)
    idx = idx[batched_nms(pixels[idx], scores[idx], labels[idx], max_overlap)]  # by decreasing score
    return pixels[idx], labels[idx], scores[idx]


def detect_windows(model, items, tiles, batch_size=1, min_score=0.2, max_overlap=0.5, top_k=200, amp=None):
    """Detections for a stream of prepared images, whose windows go through the model batch_size at a time
    (those of consecutive images share batches: an image of the training field's size is one window).

    items: iterable of (key, (width, height), windows, inputs) with (windows, inputs) from prepare(image, tiles).
    Yields (key, boxes (n, 4) in pixels of the image, labels (n,), scores (n,)) for each item, in order. top_k
    applies to each model input: an image resized whole, or a window.
    """
    waiting, queue, done = [], [], ([], [], [])  # images not yet yielded; inputs not yet run; outputs per input

    def run(n):
        dets = predict(model, torch.stack(queue[:n]), min_score, max_overlap, top_k, amp)
        del queue[:n]
        for store, outputs in zip(done, dets):
            store.extend(x.cpu() for x in outputs)

    def finished():
        while waiting and len(done[0]) >= (1 if waiting[0][2] is None else len(waiting[0][2])):
            key, (width, height), windows = waiting.pop(0)
            n = 1 if windows is None else len(windows)
            boxes, labels, scores = (d[:n] for d in done)
            for d in done:
                del d[:n]
            if windows is None:  # resized whole, as the tutorial does
                yield key, to_pixels(boxes[0], width, height), labels[0], scores[0]
            else:
                yield key, *merge_windows(boxes, labels, scores, windows, (width, height), tiles.margin, max_overlap)

    for key, size, windows, inputs in items:
        waiting.append((key, size, windows))
        queue.extend(inputs.unbind(0))
        while len(queue) >= batch_size:
            run(batch_size)
            yield from finished()
    if queue:
        run(len(queue))
    yield from finished()


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
    p.add_argument("--top-k", type=int, default=200, help="keep at most this many detections per image (per window "
                   "of a tiled image)")
    p.add_argument("--tile", default="auto", help="auto: cut images more than 1.25 times as wide or tall as the "
                   "training field (x --scale) into overlapping windows of its size; off: resize every image whole; "
                   "WxH: windows of W x H pixels")
    p.add_argument("--scale", type=float, default=None, help="cells appear this many times as large as in BCCD "
                   "(default 1: as large); the windows follow")
    p.add_argument("--rbc-width", type=float, default=None, metavar="PX", help="or: a red cell is about PX pixels "
                   f"wide (BCCD's median: {RBC_WIDTH}); sets --scale PX/{RBC_WIDTH}")
    p.add_argument("--batch-size", type=int, default=None, help="images or windows per forward pass (default: 16 on "
                   "CUDA; 1 on a CPU, where it is the fastest per image)")
    p.add_argument("--workers", type=int, default=None, help="processes reading images while the model runs (default: "
                   "2 on CUDA; 0 on a CPU, whose cores the model already uses)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on with CUDA, and on CPUs with native bf16 where it is faster: misc.bf16_is_fast)")
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
    if args.scale is not None and args.rbc_width is not None:
        raise UserError("give --scale or --rbc-width, not both")
    if (args.scale is not None or args.rbc_width is not None) and args.tile != "auto":
        raise UserError(f"--scale and --rbc-width set the windows of --tile auto; with --tile {args.tile} they have no use")
    tile_settings(args, BCCD_FIELD)  # the checkpoint's own field is checked once it is loaded


def tile_settings(args, field):
    """The Tiling of the command line's --tile, --scale and --rbc-width, for a model trained on `field`."""
    if args.rbc_width is None:
        return tiling(field, args.tile, 1.0 if args.scale is None else args.scale)
    check_scale(rbc_scale(args.rbc_width, field), f"--rbc-width {args.rbc_width:g}")
    return tiling(field, args.tile, rbc_scale(args.rbc_width, field))


def find_images(inputs, skip=None):
    """Expand files and folders (recursively, linked folders too) into a sorted list of image paths, each file once (a
    file given twice, or also inside a folder given, is counted once); returns (paths, missing inputs, number of
    repeats left out). skip: a folder whose files are left out of the folders searched (the output folder: its
    annotated images)."""
    paths, missing, seen, repeats = [], [], set(), 0
    skip = os.path.realpath(skip) if skip else None
    for item in inputs:
        if os.path.isdir(item):
            found, walked = [], {os.path.realpath(item), skip}
            for root, dirs, files in os.walk(item, followlinks=True):
                kept = []
                for d in sorted(dirs):  # a folder already walked (a link back up: a loop) is not walked again
                    real = os.path.realpath(os.path.join(root, d))
                    if real not in walked:
                        walked.add(real)
                        kept.append(d)
                dirs[:] = kept
                found += sorted(os.path.join(root, f) for f in files if os.path.splitext(f)[1].lower() in image_extensions())
        elif os.path.exists(item):  # a file; a pipe or device is reported when read (ImageFiles)
            found = [item]
        else:
            missing.append(item)
            continue
        for path in found:
            key = os.path.realpath(path)
            repeats += key in seen
            if key not in seen:
                seen.add(key)
                paths.append(path)
    return paths, missing, repeats


def open_image(path_or_file):
    """Open an image upright (EXIF orientation applied) as a uint8 RGB tensor (3, H, W). Images above PIL's
    decompression-bomb limit (twice 89 megapixels) are refused by PIL; its warning below that is not printed: a
    large scan is what tiling is for."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path_or_file) as im:
            return pil_to_tensor(ImageOps.exif_transpose(im))


class ImageFiles(Dataset):
    """Reads and prepares image files (prepare(image, tiles)); an unreadable file yields its error message instead."""

    def __init__(self, paths, tiles=None):
        self.paths = paths
        self.tiles = tiles

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        path = self.paths[i]
        if not os.path.isfile(path) and os.path.exists(path):  # a pipe or a device: opening it could wait for ever
            return i, None, f"{path}: not a regular file (a pipe, socket or device), not an image"
        try:
            image = open_image(path)
        except Exception as e:  # PIL raises many kinds: report and go on
            return i, None, f"{path}: cannot read image ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
        try:
            return i, image, prepare(image, self.tiles)
        except UserError as e:  # too many windows
            return i, None, f"{path}: {e}"

    @staticmethod
    def collate_fn(batch):
        return batch


def output_names(paths, reserved=("counts.csv", "detections.json")):
    """A distinct output file name for every input, whatever the folders and names: the input's name (.jpg, .jpeg
    and .png kept, other formats saved as .png), with _1, _2, ... when it is taken (names compared ignoring case,
    for case-insensitive file systems), and shortened to stay within the file systems' 255 bytes."""
    names, taken = [], {n.casefold() for n in reserved}
    for p in paths:
        stem, ext = os.path.splitext(os.path.basename(p))
        ext = ext.lower() if ext.lower() in (".jpg", ".jpeg", ".png") else ".png"
        while len(os.fsencode(stem)) > 200:  # room for a counter and the extension
            stem = stem[:-1]
        name, n = stem + ext, 0
        while name.casefold() in taken:
            n += 1
            name = f"{stem}_{n}{ext}"
        taken.add(name.casefold())
        names.append(name)
    return names


CONTROL_CHARACTERS = {c: f"\\x{c:02x}" for c in [*range(32), 127]}


def printable(path):
    """A path as text that any UTF-8 file or terminal takes, on one line: bytes that are not UTF-8 (on Linux a
    file name may hold any) and control characters (a newline, a tab) shown as \\xNN, as `ls -b` does."""
    return os.fsencode(path).decode("utf-8", "backslashreplace").translate(CONTROL_CHARACTERS)


# What a run writes beside the annotated images, and where it writes them while the folder holds an earlier run's
PARTIAL = {"counts.csv": "counts.partial.csv", "detections.json": "detections.partial.json", REPORT: "report.partial.html"}


def spreadsheet_text(text):
    """A counts.csv cell as text: one that starts as a formula does (= + - @, a tab or a return) gets a leading
    apostrophe, which Excel and LibreOffice read as "text" rather than running the formula (a file named
    =HYPERLINK(...).jpg)."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def earlier_outputs(folder):
    """The names of the annotated images that earlier detect.py runs wrote in `folder`, as their detections.json
    (and detections.partial.json) record them, also when a run was killed before closing the list."""
    outputs = set()
    for name in ("detections.json", PARTIAL["detections.json"]):
        if not os.path.isfile(os.path.join(folder, name)):  # a pipe there would block open() for ever
            continue
        try:
            with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        for candidate in (text, text.rstrip().rstrip(",") + "\n]"):
            try:
                records = json.loads(candidate)
            except (ValueError, RecursionError):  # damaged, or nested deeper than Python's stack
                continue
            if isinstance(records, list):
                outputs |= {r["output"] for r in records if isinstance(r, dict) and isinstance(r.get("output"), str)}
            break
    return outputs


class Results:
    """The output folder of a run: the annotated images, counts.csv and detections.json, written as the images are
    done (each row flushed), so that an interrupted or failing run keeps what it finished, and report.html (a
    report.Report, with its thumbnails) refreshed as they are. A context manager:

        with Results(folder, classes, rev_label_map, report) as results:   # locks the folder, if it is there
            results.add(...)   # the first image creates the folder (locked)

    An earlier run's counts.csv, detections.json and report.html are never replaced by a partial one: where they
    are, the run writes counts.partial.csv, detections.partial.json and report.partial.html (PARTIAL), moved onto
    them only when it ends whole; a run that stops (an error, Ctrl-C, SIGTERM) leaves them beside the earlier
    ones. Annotated images are replaced as they are done. Leaving the block closes detections.json as a JSON list
    and writes report.html's last page ("ended early" after an error or an interruption) however the run ends (a
    kill, SIGKILL, leaves detections.json without its closing bracket and the page as last written; counts.csv
    stays whole up to its last row) and releases the lock: a second detect.py writing into the folder at the same
    time is refused."""

    def __init__(self, folder, classes, rev_label_map, report=None):
        self.folder, self.classes, self.rev_label_map, self.n = folder, classes, rev_label_map, 0
        self.report = report  # report.html (a report.Report), kept up to date beside the two files; None: none
        self.lock = self.counts = self.detections = None
        self.names = {name: name for name in PARTIAL}  # where each file goes during the run (PARTIAL when staged)

    @property
    def staged(self):
        return self.names == PARTIAL

    def held(self):
        """Where the images finished so far are recorded, for a run that stops."""
        if not self.n:
            return ""
        if self.staged:
            return (f"; {PARTIAL['counts.csv']} and {PARTIAL['detections.json']} in {self.folder} hold those (the "
                    f"earlier run's counts.csv, detections.json and report.html are kept)")
        return f"; counts.csv and detections.json in {self.folder} hold those"

    def __enter__(self):
        if os.path.isdir(self.folder):
            self._lock()
        return self

    def __exit__(self, kind, error, traceback):
        try:
            if self.counts is not None:
                self.close(quiet=error is not None)  # a run already ending with an error says that one
        finally:
            if self.lock is not None:
                os.close(self.lock)

    def _lock(self):
        self.lock = lock_folder(self.folder, f"--output-dir {self.folder}: another detect.py is writing there; wait "
                                             f"for it or choose another folder")

    def _open(self):
        try:
            os.makedirs(self.folder, exist_ok=True)
            if self.lock is None:
                self._lock()
            if any(os.path.lexists(os.path.join(self.folder, name)) for name in PARTIAL):  # an earlier run's
                self.names = PARTIAL
                if self.report is not None:
                    self.report.name = PARTIAL[REPORT]
            for name in (self.names["counts.csv"], self.names["detections.json"]):  # a link is replaced, not written through
                if os.path.islink(os.path.join(self.folder, name)):
                    os.remove(os.path.join(self.folder, name))
            self.counts = open(os.path.join(self.folder, self.names["counts.csv"]), "w", encoding="utf-8", newline="")
            self.detections = open(os.path.join(self.folder, self.names["detections.json"]), "w", encoding="utf-8")
            remove_stale_temporaries(self.folder, (REPORT, PARTIAL[REPORT]))  # a killed run's half page (locked)
        except OSError as e:
            raise UserError(f"--output-dir {self.folder}: cannot write {e.filename or 'there'} ({e.strerror or e})") from None
        self.csv = csv.writer(self.counts, lineterminator="\n")
        self.csv.writerow(["image", *map(spreadsheet_text, self.classes)])
        self.counts.flush()
        self.detections.write("[")

    def add(self, path, name, annotated, windows, boxes, labels, scores):
        """One image: its annotated copy (a PIL image) saved as `name`, a row of counts.csv and a record of
        detections.json (boxes in pixels). Returns (its counts per class, the UserError that kept its annotated
        image from being written or None: it is counted all the same)."""
        if self.counts is None:
            self._open()
        try:  # an interrupted save leaves no half image, and a link there is replaced, not written through
            save_image_atomic(annotated, os.path.join(self.folder, name), quality=90)
            if self.report is not None:
                self.report.thumbnail(name, annotated)
            failed = None
        except UserError as e:
            failed = e
        n = torch.bincount(labels, minlength=len(self.classes) + 1).tolist()[1:]
        record = {"image": printable(path), "output": printable(name), "width": annotated.width,
                  "height": annotated.height, "windows": windows, "boxes": [[round(v, 1) for v in b] for b in boxes.tolist()],
                  "labels": [self.rev_label_map[l] for l in labels.tolist()],
                  "scores": [round(s, 4) for s in scores.tolist()]}
        try:
            self.csv.writerow([spreadsheet_text(printable(path)), *n])
            self.counts.flush()
            self.detections.write(("," if self.n else "") + "\n" + json.dumps(record, ensure_ascii=False))
            self.detections.flush()
        except OSError as e:  # a full disk: what was written before stays readable
            raise UserError(f"--output-dir {self.folder}: cannot write {self.names['counts.csv']} and "
                            f"{self.names['detections.json']} ({e.strerror or e}); they hold the first {self.n} "
                            f"image(s)") from None
        self.n += 1
        if self.report is not None:
            self.report.add(record["image"], name, n, record["labels"], scores.tolist())
        return n, failed

    def close(self, quiet=False):
        """Ends detections.json as a JSON list and writes report.html's last page (quiet: the run ends early, with an
        error, and the page says so); a write that fails (a full disk) is a UserError unless quiet. A run that
        ends whole replaces the earlier run's three files with its own (and removes a stopped run's)."""
        failed = None
        for f, end in ((self.detections, "\n]\n"), (self.counts, "")):
            try:
                f.write(end)
                f.close()
            except OSError as e:
                failed = failed or e
        if self.report is not None:
            self.report.close(ended_early=quiet, quiet=quiet or failed is not None)  # failed: that error is said
        if failed and not quiet:
            raise UserError(f"--output-dir {self.folder}: cannot finish {self.names['detections.json']} "
                            f"({failed.strerror or failed}); {self.names['counts.csv']} holds the {self.n} image(s)")
        if quiet or failed:
            return
        try:
            with stop_signals_held():  # the three files belong together
                for name in ("detections.json", "counts.csv", REPORT):  # the page last: it shows the other two
                    path, partial = os.path.join(self.folder, name), os.path.join(self.folder, PARTIAL[name])
                    if os.path.lexists(partial):
                        os.replace(partial, path) if self.staged else os.remove(partial)  # else a stopped run's, older
        except OSError as e:
            raise UserError(f"--output-dir {self.folder}: cannot move {e.filename} into place ({e.strerror or e})") from None


def report_settings(args, model, min_score, max_overlap, tiles, device, amp):
    """What report.html says of a run: {label: text}."""
    classes = class_names(model.label_map)
    command = " ".join(printable(a) for a in sys.argv)  # a long list of files: its start
    return {"model": f"{printable(os.path.abspath(args.checkpoint))} (classes {', '.join(classes)}; trained on "
                     f"{model.field[0]}x{model.field[1]} px fields)",
            "min_score": format_min_score(min_score, classes), "max_overlap": f"{max_overlap:g}", "top_k": args.top_k,
            "tiling": "off: every image resized whole" if tiles is None else
                      f"windows of {tiles.window[0]}x{tiles.window[1]} px overlapping by {tiles.overlap} px, for "
                      f"images more than {TILE_ABOVE:g} times as wide or tall",
            "device": f"{device}, bf16 autocast {'on' if amp else 'off'}",
            "command": command if len(command) <= 200 else f"{command[:200]} ... ({len(sys.argv) - 1} arguments)",
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def detect_files(args):
    check_args(args)
    check_writable(args.output_dir, "--output-dir", folder=True, create=False)  # created at the first image detected
    for name in (*PARTIAL, *PARTIAL.values()):  # no folder, device or pipe where they go
        check_writable(os.path.join(args.output_dir, name), "--output-dir", create=False)
    device = resolve_device(device_flag(args.device, args.checkpoint))
    amp = bf16_is_fast(device) if args.amp is None else args.amp
    model = load_model(args.checkpoint, device, tta=args.tta)
    classes = class_names(model.label_map)
    min_score = model.min_score if args.min_score is None else parse_min_score(args.min_score, classes,
                                                                                  default=model.min_score)
    max_overlap = model.max_overlap if args.max_overlap is None else args.max_overlap
    tiles = tile_settings(args, model.field)
    paths, missing, repeats = find_images(args.inputs, skip=args.output_dir)
    if not paths:
        raise UserError(f"{missing[0]}: no such file or folder" if missing else
                        f"no images found in {' '.join(map(printable, args.inputs))}")
    names = output_names(paths)
    inputs = {os.path.realpath(p) for p in paths}
    clash = next((n for n in names if os.path.realpath(os.path.join(args.output_dir, n)) in inputs), None)
    if clash:
        raise UserError(f"--output-dir {args.output_dir}: writing {printable(clash)} there would overwrite an input "
                        f"image; choose another folder")
    ours = earlier_outputs(args.output_dir)
    foreign = next((p for n in names if printable(n) not in ours  # an annotated image, or its thumbnail
                    for p in (n, os.path.join(THUMBNAILS, thumbnail_name(n)))
                    if os.path.lexists(os.path.join(args.output_dir, p))), None)
    if foreign:
        raise UserError(f"--output-dir {args.output_dir}: {printable(foreign)} is there and no earlier detect.py wrote "
                        f"it; the annotated image would replace it: choose another folder")
    thumbnails = os.path.join(args.output_dir, THUMBNAILS)
    if os.path.lexists(thumbnails) and (os.path.islink(thumbnails) or not os.path.isdir(thumbnails)):
        raise UserError(f"--output-dir {args.output_dir}: {THUMBNAILS} there is not a folder (report.html's "
                        f"thumbnails go in it); remove it or choose another folder")

    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")  # any file name prints, whatever the terminal's encoding
    errors = [f"{printable(m)}: no such file or folder" for m in missing]  # all said at the end (or when interrupted)
    if repeats:
        print(f"note: {repeats} input file(s) given more than once; each is counted once")

    workers = args.workers if args.workers is not None else (2 if device.type == "cuda" else 0)
    loader = DataLoader(ImageFiles(paths, tiles), batch_size=None, num_workers=workers,
                        collate_fn=ImageFiles.collate_fn, worker_init_fn=ignore_stop_signals)

    def readable():  # an unreadable file is skipped and reported at the end
        for i, image, prepared in loader:
            if image is None:
                errors.append(printable(prepared))
            else:
                yield (i, image, prepared[0]), (image.shape[2], image.shape[1]), *prepared

    def say_errors(errors):
        for e in errors:
            print(f"{get_args_parser().prog}: error: {e}", file=sys.stderr)

    width = max([len("image")] + [len(printable(p)) for p in paths])
    print(f"{'image':<{width}}  " + "  ".join(f"{name:>9}" for name in classes), flush=True)
    start = time.perf_counter()
    report = Report(args.output_dir, classes, min_score,
                    report_settings(args, model, min_score, max_overlap, tiles, device, amp), len(paths))
    with Results(args.output_dir, classes, model.rev_label_map, report) as results:
        try:
            for (i, image, windows), boxes, labels, scores in detect_windows(
                    model, readable(), tiles, args.batch_size or default_batch_size(device), min_score, max_overlap,
                    args.top_k, amp):
                pil = Image.fromarray(image.permute(1, 2, 0).numpy())
                annotated = annotate(pil, boxes, labels, scores, model.rev_label_map, model.label_color_map)
                n, failed = results.add(paths[i], names[i], annotated, 1 if windows is None else len(windows), boxes,
                                        labels, scores)
                if failed:  # counted all the same, and said at the end
                    errors.append(f"the annotated image {printable(str(failed))}")
                print(f"{printable(paths[i]):<{width}}  "
                      + "  ".join(f"{c:>{max(9, len(name))}}" for c, name in zip(n, classes)), flush=True)
        except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: run_cli says this in one line, after the errors
            say_errors(errors)
            raise type(stop)(f"{'terminated' if isinstance(stop, Terminated) else 'interrupted'} after {results.n} of "
                             f"{len(paths)} image(s){results.held()}") from None
    if results.n == 0:  # every file was unreadable
        say_errors(errors[:-1])
        raise UserError(f"{errors[-1]}; no image could be read, nothing written")
    seconds = time.perf_counter() - start
    print(f"{results.n} image(s) in {seconds:.1f} s at min_score {format_min_score(min_score, classes)}, max_overlap "
          f"{max_overlap:g}; results in {args.output_dir}")
    say_errors(errors)
    if errors:
        sys.exit(1)


def main(args):
    detect_files(args)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
