"""Tiling: how detect.py cuts an image larger than the model's training field into overlapping windows, and merges
the windows' detections back into one set for the image.

    from tiling import BCCD_FIELD, tiling, tile_windows
    tile_windows(1920, 1440, tiling(BCCD_FIELD))   # the 12 windows (x_min, y_min, x_max, y_max) of a 1920x1440 scan

The model sees 300x300 pixels. An image much larger than the field it was trained on (BCCD's 640x480) is cut into
windows of that field's size (x --scale, for cells that appear larger or smaller than in BCCD), overlapping by more
than the largest cell, so that every cell lies whole in some window (tile_windows). Each window goes through the
model as an image of the field would; the boxes go back to pixels of the image, each place of the image is counted
from the one window that owns it, cells cut by a window's edge give way to the whole cell, and NMS across windows
counts a cell two windows claim once (merge_windows). Checked without a model in tests/test_tiling.py.
"""
import collections
import itertools
import math
import re
from typing import NamedTuple

import torch

from misc import UserError
from utils import find_intersection, resize, resize_placement

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
# a slide's windows are read one at a time (slides.py), only their boxes kept: at this many (18 boxes a window), the
# boxes take about 280 MB and merge_windows 8 s and 370 MB more: with the model, under 2 GB (docs/large-images.md)
MAX_STREAMED_WINDOWS = 100_000
NMS_AT_ONCE = 4000  # merge_windows: more boxes than this go through local_nms (torchvision's CPU NMS is quadratic)
COVERED = 0.5  # a cut box with this much of its area inside another box of its class is a part of that cell


class Tiling(NamedTuple):
    """Windows of `window` (width, height) pixels whose neighbours overlap by at least `overlap` pixels; a box
    within `margin` pixels of a window edge inside the image is cut by it."""
    window: tuple
    overlap: int
    margin: float


def check_scale(scale, flag=None):
    if not (isinstance(scale, (int, float)) and 0.1 * (1 - 1e-9) <= scale <= 100 * (1 + 1e-9)):  # 10.6 / 106 < 0.1
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


def flag_tiling(field, tile="auto", scale=None, rbc_width=None):
    """The Tiling of detect.py's --tile, --scale and --rbc-width (None where not given), for a model trained on
    images of `field`; a bad value, or a pair that does not go together, is a one-line UserError."""
    if scale is not None and rbc_width is not None:
        raise UserError("give --scale or --rbc-width, not both")
    if (scale is not None or rbc_width is not None) and tile != "auto":
        raise UserError(f"--scale and --rbc-width set the windows of --tile auto; with --tile {tile} they have no use")
    if rbc_width is None:
        return tiling(field, tile, 1.0 if scale is None else scale)
    check_scale(rbc_scale(rbc_width, field), f"--rbc-width {rbc_width:g}")
    return tiling(field, tile, rbc_scale(rbc_width, field))


class Reading(NamedTuple):
    """How detect.py reads an image that PIL does not read whole (a slide: slides.py). field: the model's training
    field; rbc_width: a red cell's width in pixels of full resolution, from --rbc-width or --scale (None: a slide's
    microns per pixel, else BCCD's); auto: --tile auto (else a slide is cut at full resolution into the --tile
    windows); max_pixels: --max-pixels, the most pixels of a plain image read whole (None: PIL's limit)."""
    field: tuple = BCCD_FIELD
    rbc_width: float = None
    auto: bool = True
    max_pixels: int = None


def flag_reading(field, tile="auto", scale=None, rbc_width=None, max_pixels=None):
    """detect.py's --tile, --scale, --rbc-width and --max-pixels, checked (a one-line UserError): (the Tiling of an
    image, flag_tiling's; the Reading of a slide or of an image beyond PIL's limit)."""
    tiles = flag_tiling(field, tile, scale, rbc_width)
    if max_pixels is not None and max_pixels < 1:
        raise UserError(f"--max-pixels must be a positive number of pixels, not {max_pixels}")
    if rbc_width is None and scale is not None:
        rbc_width = scale * RBC_WIDTH * field_share(field)
    return tiles, Reading(tuple(field), rbc_width, tile == "auto", max_pixels)


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


def tile_windows(width, height, tiles, limit=MAX_WINDOWS):
    """The windows (x_min, y_min, x_max, y_max) of a width x height image, or None if it is resized whole.

    The rule: an image more than TILE_ABOVE times as wide or as tall as a window is tiled (an image of the
    training field's size, or up to 1.25 times it, is resized whole as before: the plain path shrinks its
    cells by at most a fifth); so is one that fits neither way round (a field turned on its side, 480x640 for
    BCCD's 640x480, is resized whole too). Along each side, window_starts. On a side shorter than a window (a long,
    narrow image) the window reaches past the image, and resize() fills the outside with the ImageNet mean,
    like training's zoom-out: cells keep their size. More than `limit` windows is a UserError (MAX_WINDOWS: they
    are held at once; a slide's are read one by one, MAX_STREAMED_WINDOWS).
    """
    if tiles is None:
        return None
    (w, h), overlap = tiles.window, tiles.overlap
    if max(width, height) <= TILE_ABOVE * max(w, h) and min(width, height) <= TILE_ABOVE * min(w, h):
        return None
    xs, ys = window_starts(width, w, overlap), window_starts(height, h, overlap)
    if len(xs) * len(ys) > limit:
        fixes = "a larger --tile, or --tile off" if limit == MAX_WINDOWS else "or a larger --tile"  # not a slide
        raise UserError(f"{width}x{height} px would be cut into {len(xs) * len(ys):,} windows of {w}x{h} px, more than "
                        f"{limit:,}: give a larger --scale or --rbc-width, {fixes}")
    return [(x, y, x + w, y + h) for y in ys for x in xs]


def prepare(image, tiles):
    """uint8 (3, H, W) -> (windows or None, the model's inputs uint8 (n, 3, 300, 300)): the n windows of a tiled
    image, or the whole image resized (windows None), exactly as detect.preprocess does it."""
    _, h, w = image.shape
    windows = tile_windows(w, h, tiles)
    no_boxes = image.new_zeros(0, 4, dtype=torch.float)
    return windows, torch.stack([resize(image, window, no_boxes)[0] for window in windows or [(0, 0, w, h)]])


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
    from torchvision.ops import batched_nms, box_area  # here: misc checks first that torchvision fits torch
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
    a = 0 if image_size[0] >= image_size[1] else 1  # along the image's longer side (x for a landscape image)
    by_x = torch.argsort(pixels[:, a])  # every box q, in order of x_min, may drop a cut box d that it meets
    x_min, widest = pixels[by_x, a], (pixels[:, a + 2] - pixels[:, a]).max() if len(pixels) else 0
    owned_cut = (keep & cut).nonzero().squeeze(1)
    owned_cut = owned_cut[torch.argsort(pixels[owned_cut, a], stable=True)]  # neighbours: each chunk meets few boxes
    for d in owned_cut.split(1024) if len(owned_cut) else ():
        q = by_x[torch.searchsorted(x_min, pixels[d, a].min() - widest):
                 torch.searchsorted(x_min, pixels[d, a + 2].max(), right=True)]
        inside = find_intersection(pixels[d], pixels[q]) >= COVERED * area[d, None]  # (d, q)
        by = ~cut[None, q] | (rank[None, q] < rank[d, None])  # a whole box, or a larger cut one
        keep[d] = ~(inside & by & (labels[d, None] == labels[q])).any(1)
    idx = keep.nonzero().squeeze(1)
    nms = batched_nms if len(idx) <= NMS_AT_ONCE else local_nms  # the same boxes kept (up to ties of score)
    idx = idx[nms(pixels[idx], scores[idx], labels[idx], max_overlap)]  # by decreasing score
    return pixels[idx], labels[idx], scores[idx]


def local_nms(boxes, scores, labels, max_overlap, chunk=256):
    """torchvision's batched_nms for many boxes spread over a large image, without its quadratic cost: the indices
    (k,) of the boxes kept, by decreasing score (ties in the order given).

    The pairs of boxes of one label that overlap by more than max_overlap (IoU) are found chunk by chunk along the
    longer side (a box meets only those that start less than the widest box before it), and greedy NMS runs over
    those pairs alone, in order of score: a box kept suppresses its lower-scoring partners. A box no pair holds is
    kept, as NMS keeps it. Checked against batched_nms in tests/test_slides.py.
    """
    from torchvision.ops import box_iou
    order = torch.argsort(scores, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    extent = boxes[:, 2:].amax(0) - boxes[:, :2].amin(0) if len(boxes) else boxes.new_zeros(2)
    a = 0 if extent[0] >= extent[1] else 1
    by = torch.argsort(boxes[:, a])
    starts, widest = boxes[by, a], (boxes[:, a + 2] - boxes[:, a]).max() if len(boxes) else 0
    pairs = [torch.zeros(0, 2, dtype=torch.long)]  # (higher-scoring, lower-scoring) box
    for d in by.split(chunk) if len(boxes) else ():
        q = by[torch.searchsorted(starts, boxes[d, a].min() - widest):
               torch.searchsorted(starts, boxes[d, a + 2].max(), right=True)]
        hit = (box_iou(boxes[d], boxes[q]) > max_overlap) & (labels[d, None] == labels[q]) & (rank[d, None] < rank[q])
        i, j = hit.nonzero().unbind(1)
        pairs.append(torch.stack([d[i], q[j]], 1))
    pairs = torch.cat(pairs)
    pairs = pairs[torch.argsort(rank[pairs[:, 0]], stable=True)]
    suppressed = bytearray(len(boxes))
    for i, j in pairs.tolist():  # each box's own suppression was settled by the higher-scoring pairs before it
        if not suppressed[i]:
            suppressed[j] = 1
    return order[~torch.frombuffer(suppressed, dtype=torch.bool)[order]] if len(boxes) else order


def to_pixels(boxes, width, height):
    """Boxes (n, 4) in fractions of an image resized whole -> pixels of the width x height image."""
    return boxes * boxes.new_tensor([width, height, width, height])


def in_batches(run, items, tiles, batch_size, max_overlap):
    """Detections for a stream of images whose model inputs go through the model batch_size at a time, those of
    consecutive images sharing batches (detect.py's command line, and a tiled image in detect.detect_image).

    run: uint8 (n, 3, 300, 300) -> a list over the n inputs of (boxes (k, 4) fractional, labels (k,), scores (k,)):
    detect.predict at the run's settings. items: iterable of (key, (width, height), windows, inputs), (windows,
    inputs) from prepare(image, tiles); inputs may also be an iterable of uint8 (3, 300, 300), taken one at a time (a
    slide's windows, read as the model goes: slides.py), and an item may end with (its Tiling, (x, y) pixels of the
    output per pixel of the image), for an image read at a level of a pyramid. Yields (key, boxes (k, 4) in pixels
    of the image (x that factor), labels (k,), scores (k,)) for each item, in order: an image resized whole as the
    tutorial does, a tiled one merged (merge_windows).
    """
    waiting, queue, outputs = collections.deque(), [], []  # images not yet yielded; inputs not yet run; their outputs
    for item in itertools.chain(items, [None]):
        if item is not None:
            waiting.append((*item[:3], *(item[4:] or [(tiles, (1, 1))])))
        inputs = () if item is None else item[3].unbind(0) if torch.is_tensor(item[3]) else item[3]
        for x in itertools.chain(inputs, [None]):  # None: the item's inputs are all queued
            if x is not None:
                queue.append(x)
            while queue and (len(queue) >= batch_size or item is None):
                batch, queue = torch.stack(queue[:batch_size]), queue[batch_size:]
                outputs += zip(*([t.cpu() for t in detections] for detections in run(batch)))
                while waiting and len(outputs) >= len(waiting[0][2] or [None]):
                    key, (width, height), windows, (level_tiles, factor) = waiting.popleft()
                    n = len(windows or [None])
                    (boxes, labels, scores), outputs = zip(*outputs[:n]), outputs[n:]
                    if windows is None:
                        boxes, labels, scores = to_pixels(boxes[0], width, height), labels[0], scores[0]
                    else:
                        boxes, labels, scores = merge_windows(boxes, labels, scores, windows, (width, height),
                                                              level_tiles.margin, max_overlap)
                    yield key, boxes if factor == (1, 1) else boxes * boxes.new_tensor(factor * 2), labels, scores
