"""Tests of BCCDDataset, the DataLoader helpers and the transforms (TRAIN augmentation, reproducibility).

    python -m pytest tests/test_datasets.py -q

Runs on the lists of the real BCCD where it is present (see conftest.py), otherwise on generated data.
"""
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as FT
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.ops import box_iou

import utils
from conftest import image_id, load_tool
from datasets import AugmentationSampler, BCCDDataset, EpochBatches
from create_data_lists import create_data_lists
from misc import UserError
from utils import IMAGENET_MEAN, IMAGENET_STD



@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Transforms run in DataLoader workers, which use one thread each; so do these tests. (Thousands of
    small ops: with two threads on a busy 2-core machine OpenMP's waits made them 30x slower.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def load_lists(folder, split):
    folder = Path(folder)
    return (json.loads((folder / f"{split}_images.json").read_text()),
            json.loads((folder / f"{split}_objects.json").read_text()))


def denormalize(image):
    """A transformed uint8 (3, H, W) -> [0, 1] RGB."""
    assert image.dtype == torch.uint8
    return image.float() / 255


def generator(seed):
    return torch.Generator().manual_seed(seed)


def draw_boxes(size, boxes, colors, background=30):
    """uint8 (3, H, W) of one grey level with each box (pixel-aligned ints) filled with its colour."""
    width, height = size
    image = torch.full((3, height, width), background, dtype=torch.uint8)
    for (x0, y0, x1, y1), color in zip(boxes, colors):
        image[:, y0:y1, x0:x1] = torch.tensor(color, dtype=torch.uint8)[:, None, None]
    return image


# ---------------------------------------------------------------------------------------------
# BCCDDataset
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("split", ["train", "TEST", "Test"])
def test_item_types_and_shapes(data_lists, split):
    dataset = BCCDDataset(data_lists, split)
    name = "TRAIN" if split.upper() == "TRAIN" else "TEST"
    _, objects = load_lists(data_lists, name)
    assert len(dataset) == len(objects)
    image, boxes, labels, difficulties = dataset[(0, 7)] if name == "TRAIN" else dataset[0]
    n = boxes.size(0)
    assert image.shape == (3, 300, 300) and image.dtype == torch.uint8
    assert boxes.shape == (n, 4) and boxes.dtype == torch.float32
    assert labels.shape == (n,) and labels.dtype == torch.int64
    assert difficulties.shape == (n,) and difficulties.dtype == torch.uint8
    assert 1 <= n <= len(objects[0]["boxes"]) and set(labels.tolist()) <= {1, 2, 3}
    if name == "TEST":
        assert n == len(objects[0]["boxes"]) and labels.tolist() == objects[0]["labels"]


def test_bad_split_is_refused(data_lists):
    with pytest.raises(ValueError, match="val"):
        BCCDDataset(data_lists, "val")


def test_missing_lists_are_a_user_error(tmp_path):
    with pytest.raises(UserError, match="create_data_lists"):
        BCCDDataset(tmp_path, "train")


def test_collate_fn_stacks_images_and_keeps_lists(data_lists):
    dataset = BCCDDataset(data_lists, "test")
    images, boxes, labels, difficulties = next(iter(DataLoader(dataset, batch_size=3, collate_fn=BCCDDataset.collate_fn)))
    assert images.shape == (3, 3, 300, 300)
    assert all(isinstance(x, list) and len(x) == 3 for x in (boxes, labels, difficulties))
    for k in range(3):
        item = dataset[k]
        assert torch.equal(images[k], item[0])
        assert torch.equal(boxes[k], item[1]) and torch.equal(labels[k], item[2]) and torch.equal(difficulties[k], item[3])


def test_keep_difficult(tiny_voc, tmp_path):
    test_image = image_id(4)  # the first TEST image of tiny_voc()
    objects = [{"name": "RBC", "box": [4, 4, 20, 20]}, {"name": "WBC", "box": [24, 8, 44, 40], "difficult": 1},
               {"name": "Platelets", "box": [48, 30, 60, 44], "difficult": None}]
    voc = tiny_voc(objects={test_image: objects})
    create_data_lists(voc, tmp_path / "lists", verbose=False)
    scale = torch.tensor([64., 48., 64., 48.])
    _, boxes, labels, difficulties = BCCDDataset(tmp_path / "lists", "test")[0]
    assert labels.tolist() == [1, 3] and difficulties.tolist() == [0, 0]
    assert torch.allclose(boxes, torch.tensor([objects[0]["box"], objects[2]["box"]]) / scale, atol=1e-6)
    _, boxes, labels, difficulties = BCCDDataset(tmp_path / "lists", "test", keep_difficult=True)[0]
    assert labels.tolist() == [1, 2, 3] and difficulties.tolist() == [0, 1, 0]
    assert torch.allclose(boxes, torch.tensor([o["box"] for o in objects]) / scale, atol=1e-6)


def test_test_transform_is_plain_resize(data_lists):
    """TEST = PIL bilinear resize to 300x300 (uint8); boxes divided by the image size."""
    dataset = BCCDDataset(data_lists, "test")
    images, objects = load_lists(data_lists, "TEST")
    for k in (0, len(dataset) - 1):
        image, boxes, labels, difficulties = dataset[k]
        with Image.open(images[k]) as im:
            size = im.size
            reference = FT.pil_to_tensor(im.convert("RGB").resize((300, 300), Image.BILINEAR))
        diff = (image.float() - reference.float()).abs()  # in grey levels
        assert diff.max() <= 1.01 and diff.mean() < 0.1, (diff.max(), diff.mean())
        expected = torch.tensor(objects[k]["boxes"]) / torch.tensor(size * 2, dtype=torch.float)
        assert torch.allclose(boxes, expected, atol=1e-6, rtol=0)
        assert labels.tolist() == objects[k]["labels"] and difficulties.tolist() == objects[k]["difficulties"]


# ---------------------------------------------------------------------------------------------
# TRAIN augmentation, statistically over seeds
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def noisy_sample():
    """A 160x120 noise image and five boxes (one the whole image, two at its borders), each with its own label."""
    image = torch.randint(0, 256, (3, 120, 160), dtype=torch.uint8, generator=generator(0))
    boxes = torch.tensor([[10., 10, 50, 40], [100, 60, 150, 110], [0, 0, 160, 120], [140, 0, 160, 15], [0, 100, 30, 120]])
    labels = torch.tensor([10, 11, 12, 13, 14])  # unique, so a kept box can be told apart
    difficulties = torch.tensor([0, 1, 0, 1, 0], dtype=torch.uint8)
    return image, boxes, labels, difficulties


def test_normalize_is_the_tutorials_normalization_of_uint8_batches():
    images = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    reference = torch.stack([FT.normalize(FT.to_tensor(FT.to_pil_image(im)), IMAGENET_MEAN, IMAGENET_STD) for im in images])
    assert torch.allclose(utils.normalize(images), reference, atol=1e-6)
    assert utils.normalize(images[0]).shape == (3, 5, 7)
    canvas = torch.tensor(utils.IMAGENET_MEAN_UINT8, dtype=torch.uint8)[:, None, None]
    assert utils.normalize(canvas).abs().max() < 0.01  # the zoom-out canvas is the mean, ~0 once normalized
    with pytest.raises(TypeError, match="uint8"):  # normalizing twice would go unnoticed
        utils.normalize(reference)
    channels_last = utils.normalize(images.contiguous(memory_format=torch.channels_last))
    assert channels_last.is_contiguous(memory_format=torch.channels_last) and torch.equal(channels_last, utils.normalize(images))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the claim is about CUDA")
def test_normalize_makes_no_host_synchronization():
    """train.py normalizes every batch on the GPU: that must not stall the queue of work."""
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = utils.normalize(images)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.allclose(out.cpu(), utils.normalize(images.cpu()))


def test_train_boxes_are_valid_and_follow_their_labels(noisy_sample):
    image, boxes, labels, difficulties = noisy_sample
    n_dropped = 0
    for seed in range(300):
        out, new_boxes, new_labels, new_difficulties = utils.transform(image, boxes, labels, difficulties, "TRAIN", generator(seed))
        n = new_boxes.size(0)
        assert out.shape == (3, 300, 300) and torch.isfinite(out).all()
        assert n >= 1 and new_boxes.shape == (n, 4) and new_labels.shape == new_difficulties.shape == (n,)
        assert new_difficulties.dtype == torch.uint8
        assert (new_boxes >= -1e-6).all() and (new_boxes <= 1 + 1e-6).all(), (seed, new_boxes)
        assert (new_boxes[:, 2:] > new_boxes[:, :2]).all(), (seed, new_boxes)
        # kept objects keep their order, and each its own difficulty
        index = new_labels - 10
        assert (index.diff() > 0).all() and torch.equal(new_difficulties, difficulties[index])
        n_dropped += n < boxes.size(0)
    assert n_dropped > 30  # the random crop does drop objects


def test_train_boxes_stay_inside_the_unit_square(noisy_sample):
    """Fractional boxes are documented as [0, 1]; not even a rounding error may leave it."""
    image, boxes, labels, difficulties = noisy_sample
    outside = []
    for seed in range(300):
        _, new_boxes, _, _ = utils.transform(image, boxes, labels, difficulties, "TRAIN", generator(seed))
        if new_boxes.min() < 0 or new_boxes.max() > 1:
            outside.append((seed, new_boxes.min().item(), new_boxes.max().item()))
    assert not outside, f"{len(outside)} of 300 seeds give boxes outside [0, 1], e.g. (seed, min, max) {outside[:3]}"


def test_train_zoom_out_fills_with_imagenet_mean(noisy_sample):
    image, boxes, labels, difficulties = noisy_sample
    mean = torch.tensor(utils.IMAGENET_MEAN_UINT8, dtype=torch.uint8)[:, None, None]
    assert mean.flatten().tolist() == [124, 116, 104]
    filled = 0
    for seed in range(200):
        out, *_ = utils.transform(image, boxes, labels, difficulties, "TRAIN", generator(seed))
        fill = (out == mean).all(0)
        filled += bool(fill.any())
    # zoom-out happens half the time and the crop may cut the fill away again
    assert 0.25 * 200 < filled < 0.6 * 200, filled
    test_out = utils.transform(image, boxes, labels, difficulties, "TEST")[0]
    assert not (test_out == mean).all(0).any()  # the noise image itself never has the mean colour


def test_train_flips_about_half_the_time():
    """Left half red, right half green, one box of the whole image: every crop keeps its centre, the
    colour boundary, so red right of green means flipped (whatever the colour distortions)."""
    image = torch.zeros(3, 120, 160, dtype=torch.uint8)
    image[0, :, :80] = 230
    image[1, :, 80:] = 230
    boxes, labels, difficulties = torch.tensor([[0., 0, 160, 120]]), torch.tensor([1]), torch.zeros(1, dtype=torch.uint8)
    columns = torch.arange(300.)
    flipped = unclear = 0
    for seed in range(200):
        out = denormalize(utils.transform(image, boxes, labels, difficulties, "TRAIN", generator(seed))[0])
        red, green = (out[0] - out[1] > 0.1), (out[1] - out[0] > 0.1)
        if red.sum() < 5 or green.sum() < 5:
            unclear += 1
            continue
        red_x = (red.sum(0) * columns).sum() / red.sum()
        green_x = (green.sum(0) * columns).sum() / green.sum()
        flipped += bool(red_x > green_x)
    assert unclear < 20
    assert 0.35 < flipped / (200 - unclear) < 0.65, (flipped, unclear)


COLORS = {1: (230, 30, 30), 2: (30, 200, 30), 3: (30, 30, 230)}


@pytest.fixture(scope="module")
def coloured_sample():
    """A 320x240 dark image with three solid rectangles, the colour of each given by its label."""
    boxes = [[20, 30, 100, 110], [150, 20, 230, 70], [200, 120, 300, 230]]
    labels = [1, 2, 3]
    image = draw_boxes((320, 240), boxes, [COLORS[l] for l in labels])
    return image, torch.tensor(boxes, dtype=torch.float), torch.tensor(labels), torch.zeros(3, dtype=torch.uint8)


def colour_bbox(out, color):
    """Tight box (x_min, y_min, x_max, y_max), in output pixels, of the pixels of about `color`."""
    mask = ((denormalize(out) * 255 - torch.tensor(color, dtype=torch.float)[:, None, None]).abs() < 40).all(0)
    ys, xs = mask.nonzero(as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float) if len(xs) else None


def test_expand_crop_flip_resize_geometry_matches_pixels(coloured_sample):
    """The chain built from utils' functions, without colour distortion: every transformed box holds
    its rectangle's colour inside and is the tight box of that colour."""
    image, boxes, labels, difficulties = coloured_sample
    for seed in range(150):
        g = generator(seed)
        window = (0, 0, 320, 240)
        if seed % 2:
            window = utils.expand(window, g)
        window, new_boxes, new_labels, _ = utils.random_crop(window, boxes, labels, difficulties, g)
        hflip = seed % 4 >= 2
        out, new_boxes = utils.resize(image, window, new_boxes, hflip=hflip)
        # bilinear resizing blurs edges over one output pixel, or one input pixel when enlarging
        margin = 0.5 + max(1., 0.5 * 300 / (window[2] - window[0]), 0.5 * 300 / (window[3] - window[1]))
        for box, label in zip(new_boxes * 300, new_labels.tolist()):
            color = torch.tensor(COLORS[label], dtype=torch.float)[:, None, None]
            x0, y0, x1, y1 = box.tolist()
            inner = out[:, math.ceil(y0 + margin - 0.5):math.floor(y1 - margin - 0.5) + 1,
                        math.ceil(x0 + margin - 0.5):math.floor(x1 - margin - 0.5) + 1]
            if inner.numel():
                assert (denormalize(inner) * 255 - color).abs().max() < 3, (seed, label, box)
            tight = colour_bbox(out, COLORS[label])
            assert tight is not None and (tight - box).abs().max() < 2, (seed, label, box, tight)


def test_train_transform_boxes_follow_pixels(coloured_sample, monkeypatch):
    """The whole TRAIN chain (colour distortion switched off): each box is where its rectangle went."""
    monkeypatch.setattr(utils, "photometric_distort", lambda image, g=None: image)
    image, boxes, labels, difficulties = coloured_sample
    for seed in range(150):
        out, new_boxes, new_labels, _ = utils.transform(image, boxes, labels, difficulties, "TRAIN", generator(seed))
        for box, label in zip(new_boxes * 300, new_labels.tolist()):
            tight = colour_bbox(out, COLORS[label])
            assert tight is not None and (tight - box).abs().max() < 2, (seed, label, box, tight)


@pytest.mark.parametrize("window", [(0, 0, 320, 240), (-200, -100, 600, 500)], ids=["image", "zoomed-out"])
def test_random_crop_follows_the_paper(window, coloured_sample):
    _, boxes, labels, difficulties = coloured_sample
    difficulties = torch.tensor([0, 1, 0], dtype=torch.uint8)
    x0, y0, x1, y1 = window
    w, h = x1 - x0, y1 - y0
    uncropped = 0
    for seed in range(300):
        crop, new_boxes, new_labels, new_difficulties = utils.random_crop(window, boxes, labels, difficulties, generator(seed))
        if tuple(crop) == window:
            uncropped += 1
            assert torch.equal(new_boxes, boxes) and torch.equal(new_labels, labels)
            continue
        cx0, cy0, cx1, cy1 = crop
        cw, ch = cx1 - cx0, cy1 - cy0
        assert x0 <= cx0 < cx1 <= x1 and y0 <= cy0 < cy1 <= y1
        assert int(0.3 * w) <= cw <= w and int(0.3 * h) <= ch <= h
        assert 0.5 < ch / cw < 2
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        keep = (centres[:, 0] > cx0) & (centres[:, 0] < cx1) & (centres[:, 1] > cy0) & (centres[:, 1] < cy1)
        assert keep.any()
        clipped = torch.cat([torch.max(boxes[keep, :2], torch.tensor([float(cx0), float(cy0)])),
                             torch.min(boxes[keep, 2:], torch.tensor([float(cx1), float(cy1)]))], 1)
        assert torch.equal(new_boxes, clipped)
        assert torch.equal(new_labels, labels[keep]) and torch.equal(new_difficulties, difficulties[keep])
    assert 0.05 * 300 < uncropped < 0.6 * 300  # "no crop" is one of seven choices


def test_random_crop_keeps_the_visible_boxes_when_asked(coloured_sample):
    """keep="visible": every box with more than 15 % of its area inside the crop, clipped, whether its centre is
    inside or not; the others dropped."""
    _, boxes, labels, difficulties = coloured_sample
    window, area = (0, 0, 320, 240), ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).tolist()
    off_centre = dropped = 0
    for seed in range(300):
        crop, new_boxes, new_labels, _ = utils.random_crop(window, boxes, labels, difficulties, generator(seed),
                                                           keep="visible")
        cx0, cy0, cx1, cy1 = crop
        keep, clipped = [], []
        for (x0, y0, x1, y1), a in zip(boxes.tolist(), area):
            box = [max(x0, cx0), max(y0, cy0), min(x1, cx1), min(y1, cy1)]
            shown = max(0, box[2] - box[0]) * max(0, box[3] - box[1])
            keep.append(shown > 0.15 * a)
            clipped += [box] if keep[-1] else []
            centre_in = cx0 < (x0 + x1) / 2 < cx1 and cy0 < (y0 + y1) / 2 < cy1
            off_centre += keep[-1] and not centre_in
            dropped += 0 < shown <= 0.15 * a
        assert any(keep) and new_boxes.tolist() == clipped and torch.equal(new_labels, labels[torch.tensor(keep)])
    assert off_centre > 20 and dropped > 5  # both sides of the rule were tried
    with pytest.raises(AssertionError):
        utils.transform(torch.zeros(3, 240, 320, dtype=torch.uint8), boxes, labels, difficulties, "TRAIN",
                        crop_keep="center")


def test_prior_match_finds_a_prior_whole_and_loses_it_to_zoom_out():
    """tools/prior_match.py: a box that is a prior overlaps it wholly; shrunk by a zoom-out of 2 towards the corner, its
    best overlap is that of a plain loop over the priors."""
    from model import create_prior_boxes
    prior_match = load_tool("prior_match")
    scales = (0.06, 0.15, 0.33, 0.51, 0.69, 0.87)
    priors = utils.cxcy_to_xy(create_prior_boxes(scales)).clamp(0, 1)
    boxes = priors[[0, 1000, 5000, 8731]]
    assert prior_match.best_overlaps(boxes, scales).tolist() == pytest.approx([1.0] * 4)
    shrunk = prior_match.best_overlaps(boxes, scales, zoom=2.0)
    for box, best in zip(boxes / 2, shrunk.tolist()):
        x0, y0, x1, y1 = box.tolist()
        plain = 0.0
        for p in priors.tolist():
            inter = max(0., min(x1, p[2]) - max(x0, p[0])) * max(0., min(y1, p[3]) - max(y0, p[1]))
            plain = max(plain, inter / ((x1 - x0) * (y1 - y0) + (p[2] - p[0]) * (p[3] - p[1]) - inter))
        assert best == pytest.approx(plain, abs=1e-6)
    assert shrunk[0] < 1 and prior_match.best_overlaps(boxes[:0], scales).numel() == 0


def test_edge_cells_measures_the_share_of_a_cell_a_box_at_the_edge_shows():
    """tools/edge_cells.py: boxes within 0.5 % of the border touch the edge; each one's short side over the median
    long side of the boxes clear of it; with none clear, no share (NaN)."""
    edge_cells = load_tool("edge_cells")
    shown = edge_cells.shown
    boxes = np.array([[0., 100, 15, 200], [300, 0, 340, 20], [50, 50, 150, 150], [200, 200, 280, 300],
                      [100, 300, 200, 398.5]])  # two slivers, two whole cells (long sides 100, 100), one at 1.5 px
    at_edge, share = shown(boxes, 400, 400)
    assert at_edge.tolist() == [True, True, False, False, True]
    assert share[at_edge] == pytest.approx([0.15, 0.2, 0.985])
    at_edge, share = shown(boxes[:2], 400, 400)
    assert at_edge.all() and np.isnan(share).all()
    assert edge_cells.touches_edge(torch.tensor([[0.004, 0.5, 0.2, 0.6], [0.1, 0.1, 0.2, 0.2]])).tolist() \
        == [True, False]


def test_random_crop_honours_the_min_overlap(monkeypatch):
    """The paper's choices; with the draw forced, every crop overlaps some object by at least that much."""
    assert utils._MIN_OVERLAPS == (0., .1, .3, .5, .7, .9, None)
    window = (0, 0, 320, 240)
    boxes = torch.tensor([[0., 0, 320, 240], [10, 20, 60, 70]])  # IoU with the first = the crop's share of the area
    labels, difficulties = torch.tensor([1, 2]), torch.zeros(2, dtype=torch.uint8)
    monkeypatch.setattr(utils, "_MIN_OVERLAPS", (0.7,))
    for seed in range(100):
        crop, *_ = utils.random_crop(window, boxes, labels, difficulties, generator(seed))
        assert crop != window
        assert box_iou(torch.tensor([crop], dtype=torch.float), boxes).max() >= 0.7
    monkeypatch.setattr(utils, "_MIN_OVERLAPS", (None,))
    assert all(utils.random_crop(window, boxes, labels, difficulties, generator(seed))[0] == window for seed in range(20))


def test_expand_scales_1_to_4():
    scales = []
    for seed in range(200):
        x0, y0, x1, y1 = utils.expand((0, 0, 320, 240), generator(seed))
        assert x0 <= 0 and y0 <= 0 and x1 >= 320 and y1 >= 240  # the canvas holds the image
        sx, sy = (x1 - x0) / 320, (y1 - y0) / 240
        assert 1 <= sx <= 4 and 1 <= sy <= 4 and abs(sx - sy) < 1 / 240  # one scale for both sides
        scales.append(sx)
    assert min(scales) < 1.2 and max(scales) > 3.8


def test_resize_fills_outside_the_image_and_flips(coloured_sample):
    image, boxes, _, _ = coloured_sample
    window = (-320, 0, 320, 240)  # the image is the right half of the output
    out, new_boxes = utils.resize(image, window, boxes)
    mean = torch.tensor(utils.IMAGENET_MEAN_UINT8, dtype=torch.uint8)[:, None, None]
    assert (out[:, :, :150] == mean).all() and not (out[:, :, 150:] == mean).all(0).any()
    assert torch.allclose(new_boxes, (boxes + torch.tensor([320., 0, 320, 0])) / torch.tensor([640., 240, 640, 240]), atol=1e-6)
    flipped, flipped_boxes = utils.resize(image, window, boxes, hflip=True)
    assert torch.equal(flipped, out.flip(-1))
    assert torch.allclose(flipped_boxes, torch.stack([1 - new_boxes[:, 2], new_boxes[:, 1], 1 - new_boxes[:, 0], new_boxes[:, 3]], 1))
    assert torch.equal(utils.flip(utils.flip(boxes, window), window), boxes)


@pytest.mark.parametrize("seed", range(6))
def test_adjust_hue_is_torchvisions_to_the_bit(seed):
    g = generator(seed)
    image = torch.rand(3, 37, 53, generator=g)
    image[:, :4] = image[0:1, :4]  # greys: no hue
    image[:, 4, :6] = torch.tensor([[1, 0, 0, 1, 1, 0], [0, 1, 0, 1, 0, 1], [0, 0, 1, 0, 1, 1.]])  # pure colours
    image[:, 5], image[:, 6] = 0., 1.  # black, white
    if seed % 2:
        image = (image * 255).round() / 255  # whole grey levels, as from a uint8 image: ties between channels
    for factor in (-0.5, -18 / 255, 0., 0.01, 0.5, torch.rand((), generator=g).item() - 0.5):
        assert torch.equal(utils.adjust_hue(image, factor), FT.adjust_hue(image, factor)), factor


def test_photometric_distort_each_half_the_time():
    image = torch.rand(3, 16, 16, generator=generator(0))
    unchanged = 0
    for seed in range(400):
        out = utils.photometric_distort(image, generator(seed))
        assert out.shape == image.shape and out.min() >= 0 and out.max() <= 1
        unchanged += torch.equal(out, image)
    assert 10 < unchanged < 45  # all four skipped: 1/16 of 400 = 25


# ---------------------------------------------------------------------------------------------
# Reproducibility
# ---------------------------------------------------------------------------------------------

def same_items(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_same_index_and_seed_give_the_same_item(data_lists):
    dataset = BCCDDataset(data_lists, "train")
    first = dataset[(1, 1234)]
    assert same_items(first, dataset[(1, 1234)])
    assert not all(torch.equal(first[0], dataset[(1, s)][0]) for s in (1235, 1236))


@pytest.fixture
def tiny_lists(tiny_voc, tmp_path):
    """Lists of a tiny dataset of 7 TRAIN images (64x48) and 2 TEST."""
    voc = tiny_voc(n_trainval=7, n_test=2)
    create_data_lists(voc, tmp_path / "lists", verbose=False)
    return tmp_path / "lists"


def test_cached_images_give_the_same_items(tiny_lists):
    plain, cached = BCCDDataset(tiny_lists, "train"), BCCDDataset(tiny_lists, "train", cache_images=True)
    for i in range(len(plain)):
        assert same_items(plain[(i, 99)], cached[(i, 99)])


def epoch_batches(dataset, seed, epoch, num_workers):
    sampler = AugmentationSampler(dataset, seed=seed)
    sampler.set_epoch(epoch)
    loader = DataLoader(dataset, batch_size=3, sampler=sampler, num_workers=num_workers, collate_fn=BCCDDataset.collate_fn)
    return list(loader)


def same_batches(a, b):
    return len(a) == len(b) and all(
        torch.equal(x[0], y[0]) and all(same_items(u, v) for u, v in zip(x[1:], y[1:])) for x, y in zip(a, b))


def test_sampler_makes_batches_reproducible(tiny_lists):
    dataset = BCCDDataset(tiny_lists, "train")
    reference = epoch_batches(dataset, seed=3, epoch=0, num_workers=0)
    assert len(reference) == 3 and sum(len(b[1]) for b in reference) == 7
    assert same_batches(reference, epoch_batches(dataset, seed=3, epoch=0, num_workers=0))  # a second run
    assert same_batches(reference, epoch_batches(dataset, seed=3, epoch=0, num_workers=2))  # workers
    assert not same_batches(reference, epoch_batches(dataset, seed=3, epoch=1, num_workers=0))  # next epoch
    assert not same_batches(reference, epoch_batches(dataset, seed=4, epoch=0, num_workers=0))  # another seed
    sampler = AugmentationSampler(dataset, seed=3)
    indices = [i for i, _ in sampler]
    assert sorted(indices) == list(range(7))  # every image once an epoch
    sampler.set_epoch(1)
    assert [s for _, s in sampler] != [s for _, s in AugmentationSampler(dataset, seed=3)]


def test_sampler_repeats_images_each_with_its_own_augmentation(tiny_lists):
    dataset = BCCDDataset(tiny_lists, "train")  # 7 images
    plain = [i for i, _ in AugmentationSampler(dataset, seed=3)]
    assert plain == list(DistributedSampler(dataset, num_replicas=1, rank=0, seed=3))  # runs from before --repeat
    repeats = [1, 3, 1, 1, 2, 1, 1]
    for epoch in range(3):
        sampler = AugmentationSampler(dataset, seed=3, repeats=repeats)
        sampler.set_epoch(epoch)
        pairs = list(sampler)
        assert len(sampler) == len(pairs) == 10 and sorted(i for i, _ in pairs) == [0, 1, 1, 1, 2, 3, 4, 4, 5, 6]
        assert len({s for i, s in pairs if i == 1}) == 3  # three augmentations of image 1
    shards = [[i for i, _ in AugmentationSampler(dataset, seed=3, num_replicas=2, rank=r, repeats=repeats)]
              for r in range(2)]
    assert sorted(shards[0] + shards[1]) == [0, 1, 1, 1, 2, 3, 4, 4, 5, 6]  # 10 split evenly over two processes


@pytest.mark.parametrize("drop_last", [False, True])
def test_epoch_batches_are_the_batches_of_each_epoch_in_one_stream(tiny_lists, drop_last):
    dataset = BCCDDataset(tiny_lists, "train")  # 7 images: batches of 3, 3 and 1 (dropped with drop_last)
    batches = EpochBatches(AugmentationSampler(dataset, seed=3), 3, drop_last, epochs=range(2, 5))
    assert len(batches) == 3 * (2 if drop_last else 3)
    stream = list(DataLoader(dataset, batch_sampler=batches, num_workers=2, collate_fn=BCCDDataset.collate_fn))
    per_epoch = [b for e in range(2, 5) for b in epoch_batches(dataset, seed=3, epoch=e, num_workers=0)
                 if not (drop_last and len(b[1]) < 3)]
    assert same_batches(stream, per_epoch)


# ---------------------------------------------------------------------------------------------
# Images that cannot be read at load time
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["garbage", "truncated", "deleted"])
def test_unreadable_image_is_a_user_error_naming_it(tiny_lists, damage):
    images, _ = load_lists(tiny_lists, "TRAIN")
    path = Path(images[2])
    if damage == "garbage":
        path.write_bytes(bytes(range(256)) * 4)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:300])
    else:
        path.unlink()
        with pytest.raises(UserError, match=re.escape(str(path)) + ".*not found"):  # found before any work
            BCCDDataset(tiny_lists, "train")
        return
    dataset = BCCDDataset(tiny_lists, "train")
    assert len(dataset[(1, 0)]) == 4  # the others still load
    with pytest.raises(UserError, match=re.escape(str(path))):
        dataset[(2, 0)]
    with pytest.raises(UserError, match=re.escape(str(path))):
        BCCDDataset(tiny_lists, "train", cache_images=True)


@pytest.mark.parametrize("damage, says", [
    (lambda o: o[0]["boxes"][0].__setitem__(0, float("nan")), "a box is not finite, negative"),
    (lambda o: o[0]["boxes"][0].__setitem__(2, -1), "a box is not finite, negative"),
    (lambda o: o[0]["labels"].__setitem__(0, 9), "a label outside 1-3"),
    (lambda o: o[0]["labels"].__setitem__(0, 1.5), "not {'boxes'"),
    (lambda o: o[0].pop("difficulties"), "not {'boxes'"),
    (lambda o: o[0]["boxes"].append([1, 2, 3]), "not {'boxes'"),
    (lambda o: o.__setitem__(0, "x"), "not {'boxes'"),
    (lambda o: o[0]["difficulties"].__setitem__(0, -1), "a 'difficult' flag other than 0 or 1"),
    (lambda o: o[0]["boxes"].__setitem__(0, [-500, -500, -100, -100]), "a box is not finite, negative"),
], ids=["nan", "no-area", "label-9", "label-float", "no-difficulties", "box-of-3", "not-a-dict", "difficult--1",
        "box-outside"])
def test_damaged_list_entry_is_one_line_naming_file_and_entry(damage, says, tiny_voc, tmp_path):
    lists = tmp_path / "lists"
    create_data_lists(tiny_voc(), lists, verbose=False)
    objects = json.loads((lists / "TRAIN_objects.json").read_text())
    damage(objects)
    (lists / "TRAIN_objects.json").write_text(json.dumps(objects))
    with pytest.raises(UserError) as e:
        BCCDDataset(lists, "train")
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{lists / 'TRAIN_objects.json'}: entry 0 ("), str(e.value)
    assert says in str(e.value)
