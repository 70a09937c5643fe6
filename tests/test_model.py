"""SSD300, its priors, the pretrained base and detect_objects (model.py); its loss is tests/test_loss.py's.

Each result is checked against a reference written here, in plain loops where that is clearer:
the tutorial's prior loop, a greedy per-class NMS and torchvision.ops.nms.
Model forwards cost ~0.2 s an image on a CPU, so they share one batch of 2 per model; the detection
tests use random (N, 8732, 4) tensors instead of a forward.

Run: python -m pytest tests/test_model.py -q
"""
import math
import os
import urllib.error

import pytest
import torch
import torch.nn as nn
import torchvision
from torchvision.ops import nms

from model import SSD300, create_prior_boxes
from misc import UserError

N_CLASSES = 4
N_PRIORS = 8732
# VGG-16's convolutions in order, as SSD300's base names them (tutorial, "Base Convolutions")
VGG_CONV_NAMES = ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
                  "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3"]
AUX_CONV_NAMES = ["conv8_1", "conv8_2", "conv9_1", "conv9_2", "conv10_1", "conv10_2", "conv11_1", "conv11_2"]
# (feature map, size, scale, aspect ratios, channels) from the paper / tutorial
FMAP_SPECS = [("conv4_3", 38, 0.1, [1., 2., 0.5], 512),
              ("conv7", 19, 0.2, [1., 2., 3., 0.5, 1 / 3], 1024),
              ("conv8_2", 10, 0.375, [1., 2., 3., 0.5, 1 / 3], 512),
              ("conv9_2", 5, 0.55, [1., 2., 3., 0.5, 1 / 3], 256),
              ("conv10_2", 3, 0.725, [1., 2., 0.5], 256),
              ("conv11_2", 1, 0.9, [1., 2., 0.5], 256)]


def cxcy_to_xy_ref(cxcy):
    return torch.cat([cxcy[:, :2] - cxcy[:, 2:] / 2, cxcy[:, :2] + cxcy[:, 2:] / 2], 1)


def xy_to_cxcy_ref(xy):
    return torch.stack([(xy[:, 0] + xy[:, 2]) / 2, (xy[:, 1] + xy[:, 3]) / 2,
                        xy[:, 2] - xy[:, 0], xy[:, 3] - xy[:, 1]], 1)


def reference_priors_unclipped():
    """The tutorial's create_prior_boxes loop, without any clipping: (8732, 4) cxcy, float64."""
    priors = []
    for k, (_, dim, s, ratios, _) in enumerate(FMAP_SPECS):
        for i in range(dim):  # row (y)
            for j in range(dim):  # column (x)
                cx, cy = (j + 0.5) / dim, (i + 0.5) / dim
                for r in ratios:
                    priors.append([cx, cy, s * math.sqrt(r), s / math.sqrt(r)])
                    if r == 1.:
                        extra = math.sqrt(s * FMAP_SPECS[k + 1][2]) if k + 1 < len(FMAP_SPECS) else 1.
                        priors.append([cx, cy, extra, extra])
    return torch.tensor(priors, dtype=torch.float64)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SSD300(n_classes=N_CLASSES, base_weights=None).eval()


# =================================================================================================
# Architecture and forward pass
# =================================================================================================

@pytest.fixture(scope="module", params=[False, True], ids=["plain", "batch_norm"])
def forward_run(request):
    """One eval-mode forward of 2 random images, with every base/aux layer call recorded in order."""
    batch_norm = request.param
    torch.manual_seed(1)
    m = SSD300(n_classes=N_CLASSES, base_weights=None, batch_norm=batch_norm).eval()
    with torch.no_grad():  # BatchNorm statistics other than the identity, so eval mode matters
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.normal_(0, 0.1)
                bn.running_var.uniform_(0.5, 2.)
    calls = []  # (qualified name, module, id(input), id(output), output shape)

    def hook(name):
        def record(module, inputs, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            calls.append((name, module, id(inputs[0]), id(out), tuple(out.shape)))
        return record

    handles = [mod.register_forward_hook(hook(name)) for name, mod in m.named_modules()
               if name.startswith(("base.", "aux_convs."))]
    images = torch.randn(2, 3, 300, 300, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        locs, scores = m(images)
    for h in handles:
        h.remove()
    return {"model": m, "batch_norm": batch_norm, "images": images, "locs": locs, "scores": scores, "calls": calls}


def test_forward_shapes(forward_run):
    locs, scores = forward_run["locs"], forward_run["scores"]
    assert locs.shape == (2, N_PRIORS, 4)
    assert scores.shape == (2, N_PRIORS, N_CLASSES)
    assert torch.isfinite(locs).all() and torch.isfinite(scores).all()
    assert locs.std() > 0 and scores.std() > 0


def test_batch_equals_its_images_one_by_one(forward_run):
    m, images = forward_run["model"], forward_run["images"]
    for i in range(images.size(0)):
        with torch.no_grad():
            locs, scores = m(images[i:i + 1])
        for single, batched in ((locs[0], forward_run["locs"][i]), (scores[0], forward_run["scores"][i])):
            tol = 1e-4 * batched.abs().max().item()
            assert torch.allclose(single, batched, atol=tol, rtol=1e-4)


def test_fused_batch_norm_gives_the_same_outputs(forward_run):
    import copy
    m = copy.deepcopy(forward_run["model"]).fuse_batch_norm()
    assert not any(isinstance(x, nn.BatchNorm2d) for x in m.modules())
    with torch.no_grad():
        locs, scores = m(forward_run["images"])
    for fused, plain in ((locs, forward_run["locs"]), (scores, forward_run["scores"])):
        assert torch.allclose(fused, plain, atol=1e-4 * plain.abs().max().item(), rtol=1e-4)


def test_feature_map_sizes(forward_run):
    shapes = {name: shape for name, _, _, _, shape in forward_run["calls"]}
    assert shapes["base.pool3"] == (2, 256, 38, 38)  # 75 -> 38 needs ceil_mode
    assert shapes["base.conv4_3"] == (2, 512, 38, 38)
    assert shapes["base.pool5"] == (2, 512, 19, 19)
    assert shapes["base.conv6"] == (2, 1024, 19, 19)
    assert shapes["base.conv7"] == (2, 1024, 19, 19)
    for name, dim, _, _, channels in FMAP_SPECS[2:]:
        assert shapes["aux_convs." + name] == (2, channels, dim, dim)
    # and what model.base / model.aux_convs return
    m = forward_run["model"]
    with torch.no_grad():
        conv4_3, conv7 = m.base(forward_run["images"][:1])
        aux = m.aux_convs(conv7)
    assert conv4_3.shape == (1, 512, 38, 38) and conv7.shape == (1, 1024, 19, 19)
    assert [tuple(a.shape) for a in aux] == [(1, c, d, d) for _, d, _, _, c in FMAP_SPECS[2:]]


def test_batch_norm_follows_every_conv_of_base_and_aux(forward_run):
    m, calls = forward_run["model"], forward_run["calls"]
    convs = [("base." + n) for n in VGG_CONV_NAMES + ["conv6", "conv7"]] + [("aux_convs." + n) for n in AUX_CONV_NAMES]
    n_bn = sum(isinstance(mod, nn.BatchNorm2d) for mod in m.modules())
    if not forward_run["batch_norm"]:
        assert n_bn == 0
        return
    assert n_bn == len(convs) == 23
    order = [name for name, *_ in calls]
    for conv in convs:
        prefix, layer = conv.split(".")
        bn_name = f"{prefix}.bn{layer[4:]}"
        bn = m.get_submodule(bn_name)
        assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == m.get_submodule(conv).out_channels
        i = order.index(conv)
        assert order[i + 1] == bn_name, f"{conv} is followed by {order[i + 1]}, not {bn_name}"
        assert calls[i + 1][2] == calls[i][3], f"{bn_name} does not take {conv}'s output"


def test_vgg_layer_configuration(model):
    base = model.base
    for name in VGG_CONV_NAMES:
        conv = getattr(base, name)
        assert conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.stride == (1, 1)
    for i in (1, 2, 3, 4):
        pool = getattr(base, f"pool{i}")
        assert isinstance(pool, nn.MaxPool2d) and pool.kernel_size == 2 and pool.stride == 2
        assert pool.ceil_mode == (i == 3)
    assert isinstance(base.pool5, nn.MaxPool2d)
    assert (base.pool5.kernel_size, base.pool5.stride, base.pool5.padding) == (3, 1, 1)
    c6, c7 = base.conv6, base.conv7
    assert (c6.in_channels, c6.out_channels, c6.kernel_size, c6.dilation, c6.padding) == (512, 1024, (3, 3), (6, 6), (6, 6))
    assert (c7.in_channels, c7.out_channels, c7.kernel_size) == (1024, 1024, (1, 1))


def test_prediction_heads_have_4_6_6_6_4_4_priors_per_location(model):
    for (fmap, _, _, _, channels), n in zip(FMAP_SPECS, (4, 6, 6, 6, 4, 4)):
        loc, cl = getattr(model.pred_convs, "loc_" + fmap), getattr(model.pred_convs, "cl_" + fmap)
        assert (loc.in_channels, loc.out_channels) == (channels, n * 4)
        assert (cl.in_channels, cl.out_channels) == (channels, n * N_CLASSES)
    assert sum(d * d * n for (_, d, _, _, _), n in zip(FMAP_SPECS, (4, 6, 6, 6, 4, 4))) == N_PRIORS


def test_rescale_factors_start_at_20(model):
    rf = model.rescale_factors
    assert isinstance(rf, nn.Parameter) and rf.requires_grad
    assert rf.shape == (1, 512, 1, 1)
    assert torch.equal(rf, torch.full((1, 512, 1, 1), 20.))
    assert any(p is rf for p in model.parameters())


def test_priors_are_a_non_persistent_buffer():
    m = SSD300(n_classes=N_CLASSES, base_weights=None)
    assert "priors_cxcy" in dict(m.named_buffers())
    assert not any("priors" in k for k in m.state_dict())
    assert torch.equal(m.priors_cxcy, create_prior_boxes())
    m.to(torch.float64)  # no GPU here: a dtype change and the meta device show that .to() reaches it
    assert m.priors_cxcy.dtype == torch.float64
    m.to("meta")
    assert m.priors_cxcy.device.type == "meta"


@pytest.mark.parametrize("batch_norm", [False, True])
def test_xavier_init(batch_norm):
    torch.manual_seed(3)
    m = SSD300(n_classes=N_CLASSES, base_weights=None, batch_norm=batch_norm)
    convs = [(n, mod) for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d)]
    assert len(convs) == 13 + 2 + 8 + 12
    for name, conv in convs:
        w = conv.weight
        fan_in = w.size(1) * w[0, 0].numel()
        fan_out = w.size(0) * w[0, 0].numel()
        bound = math.sqrt(6. / (fan_in + fan_out))  # xavier_uniform_, gain 1
        assert torch.equal(conv.bias, torch.zeros_like(conv.bias)), name
        assert w.abs().max() <= bound + 1e-7, name
        if w.numel() >= 10_000:  # uniform on [-bound, bound]: reaches the edge, std bound / sqrt(3)
            assert w.abs().max() > 0.99 * bound, name
            assert abs(w.std().item() / (bound / math.sqrt(3)) - 1) < 0.05, name
    for bn in (mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)):
        assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.bias, torch.zeros_like(bn.bias))


# =================================================================================================
# Priors
# =================================================================================================

def test_prior_count_and_per_map_layout():
    priors = create_prior_boxes()
    assert priors.shape == (N_PRIORS, 4)
    ref = reference_priors_unclipped()
    assert ref.shape == (N_PRIORS, 4)
    # first conv4_3, row by row, 4 priors a location: prior k of location (i, j) is (i * 38 + j) * 4 + k
    assert torch.allclose(ref[0], torch.tensor([0.5 / 38, 0.5 / 38, 0.1, 0.1], dtype=torch.float64))
    assert torch.allclose(ref[4, :2], torch.tensor([1.5 / 38, 0.5 / 38], dtype=torch.float64))  # next column
    assert torch.allclose(ref[38 * 4, :2], torch.tensor([0.5 / 38, 1.5 / 38], dtype=torch.float64))  # next row
    assert torch.allclose(ref[38 * 38 * 4, :2], torch.tensor([0.5 / 19, 0.5 / 19], dtype=torch.float64))  # conv7


def test_priors_equal_the_tutorial_priors_clipped_to_the_image():
    priors = create_prior_boxes().double()
    ref_xy = cxcy_to_xy_ref(reference_priors_unclipped())
    clipped = ref_xy.clamp(0, 1)  # intersection of each box with the unit square
    assert torch.allclose(cxcy_to_xy_ref(priors), clipped, atol=1e-6, rtol=0)
    inside = ((ref_xy >= 0) & (ref_xy <= 1)).all(1)
    assert 0 < inside.sum() < N_PRIORS  # both kinds are there
    assert torch.allclose(priors[inside], reference_priors_unclipped()[inside], atol=1e-6, rtol=0)


def test_prior_hand_checks():
    priors = create_prior_boxes().double()
    # conv4_3, location (row 10, column 10): ratio 1, the extra sqrt(0.1 * 0.2), ratio 2, ratio 1/2; inside the image
    i = (10 * 38 + 10) * 4
    c = 10.5 / 38
    expected = torch.tensor([[c, c, 0.1, 0.1],
                             [c, c, math.sqrt(0.02), math.sqrt(0.02)],
                             [c, c, 0.1 * math.sqrt(2), 0.1 / math.sqrt(2)],
                             [c, c, 0.1 / math.sqrt(2), 0.1 * math.sqrt(2)]], dtype=torch.float64)
    assert torch.allclose(priors[i:i + 4], expected, atol=1e-6)
    assert torch.allclose(priors[i + 4, :2], torch.tensor([11.5 / 38, c], dtype=torch.float64), atol=1e-6)
    # conv7 uses ratios 1, extra, 2, 3, 1/2, 1/3: location (9, 9) is the centre of the image
    i = 38 * 38 * 4 + (9 * 19 + 9) * 6
    widths = [0.2, math.sqrt(0.2 * 0.375), 0.2 * math.sqrt(2), 0.2 * math.sqrt(3), 0.2 / math.sqrt(2), 0.2 / math.sqrt(3)]
    assert torch.allclose(priors[i:i + 6, 2], torch.tensor(widths, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(priors[i:i + 6, :2], torch.full((6, 2), 0.5, dtype=torch.float64), atol=1e-6)
    # the very first prior, 0.1 wide at (0.5/38, 0.5/38), reaches outside: clipped to its part in the image
    e = 0.5 / 38 + 0.05
    assert torch.allclose(cxcy_to_xy_ref(priors[:1]), torch.tensor([[0., 0., e, e]], dtype=torch.float64), atol=1e-6)
    # the last map's extra prior has scale 1: the whole image
    assert torch.allclose(cxcy_to_xy_ref(priors[-3:-2]), torch.tensor([[0., 0., 1., 1.]], dtype=torch.float64), atol=1e-6)


def test_all_priors_lie_inside_the_image():
    xy = cxcy_to_xy_ref(create_prior_boxes())
    assert (xy >= -1e-6).all() and (xy <= 1 + 1e-6).all()
    assert ((xy[:, 2:] - xy[:, :2]) > 0).all()


# =================================================================================================
# Pretrained base weights
# =================================================================================================

@pytest.fixture(scope="module")
def vgg_files(tmp_path_factory):
    """torchvision VGG-16 and VGG-16-BN with random weights (biases and BN statistics too), saved."""
    folder = tmp_path_factory.mktemp("vgg")
    out = {}
    for batch_norm, build in ((False, torchvision.models.vgg16), (True, torchvision.models.vgg16_bn)):
        torch.manual_seed(4 + batch_norm)
        vgg = build(weights=None, init_weights=False)  # PyTorch's own random start: one pass over 138M weights, not two
        with torch.no_grad():  # torchvision starts biases at 0 and BatchNorms at (1, 0, 0, 1): make them tell
            for mod in vgg.modules():
                if isinstance(mod, (nn.Conv2d, nn.Linear)):
                    mod.bias.uniform_(-1, 1)
                if isinstance(mod, nn.BatchNorm2d):
                    mod.weight.uniform_(0.5, 1.5)
                    mod.bias.uniform_(-1, 1)
                    mod.running_mean.uniform_(-1, 1)
                    mod.running_var.uniform_(0.5, 2)
                    mod.num_batches_tracked.fill_(7)
        path = folder / ("vgg16_bn.pth" if batch_norm else "vgg16.pth")
        torch.save(vgg.state_dict(), path)
        out[batch_norm] = (str(path), vgg)
    return out


@pytest.mark.parametrize("batch_norm", [False, True], ids=["vgg16", "vgg16_bn"])
def test_base_weights_are_copied_and_decimated(vgg_files, batch_norm):
    path, vgg = vgg_files[batch_norm]
    m = SSD300(n_classes=N_CLASSES, base_weights=path, batch_norm=batch_norm)
    convs = [mod for mod in vgg.features if isinstance(mod, nn.Conv2d)]
    bns = [mod for mod in vgg.features if isinstance(mod, nn.BatchNorm2d)]
    assert len(convs) == 13 and len(bns) == (13 if batch_norm else 0)
    for name, conv in zip(VGG_CONV_NAMES, convs):
        assert torch.equal(getattr(m.base, name).weight, conv.weight), name
        assert torch.equal(getattr(m.base, name).bias, conv.bias), name
    for name, bn in zip(VGG_CONV_NAMES, bns):
        ours = getattr(m.base, "bn" + name[4:])
        for attr in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(ours, attr), getattr(bn, attr)), f"bn{name[4:]}.{attr}"
    # fc6 (4096, 512*7*7) -> (4096, 512, 7, 7): every 4th filter, every 3rd row and column
    fc6, fc7 = vgg.classifier[0], vgg.classifier[3]
    w6 = fc6.weight.view(4096, 512, 7, 7)[::4, :, ::3, ::3]
    assert w6.shape == (1024, 512, 3, 3)
    assert torch.equal(m.base.conv6.weight, w6)
    assert torch.equal(m.base.conv6.bias, fc6.bias[::4])
    # fc7 (4096, 4096): every 4th output and input
    assert torch.equal(m.base.conv7.weight, fc7.weight[::4, ::4].reshape(1024, 1024, 1, 1))
    assert torch.equal(m.base.conv7.bias, fc7.bias[::4])
    if batch_norm:  # conv6/conv7 have no counterpart in VGG-16-BN: their BatchNorms start fresh
        for bn in (m.base.bn6, m.base.bn7):
            assert torch.equal(bn.running_mean, torch.zeros(1024)) and torch.equal(bn.running_var, torch.ones(1024))
    # layers outside the base keep their Xavier initialization
    assert torch.equal(m.aux_convs.conv8_1.bias, torch.zeros(256))


def _assert_one_line_user_error(excinfo, *words):
    message = str(excinfo.value)
    assert message and "\n" not in message, message
    for w in words:
        assert w in message, f"{w!r} not in {message!r}"


def test_wrong_base_weights_files_give_a_user_error(tmp_path):
    random_dict = tmp_path / "random.pth"
    torch.save({"weight": torch.randn(3, 3), "step": 5}, random_dict)
    not_torch = tmp_path / "notes.txt"
    not_torch.write_text("not a state_dict\n")
    a_list = tmp_path / "list.pth"
    torch.save([torch.randn(2)], a_list)
    not_finite = tmp_path / "nan.pth"
    torch.save({"features.0.weight": torch.full((64, 3, 3, 3), float("nan"))}, not_finite)
    os.mkfifo(tmp_path / "pipe.pth")  # read, it would wait for ever
    with pytest.raises(UserError) as e:
        SSD300(n_classes=N_CLASSES, base_weights=str(random_dict))
    _assert_one_line_user_error(e, str(random_dict))
    # the rest through the method SSD300.__init__ calls, on one model of each kind (faster)
    for batch_norm in (False, True):
        m = SSD300(n_classes=N_CLASSES, base_weights=None, batch_norm=batch_norm)
        for path in (random_dict, not_torch, a_list, tmp_path / "missing.pth", not_finite, tmp_path / "pipe.pth",
                     tmp_path):
            with pytest.raises(UserError) as e:
                m.load_pretrained_layers(str(path))
            _assert_one_line_user_error(e, str(path))


def test_vgg16_weights_for_a_batch_norm_model_give_a_user_error(vgg_files):
    path, _ = vgg_files[False]
    with pytest.raises(UserError) as e:
        SSD300(n_classes=N_CLASSES, base_weights=path, batch_norm=True)
    _assert_one_line_user_error(e, path)


def test_vgg16_with_other_layer_shapes_gives_a_user_error(vgg_files, tmp_path):
    """A VGG-16 for grey images (1 input channel) has VGG-16's keys but another conv1_1 shape."""
    _, vgg = vgg_files[False]
    state = dict(vgg.state_dict())
    state["features.0.weight"] = torch.randn(64, 1, 3, 3)
    # the classifier as stride-0 tensors of the right shapes: the file stays small
    state["classifier.0.weight"] = torch.zeros(()).expand(4096, 512 * 7 * 7)
    state["classifier.3.weight"] = torch.zeros(()).expand(4096, 4096)
    path = tmp_path / "vgg16_grey.pth"
    torch.save(state, path)
    with pytest.raises(UserError) as e:
        SSD300(n_classes=N_CLASSES, base_weights=str(path))
    _assert_one_line_user_error(e, str(path))


@pytest.mark.parametrize("batch_norm", [False, True])
def test_imagenet_weights_offline_give_a_user_error(monkeypatch, batch_norm):
    tries = []

    def offline(url, *args, **kwargs):
        tries.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    # torchvision's WeightsEnum.get_state_dict downloads through this name
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(UserError) as e:
        SSD300(n_classes=N_CLASSES, base_weights="imagenet", batch_norm=batch_norm)
    assert len(tries) == 1 and ("vgg16_bn" in tries[0]) == batch_norm
    _assert_one_line_user_error(e, "download", "none", "PATH")


# =================================================================================================
# detect_objects
# =================================================================================================

MIN_SCORE, MAX_OVERLAP = 0.3, 0.45


def peaked_predictions(n_images, g, empty=()):
    """Random predictions where background wins almost everywhere and ~150 priors per class score
    above MIN_SCORE (a third of them among the large priors, so that NMS has boxes to suppress).
    Images in `empty` score nothing above MIN_SCORE."""
    locs = torch.randn(n_images, N_PRIORS, 4, generator=g)
    scores = 0.5 * torch.randn(n_images, N_PRIORS, N_CLASSES, generator=g)
    scores[:, :, 0] += 3.
    for i in range(n_images):
        if i in empty:
            scores[i, :, 0] += 5.
            continue
        for c in range(1, N_CLASSES):
            chosen = torch.cat([torch.randperm(N_PRIORS, generator=g)[:100],
                                N_PRIORS - 790 + torch.randperm(790, generator=g)[:50]])
            scores[i, chosen, c] += 3. + 3. * torch.rand(150, generator=g)
    return locs, scores


def decode_ref(locs, priors_cxcy):
    """Offsets -> boxes, by hand (paper, eq. 2, variances 10 and 5), clipped to the image: float64 (P, 4)."""
    g, p = locs.double(), priors_cxcy.double()
    cxcy = torch.stack([p[:, 0] + g[:, 0] * p[:, 2] / 10, p[:, 1] + g[:, 1] * p[:, 3] / 10,
                        p[:, 2] * torch.exp(g[:, 2] / 5), p[:, 3] * torch.exp(g[:, 3] / 5)], 1)
    return cxcy_to_xy_ref(cxcy)


def iou_ref(a, b):
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0.) * max(h, 0.)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def reference_detect(locs, scores, priors_cxcy, min_score, max_overlap, top_k, suppress="greedy"):
    """Per image, per class: softmax, threshold, sort, NMS (plain greedy loop or torchvision.ops.nms),
    then the top_k best over all classes. Returns a list over images of (score, label, box) tuples."""
    out = []
    for i in range(locs.size(0)):
        boxes = decode_ref(locs[i], priors_cxcy).clamp(0, 1)  # (P, 4)
        probs = torch.softmax(scores[i].double(), 1)
        detections = []
        for c in range(1, scores.size(2)):
            candidates = (probs[:, c] > min_score).nonzero()[:, 0]
            assert len(candidates) < 400  # the premise under which full NMS is what detect_objects does
            if suppress == "greedy":
                order = sorted(candidates.tolist(), key=lambda p: -probs[p, c].item())
                box_list = boxes.tolist()
                kept = []
                for p in order:
                    if all(iou_ref(box_list[p], box_list[q]) <= max_overlap for q in kept):
                        kept.append(p)
            else:
                kept = candidates[nms(boxes[candidates].float(), probs[candidates, c].float(), max_overlap)].tolist()
            detections += [(probs[p, c].item(), c, boxes[p]) for p in kept]
        detections.sort(key=lambda d: -d[0])
        out.append(detections[:top_k])
    return out


def assert_same_detections(model_out, reference):
    det_boxes, det_labels, det_scores = model_out
    assert len(det_boxes) == len(det_labels) == len(det_scores) == len(reference)
    for boxes, labels, scores, ref in zip(det_boxes, det_labels, det_scores, reference):
        assert boxes.shape == (len(ref), 4) and labels.shape == (len(ref),) and scores.shape == (len(ref),)
        if not ref:
            continue
        assert labels.tolist() == [c for _, c, _ in ref]
        assert torch.allclose(scores.double(), torch.tensor([s for s, _, _ in ref], dtype=torch.float64), atol=1e-6)
        assert torch.allclose(boxes.double(), torch.stack([b for _, _, b in ref]), atol=1e-5)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("suppress", ["greedy", "torchvision"])
def test_detect_objects_equals_per_class_nms_reference(model, seed, suppress):
    g = torch.Generator().manual_seed(200 + seed)
    locs, scores = peaked_predictions(2, g)
    out = model.detect_objects(locs, scores, min_score=MIN_SCORE, max_overlap=MAX_OVERLAP, top_k=200)
    reference = reference_detect(locs, scores, model.priors_cxcy, MIN_SCORE, MAX_OVERLAP, 200, suppress)
    assert_same_detections(out, reference)
    n_candidates = int((torch.softmax(scores, 2)[:, :, 1:] > MIN_SCORE).sum())
    assert 0 < sum(len(r) for r in reference) < n_candidates  # NMS did suppress something


@pytest.mark.parametrize("nms_chunk", [1, 400, 1000, 5000, 10 ** 9])
def test_detect_objects_gives_the_same_detections_whatever_the_nms_chunk(model, nms_chunk):
    """Runs of whole images, each NMS'd by one batched_nms call: any run size gives the per-class reference
    (1: one image a call; 10 ** 9: all images in one call), with images that have nothing in between."""
    g = torch.Generator().manual_seed(300)
    locs, scores = peaked_predictions(5, g, empty=(0, 2))
    out = model.detect_objects(locs, scores, min_score=MIN_SCORE, max_overlap=MAX_OVERLAP, top_k=200,
                               nms_chunk=nms_chunk)
    assert_same_detections(out, reference_detect(locs, scores, model.priors_cxcy, MIN_SCORE, MAX_OVERLAP, 200))


def test_detect_objects_keeps_the_top_k_best_over_all_classes(model):
    g = torch.Generator().manual_seed(210)
    locs, scores = peaked_predictions(2, g)
    out = model.detect_objects(locs, scores, min_score=MIN_SCORE, max_overlap=MAX_OVERLAP, top_k=10)
    reference = reference_detect(locs, scores, model.priors_cxcy, MIN_SCORE, MAX_OVERLAP, 10)
    assert [len(r) for r in reference] == [10, 10]
    assert_same_detections(out, reference)
    assert len(set(out[1][0].tolist())) > 1  # several classes among the 10


def test_detect_objects_outputs_sorted_fractional_and_clipped(model):
    g = torch.Generator().manual_seed(220)
    locs, scores = peaked_predictions(2, g)
    locs[:, :, 2:] += 3.  # boxes e^(3/5) = 1.8 times their priors: many reach outside the image
    unclipped = torch.stack([decode_ref(locs[i], model.priors_cxcy) for i in range(2)])
    assert (unclipped < 0).any() and (unclipped > 1).any()
    det_boxes, det_labels, det_scores = model.detect_objects(locs, scores, min_score=MIN_SCORE,
                                                             max_overlap=MAX_OVERLAP, top_k=200)
    for boxes, labels, scores_i in zip(det_boxes, det_labels, det_scores):
        assert len(scores_i) > 0
        assert (scores_i[:-1] >= scores_i[1:]).all()
        assert (scores_i > MIN_SCORE).all() and (scores_i <= 1).all()
        assert (boxes >= 0).all() and (boxes <= 1).all()
        assert ((boxes == 0) | (boxes == 1)).any()  # some were clipped
        assert (boxes[:, 2:] >= boxes[:, :2]).all()
        assert ((labels >= 1) & (labels < N_CLASSES)).all() and labels.dtype == torch.long


def test_detect_objects_image_with_nothing_above_min_score_gets_empty_tensors(model):
    g = torch.Generator().manual_seed(230)
    locs, scores = peaked_predictions(3, g, empty=(1,))
    det_boxes, det_labels, det_scores = model.detect_objects(locs, scores, min_score=MIN_SCORE,
                                                             max_overlap=MAX_OVERLAP, top_k=200)
    assert det_boxes[1].shape == (0, 4) and det_labels[1].shape == (0,) and det_scores[1].shape == (0,)
    assert len(det_boxes[0]) > 0 and len(det_boxes[2]) > 0  # the images around it keep theirs
    reference = reference_detect(locs, scores, model.priors_cxcy, MIN_SCORE, MAX_OVERLAP, 200)
    assert_same_detections((det_boxes, det_labels, det_scores), reference)
    # and a batch where no image has anything
    det_boxes, det_labels, det_scores = model.detect_objects(locs[1:2], scores[1:2], min_score=MIN_SCORE,
                                                             max_overlap=MAX_OVERLAP, top_k=200)
    assert len(det_boxes) == 1
    assert det_boxes[0].shape == (0, 4) and det_labels[0].shape == (0,) and det_scores[0].shape == (0,)


def test_detect_objects_with_one_min_score_per_class_equals_each_class_at_its_own(model):
    """min_score may be one value per class: each class's detections are those of a decode at its own threshold
    (NMS and the threshold act class by class; top_k is set above the number of detections, as an image of cells
    is far below 200)."""
    g = torch.Generator().manual_seed(240)
    locs, scores = peaked_predictions(3, g, empty=(1,))
    per_class = [0.3, 0.9, 0.45]
    det_boxes, det_labels, det_scores = model.detect_objects(locs, scores, min_score=per_class,
                                                             max_overlap=MAX_OVERLAP, top_k=1000)
    for c, threshold in enumerate(per_class, start=1):
        reference = reference_detect(locs, scores, model.priors_cxcy, threshold, MAX_OVERLAP, 1000)
        reference = [[d for d in ref if d[1] == c] for ref in reference]
        mine = [tuple(x[labels == c] for x in (boxes, labels, s))
                for boxes, labels, s in zip(det_boxes, det_labels, det_scores)]
        assert_same_detections(tuple(zip(*mine)), reference)
        assert sum(len(r) for r in reference) > 0
    # the thresholds do differ: class 2 at 0.9 keeps fewer than at 0.3
    at_03 = model.detect_objects(locs, scores, min_score=0.3, max_overlap=MAX_OVERLAP, top_k=1000)[1]
    assert sum(int((l == 2).sum()) for l in det_labels) < sum(int((l == 2).sum()) for l in at_03)
