"""SSD300 with a VGG-16 base, its priors, MultiBoxLoss and detect_objects; ModelEMA, the average of its weights that
train.py --ema-decay keeps.

Follows the tutorial's sections "Base Convolutions", "Auxiliary Convolutions", "Prediction
Convolutions", "Putting it all together", "Priors" and "Multibox Loss"
(../shared/seed/ssd-tutorial-bccd.md) and the SSD paper (Liu et al., 2016, arXiv:1512.02325).

Shape notation used in comments:
    N  batch size          P  number of priors (8732)
    C  number of classes, background included (4 for BCCD)
    M  objects in an image (padded to the largest in the batch)
Boxes are fractional (x_min, y_min, x_max, y_max) unless the name says cxcy / gcxgcy.
"""
import copy
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

from misc import UserError, all_finite
from utils import (check_label_map, class_colors, class_names, cxcy_to_gcxgcy, cxcy_to_xy, decimate,
                   find_jaccard_overlap, gcxgcy_to_cxcy, make_label_map, xy_to_cxcy)
from utils import label_map as bccd_label_map

# The six feature maps that predict boxes, their sizes, prior scales and aspect ratios (paper, Sec. 2.2-3).
FMAPS = ("conv4_3", "conv7", "conv8_2", "conv9_2", "conv10_2", "conv11_2")
FMAP_DIMS = (38, 19, 10, 5, 3, 1)
PRIOR_SCALES = (0.1, 0.2, 0.375, 0.55, 0.725, 0.9)
ASPECT_RATIOS = ((1., 2., 0.5),
                 (1., 2., 3., 0.5, 1 / 3),
                 (1., 2., 3., 0.5, 1 / 3),
                 (1., 2., 3., 0.5, 1 / 3),
                 (1., 2., 0.5),
                 (1., 2., 0.5))
N_BOXES = tuple(len(r) + 1 for r in ASPECT_RATIOS)  # + the extra square prior: 4, 6, 6, 6, 4, 4


def valid_prior_scales(scales):
    """Six prior scales (conv4_3 ... conv11_2), each a fraction of the image in (0, 1] (nan refused)."""
    return isinstance(scales, (list, tuple)) and len(scales) == 6 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1 for v in scales)


# VGG-16's 13 convolutions as (name, in_channels, out_channels), and its first four max pools.
VGG_LAYERS = (("conv1_1", 3, 64), ("conv1_2", 64, 64), "pool1",
              ("conv2_1", 64, 128), ("conv2_2", 128, 128), "pool2",
              ("conv3_1", 128, 256), ("conv3_2", 256, 256), ("conv3_3", 256, 256), "pool3",
              ("conv4_1", 256, 512), ("conv4_2", 512, 512), ("conv4_3", 512, 512), "pool4",
              ("conv5_1", 512, 512), ("conv5_2", 512, 512), ("conv5_3", 512, 512))
VGG_CONVS = tuple(layer[0] for layer in VGG_LAYERS if not isinstance(layer, str))


def _bn(channels, batch_norm):
    return nn.BatchNorm2d(channels) if batch_norm else nn.Identity()


class VGGBase(nn.Module):
    """VGG-16 convolutions up to conv5_3, then conv6 and conv7 in place of the fully connected layers.

    Returns the conv4_3 (N, 512, 38, 38) and conv7 (N, 1024, 19, 19) feature maps.
    With batch_norm, a BatchNorm follows every convolution (ScratchDet, Zhu et al. 2019: it lets
    SSD train from scratch at a much higher learning rate); bnX_Y is an Identity otherwise.
    """

    def __init__(self, batch_norm=False):
        super().__init__()
        for layer in VGG_LAYERS:
            if isinstance(layer, str):
                # pool3 rounds up (ceil_mode) so that conv4_3 is 38x38, not 37x37 (75 / 2 = 37.5)
                setattr(self, layer, nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=layer == "pool3"))
            else:
                name, c_in, c_out = layer
                setattr(self, name, nn.Conv2d(c_in, c_out, kernel_size=3, padding=1))
                setattr(self, "bn" + name[4:], _bn(c_out, batch_norm))
        # pool5 is 3x3, stride 1, so conv5_3's 19x19 resolution is kept (paper, Sec. 3)
        self.pool5 = nn.MaxPool2d(kernel_size=3, stride=1, padding=1)
        # conv6: atrous (dilation 6) 3x3 conv, decimated from fc6; conv7: 1x1 conv from fc7
        self.conv6 = nn.Conv2d(512, 1024, kernel_size=3, padding=6, dilation=6)
        self.bn6 = _bn(1024, batch_norm)
        self.conv7 = nn.Conv2d(1024, 1024, kernel_size=1)
        self.bn7 = _bn(1024, batch_norm)

    def _conv(self, name, x):
        return F.relu(getattr(self, "bn" + name[4:])(getattr(self, name)(x)), inplace=True)

    def forward(self, image):  # (N, 3, 300, 300)
        x = image
        for layer in VGG_LAYERS:  # the pools take 300 -> 150 -> 75 -> 38 -> 19
            if isinstance(layer, str):
                x = getattr(self, layer)(x)
            else:
                x = self._conv(layer[0], x)
                if layer[0] == "conv4_3":
                    conv4_3_feats = x  # (N, 512, 38, 38)
        x = self.pool5(x)  # (N, 512, 19, 19)
        x = self._conv("conv6", x)  # (N, 1024, 19, 19)
        conv7_feats = self._conv("conv7", x)  # (N, 1024, 19, 19)
        return conv4_3_feats, conv7_feats


class AuxiliaryConvolutions(nn.Module):
    """Extra layers on top of conv7 that give the coarser maps conv8_2 ... conv11_2 (paper, Fig. 2)."""

    LAYERS = (("conv8_1", 1024, 256, 1, 1, 0), ("conv8_2", 256, 512, 3, 2, 1),  # -> 10x10
              ("conv9_1", 512, 128, 1, 1, 0), ("conv9_2", 128, 256, 3, 2, 1),  # -> 5x5
              ("conv10_1", 256, 128, 1, 1, 0), ("conv10_2", 128, 256, 3, 1, 0),  # -> 3x3
              ("conv11_1", 256, 128, 1, 1, 0), ("conv11_2", 128, 256, 3, 1, 0))  # -> 1x1

    def __init__(self, batch_norm=False):
        super().__init__()
        for name, c_in, c_out, k, stride, pad in self.LAYERS:
            setattr(self, name, nn.Conv2d(c_in, c_out, kernel_size=k, stride=stride, padding=pad))
            setattr(self, "bn" + name[4:], _bn(c_out, batch_norm))

    def forward(self, conv7_feats):  # (N, 1024, 19, 19)
        x, feats = conv7_feats, []
        for name, *_ in self.LAYERS:
            x = F.relu(getattr(self, "bn" + name[4:])(getattr(self, name)(x)), inplace=True)
            if name.endswith("_2"):
                feats.append(x)
        return feats  # conv8_2 (N, 512, 10, 10), conv9_2 (N, 256, 5, 5), conv10_2 (N, 256, 3, 3), conv11_2 (N, 256, 1, 1)


class PredictionConvolutions(nn.Module):
    """3x3 convolutions that predict, at every prior, 4 box offsets and C class scores.

    The six maps' predictions are flattened location by location, then prior by prior, and
    concatenated in the order of FMAPS: the same order as create_prior_boxes().
    """

    CHANNELS = (512, 1024, 512, 256, 256, 256)

    def __init__(self, n_classes):
        super().__init__()
        self.n_classes = n_classes
        for fmap, c_in, n in zip(FMAPS, self.CHANNELS, N_BOXES):
            setattr(self, "loc_" + fmap, nn.Conv2d(c_in, n * 4, kernel_size=3, padding=1))
            setattr(self, "cl_" + fmap, nn.Conv2d(c_in, n * n_classes, kernel_size=3, padding=1))

    def forward(self, *feats):
        N = feats[0].size(0)
        locs, scores = [], []
        for fmap, x in zip(FMAPS, feats):
            # (N, n*4, H, W) -> (N, H, W, n*4) -> (N, H*W*n, 4): the order of the priors
            locs.append(getattr(self, "loc_" + fmap)(x).permute(0, 2, 3, 1).reshape(N, -1, 4))
            scores.append(getattr(self, "cl_" + fmap)(x).permute(0, 2, 3, 1).reshape(N, -1, self.n_classes))
        return torch.cat(locs, 1), torch.cat(scores, 1)  # (N, P, 4), (N, P, C)


def create_prior_boxes(scales=PRIOR_SCALES):
    """The 8732 default boxes ("priors") of SSD300, in centre-size form (P, 4), fractional.

    For each feature map in FMAPS order, row by row, column by column, and at each location in
    the order: aspect ratio 1, the extra square of scale sqrt(s_k * s_k+1) (1 for the last map),
    then the other ratios. A prior of scale s and ratio a is s*sqrt(a) wide and s/sqrt(a) high.

    Clipping (our choice; the tutorial clamps c_x, c_y, w, h each to [0, 1], which shifts no
    centre but lets a box overshoot the image by up to half its size, and the paper says
    nothing): priors are clipped to the image in corner form, so every prior is the part of its
    box that lies inside the image. Edge priors then resemble the objects the image border
    truncates, whose annotated boxes also end at the border. Priors inside the image are unchanged.
    """
    assert len(scales) == len(FMAPS)
    priors = []
    for k, (dim, ratios) in enumerate(zip(FMAP_DIMS, ASPECT_RATIOS)):
        s = scales[k]
        extra = math.sqrt(s * scales[k + 1]) if k + 1 < len(scales) else 1.
        wh = [(s * math.sqrt(ratios[0]), s / math.sqrt(ratios[0])), (extra, extra)]
        wh += [(s * math.sqrt(r), s / math.sqrt(r)) for r in ratios[1:]]
        wh = torch.tensor(wh)  # (n, 2)
        centres = (torch.arange(dim, dtype=torch.float) + 0.5) / dim
        cy, cx = torch.meshgrid(centres, centres, indexing="ij")  # row by row
        cxcy = torch.stack([cx, cy], -1).reshape(-1, 1, 2).expand(-1, len(wh), 2)  # (dim*dim, n, 2)
        priors.append(torch.cat([cxcy, wh.expand(dim * dim, -1, -1)], -1).reshape(-1, 4))
    priors = torch.cat(priors)  # (8732, 4)
    return xy_to_cxcy(cxcy_to_xy(priors).clamp(0, 1))


class SSD300(nn.Module):
    """The Single Shot MultiBox Detector at 300x300: VGG base, auxiliary and prediction convolutions.

    Args:
        n_classes: classes including background (BCCD: 4).
        base_weights: "imagenet" (torchvision's ImageNet VGG-16, or VGG-16-BN with batch_norm,
            downloaded through torchvision), a path to a torchvision VGG-16 state_dict saved with
            torch.save, or None to start from scratch.
        batch_norm: BatchNorm after every convolution of the base and auxiliary layers.
        prior_scales: the six prior scales (default: the paper's 0.1 ... 0.9, as in the tutorial).
        label_map: {"background": 0, class name: label, ...} of n_classes entries (default: BCCD's for 4
            classes, else "class 1", "class 2", ...). Not part of the network: the names it predicts.
    `model(images)` with images (N, 3, 300, 300) returns locs (N, 8732, 4) and scores (N, 8732, C).
    """

    def __init__(self, n_classes=4, base_weights="imagenet", batch_norm=False, prior_scales=PRIOR_SCALES,
                 label_map=None):
        super().__init__()
        if label_map is None:
            label_map = (bccd_label_map if n_classes == len(bccd_label_map)
                         else make_label_map(f"class {i}" for i in range(1, n_classes)))
        if len(label_map) != n_classes:
            raise ValueError(f"a label map of {len(label_map)} entries for {n_classes} classes")
        self.n_classes = n_classes
        self.label_map = dict(label_map)  # class name -> label, background 0
        self.batch_norm = batch_norm
        self.prior_scales = tuple(float(s) for s in prior_scales)
        self.base = VGGBase(batch_norm)
        self.aux_convs = AuxiliaryConvolutions(batch_norm)
        self.pred_convs = PredictionConvolutions(n_classes)
        # conv4_3's features are larger than the others': L2-normalize each location's 512 values,
        # then rescale each channel by a learned factor, initially 20 (ParseNet; paper, Sec. 3)
        self.rescale_factors = nn.Parameter(torch.full((1, 512, 1, 1), 20.))
        self.register_buffer("priors_cxcy", create_prior_boxes(self.prior_scales), persistent=False)
        self.init_weights()
        if base_weights is not None:
            self.load_pretrained_layers(base_weights)

    @property
    def model_args(self):
        """What rebuilds this model: saved in checkpoints as plain data."""
        return {"n_classes": self.n_classes, "batch_norm": self.batch_norm, "prior_scales": list(self.prior_scales)}

    @property
    def rev_label_map(self):
        """label -> class name, background included: decodes the labels of detect_objects."""
        return {v: k for k, v in self.label_map.items()}

    @property
    def label_color_map(self):
        """class name -> colour for drawing (utils.class_colors)."""
        return class_colors(class_names(self.label_map))

    def init_weights(self):
        """Xavier-uniform weights and zero biases for the convolutions, as the tutorial does for new layers."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, image):  # (N, 3, 300, 300)
        conv4_3_feats, conv7_feats = self.base(image)  # (N, 512, 38, 38), (N, 1024, 19, 19)
        norm = conv4_3_feats.float().pow(2).sum(dim=1, keepdim=True).sqrt().clamp(min=1e-10)  # (N, 1, 38, 38)
        conv4_3_feats = (conv4_3_feats / norm * self.rescale_factors).to(conv7_feats.dtype)
        aux_feats = self.aux_convs(conv7_feats)
        return self.pred_convs(conv4_3_feats, conv7_feats, *aux_feats)  # (N, P, 4), (N, P, C)

    # ---- pretrained base -------------------------------------------------------------------

    def load_pretrained_layers(self, base_weights):
        """Copy an ImageNet VGG-16's convolutions into the base and decimate fc6/fc7 into conv6/conv7.

        base_weights: "imagenet" to download through torchvision's weights API, or a path to a
        torchvision vgg16 (vgg16_bn with batch_norm) state_dict saved with torch.save.
        """
        import torchvision  # here, not at the top: misc.check_torch_pair
        if base_weights == "imagenet":
            weights = (torchvision.models.VGG16_BN_Weights.IMAGENET1K_V1 if self.batch_norm
                       else torchvision.models.VGG16_Weights.IMAGENET1K_V1)
            try:
                state = weights.get_state_dict(progress=True)
            except Exception as e:
                reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
                raise UserError(f"could not download the ImageNet VGG-16 weights ({reason}); use --base-weights none "
                                f"to train from scratch, or --base-weights PATH to a torchvision VGG-16 state_dict "
                                f"saved with torch.save") from None
            source = weights.url
        else:
            source = str(base_weights)
            if not os.path.isfile(base_weights):  # a pipe or a device would be read for ever
                raise UserError(f"{source}: no such file (--base-weights takes imagenet, none or a path)"
                                if not os.path.exists(base_weights) else f"{source}: not a regular file")
            try:
                state = torch.load(base_weights, map_location="cpu", weights_only=True)
            except Exception as e:
                raise UserError(f"{source}: not a loadable state_dict ({type(e).__name__})") from None
            if isinstance(state, dict) and not all_finite(state.values()):
                raise UserError(f"{source}: a weight is not finite (nan or inf)")
        try:
            self.base.load_state_dict(convert_vgg16_state_dict(state, self.batch_norm, source), strict=False)
        except RuntimeError as e:  # right names, wrong shapes
            detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), "shape mismatch")
            raise UserError(f"{source}: not a torchvision {'vgg16_bn' if self.batch_norm else 'vgg16'} state_dict ({detail})") from None

    @classmethod
    def from_checkpoint(cls, ckpt, source="checkpoint"):
        """Rebuild the model saved in a checkpoint dict (see misc.load_checkpoint), with its label map.

        A checkpoint without "label_map" (written before the classes were data) is BCCD's. Raises
        UserError, naming `source`, for a label map that does not fit the model or weights that do not fit.
        """
        model_args = ckpt["model_args"]
        n_classes = model_args.get("n_classes") if isinstance(model_args, dict) else None
        classes = check_label_map(ckpt.get("label_map", bccd_label_map), f"{source}: label_map")
        if n_classes != len(classes):
            saved = "a label map" if "label_map" in ckpt else "no label map, so BCCD's"
            raise UserError(f"{source}: a model of {n_classes} classes (background included) with {saved} of "
                            f"{len(classes)}")
        scales = model_args.get("prior_scales", PRIOR_SCALES)
        if not valid_prior_scales(scales):
            raise UserError(f"{source}: its model_args' prior_scales must be six numbers in (0, 1], not {scales!r}")
        if not isinstance(model_args.get("batch_norm", False), bool):
            raise UserError(f"{source}: its model_args' batch_norm must be true or false, not "
                            f"{model_args['batch_norm']!r}")
        try:
            with torch.device("meta"):  # no weights drawn at random only to be overwritten (most of the time here)
                model = cls(base_weights=None, label_map=classes, **model_args)
            model.to_empty(device="cpu").load_state_dict(ckpt["model"])  # every tensor of a state_dict, cast
            model.priors_cxcy = create_prior_boxes(model.prior_scales)  # the one that is not in it
        except (RuntimeError, TypeError, KeyError, ValueError, AttributeError) as e:
            detail = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
            raise UserError(f"{source}: does not fit SSD300 ({type(e).__name__}: {detail[:200]})") from None
        if not all_finite(model.state_dict().values()):
            raise UserError(f"{source}: its weights hold nan or inf (a training that diverged); use another checkpoint")
        kinds = [k for k, v in ckpt["model"].items() if isinstance(v, torch.Tensor) and not k.endswith(
            "num_batches_tracked") and not v.is_floating_point()]  # load_state_dict casts them without a word
        negative = [k for k, v in model.state_dict().items() if k.endswith("running_var") and (v < 0).any()]
        if kinds or negative:
            raise UserError(f"{source}: damaged weights: {(kinds or negative)[0]} "
                            f"{'is not floating point' if kinds else 'holds a negative variance'}")
        return model

    def fuse_batch_norm(self):
        """Fold every BatchNorm into the convolution before it, for inference: the same outputs, less work.

        Only for a model in eval mode that is not trained or saved afterwards (its state_dict changes).
        """
        assert not self.training, "fuse_batch_norm() is for inference: call model.eval() first"
        for block in (self.base, self.aux_convs):
            for name, module in list(block.named_children()):
                bn = getattr(block, "bn" + name[4:], None) if name.startswith("conv") else None
                if isinstance(bn, nn.BatchNorm2d):
                    setattr(block, name, fuse_conv_bn_eval(module, bn))
                    setattr(block, "bn" + name[4:], nn.Identity())
        return self

    # ---- predictions to detections ------------------------------------------------------------

    @torch.no_grad()
    def detect_objects(self, predicted_locs, predicted_scores, min_score, max_overlap, top_k, pre_nms_top_k=400,
                       nms_chunk=None):
        """Decode the predictions into detections (tutorial, "Processing predictions").

        For every image and class: softmax scores, keep priors scoring above min_score (one number, or
        one per class in label order, background excluded), keep at
        most the pre_nms_top_k best of them (as the original Caffe SSD and torchvision do: 400),
        suppress boxes overlapping a better one of the same class by more than max_overlap
        (torchvision.ops.batched_nms, on runs of whole images of at most nms_chunk candidates: by
        default 25,000 on CUDA, 1,000 on a CPU), then keep the top_k best detections per image.
        Whenever fewer than pre_nms_top_k priors of a class pass min_score this equals full NMS.

        predicted_locs (N, P, 4), predicted_scores (N, P, C) -> three lists over images of
        boxes (n, 4) fractional xy clipped to [0, 1], labels (n,) and scores (n,), sorted by
        decreasing score. An image with nothing above min_score gets empty tensors.
        """
        N, P, C = predicted_scores.shape
        device = predicted_scores.device
        boxes = cxcy_to_xy(gcxgcy_to_cxcy(predicted_locs.float(), self.priors_cxcy)).clamp_(0, 1)  # (N, P, 4)
        probs = F.softmax(predicted_scores.float(), dim=2)[:, :, 1:]  # (N, P, C-1), background dropped
        k = min(pre_nms_top_k, P)
        top_scores, top_priors = probs.topk(k, dim=1)  # (N, k, C-1)
        image_idx = torch.arange(N, device=device)[:, None, None].expand(N, k, C - 1)
        class_idx = torch.arange(1, C, device=device)[None, None, :].expand(N, k, C - 1)
        if not isinstance(min_score, (int, float)):  # one threshold per class (background excluded)
            min_score = torch.as_tensor(min_score, dtype=torch.float, device=device)
            assert min_score.shape == (C - 1,), f"min_score: one value or {C - 1} (one per class), not {min_score.shape}"
        keep = top_scores > min_score
        image_idx, class_idx, scores = image_idx[keep], class_idx[keep], top_scores[keep]  # (K,)
        cand_boxes = boxes[image_idx, top_priors[keep]]  # (K, 4)
        # batched_nms in runs of whole images of at most nms_chunk boxes: torchvision does a run that size in one
        # NMS call (its coordinate trick), but a larger one class by class and image by image (a call each, each
        # with a host sync: 192 for 64 images)
        from torchvision.ops import batched_nms  # here, not at the top: misc.check_torch_pair
        if nms_chunk is None:
            nms_chunk = 25_000 if device.type == "cuda" else 1000  # torchvision's own cut-offs (since 0.22 on CUDA)
        kept, start, end = [], 0, 0
        for n in torch.bincount(image_idx, minlength=N).tolist() + [nms_chunk + 1]:  # the last one ends the loop
            if end > start and end - start + n > nms_chunk:
                sl = slice(start, end)
                kept.append(start + batched_nms(cand_boxes[sl], scores[sl], image_idx[sl] * C + class_idx[sl], max_overlap))
                start = end
            end += n
        kept = torch.cat(kept) if kept else image_idx.new_zeros(0)  # by decreasing score within each run
        kept = kept[image_idx[kept].argsort(stable=True)]  # group by image, still by score within
        img = image_idx[kept]
        counts = torch.bincount(img, minlength=N)  # (N,)
        rank = torch.arange(len(kept), device=device) - (counts.cumsum(0) - counts)[img]
        kept = kept[rank < top_k]
        counts = counts.clamp(max=top_k).tolist()
        return (list(cand_boxes[kept].split(counts)), list(class_idx[kept].split(counts)),
                list(scores[kept].split(counts)))


# A model input whose every channel, averaged over 4x4 pixels, spans fewer than BLANK_SPREAD levels (of 255) is a
# blank field: a dark frame, bare glass, a flat colour. No cell can show there, but a model never trained on one may
# see a white cell in a black frame (the shipped model does, at 0.88). BCCD's and TXL-PBC's images span 93 or more.
BLANK_SPREAD = 16


def no_cells_in_blank(images, scores):
    """The model's scores (N, P, C) for `images`, its inputs (uint8 (N, 3, 300, 300)), with every class but the
    background at -inf (nothing detected: detect_objects) where an input is blank (BLANK_SPREAD)."""
    pooled = F.avg_pool2d(images.float(), 4).flatten(2)  # (N, 3, 75 * 75)
    blank = (pooled.amax(2) - pooled.amin(2)).amax(1) < BLANK_SPREAD  # (N,)
    cells = torch.arange(scores.shape[-1], device=scores.device) > 0
    return scores.masked_fill(blank[:, None, None] & cells, float("-inf"))


def convert_vgg16_state_dict(state, batch_norm, source="state_dict"):
    """Map a torchvision vgg16 / vgg16_bn state_dict onto VGGBase's names.

    features' convolutions (and BatchNorms) become conv1_1 ... conv5_3 (bn1_1 ... bn5_3);
    classifier.0 (fc6, 4096 x 512*7*7) is reshaped to (4096, 512, 7, 7) and decimated to
    conv6 (1024, 512, 3, 3); classifier.3 (fc7) to conv7 (1024, 1024, 1, 1). conv6/conv7's
    BatchNorms, if any, start fresh.
    """
    def layer_index(key):
        return int(key.split(".")[1])

    try:
        conv_idx = sorted({layer_index(k) for k, v in state.items() if k.startswith("features.") and k.endswith(".weight") and v.dim() == 4})
        bn_idx = sorted({layer_index(k) for k in state if k.startswith("features.") and k.endswith(".running_mean")})
        names = VGG_CONVS
        if len(conv_idx) != len(names) or len(bn_idx) != (len(names) if batch_norm else 0):
            raise KeyError(f"found {len(conv_idx)} convolutions and {len(bn_idx)} BatchNorms, expected 13"
                           + (" of each" if batch_norm else " and none"))
        out = {}
        for name, i in zip(names, conv_idx):
            out[name + ".weight"] = state[f"features.{i}.weight"]
            out[name + ".bias"] = state[f"features.{i}.bias"]
        if batch_norm:
            for name, i in zip(names, bn_idx):
                for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                    if f"features.{i}.{p}" in state:
                        out[f"bn{name[4:]}.{p}"] = state[f"features.{i}.{p}"]
        out["conv6.weight"] = decimate(state["classifier.0.weight"].view(4096, 512, 7, 7), m=[4, None, 3, 3])
        out["conv6.bias"] = decimate(state["classifier.0.bias"], m=[4])
        out["conv7.weight"] = decimate(state["classifier.3.weight"].view(4096, 4096, 1, 1), m=[4, 4, None, None])
        out["conv7.bias"] = decimate(state["classifier.3.bias"], m=[4])
    except (KeyError, RuntimeError, AttributeError, ValueError) as e:
        kind = "vgg16_bn" if batch_norm else "vgg16"
        raise UserError(f"{source}: not a torchvision {kind} state_dict ({e})") from None
    return out


class MultiBoxLoss(nn.Module):
    """The MultiBox loss: Smooth L1 localization loss + cross-entropy confidence loss (paper, Sec. 2.2).

    1. Match: each prior gets the object it overlaps most; each object is forced onto the prior
       it overlaps most (unless another object overlaps that prior more: see match); priors
       overlapping their object by less than `threshold` are background.
    2. Localization: Smooth L1 between predicted and encoded true offsets, positives only.
    3. Confidence: cross-entropy over the positives and the `neg_pos_ratio` x n_pos hardest
       negatives of each image (hard negative mining).
    Both are summed over the batch and divided by the total number of positives;
    loss = conf_loss + alpha * loc_loss. Vectorized over the batch: objects are padded to (N, M).
    """

    def __init__(self, priors_cxcy, threshold=0.5, neg_pos_ratio=3, alpha=1.):
        super().__init__()
        self.threshold = threshold
        self.neg_pos_ratio = neg_pos_ratio
        self.alpha = alpha
        self.register_buffer("priors_cxcy", priors_cxcy.clone(), persistent=False)
        self.register_buffer("priors_xy", cxcy_to_xy(priors_cxcy), persistent=False)

    def match(self, boxes, labels):
        """Targets for every prior: encoded offsets (N, P, 4) and class labels (N, P), 0 = background.

        boxes: list of N tensors (n_i, 4) fractional xy; labels: list of N tensors (n_i,).
        When two objects share a best prior it goes to the one overlapping it more (the later
        object on a tie): the result never depends on the order of writes.
        """
        P = self.priors_xy.size(0)
        device = self.priors_xy.device
        N = len(boxes)
        counts = torch.tensor([b.size(0) for b in boxes])  # (N,), from shapes: no device sync
        M = max(int(counts.max()) if N else 0, 1)
        # slot of each object in the (N, M) padded layout: image i's objects fill i*M, i*M + 1, ...
        starts = counts.cumsum(0) - counts
        image_of = torch.repeat_interleave(torch.arange(N), counts)
        slots = (image_of * M + torch.arange(int(counts.sum())) - starts[image_of]).to(device, non_blocking=True)
        all_boxes = torch.cat([b.reshape(-1, 4) for b in boxes]).to(self.priors_xy.dtype)  # (T, 4), T objects in all
        all_labels = torch.cat([l.reshape(-1) for l in labels]).long()  # (T,)

        # IoU of the real objects only, laid out (N, M, P) with -1 for the padding (never matched)
        overlap = self.priors_xy.new_full((N * M, P), -1.).index_copy_(
            0, slots, find_jaccard_overlap(all_boxes, self.priors_xy)).view(N, M, P)
        # padding: a harmless unit box (keeps the encoding finite) and label -1
        pad_boxes = self.priors_xy.new_zeros(N * M, 4)
        pad_boxes[:, 2:] = 1.  # a fill, not a tensor from the host: no copy, no device sync
        pad_boxes = pad_boxes.index_copy_(0, slots, all_boxes).view(N, M, 4)
        pad_labels = torch.full((N * M,), -1, dtype=torch.long, device=device).index_copy_(0, slots, all_labels).view(N, M)
        valid = pad_labels >= 0  # (N, M)

        overlap_for_each_prior, object_for_each_prior = overlap.max(dim=1)  # (N, P)
        best_overlap, prior_for_each_object = overlap.max(dim=2)  # (N, M)

        # force each object onto its best prior; a prior wanted by several goes to the best overlap
        # (padding's best overlap is -1, below any real object's, and padding never wins)
        contested = torch.full((N, P), -2., device=device).scatter_reduce_(1, prior_for_each_object, best_overlap, "amax")
        wins = valid & (best_overlap == contested.gather(1, prior_for_each_object))  # (N, M)
        obj_ids = torch.arange(M, device=device).expand(N, M).masked_fill(~wins, -1)
        forced = torch.full((N, P), -1, dtype=torch.long, device=device).scatter_reduce_(1, prior_for_each_object, obj_ids, "amax")
        object_for_each_prior = torch.where(forced >= 0, forced, object_for_each_prior)
        overlap_for_each_prior = torch.where(forced >= 0, 1., overlap_for_each_prior)

        label_for_each_prior = pad_labels.gather(1, object_for_each_prior)  # (N, P)
        label_for_each_prior = label_for_each_prior.masked_fill(overlap_for_each_prior < self.threshold, 0)
        matched_boxes = pad_boxes.gather(1, object_for_each_prior[:, :, None].expand(N, P, 4))  # (N, P, 4)
        true_locs = cxcy_to_gcxgcy(xy_to_cxcy(matched_boxes), self.priors_cxcy)  # (N, P, 4)
        return true_locs, label_for_each_prior

    def forward(self, predicted_locs, predicted_scores, boxes, labels):
        """predicted_locs (N, P, 4), predicted_scores (N, P, C), boxes/labels lists over the batch -> scalar loss."""
        loss_sum, n_positives = self.sum_and_positives(predicted_locs, predicted_scores, boxes, labels)
        return loss_sum / n_positives.clamp(min=1)

    def sum_and_positives(self, predicted_locs, predicted_scores, boxes, labels):
        """The loss summed over the batch, and the number of positives it is to be divided by.

        Kept apart so that a distributed run can divide by the positives of the global batch.
        """
        predicted_locs, predicted_scores = predicted_locs.float(), predicted_scores.float()  # loss in fp32 under autocast
        N, P, C = predicted_scores.shape
        true_locs, true_classes = self.match(boxes, labels)  # (N, P, 4), (N, P)
        positive = true_classes != 0  # (N, P)
        n_positives = positive.sum(dim=1)  # (N,)

        loc_loss = (F.smooth_l1_loss(predicted_locs, true_locs, reduction="none").sum(2) * positive).sum()

        conf_loss_all = F.cross_entropy(predicted_scores.reshape(-1, C), true_classes.reshape(-1), reduction="none").view(N, P)
        conf_loss_pos = (conf_loss_all * positive).sum()
        # hard negative mining: per image, the neg_pos_ratio * n_positives negatives with the highest loss
        conf_loss_neg, _ = conf_loss_all.masked_fill(positive, 0.).sort(dim=1, descending=True)  # (N, P)
        hard = torch.arange(P, device=positive.device)[None, :] < self.neg_pos_ratio * n_positives[:, None]  # (N, P)
        conf_loss_hard_neg = (conf_loss_neg * hard).sum()

        return conf_loss_pos + conf_loss_hard_neg + self.alpha * loc_loss, n_positives.sum()


class ModelEMA:
    """An exponential moving average of a model's weights and BatchNorm statistics, updated after every step:
    ema = d * ema + (1 - d) * weights, with d = min(decay, (1 + t) / (10 + t)) at update t (TensorFlow's
    ExponentialMovingAverage), so that early on the average follows the weights closely. The step count is kept
    on the host: torch.optim.swa_utils.AveragedModel keeps it on the device and reads it back every step (a host
    sync on CUDA). A no-grad copy in eval mode; `.module` is an SSD300 to validate or save."""

    def __init__(self, model, decay, updates=0):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.updates = decay, updates

    @torch.no_grad()
    def update(self, model):
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        mine, theirs = self.module.state_dict(), model.state_dict()
        floats = [k for k, v in mine.items() if v.is_floating_point()]
        torch._foreach_lerp_([mine[k] for k in floats], [theirs[k] for k in floats], 1 - d)
        for k, v in mine.items():
            if not v.is_floating_point():  # BatchNorm's num_batches_tracked
                v.copy_(theirs[k])
