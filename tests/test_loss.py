"""MultiBoxLoss (model.py): matching, the loss against a per-image reference, and no host sync on CUDA.

The reference is written here in plain loops, image by image, in float64 (the tutorial's matching and loss), with
torchvision.ops.box_iou for the overlaps. The tests use random (N, 8732, 4) predictions instead of a forward.

Run: python -m pytest tests/test_loss.py -q
"""
import math

import pytest
import torch
from torchvision.ops import box_iou

from model import MultiBoxLoss, create_prior_boxes
from test_model import N_CLASSES, N_PRIORS, cxcy_to_xy_ref, xy_to_cxcy_ref


def reference_match(boxes, labels, priors_cxcy, threshold=0.5):
    """One image, plainly: labels (P,) and encoded targets (P, 4) of every prior."""
    P = priors_cxcy.size(0)
    if boxes.size(0) == 0:
        return torch.zeros(P, dtype=torch.long), torch.zeros(P, 4, dtype=torch.float64)
    iou = box_iou(boxes, cxcy_to_xy_ref(priors_cxcy))  # (M, P)
    overlap, obj = iou.max(0)  # each prior's best object
    best_overlap, best_prior = iou.max(1)  # each object's best prior
    owner = {}  # forced priors: the object overlapping the prior more wins, the later one on a tie
    for m in range(boxes.size(0)):
        p = int(best_prior[m])
        if p not in owner or best_overlap[m] >= best_overlap[owner[p]]:
            owner[p] = m
    for p, m in owner.items():
        obj[p] = m
        overlap[p] = 1.
    target_labels = labels[obj].clone()
    target_labels[overlap < threshold] = 0
    b, pr = xy_to_cxcy_ref(boxes[obj].double()), priors_cxcy.double()
    targets = torch.stack([(b[:, 0] - pr[:, 0]) / (pr[:, 2] / 10), (b[:, 1] - pr[:, 1]) / (pr[:, 3] / 10),
                           5 * torch.log(b[:, 2] / pr[:, 2]), 5 * torch.log(b[:, 3] / pr[:, 3])], 1)
    return target_labels, targets


def reference_multibox_loss(locs, scores, boxes, labels, priors_cxcy, threshold=0.5, neg_pos_ratio=3, alpha=1.):
    """The loss image by image, in float64: Smooth L1 over positives + CE over positives and hard negatives,
    summed over the batch and divided by the batch's positives."""
    loss_sum, total_positives = reference_loss_sum(locs, scores, boxes, labels, priors_cxcy, threshold, neg_pos_ratio, alpha)
    return loss_sum / max(total_positives, 1)


def reference_loss_sum(locs, scores, boxes, labels, priors_cxcy, threshold=0.5, neg_pos_ratio=3, alpha=1.):
    """(the loss summed over the images, their number of positives)."""
    conf, loc, total_positives = 0., 0., 0
    for i in range(locs.size(0)):
        target_labels, targets = reference_match(boxes[i], labels[i], priors_cxcy, threshold)
        pos = target_labels != 0
        n_pos = int(pos.sum())
        d = (locs[i].double()[pos] - targets[pos]).abs()
        loc = loc + torch.where(d < 1, 0.5 * d ** 2, d - 0.5).sum()
        ce = -torch.log_softmax(scores[i].double(), 1).gather(1, target_labels[:, None])[:, 0]  # (P,)
        hard_negatives = ce[~pos].sort(descending=True).values[:neg_pos_ratio * n_pos]
        conf = conf + ce[pos].sum() + hard_negatives.sum()
        total_positives += n_pos
    return conf + alpha * loc, total_positives


def random_objects(n, g):
    """n random boxes inside the image, 0.02 to 0.6 wide and high, and labels in 1..3."""
    centres = 0.05 + 0.9 * torch.rand(n, 2, generator=g)
    sizes = 0.02 + 0.58 * torch.rand(n, 2, generator=g)
    boxes = torch.cat([centres - sizes / 2, centres + sizes / 2], 1).clamp(0, 1)
    return boxes, torch.randint(1, N_CLASSES, (n,), generator=g)


def random_predictions(n, g):
    return torch.randn(n, N_PRIORS, 4, generator=g), 2 * torch.randn(n, N_PRIORS, N_CLASSES, generator=g)


@pytest.fixture(scope="module")
def priors():
    return create_prior_boxes()


@pytest.mark.parametrize("seed", range(5))
def test_loss_equals_per_image_reference(priors, seed):
    g = torch.Generator().manual_seed(100 + seed)
    n_objects = [1, 30] + torch.randint(1, 31, (2,), generator=g).tolist()
    objects = [random_objects(n, g) for n in n_objects]
    boxes, labels = [b for b, _ in objects], [lab for _, lab in objects]
    locs, scores = random_predictions(len(objects), g)
    criterion = MultiBoxLoss(priors, threshold=0.5, neg_pos_ratio=3, alpha=1.)
    loss = criterion(locs, scores, boxes, labels)
    expected = reference_multibox_loss(locs, scores, boxes, labels, priors)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert abs(loss.item() - expected.item()) <= 1e-5 * abs(expected.item()), (loss.item(), expected.item())
    # the matching itself, image by image
    true_locs, true_labels = criterion.match(boxes, labels)
    assert true_locs.shape == (len(objects), N_PRIORS, 4) and true_labels.shape == (len(objects), N_PRIORS)
    for i in range(len(objects)):
        ref_labels, ref_targets = reference_match(boxes[i], labels[i], priors)
        assert torch.equal(true_labels[i], ref_labels)
        pos = ref_labels != 0
        assert pos.sum() >= 1
        assert torch.allclose(true_locs[i][pos].double(), ref_targets[pos], atol=1e-4, rtol=1e-5)


def test_loss_sum_and_positives_add_up_over_parts_of_a_batch(priors):
    """What a distributed run does: sum each part's loss and positives, divide once."""
    g = torch.Generator().manual_seed(6)
    objects = [random_objects(n, g) for n in (3, 17, 8)]
    boxes, labels = [b for b, _ in objects], [lab for _, lab in objects]
    locs, scores = random_predictions(3, g)
    criterion = MultiBoxLoss(priors)
    total, n_pos = 0., 0
    for part in ([0], [1, 2]):
        part_boxes, part_labels = [boxes[i] for i in part], [labels[i] for i in part]
        part_sum, part_pos = criterion.sum_and_positives(locs[part], scores[part], part_boxes, part_labels)
        ref_sum, ref_pos = reference_loss_sum(locs[part], scores[part], part_boxes, part_labels, priors)
        assert int(part_pos) == ref_pos > 0
        assert abs(part_sum.item() - ref_sum.item()) <= 1e-5 * ref_sum.item()
        total, n_pos = total + part_sum, n_pos + part_pos
    whole = criterion(locs, scores, boxes, labels)
    assert abs((total / n_pos).item() - whole.item()) <= 1e-5 * whole.item()


@pytest.mark.parametrize("alpha", [1., 0.5])
def test_loss_alpha_weights_the_localization_loss(priors, alpha):
    g = torch.Generator().manual_seed(7)
    objects = [random_objects(5, g), random_objects(12, g)]
    boxes, labels = [b for b, _ in objects], [lab for _, lab in objects]
    locs, scores = random_predictions(2, g)
    loss = MultiBoxLoss(priors, alpha=alpha)(locs, scores, boxes, labels)
    expected = reference_multibox_loss(locs, scores, boxes, labels, priors, alpha=alpha)
    assert abs(loss.item() - expected.item()) <= 1e-5 * expected.item()


def test_loss_with_an_image_without_objects(priors):
    """An image whose objects were all cropped away: it has no positives, so no hard negatives either."""
    g = torch.Generator().manual_seed(8)
    (b0, l0), (b2, l2) = random_objects(4, g), random_objects(9, g)
    boxes = [b0, torch.zeros(0, 4), b2]
    labels = [l0, torch.zeros(0, dtype=torch.long), l2]
    locs, scores = random_predictions(3, g)
    locs.requires_grad_(True)
    scores.requires_grad_(True)
    criterion = MultiBoxLoss(priors)
    loss = criterion(locs, scores, boxes, labels)
    assert torch.isfinite(loss)
    expected = reference_multibox_loss(locs.detach(), scores.detach(), boxes, labels, priors)
    assert abs(loss.item() - expected.item()) <= 1e-5 * expected.item()
    without = criterion(locs.detach()[[0, 2]], scores.detach()[[0, 2]], [b0, b2], [l0, l2])
    assert abs(loss.item() - without.item()) <= 1e-6 * without.item()
    loss.backward()
    assert torch.isfinite(locs.grad).all() and torch.isfinite(scores.grad).all()
    assert torch.equal(locs.grad[1], torch.zeros(N_PRIORS, 4)) and torch.equal(scores.grad[1], torch.zeros(N_PRIORS, N_CLASSES))
    assert locs.grad[0].abs().sum() > 0


def test_loss_when_no_image_has_objects(priors):
    g = torch.Generator().manual_seed(9)
    locs, scores = random_predictions(2, g)
    locs.requires_grad_(True)
    empty = [torch.zeros(0, 4), torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.long)] * 2
    loss = MultiBoxLoss(priors)(locs, scores, *empty)
    assert torch.isfinite(loss)
    assert loss.item() == reference_multibox_loss(locs.detach(), scores, *empty, priors) == 0.
    loss.backward()
    assert torch.isfinite(locs.grad).all()


def test_match_background_is_overlap_below_threshold():
    """With priors in binary fractions, overlaps are exact: 1, exactly 0.5, 0.25 and 0."""
    priors_xy = torch.tensor([[0., 0., 0.5, 0.5],  # the object itself
                              [0., 0., 0.25, 0.5],  # half of it: IoU exactly 0.5 -> positive
                              [0., 0., 0.25, 0.25],  # a quarter: IoU 0.25 -> background
                              [0.5, 0.5, 1., 1.]])  # elsewhere
    criterion = MultiBoxLoss(xy_to_cxcy_ref(priors_xy), threshold=0.5)
    obj = torch.tensor([[0., 0., 0.5, 0.5]])
    assert box_iou(obj, priors_xy).tolist() == [[1., 0.5, 0.25, 0.]]
    true_locs, true_labels = criterion.match([obj], [torch.tensor([3])])
    assert true_labels.tolist() == [[3, 3, 0, 0]]
    # prior 1 (0.25 wide, centre x 0.125) encodes the object (0.5 wide, centre x 0.25): g_cx = 0.125 / 0.025, g_w = 5 ln 2
    assert torch.allclose(true_locs[0, 1], torch.tensor([5., 0., 5 * math.log(2), 0.]), atol=1e-5)
    _, true_labels = MultiBoxLoss(xy_to_cxcy_ref(priors_xy), threshold=0.6).match([obj], [torch.tensor([3])])
    assert true_labels.tolist() == [[3, 0, 0, 0]]


def test_loss_is_smooth_l1_not_l1(priors):
    """Predictions off their targets by 0.5 (quadratic part) and by 2 (linear part) on every coordinate."""
    g = torch.Generator().manual_seed(10)
    boxes, labels = random_objects(3, g)
    criterion = MultiBoxLoss(priors, alpha=1.)
    true_locs, true_labels = criterion.match([boxes], [labels])
    n_pos = int((true_labels != 0).sum())
    scores = torch.zeros(1, N_PRIORS, N_CLASSES)
    conf_only = MultiBoxLoss(priors, alpha=0.)(true_locs, scores, [boxes], [labels])
    for offset, smooth_l1 in ((0.5, 0.5 * 0.5 ** 2), (2., 2. - 0.5)):
        loss = criterion(true_locs + offset, scores, [boxes], [labels])
        loc_loss = (loss - conf_only).item() * n_pos  # summed over the positives
        assert abs(loc_loss - 4 * n_pos * smooth_l1) < 1e-3 * n_pos, (offset, loc_loss / n_pos)
        assert abs(loc_loss - 4 * n_pos * offset) > 0.1 * n_pos  # what L1 would give


def _shared_prior_case(priors):
    """Two objects centred on the conv4_3 prior at (row 10, column 10), 0.09 and 0.08 wide: both its best."""
    p = (10 * 38 + 10) * 4
    c = 10.5 / 38
    a = torch.tensor([[c - 0.045, c - 0.045, c + 0.045, c + 0.045]])  # IoU 0.81 with the prior
    b = torch.tensor([[c - 0.04, c - 0.04, c + 0.04, c + 0.04]])  # IoU 0.64
    iou = box_iou(torch.cat([a, b]), cxcy_to_xy_ref(priors))
    assert iou.argmax(1).tolist() == [p, p]  # the premise: one best prior for both
    assert iou[0, p] > iou[1, p]
    return p, a, b


def test_match_shared_best_prior_goes_to_the_object_overlapping_it_more(priors):
    p, a, b = _shared_prior_case(priors)
    criterion = MultiBoxLoss(priors)
    c = 10.5 / 38
    expected_a = torch.tensor([0., 0., 5 * math.log(0.9), 5 * math.log(0.9)])  # a is centred on p, 0.9 its size
    for boxes, labels in ((torch.cat([a, b]), torch.tensor([1, 2])), (torch.cat([b, a]), torch.tensor([2, 1]))):
        true_locs, true_labels = criterion.match([boxes], [labels])
        assert true_labels[0, p] == 1, "the prior must go to object a, whatever the order"
        assert torch.allclose(true_locs[0, p], expected_a, atol=1e-4)
        ref_labels, _ = reference_match(boxes, labels, priors)
        assert torch.equal(true_labels[0], ref_labels)
    assert abs(priors[p, 0].item() - c) < 1e-6


def test_match_shared_best_prior_tie_goes_to_the_later_object(priors):
    p, a, _ = _shared_prior_case(priors)
    criterion = MultiBoxLoss(priors)
    boxes = torch.cat([a, a])  # the same box twice: equal overlap
    for labels in (torch.tensor([1, 2]), torch.tensor([2, 1]), torch.tensor([3, 1])):
        _, true_labels = criterion.match([boxes], [labels])
        assert true_labels[0, p] == labels[1]
        # and in a batch, beside another image, the rule holds per image
        _, batch_labels = criterion.match([boxes[:1], boxes], [labels[:1], labels])
        assert batch_labels[1, p] == labels[1] and batch_labels[0, p] == labels[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the claim is about CUDA")
def test_loss_and_backward_make_no_host_synchronization(priors):
    """The training loss must not stall the GPU: any synchronizing call raises in sync debug mode."""
    device = torch.device("cuda")
    criterion = MultiBoxLoss(priors).to(device)
    g = torch.Generator().manual_seed(0)
    boxes = [torch.tensor([[0.1, 0.1, 0.4, 0.5], [0.5, 0.5, 0.9, 0.8]]), torch.zeros(0, 4),
             torch.tensor([[0.2, 0.3, 0.3, 0.35]])]
    boxes = [b.to(device) for b in boxes]
    labels = [torch.tensor([1, 3]).to(device), torch.zeros(0, dtype=torch.long).to(device), torch.tensor([2]).to(device)]
    locs = torch.randn(3, priors.size(0), 4, generator=g).to(device).requires_grad_()
    scores = torch.randn(3, priors.size(0), 4, generator=g).to(device).requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = criterion(locs, scores, boxes, labels)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()
