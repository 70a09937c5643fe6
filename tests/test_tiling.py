"""Tiled detection of large images (tiling.py, used by detect.py): its geometry, checked without a trained model.

    python -m pytest tests/test_tiling.py -q

* The windows cover every image, evenly, the last flush with the border, neighbours overlapping enough
  that every cell up to BCCD's largest lies in some window away from its inner edges.
* Boxes go back from a window's fractions to pixels of the image exactly: the inverse of resize()'s own
  mapping, also for windows that reach past a narrow image.
* Merging, fed what a perfect detector sees in each window (every cell that shows, cut at the window's
  edge), gives every cell once with its exact box: cells straddling two or four windows, at the image
  border, in clumps, and cells larger than the overlap; nearly so when the boxes' edges scatter. Each
  place counts from the one window that owns it.
* End to end with a stand-in for the model that finds a bright rectangle: detect.main and detect_image
  find it once where it straddles windows, --batch-size is respected across images, and an image of
  BCCD's size gives the same detections, to the bit, as the plain resize path with the real network.
* Flags: one-line errors naming the value.
"""
import json
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_area, box_iou

import detect
from tiling import (BCCD_FIELD, EDGE_MARGIN, LARGEST_CELL, OVERLAP, TILE_ABOVE, Tiling, flag_tiling, merge_windows,
                    owned_regions, tile_windows, tiling, window_boxes_to_image, window_starts)
from datasets import median_image_size
from misc import UserError
from utils import find_intersection, label_map, resize, resize_placement

BCCD = tiling(BCCD_FIELD)  # windows of 640x480, overlap 354, margin 8


# ---------------------------------------------------------------------------------------------
# windows
# ---------------------------------------------------------------------------------------------

def test_bccd_tiling_constants():
    assert BCCD == Tiling((640, 480), LARGEST_CELL + 2 * EDGE_MARGIN, EDGE_MARGIN) and OVERLAP == 354
    assert tiling(BCCD_FIELD, "auto", 2) == Tiling((1280, 960), 708, 16)
    assert tiling(BCCD_FIELD, "1280x960") == Tiling((1280, 960), 708, 16)  # the same windows, given in pixels
    assert tiling((320, 240)) == Tiling((320, 240), 177, 4)  # another field: cells fill the same share of it
    assert tiling(BCCD_FIELD, "off") is None
    assert tiling(BCCD_FIELD, (1280, 960)) == tiling(BCCD_FIELD, " 1280X960 ")  # from Python too
    for bad in ((640.5, 480), (640,), "640x480x3", None):
        with pytest.raises(UserError, match="--tile must be auto, off or WIDTHxHEIGHT"):
            tiling(BCCD_FIELD, bad)
    with pytest.raises(UserError, match="not both"):
        tiling(BCCD_FIELD, (1280, 960), scale=2)


@pytest.mark.parametrize("size, overlap", [(640, 354), (480, 354), (1280, 708), (300, 299), (100, 1)])
def test_windows_cover_a_side_evenly_and_overlap_enough(size, overlap):
    rng = random.Random(size)
    for length in [1, size - 1, size, size + 1, 2 * size, 3 * size - 1] + [rng.randrange(1, 20 * size) for _ in range(200)]:
        starts = window_starts(length, size, overlap)
        if length <= size:  # one window, centred: it covers the side and reaches past both ends by the same (+-1)
            assert len(starts) == 1 and starts[0] <= 0 and starts[0] + size >= length
            assert abs(-starts[0] - (starts[0] + size - length)) <= 1
            continue
        assert starts[0] == 0 and starts[-1] + size == length  # the first at 0, the last flush with the border
        steps = np.diff(starts)
        assert (steps > 0).all() and (size - steps >= overlap).all(), (length, starts)
        assert steps.max() - steps.min() <= 1  # evenly spread
        assert (len(starts) - 2) * (size - overlap) < length - size  # one window fewer could not overlap enough


def test_an_image_is_tiled_only_when_wider_or_taller_than_the_rule():
    assert tile_windows(640, 480, BCCD) is None  # BCCD's size: resized whole, as before
    assert tile_windows(800, 600, BCCD) is None and TILE_ABOVE == 1.25
    assert tile_windows(100, 50, BCCD) is None and tile_windows(640, 480, None) is None
    assert tile_windows(480, 640, BCCD) is None and tile_windows(600, 800, BCCD) is None  # a field on its side
    assert len(tile_windows(601, 800, BCCD)) == 4 and tile_windows(480, 801, BCCD) is not None
    assert len(tile_windows(801, 480, BCCD)) == 2 and len(tile_windows(640, 601, BCCD)) == 2
    assert len(tile_windows(1280, 960, BCCD)) == 4 * 5
    assert tile_windows(1280, 960, tiling(BCCD_FIELD, "auto", 2)) is None  # one field at scale 2: resized whole
    assert tile_windows(1280, 960, tiling(BCCD_FIELD, "auto", 0.5)) is not None


@pytest.mark.parametrize("width, height, scale", [(1920, 1440, 1), (3000, 400, 1), (2561, 1921, 2), (1000, 700, 0.5)])
def test_windows_cover_the_image_and_see_every_cell_whole_somewhere(width, height, scale):
    tiles = tiling(BCCD_FIELD, "auto", scale)
    windows = torch.tensor(tile_windows(width, height, tiles))
    assert ((windows[:, 2:] - windows[:, :2]) == torch.tensor(tiles.window)).all()
    covered = torch.zeros(height, width, dtype=torch.bool)
    for x0, y0, x1, y1 in windows.tolist():
        covered[max(y0, 0):y1, max(x0, 0):x1] = True
    assert covered.all()
    # any cell up to the largest BCCD cell (at this scale) lies, in some window, at least the margin away from every
    # window edge inside the image: the window that sees it whole
    g = torch.Generator().manual_seed(0)
    size = torch.randint(1, math.floor(LARGEST_CELL * scale) + 1, (3000, 2), generator=g)
    corner = torch.rand(3000, 2, generator=g) * (torch.tensor([width, height]) - size + 1)
    cells = torch.cat([corner, corner + size], 1)  # (C, 4)
    m = tiles.margin
    x0, y0, x1, y1 = (windows[:, k][:, None].float() for k in range(4))  # (W, 1)
    inside = (((x0 <= 0) | (cells[:, 0] >= x0 + m)) & ((y0 <= 0) | (cells[:, 1] >= y0 + m)) &
              ((x1 >= width) | (cells[:, 2] <= x1 - m)) & ((y1 >= height) | (cells[:, 3] <= y1 - m)))  # (W, C)
    assert inside.any(0).all()


# ---------------------------------------------------------------------------------------------
# boxes back to the image
# ---------------------------------------------------------------------------------------------

def placements(windows, image_size, counts):
    visible, placed = zip(*(resize_placement(w, image_size) for w in windows))
    return (torch.tensor(p, dtype=torch.float).repeat_interleave(torch.tensor(counts), 0) for p in (visible, placed))


@pytest.mark.parametrize("width, height, scale", [(1920, 1440, 1), (3000, 400, 1), (801, 480, 1), (2000, 150, 2)])
def test_boxes_map_back_exactly_to_pixels_of_the_image(width, height, scale):
    windows = tile_windows(width, height, tiling(BCCD_FIELD, "auto", scale))
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    g = torch.Generator().manual_seed(1)
    fractions, originals, counts = [], [], []
    for x0, y0, x1, y1 in windows:  # random boxes in the visible part of each window
        lo = torch.tensor([max(x0, 0), max(y0, 0)], dtype=torch.float)
        hi = torch.tensor([min(x1, width), min(y1, height)], dtype=torch.float)
        a, b = (lo + torch.rand(20, 2, generator=g) * (hi - lo) for _ in range(2))
        boxes = torch.cat([torch.min(a, b), torch.max(a, b)], 1)
        fractions.append(resize(image, (x0, y0, x1, y1), boxes)[1])  # resize's own mapping, pixels -> fractions
        originals.append(boxes)
        counts.append(len(boxes))
    visible, placed = placements(windows, (width, height), counts)
    back = window_boxes_to_image(torch.cat(fractions), visible, placed)
    assert torch.allclose(back, torch.cat(originals), atol=1e-3, rtol=0)
    # a window inside the image is a plain affine map: pixel = window corner + fraction x window size
    inner = [k for k, (x0, y0, x1, y1) in enumerate(windows) if x0 >= 0 and y0 >= 0 and x1 <= width and y1 <= height]
    for k in inner:
        x0, y0, x1, y1 = windows[k]
        expected = torch.tensor([x0, y0, x0, y0]) + fractions[k] * torch.tensor([x1 - x0, y1 - y0] * 2)
        assert torch.allclose(back[sum(counts[:k]):sum(counts[:k + 1])], expected, atol=1e-3, rtol=0)
    assert inner or height < 480 * scale  # only a side shorter than a window has windows reaching past the image


# ---------------------------------------------------------------------------------------------
# merging, fed a perfect detector
# ---------------------------------------------------------------------------------------------

def perfect_detections(cells, labels, windows, image_size, miss=(), jitter=0., min_part=0., seed=0):
    """What a perfect detector reports in each window: every cell that shows in it, cut to the part that shows,
    as fractions of the window (resize's own mapping, which clips them to it), scored 0.9. miss: (window, cell)
    pairs left out. jitter: each box edge moves by a normal error of this fraction of the cell's size, drawn
    anew in every window (a worst case: a real model's views of one cell are alike). min_part: parts showing
    less of their cell's area than this are not reported."""
    width, height = image_size
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    g = torch.Generator().manual_seed(seed)
    boxes, out_labels, scores = [], [], []
    for k, (x0, y0, x1, y1) in enumerate(windows):
        shown = torch.cat([torch.max(cells[:, :2], torch.tensor([max(x0, 0), max(y0, 0)])),
                           torch.min(cells[:, 2:], torch.tensor([min(x1, width), min(y1, height)]))], 1).float()
        seen = ((shown[:, 2:] > shown[:, :2]).all(1) & (box_area(shown) >= min_part * box_area(cells)) &
                torch.tensor([(k, c) not in miss for c in range(len(cells))], dtype=torch.bool))
        shown = shown + torch.randn(len(shown), 4, generator=g) * jitter * (cells[:, 2:] - cells[:, :2]).repeat(1, 2)
        shown = torch.cat([torch.min(shown[:, :2], shown[:, 2:] - 1), shown[:, 2:]], 1)
        boxes.append(resize(image, (x0, y0, x1, y1), shown[seen])[1])
        out_labels.append(labels[seen])
        scores.append(torch.full((int(seen.sum()),), 0.9))
    return boxes, out_labels, scores


def random_cells(image_size, scale, n, seed):
    """n cells of BCCD's sizes (RBC-, WBC- and platelet-like, up to the largest) at random places, no two with IoU
    above 0.3 (a clump, not one cell)."""
    g = torch.Generator().manual_seed(seed)
    width, height = image_size
    cells, labels = [], []
    sizes = {1: (80, 130), 2: (150, LARGEST_CELL), 3: (25, 70)}
    while len(cells) < n:
        label = int(torch.randint(1, 4, (1,), generator=g))
        lo, hi = sizes[label]
        w, h = (torch.randint(round(lo * scale), round(hi * scale) + 1, (2,), generator=g)).tolist()
        x, y = int(torch.randint(0, width - w + 1, (1,), generator=g)), int(torch.randint(0, height - h + 1, (1,), generator=g))
        box = torch.tensor([[x, y, x + w, y + h]], dtype=torch.float)
        if cells and box_iou(box, torch.cat(cells)).max() > 0.3:
            continue
        cells.append(box)
        labels.append(label)
    return torch.cat(cells), torch.tensor(labels)


def assert_each_cell_once(merged_boxes, merged_labels, cells, labels):
    assert len(merged_boxes) == len(cells), (len(merged_boxes), len(cells))
    iou = box_iou(cells, merged_boxes)
    match = iou.argmax(1)
    assert sorted(match.tolist()) == list(range(len(cells)))  # a one-to-one match
    assert torch.allclose(merged_boxes[match], cells, atol=1e-3, rtol=0)  # with the exact boxes
    assert torch.equal(merged_labels[match], labels)


@pytest.mark.parametrize("width, height, scale, n", [(1280, 960, 1, 40), (1920, 1440, 1, 90), (2560, 1920, 2, 40),
                                                     (3000, 400, 1, 30), (1000, 700, 0.5, 40)])
def test_a_perfect_detector_counts_every_cell_once_with_its_box(width, height, scale, n):
    tiles = tiling(BCCD_FIELD, "auto", scale)
    windows = tile_windows(width, height, tiles)
    cells, labels = random_cells((width, height), scale, n, seed=width + n)
    boxes, labels_w, scores = perfect_detections(cells, labels, windows, (width, height))
    assert sum(len(b) for b in boxes) > 2 * len(cells)  # the cells show in several windows each, many of them cut
    merged = merge_windows(boxes, labels_w, scores, windows, (width, height), tiles.margin, max_overlap=0.5)
    assert_each_cell_once(*merged[:2], cells, labels)


@pytest.mark.parametrize("width, height", [(1920, 1440), (3840, 2160)])
def test_a_perfect_detector_with_noisy_boxes_still_counts_nearly_every_cell_once(width, height):
    # box edges off by 5 % of the cell's size, independently in every window: a cut part may then look whole, or a
    # whole cell's box touch a window's edge; merging must still count nearly every cell once. Parts of less than
    # a fifth of a cell, which a model would hardly call a cell, are left out
    windows = tile_windows(width, height, BCCD)
    cells, labels = random_cells((width, height), 1, width * height // 25_000, seed=width)  # 110 and 331 cells
    boxes, labels_w, scores = perfect_detections(cells, labels, windows, (width, height), jitter=0.05, min_part=0.2)
    merged_boxes, _, _ = merge_windows(boxes, labels_w, scores, windows, (width, height), BCCD.margin, 0.5)
    inside = find_intersection(merged_boxes, cells).max(1).values / box_area(merged_boxes)
    assert (inside > 0.5).all()  # every box is (mostly) within a cell
    found = box_iou(cells, merged_boxes).max(1).values > 0.5
    assert found.float().mean() > 0.99 and len(merged_boxes) <= 1.02 * len(cells), (len(merged_boxes), len(cells))


def test_a_cell_straddling_windows_is_kept_once_from_the_window_that_sees_it_whole():
    windows = tile_windows(1280, 960, BCCD)  # x starts 0, 213, 426, 640; y starts 0, 120, 240, 360, 480
    cells = torch.tensor([[600., 420, 700, 520],  # across the right edge of x-windows 0 and the bottom of y-windows 0-2
                          [0, 900, 60, 960],  # in the image's corner: cut by the image, not by a window
                          [900, 300, 900 + LARGEST_CELL, 300 + 286]])  # the largest BCCD cell
    labels = torch.tensor([1, 3, 2])
    boxes, labels_w, scores = perfect_detections(cells, labels, windows, (1280, 960))
    assert sum(len(b) for b in boxes) >= 12  # the first cell alone shows in 3 x 4 windows
    merged = merge_windows(boxes, labels_w, scores, windows, (1280, 960), BCCD.margin, max_overlap=0.5)
    assert_each_cell_once(*merged[:2], cells, labels)


def test_a_cell_cut_by_the_image_border_is_a_whole_cell_even_in_a_clump():
    # BCCD annotates the cells that the image's border cuts: that border is no window edge. Two overlapping red
    # cells, the smaller one cut by the image's left border, two thirds of it inside the other's box
    windows = tile_windows(1920, 1440, BCCD)
    cells, labels = torch.tensor([[0., 200, 60, 300], [20, 180, 140, 320]]), torch.tensor([1, 1])
    assert find_intersection(cells[:1], cells[1:]).item() / 6000 > 0.5 and box_iou(cells[:1], cells[1:]).item() < 0.5
    boxes, labels_w, scores = perfect_detections(cells, labels, windows, (1920, 1440))
    merged = merge_windows(boxes, labels_w, scores, windows, (1920, 1440), BCCD.margin, max_overlap=0.5)
    assert_each_cell_once(*merged[:2], cells, labels)


def test_each_place_is_counted_from_the_one_window_that_owns_it():
    # 1280x960: x-windows start at 0, 213, 426, 640 and y-windows at 0, 120, 240, 360, 480; window 0 owns
    # x <= (213 + 640) / 2 = 426.5 and y <= (120 + 480) / 2 = 300 (owned_regions tile the image)
    windows = tile_windows(1280, 960, BCCD)
    owned = owned_regions(windows)
    assert owned[0].tolist() == [-math.inf, -math.inf, 426.5, 300.0] and owned[-1].tolist() == [853.0, 660.0] + [math.inf] * 2
    inside = torch.max(torch.min(owned, torch.tensor([1280., 960] * 2)), torch.zeros(4))  # within the image
    overlaps = find_intersection(inside, inside)
    assert overlaps.diagonal().sum().item() == 1280 * 960 and overlaps.sum() == overlaps.diagonal().sum()
    # window 0 alone reports two things no other window does (a false detection, or a cell only it found): the one
    # whose centre it owns counts, as it would in a BCCD field; the one in a neighbour's region does not
    cells, labels = torch.tensor([[100., 100, 160, 160], [500, 350, 560, 410]]), torch.tensor([1, 1])
    boxes, labels_w, scores = perfect_detections(cells, labels, windows, (1280, 960),
                                                 miss={(k, c) for k in range(1, len(windows)) for c in (0, 1)})
    assert [len(b) for b in boxes[:2]] == [2, 0]
    merged_boxes, _, _ = merge_windows(boxes, labels_w, scores, windows, (1280, 960), BCCD.margin, 0.5)
    assert torch.allclose(merged_boxes, cells[:1], atol=1e-3, rtol=0)


@pytest.mark.parametrize("cell", [(580, 130, 1180, 590), (1000, 500, 1450, 880), (100, 1000, 700, 1440)])
def test_a_cell_larger_than_the_overlap_is_counted_once_from_its_largest_part(cell):
    # larger than the overlap (354 px): no window sees it whole, so all its parts are cut; the largest is kept
    windows = tile_windows(1920, 1440, BCCD)  # x starts 0, 256, ..., 1280; y starts 0, 120, ..., 960
    cells, labels = torch.tensor([cell], dtype=torch.float), torch.tensor([2])
    x0, y0, x1, y1 = cell
    assert not any(a <= x0 and b <= y0 and c >= x1 and d >= y1 for a, b, c, d in windows)
    boxes, labels_w, scores = perfect_detections(cells, labels, windows, (1920, 1440))
    parts = torch.cat(boxes) * 300
    merged_boxes, _, _ = merge_windows(boxes, labels_w, scores, windows, (1920, 1440), BCCD.margin, max_overlap=0.5)
    assert len(merged_boxes) == 1 and len(parts) >= 4
    largest = box_area(parts).max() * (640 / 300) * (480 / 300)
    assert box_area(merged_boxes)[0] == pytest.approx(largest.item(), rel=1e-4)
    assert (merged_boxes[0, :2] >= cells[0, :2] - 1e-3).all() and (merged_boxes[0, 2:] <= cells[0, 2:] + 1e-3).all()


def test_merging_nothing_gives_empty_tensors():
    windows = tile_windows(1280, 960, BCCD)
    empty = [torch.zeros(0, 4)] * len(windows), [torch.zeros(0, dtype=torch.long)] * len(windows), [torch.zeros(0)] * len(windows)
    boxes, labels, scores = merge_windows(*empty, windows, (1280, 960), BCCD.margin, 0.5)
    assert boxes.shape == (0, 4) and labels.shape == (0,) and scores.shape == (0,)


# ---------------------------------------------------------------------------------------------
# end to end, with a stand-in for the network
# ---------------------------------------------------------------------------------------------

DARK, BRIGHT = 40, 230


def bright_rectangle_image(size, rect):
    w, h = size
    a = np.full((h, w, 3), DARK, np.uint8)
    x0, y0, x1, y1 = rect
    a[y0:y1, x0:x1] = BRIGHT
    return Image.fromarray(a)


def bright_region_detector(calls):
    """Stands in for detect.predict: per input, one RBC box (score 0.9) around the pixels brighter than the
    middle grey, or nothing. Records the batch sizes in `calls`."""
    def predict(model, images, min_score=0.2, max_overlap=0.5, top_k=200, amp=True):
        calls.append(len(images))
        boxes, labels, scores = [], [], []
        for image in images:
            ys, xs = (image.float().mean(0) > (DARK + BRIGHT) / 2).nonzero(as_tuple=True)
            n = int(len(xs) > 0)
            boxes.append(torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()[None] / 300 if n
                         else torch.zeros(0, 4))
            labels.append(torch.full((n,), label_map["RBC"]))
            scores.append(torch.full((n,), 0.9))
        return boxes, labels, scores
    return predict


@pytest.fixture(scope="module")
def random_checkpoint(untrained_checkpoint):
    """conftest's untrained SSD300 (BatchNorm, BCCD priors, seed 0)."""
    return untrained_checkpoint


# (image size, scale, rectangle): across a vertical window edge, across the corner of four windows, on the
# image's border, in the middle of a narrow image's windows (which reach past it), twice the size at --scale 2
STRADDLING = [((1280, 960), None, (560, 200, 680, 300)), ((1920, 1440), None, (600, 400, 700, 510)),
              ((1920, 1440), None, (1850, 1300, 1920, 1440)), ((3000, 400), None, (1000, 150, 1100, 250)),
              ((2560, 1920), 2, (1120, 800, 1360, 1020))]


def test_detect_finds_a_rectangle_that_straddles_windows_once(tmp_path, random_checkpoint, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(detect, "predict", bright_region_detector(calls))
    for k, (size, scale, rect) in enumerate(STRADDLING):
        folder = tmp_path / f"in{k}"
        folder.mkdir()
        bright_rectangle_image(size, rect).save(folder / "smear.png")
        argv = [str(folder), "--checkpoint", str(random_checkpoint), "--output-dir", str(tmp_path / f"out{k}"),
                "--device", "cpu", "--batch-size", "3"] + (["--scale", str(scale)] if scale else [])
        calls.clear()
        detect.main(detect.get_args_parser().parse_args(argv))
        (record,) = json.loads((tmp_path / f"out{k}" / "detections.json").read_text())
        windows = tile_windows(*size, tiling(BCCD_FIELD, "auto", scale or 1))
        assert record["windows"] == len(windows) > 1 and sum(calls) == len(windows) and max(calls) == 3
        assert len(record["boxes"]) == 1, (size, rect, record["boxes"])
        tolerance = 1.5 + 2 * 640 * (scale or 1) / 300  # a pixel of the 300x300 input, either side
        assert record["boxes"][0] == pytest.approx(rect, abs=tolerance)
        with Image.open(tmp_path / f"out{k}" / "smear.png") as annotated:
            assert annotated.size == size


def test_windows_of_consecutive_images_share_batches(tmp_path, random_checkpoint, monkeypatch):
    calls = []
    monkeypatch.setattr(detect, "predict", bright_region_detector(calls))
    folder = tmp_path / "in"
    folder.mkdir()
    sizes = [(1280, 960), (640, 480), (1920, 1440), (300, 200)]  # 20, 1, 54, 1 windows
    for k, size in enumerate(sizes):
        bright_rectangle_image(size, (10, 10, 100, 100)).save(folder / f"{k}.png")
    args = detect.get_args_parser().parse_args([str(folder), "--checkpoint", str(random_checkpoint), "--output-dir",
                                                str(tmp_path / "out"), "--device", "cpu", "--batch-size", "8"])
    detect.main(args)
    records = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert [r["windows"] for r in records] == [20, 1, 54, 1]
    assert calls == [8] * 9 + [4]  # 76 inputs in full batches of 8, whatever image they come from
    assert all(r["boxes"] == [pytest.approx([10, 10, 100, 100], abs=1.5 + 2 * 640 / 300)] for r in records)


def test_an_image_of_bccd_size_gives_the_plain_paths_detections_to_the_bit(bccd_dir, random_checkpoint):
    model = detect.load_model(random_checkpoint)
    assert model.field == BCCD_FIELD  # an older checkpoint without the record
    path = sorted((bccd_dir / "JPEGImages").iterdir())[0]
    image = Image.open(path).convert("RGB")
    assert image.size == BCCD_FIELD
    x = detect.preprocess(detect.pil_to_tensor(image))[None]  # the path of the tutorial's detect(), as it was
    boxes, labels, scores = (d[0].cpu() for d in detect.predict(model, x, 0.1, 0.5, 200))
    plain = detect.to_pixels(boxes, *image.size), labels, scores
    assert len(labels) > 0
    for tile in ("auto", "off"):
        out = detect.detect_image(image, model, min_score=0.1, max_overlap=0.5, top_k=200, tile=tile)
        assert all(torch.equal(a, b) for a, b in zip(out, plain)), tile
    # a larger image is tiled, its windows run in batches: the same detections whatever the batch size
    big = Image.new("RGB", (1400, 500))
    big.paste(image, (0, 0))
    big.paste(image, (700, 20))
    one, three = (detect.detect_image(big, model, 0.1, batch_size=b) for b in (1, 3))
    assert len(one[0]) > 0 and all(torch.allclose(a.float(), b.float(), atol=1e-3) for a, b in zip(one, three))


def test_checkpoint_field_sets_the_windows(tmp_path, random_checkpoint):
    ckpt = torch.load(random_checkpoint, weights_only=True)
    torch.save({**ckpt, "field": [960, 720]}, tmp_path / "field.pt")
    model = detect.load_model(tmp_path / "field.pt")
    assert model.field == (960, 720)
    assert tiling(model.field) == Tiling((960, 720), 531, 12)  # BCCD's cells, at the same share of this field
    assert tile_windows(1200, 900, tiling(model.field)) is None  # <= 1.25 x the field: resized whole
    torch.save({**ckpt, "field": [640, "480"]}, tmp_path / "bad.pt")
    with pytest.raises(UserError, match=r"bad.pt: its 'field' must be \[width, height\]"):
        detect.load_model(tmp_path / "bad.pt")


def test_median_image_size_is_the_median_of_each_side(tmp_path):
    paths = []
    for k, size in enumerate([(10, 20), (30, 5), (20, 40), (640, 480), (25, 30)]):
        Image.new("RGB", size).save(tmp_path / f"{k}.png")
        paths.append(tmp_path / f"{k}.png")
    assert median_image_size(paths) == (25, 30)
    assert median_image_size(paths[:4]) == (20, 20)  # an even count: the lower median, a size that exists


# ---------------------------------------------------------------------------------------------
# flags
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--tile", "big"], "--tile must be auto, off or WIDTHxHEIGHT in pixels (e.g. 1280x960), not 'big'"),
    (["--tile", "0x480"], "not '0x480'"),
    (["--tile", "640x"], "not '640x'"),
    (["--tile", "1000x300"], "windows of 1000x300 px must be larger than their overlap, 554 px"),
    (["--scale", "0"], "--scale 0.0: cells must be 0.1 to 100 times as large as BCCD's"),
    (["--scale", "nan"], "--scale nan: cells must be"),
    (["--scale", "-2"], "--scale -2.0: cells must be"),
    (["--rbc-width", "5"], "--rbc-width 5: cells must be 0.1 to 100 times as large"),
    (["--scale", "2", "--rbc-width", "200"], "give --scale or --rbc-width, not both"),
    (["--scale", "2", "--tile", "off"], "with --tile off they have no use"),
    (["--rbc-width", "200", "--tile", "800x600"], "with --tile 800x600 they have no use")])
def test_tiling_flags_are_checked_with_one_line_errors(flags, message, tmp_path):
    args = detect.get_args_parser().parse_args(["x.jpg", "--checkpoint", str(tmp_path / "none.pt"), *flags])
    with pytest.raises(UserError) as e:
        detect.check_args(args)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_rbc_width_and_scale_give_the_same_windows():
    by_width = flag_tiling(BCCD_FIELD, "auto", rbc_width=212)
    by_scale = flag_tiling(BCCD_FIELD, "auto", scale=2)
    assert by_width == by_scale == tiling(BCCD_FIELD, "auto", 2)


def test_the_rbc_widths_the_message_allows_are_allowed():
    """--rbc-width 10.6 (the 0.1 the message names, 10.6 / 106 = 0.09999999999999999 in floats) and 10600 are taken;
    just beyond them is refused."""
    from misc import UserError
    from tiling import RBC_WIDTH, check_scale, rbc_scale
    for width in (RBC_WIDTH / 10, RBC_WIDTH * 100):
        check_scale(rbc_scale(width))
    for width in (RBC_WIDTH / 10.01, RBC_WIDTH * 100.1):
        with pytest.raises(UserError, match="cells must be 0.1 to 100 times"):
            check_scale(rbc_scale(width))
