"""The accuracy levers: utils.transform's flips, train.py's weight average (model.ModelEMA) and warm start
(--init-weights), and detect.py's test-time augmentation, each checked against a plain reference."""
import itertools
import json

import pytest
import torch

import detect
import train
import utils
from model import PRIOR_SCALES, SSD300, ModelEMA, create_prior_boxes

def box_masks(boxes, size):
    """(n, size, size) masks of boxes given in whole pixels (x_min, y_min, x_max, y_max)."""
    masks = torch.zeros(len(boxes), size, size)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes.long().tolist()):
        mask[y0:y1, x0:x1] = 1
    return masks


def mask_box(mask):
    """The box (x_min, y_min, x_max, y_max), in whole pixels, of a mask's nonzero pixels."""
    ys, xs = mask.nonzero(as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


@pytest.mark.parametrize("vflip, transpose", [(True, False), (False, True), (True, True)])
def test_flip_rotate_moves_boxes_with_the_pixels(vflip, transpose):
    size = 60
    g = torch.Generator().manual_seed(0)
    corners = torch.randint(0, size, (5, 2, 2), generator=g).sort(1).values  # whole pixels, x and y sorted apart
    boxes = torch.stack([corners[:, 0, 0], corners[:, 0, 1], corners[:, 1, 0] + 1, corners[:, 1, 1] + 1], 1).float()
    masks, new_boxes = utils.flip_rotate(box_masks(boxes, size), boxes / size, vflip, transpose)
    assert [mask_box(m) for m in masks] == (new_boxes * size).round().long().tolist()


def test_d4_flips_are_the_tutorials_transform_then_one_of_the_square_symmetries():
    """flips="d4" draws what "h" draws (the same photometric distortions, crop and horizontal flip), then a
    vertical flip and a transpose at 50% each: every combination turns up."""
    g = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8, generator=g)
    boxes, labels = torch.tensor([[5., 6., 30., 40.], [35., 10., 60., 30.]]), torch.tensor([1, 2])
    difficulties = torch.zeros(2, dtype=torch.uint8)
    seen = set()
    for seed in range(40):
        plain = utils.transform(image, boxes, labels, difficulties, "TRAIN", torch.Generator().manual_seed(seed))
        d4 = utils.transform(image, boxes, labels, difficulties, "TRAIN", torch.Generator().manual_seed(seed),
                             flips="d4")
        assert torch.equal(plain[2], d4[2])
        match = [(v, t) for v, t in itertools.product((False, True), repeat=2)
                 if torch.equal(utils.flip_rotate(plain[0], plain[1], v, t)[0], d4[0])
                 and torch.allclose(utils.flip_rotate(plain[0], plain[1], v, t)[1], d4[1])]
        assert match, f"seed {seed}: not a flip or transpose of the tutorial's transform"
        seen.update(match)
    assert len(seen) == 4
    with pytest.raises(AssertionError):
        utils.transform(image, boxes, labels, difficulties, "TRAIN", flips="rot")


def test_model_ema_is_the_moving_average_with_its_warm_up():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
    ema = ModelEMA(model, decay=0.8)
    expected = {k: v.clone().double() for k, v in model.state_dict().items()}
    for t in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(4, 1, 3, 3))  # BatchNorm statistics move, num_batches_tracked counts
        ema.update(model)
        d = min(0.8, (1 + t) / (10 + t))
        for k, v in model.state_dict().items():
            expected[k] = v.double() if not v.is_floating_point() else d * expected[k] + (1 - d) * v.double()
    assert ema.updates == 6
    for k, v in ema.module.state_dict().items():
        assert torch.allclose(v.double(), expected[k], atol=1e-6), k
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training


def reference_permutation(view, priors):
    """prior_permutation's answer found geometrically: for each prior moved as the view moves the image, the
    nearest prior (exact distances, not cdist's matrix-product shortcut)."""
    hflip, vflip, transpose = view
    moved = priors.clone().double()
    if hflip:
        moved[:, 0] = 1 - moved[:, 0]
    if vflip:
        moved[:, 1] = 1 - moved[:, 1]
    if transpose:
        moved = moved[:, [1, 0, 3, 2]]
    found = [torch.cdist(part, priors.double(), compute_mode="donot_use_mm_for_euclid_dist").min(1)
             for part in moved.split(2048)]
    assert max(f.values.max() for f in found) < 1e-6  # every prior lands on one
    return torch.cat([f.indices for f in found])


@pytest.fixture(scope="module")
def untrained():
    torch.manual_seed(0)
    return SSD300(base_weights=None, batch_norm=True, prior_scales=train.BCCD_PRIOR_SCALES).eval()


@pytest.mark.parametrize("scales, views", [
    (train.BCCD_PRIOR_SCALES, [(True, False, False), (False, True, False), (False, False, True), (True, True, True)]),
    (PRIOR_SCALES, [(True, False, True)])], ids=["bccd", "paper"])
def test_prior_permutation_puts_each_prior_where_the_view_moves_it(scales, views):
    priors = create_prior_boxes(scales)
    for view in views:
        index = detect.prior_permutation(view)
        assert torch.equal(index, reference_permutation(view, priors)), view
        assert torch.equal(index.sort().values, torch.arange(len(priors)))


def test_tta_averages_the_views_mapped_back_by_hand(untrained, monkeypatch):
    """run_model with views = the model run on each flipped image, its outputs taken at the mapped priors (the
    layout's permutation), offsets mirrored or swapped, then averaged: probabilities (as log) and offsets."""
    views = [(False, False, False), (True, False, False), (False, True, True), (True, True, True)]
    monkeypatch.setitem(detect.TTA_VIEWS, "test", views)
    images = torch.randint(0, 256, (2, 3, 300, 300), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    untrained.tta = "off"
    plain = detect.run_model(untrained, images, amp=False)
    with torch.no_grad():
        assert torch.equal(plain[0], untrained(utils.normalize(images).contiguous(memory_format=torch.channels_last))[0])
    locs, probs = torch.zeros_like(plain[0]), torch.zeros_like(plain[1])
    for hflip, vflip, transpose in views:
        x = images.flip(-1) if hflip else images
        x = x.flip(-2) if vflip else x
        x = x.transpose(-1, -2) if transpose else x
        l, s = detect.run_model(untrained, x.contiguous(), amp=False)
        index = reference_permutation((hflip, vflip, transpose), untrained.priors_cxcy)
        l, p = l[:, index], s.softmax(-1)[:, index]
        if transpose:
            l = l[..., [1, 0, 3, 2]]
        l = l * torch.tensor([-1. if hflip else 1., -1. if vflip else 1., 1., 1.])
        locs, probs = locs + l / len(views), probs + p / len(views)
    untrained.tta = "test"
    try:
        tta_locs, tta_scores = detect.run_model(untrained, images, amp=False)
    finally:
        untrained.tta = "off"
    assert torch.allclose(tta_locs, locs, atol=1e-5)
    assert torch.allclose(tta_scores.softmax(-1), probs, atol=1e-6)


def test_tta_is_one_of_the_choices():
    with pytest.raises(utils.UserError, match="test-time augmentation is one of off, h, hv, d4, not 'x'"):
        detect.check_tta("x")


def test_init_weights_starts_a_new_run_from_a_models_weights(tmp_path):
    from conftest import make_voc
    from create_data_lists import create_data_lists
    create_data_lists(make_voc(tmp_path / "voc", n_trainval=2, n_test=1), tmp_path / "lists", verbose=False)
    torch.manual_seed(1)
    start = SSD300(base_weights=None, batch_norm=True, prior_scales=PRIOR_SCALES,
                   label_map=json.loads((tmp_path / "lists" / "label_map.json").read_text()))
    torch.save({"model": start.state_dict(), "model_args": start.model_args, "label_map": start.label_map},
               tmp_path / "start.pt")
    argv = ["--data-folder", tmp_path / "lists", "--out-dir", tmp_path / "run", "--init-weights", tmp_path / "start.pt",
            "--batch-size", "2", "--iterations", "1", "--lr", "1e-12", "--warmup", "0", "--workers", "0",
            "--device", "cpu", "--no-cache-images"]
    train.main(train.get_args_parser().parse_args(list(map(str, argv))))
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["iteration"] == 1 and ckpt["args"]["init_weights"] == str(tmp_path / "start.pt")
    assert ckpt["model_args"]["prior_scales"] == list(PRIOR_SCALES)  # the architecture of the start, not the recipe's
    for name, value in start.state_dict().items():
        if "running" not in name and "num_batches" not in name:  # one step at lr 1e-12 leaves the weights
            assert torch.allclose(ckpt["model"][name], value, atol=1e-6), name
