"""Box math in utils.py against hand computations and torchvision.ops.box_iou.

Run: python -m pytest tests/test_boxes.py -q
"""
import math

import pytest
import torch
from torchvision.ops import box_iou

from utils import (cxcy_to_gcxgcy, cxcy_to_xy, decimate, find_intersection, find_jaccard_overlap,
                   gcxgcy_to_cxcy, xy_to_cxcy)


def random_xy(*shape, generator=None):
    """Random valid boxes (*shape, 4) as (x_min, y_min, x_max, y_max) inside [0, 1]."""
    a = torch.rand(*shape, 2, generator=generator)
    b = torch.rand(*shape, 2, generator=generator)
    return torch.cat([torch.minimum(a, b), torch.maximum(a, b) + 1e-3], -1)


# ---- format conversions -----------------------------------------------------------------------

def test_xy_cxcy_hand_example():
    xy = torch.tensor([[0.1, 0.2, 0.5, 0.6], [0., 0., 1., 0.5]])
    cxcy = torch.tensor([[0.3, 0.4, 0.4, 0.4], [0.5, 0.25, 1., 0.5]])
    assert torch.allclose(xy_to_cxcy(xy), cxcy, atol=1e-7)
    assert torch.allclose(cxcy_to_xy(cxcy), xy, atol=1e-7)


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4)])
def test_xy_cxcy_round_trip(shape):
    g = torch.Generator().manual_seed(0)
    xy = random_xy(*shape, generator=g)
    cxcy = xy_to_cxcy(xy)
    assert cxcy.shape == xy.shape
    assert (cxcy[..., 2:] > 0).all()
    assert torch.allclose(cxcy_to_xy(cxcy), xy, atol=1e-6, rtol=0)
    assert torch.allclose(xy_to_cxcy(cxcy_to_xy(cxcy)), cxcy, atol=1e-6, rtol=0)


def test_gcxgcy_hand_example_uses_variances_10_and_5():
    prior = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    box = torch.tensor([[0.52, 0.46, 0.1, 0.8]])
    # g_cx = (0.52 - 0.5) / (0.2 / 10) = 1, g_cy = (0.46 - 0.5) / (0.4 / 10) = -1,
    # g_w = 5 ln(0.1 / 0.2) = -5 ln 2, g_h = 5 ln(0.8 / 0.4) = 5 ln 2
    expected = torch.tensor([[1., -1., -5 * math.log(2), 5 * math.log(2)]])
    assert torch.allclose(cxcy_to_gcxgcy(box, prior), expected, atol=1e-5)
    assert torch.allclose(gcxgcy_to_cxcy(expected, prior), box, atol=1e-6)


@pytest.mark.parametrize("lead", [(), (3,), (2, 3)])
def test_gcxgcy_round_trip(lead):
    g = torch.Generator().manual_seed(1)
    P = 50
    priors = xy_to_cxcy(random_xy(P, generator=g))  # (P, 4)
    cxcy = xy_to_cxcy(random_xy(*lead, P, generator=g))  # (..., P, 4)
    encoded = cxcy_to_gcxgcy(cxcy, priors)
    assert encoded.shape == cxcy.shape
    assert torch.isfinite(encoded).all()
    assert torch.allclose(gcxgcy_to_cxcy(encoded, priors), cxcy, atol=1e-6, rtol=0)
    # the other way in float64: the encoding multiplies centre errors by 10 / p_w, so narrow priors
    # would amplify float32 rounding beyond 1e-6
    offsets = torch.randn(*lead, P, 4, generator=g, dtype=torch.float64)
    priors = priors.double()
    assert torch.allclose(cxcy_to_gcxgcy(gcxgcy_to_cxcy(offsets, priors), priors), offsets, atol=1e-9, rtol=0)


def test_gcxgcy_zero_offsets_decode_to_the_priors():
    g = torch.Generator().manual_seed(2)
    priors = xy_to_cxcy(random_xy(20, generator=g))
    assert torch.allclose(gcxgcy_to_cxcy(torch.zeros(20, 4), priors), priors, atol=1e-7)
    assert torch.allclose(cxcy_to_gcxgcy(priors, priors), torch.zeros(20, 4), atol=1e-6)


# ---- intersection and IoU -----------------------------------------------------------------------

def test_intersection_and_iou_hand_examples():
    a = torch.tensor([[0., 0., 2., 2.]])
    b = torch.tensor([[1., 1., 3., 3.],  # overlaps a 1x1 corner: IoU 1 / (4 + 4 - 1)
                      [0.5, 0.5, 1.5, 1.5],  # inside a: IoU 1 / 4
                      [2., 0., 3., 2.],  # touches a's right edge: no area in common
                      [2., 2., 3., 3.],  # touches a's corner
                      [5., 5., 6., 7.],  # disjoint
                      [0., 0., 2., 2.]])  # identical
    inter = torch.tensor([[1., 1., 0., 0., 0., 4.]])
    iou = torch.tensor([[1 / 7, 1 / 4, 0., 0., 0., 1.]])
    assert torch.allclose(find_intersection(a, b), inter, atol=1e-7)
    assert torch.allclose(find_jaccard_overlap(a, b), iou, atol=1e-7)
    assert torch.allclose(find_jaccard_overlap(b, a), iou.T, atol=1e-7)


def test_iou_equals_torchvision_box_iou():
    g = torch.Generator().manual_seed(3)
    s1, s2 = random_xy(13, generator=g), random_xy(17, generator=g)
    s2[:3] = s1[:3]  # some identical boxes
    s2[3] = torch.tensor([5., 5., 6., 6.])  # disjoint from everything
    expected = box_iou(s1, s2)
    out = find_jaccard_overlap(s1, s2)
    assert out.shape == (13, 17)
    assert torch.allclose(out, expected, atol=1e-6)
    # intersection by hand, pair by pair
    for i in range(13):
        for j in range(17):
            w = min(s1[i, 2], s2[j, 2]) - max(s1[i, 0], s2[j, 0])
            h = min(s1[i, 3], s2[j, 3]) - max(s1[i, 1], s2[j, 1])
            assert abs(find_intersection(s1, s2)[i, j].item() - max(w, 0) * max(h, 0)) < 1e-6


def test_iou_broadcasts_over_a_leading_batch_dim():
    g = torch.Generator().manual_seed(4)
    s1 = random_xy(3, 5, generator=g)  # (B, n1, 4)
    s2 = random_xy(3, 7, generator=g)  # (B, n2, 4)
    out = find_jaccard_overlap(s1, s2)
    assert out.shape == (3, 5, 7)
    for b in range(3):
        assert torch.allclose(out[b], box_iou(s1[b], s2[b]), atol=1e-6)
    # (B, n1, 4) against one shared (n2, 4): how MultiBoxLoss matches (N, M) objects to the (P,) priors
    shared = random_xy(7, generator=g)
    out = find_jaccard_overlap(s1, shared)
    inter = find_intersection(s1, shared)
    assert out.shape == inter.shape == (3, 5, 7)
    for b in range(3):
        assert torch.allclose(out[b], box_iou(s1[b], shared), atol=1e-6)
        assert torch.allclose(inter[b], find_intersection(s1[b], shared), atol=1e-7)


def test_iou_of_touching_and_disjoint_boxes_is_zero_not_negative():
    g = torch.Generator().manual_seed(5)
    left = torch.tensor([[0., 0., 0.5, 1.]])
    right = torch.tensor([[0.5, 0., 1., 1.], [0.7, 0.2, 0.9, 0.3]])
    assert torch.equal(find_intersection(left, right), torch.zeros(1, 2))
    assert torch.equal(find_jaccard_overlap(left, right), torch.zeros(1, 2))
    boxes = random_xy(50, generator=g)
    far = boxes + 2.  # shifted out of reach
    assert torch.equal(find_jaccard_overlap(boxes, far), torch.zeros(50, 50))


# ---- decimate -----------------------------------------------------------------------------------

def test_decimate_hand_example():
    t = torch.arange(24).view(2, 3, 4)
    out = decimate(t, m=[None, 2, 3])  # rows 0 and 2, columns 0 and 3
    expected = torch.tensor([[[0, 3], [8, 11]],
                             [[12, 15], [20, 23]]])
    assert torch.equal(out, expected)
    assert torch.equal(decimate(torch.arange(10), m=[4]), torch.tensor([0, 4, 8]))
    assert torch.equal(decimate(t, m=[None, None, None]), t)
