"""Helpers shared by the scripts: label maps, VOC parsing, box math, data transforms and calculate_mAP.

Sections follow the tutorial (../shared/seed/ssd-tutorial-bccd.md):
  * Label map        -> label_map, rev_label_map, label_color_map (BCCD's, the defaults), make_label_map,
                        class_names, class_colors, check_classes, check_label_map, check_same_classes
  * Parse raw data   -> read_annotation, parse_annotation (Pascal VOC), parse_yolo_labels, parse_coco, add_box
                        (every format's box checks), read_json, load_image, pil_to_tensor; the tutorial's
                        create_data_lists, which walks whole datasets, is in create_data_lists.py
  * Box math         -> xy_to_cxcy, cxcy_to_xy, cxcy_to_gcxgcy, gcxgcy_to_cxcy,
                        find_intersection, find_jaccard_overlap, decimate
  * Data transforms  -> photometric_distort, expand, random_crop, flip, resize, transform
                        (resize_placement: where resize puts a window)
  * Evaluation       -> calculate_mAP (match_detections: its VOC matching, also for eval.py --plots)

The scripts' plumbing (errors and the command line, devices, atomic writes, checkpoint loading) is in misc.py.

Boxes are `(x_min, y_min, x_max, y_max)` ("xy") unless a name says otherwise: "cxcy" is
(c_x, c_y, w, h) and "gcxgcy" is the offset encoding w.r.t. priors (see cxcy_to_gcxgcy).
Nothing here does work at import time.
"""
import functools
import json
import math
import os
import shlex
import xml.etree.ElementTree as ET

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from misc import UserError

# ---------------------------------------------------------------------------------------------
# Label map
#
# The classes are data: create_data_lists writes label_map.json beside the lists, train.py stores it in
# the checkpoint, and eval.py and detect.py take the class names from there (model.label_map). The
# names below are BCCD's, the default; nothing assumes they are the classes in use.
# ---------------------------------------------------------------------------------------------

def make_label_map(names):
    """Class names, in label order -> {"background": 0, names[0]: 1, names[1]: 2, ...}."""
    return {"background": 0, **{name: i + 1 for i, name in enumerate(names)}}


def class_names(label_map):
    """The class names of a label map in label order, background left out."""
    return [name for name, label in sorted(label_map.items(), key=lambda item: item[1]) if label != 0]


bccd_labels = ("RBC", "WBC", "Platelets")
label_map = make_label_map(bccd_labels)
rev_label_map = {v: k for k, v in label_map.items()}  # inverse mapping, used to decode predictions
label_color_map = {"RBC": "#e6194b", "WBC": "#3cb44b", "Platelets": "#4363d8"}
# colours of other classes, in label order: like BCCD's three, from Sasha Trubetskoy's list of 20 distinct
# colours, without those too light for white text
PALETTE = ("#f58231", "#911eb4", "#008080", "#f032e6", "#9a6324", "#800000", "#808000", "#000075", "#808080", "#000000")


def class_colors(names):
    """{name: colour} for class names: BCCD's own colours for RBC, WBC and Platelets, PALETTE in order for the
    others (it repeats after 10 of them)."""
    others = [name for name in names if name not in label_color_map]
    return {name: label_color_map.get(name) or PALETTE[others.index(name) % len(PALETTE)] for name in names}


def check_classes(names, source="--classes"):
    """Class names a user gives, stripped of surrounding white space; UserError for an empty name, "background"
    (in any case: label 0, which the model predicts for "no object") or a name given twice."""
    names = [name.strip() for name in names]
    for i, name in enumerate(names):
        if not name:
            raise UserError(f"{source}: an empty name")
        if name.casefold() == "background":
            raise UserError(f"{source}: {name!r} is reserved (label 0, the model's 'no object')")
        if name in names[:i]:
            raise UserError(f"{source}: {name!r} given twice")
    if not names:
        raise UserError(f"{source}: no class names")
    return names


def check_label_map(label_map, source):
    """A label map read from a file (label_map.json, a checkpoint) must be {"background": 0, name: 1, ...,
    name: n}; returns it, else raises UserError naming `source`."""
    if not (isinstance(label_map, dict) and label_map.get("background") == 0
            and all(isinstance(name, str) and name.strip() for name in label_map)
            and all(type(label) is int for label in label_map.values())
            and sorted(label_map.values()) == list(range(len(label_map))) and len(label_map) > 1):
        raise UserError(f"{source}: not a label map ({{\"background\": 0, class: 1, ...}} expected, found "
                        f"{str(label_map)[:120]})")
    return label_map


def check_same_classes(model_label_map, lists_label_map, checkpoint, data_folder):
    """UserError, one line, when a model's classes are not those of the lists it is to be trained or evaluated on."""
    if model_label_map != lists_label_map:
        names = class_names(model_label_map)
        raise UserError(f"{checkpoint}: a model of the classes {', '.join(names)}, but the lists in {data_folder} are of "
                        f"{', '.join(class_names(lists_label_map))} (label_map.json); make lists of the model's "
                        f"classes: create_data_lists.py --classes {' '.join(shlex.quote(n) for n in names)}")



# ---------------------------------------------------------------------------------------------
# Parse raw data
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def image_extensions():
    """File extensions of the image formats PIL opens: .jpg, .jpeg, .png, .tif, .bmp, ... (lower case)."""
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


MAX_XML_BYTES = 64 << 20


def read_annotation(annotation_path):
    """The root element of a VOC XML file; UserError naming the file if it is malformed or unreadable."""
    if os.path.exists(annotation_path) and not os.path.isfile(annotation_path):  # a pipe would wait for ever
        raise UserError(f"{annotation_path}: not a regular file")
    if os.path.isfile(annotation_path) and os.path.getsize(annotation_path) > MAX_XML_BYTES:  # parsed in memory
        raise UserError(f"{annotation_path}: {os.path.getsize(annotation_path):,} bytes, too large for an annotation "
                        f"(at most {MAX_XML_BYTES:,}; 10,000 objects take about 3 MB)")
    try:
        return ET.parse(annotation_path).getroot()
    except (ET.ParseError, LookupError, ValueError) as e:  # LookupError: an encoding Python does not know
        raise UserError(f"{annotation_path}: malformed XML ({e})") from None
    except OSError as e:
        raise UserError(f"{annotation_path}: cannot read ({e.strerror})") from None


def parse_annotation(annotation_path, image_size=None, label_map=label_map, root=None):
    """Parse one VOC XML annotation (BCCD's, or any annotation tool's Pascal VOC export).

    Args:
        annotation_path: path of the XML file.
        image_size: (width, height) of the image, used to clip boxes; defaults to the XML's <size>.
        label_map: class name -> label (default BCCD's); an object of another class is an error. None:
            any class but "background", and the labels returned are the class names.
        root: the file's parsed XML (read_annotation), when the caller has it.
    Returns:
        (objects, warnings): objects = {"boxes": [[x_min, y_min, x_max, y_max], ...] in pixels,
        "labels": [...], "difficulties": [...]}; warnings = list of one-line strings.
    Raises:
        UserError naming the file and the problem (malformed XML, unknown class, missing box).

    Class names are stripped of surrounding white space (a few tools write "RBC\n"), a missing
    <difficult> means 0, coordinates may be floats. VOC coordinates are 1-based pixel indices;
    like the tutorial we use them as they are (shifting by one pixel changes no metric here).
    Boxes are then checked as every format's are (add_box): clipped to the image, dropped when they have no area
    or are there twice, refused when they lie wholly outside the image.
    """
    root = read_annotation(annotation_path) if root is None else root
    if image_size is None:
        try:
            image_size = (float(root.find("size/width").text), float(root.find("size/height").text))
        except (AttributeError, TypeError, ValueError):
            raise UserError(f"{annotation_path}: no valid <size> and no image size given") from None
    objects, warnings, seen = {"boxes": [], "labels": [], "difficulties": []}, [], set()
    for i, obj in enumerate(root.iter("object")):
        cls = check_class_name((obj.findtext("name") or "").strip(), label_map, f"{annotation_path}: object {i}")
        try:
            difficult = int(float((obj.findtext("difficult") or "0").strip()))
            box = [float(obj.find("bndbox/" + k).text) for k in ("xmin", "ymin", "xmax", "ymax")]
        except (AttributeError, TypeError, ValueError, OverflowError):
            raise UserError(f"{annotation_path}: object {i} ({cls}): missing or non-numeric <bndbox>/<difficult>") from None
        add_box(objects, seen, warnings, annotation_path, f"object {i} ({cls})", box,
                cls if label_map is None else label_map[cls], 1 if difficult else 0, image_size)
    return objects, warnings


def check_class_name(cls, label_map, where):
    """A class name read from an annotation: one of label_map's (when there is one), never "background" or empty."""
    if label_map is not None and (cls not in label_map or cls == "background"):
        raise UserError(f"{where}: unknown class {cls!r} (expected one of {', '.join(class_names(label_map))})")
    if label_map is None and (not cls or cls.casefold() == "background"):
        raise UserError(f"{where}: " + (f"class {cls!r} is reserved (label 0, the model's 'no object')" if cls
                                        else "no class name"))
    return cls


ROUNDING = 0.01  # pixels: a box clipped by less (the rounding of YOLO's 6-digit fractions) is clipped without a word


def add_box(objects, seen, warnings, path, what, box, label, difficult, image_size):
    """Append one annotated box (pixels, x_min, y_min, x_max, y_max) to `objects`, as every format's reader does.

    A box that is not finite, or lies wholly outside the width x height image, is an error (UserError naming the
    file `path` and `what`, "object 3 (RBC)"); one reaching outside the image is clipped to it, with a warning; a
    zero-area or inverted box is dropped (BCCD has two, in BloodImage_00338 and _00343; kept, they make the loss
    infinite), and so is a second box of the same class and coordinates (a cell annotated twice; kept, it could
    never be matched). seen: the (label, box) pairs of the image so far."""
    width, height = image_size
    name = os.path.basename(path)
    if not all(math.isfinite(v) for v in box):
        raise UserError(f"{path}: {what}: box {box} is not finite")
    if box[2] > box[0] and box[3] > box[1] and (box[2] <= 0 or box[3] <= 0 or box[0] >= width or box[1] >= height):
        raise UserError(f"{path}: {what}: box {box} lies outside the {width:g}x{height:g} image")
    clipped = [min(max(box[0], 0.), width), min(max(box[1], 0.), height),
               min(max(box[2], 0.), width), min(max(box[3], 0.), height)]
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        warnings.append(f"{name}: dropped {what}, box {box}: zero area or inverted")
    elif (label, *clipped) in seen:
        warnings.append(f"{name}: dropped {what}, box {box}: the same box of the same class is there already (one "
                        f"cell annotated twice)")
    else:
        if max(abs(a - b) for a, b in zip(clipped, box)) > ROUNDING:
            warnings.append(f"{name}: clipped {what}, box {box}, to the {width:g}x{height:g} image: {clipped}")
        seen.add((label, *clipped))
        objects["boxes"].append(clipped)
        objects["labels"].append(label)
        objects["difficulties"].append(difficult)


MAX_LABEL_BYTES = 16 << 20  # a YOLO label file: 10,000 boxes take about 400 KB


def parse_yolo_labels(label_path, image_size, names, label_map=None):
    """Parse one YOLO label file (Ultralytics', Roboflow's, LabelImg's YOLO mode): one box a line,
    `class c_x c_y w h`, class an index into `names` (data.yaml's or classes.txt's), the four numbers fractions of
    the image's width and height. A missing file means an image without objects (the YOLO convention).

    Returns (objects, warnings) as parse_annotation does, boxes in pixels of `image_size` (width, height); labels
    are class names, or label_map's labels when one is given (a class not in it is then an error). A line with
    another number of fields, a class id that is not an index into `names`, a number outside [0, 1] or not finite
    is a UserError naming the file and line; boxes then go through add_box.
    """
    objects, warnings, seen = {"boxes": [], "labels": [], "difficulties": []}, [], set()
    if not os.path.lexists(label_path):
        return objects, warnings
    if not os.path.isfile(label_path):
        raise UserError(f"{label_path}: not a regular file")
    if os.path.getsize(label_path) > MAX_LABEL_BYTES:
        raise UserError(f"{label_path}: {os.path.getsize(label_path):,} bytes, too large for a label file")
    try:
        with open(label_path, encoding="utf-8-sig") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{label_path}: unreadable ({getattr(e, 'strerror', None) or e})") from None
    width, height = image_size
    for n, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{label_path}: line {n}"
        if len(fields) != 5:
            raise UserError(f"{where}: {len(fields)} fields, expected 5 (class c_x c_y w h; segments and scores are "
                            f"not boxes)")
        try:
            index, (cx, cy, w, h) = int(fields[0]), map(float, fields[1:])
        except ValueError:
            raise UserError(f"{where}: not numbers: {line.strip()[:80]!r}") from None
        if not 0 <= index < len(names):
            raise UserError(f"{where}: class {index} is not among the {len(names)} classes "
                            f"(0-{len(names) - 1}: {', '.join(names)})")
        if not all(0 <= v <= 1 for v in (cx, cy, w, h)):  # nan and inf too
            raise UserError(f"{where}: c_x c_y w h must be fractions of the image in [0, 1], not {line.strip()[:80]!r}")
        cls = check_class_name(names[index], label_map, where)
        box = [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]
        add_box(objects, seen, warnings, label_path, f"line {n} ({cls})", box,
                cls if label_map is None else label_map[cls], 0, image_size)
    return objects, warnings


def parse_coco(coco_path, label_map=None):
    """Parse a COCO detection file (CVAT's, Label Studio's, Roboflow's, detect.py --save-labels coco).

    Returns ({image file_name: ((width, height), objects)}, warnings, the category names in id order), objects as
    parse_annotation's (labels are category names, or label_map's labels); bbox [x, y, w, h] in pixels becomes
    [x, y, x + w, y + h]; a crowd region (iscrowd 1) is kept as difficult, so that detections on it count neither way
    (VOC's rule). UserError naming the file and annotation for ids that do not match (an image, category or
    annotation id twice, an annotation of an unknown image or category), a bbox that is not four numbers, or a box
    outside its image.
    """
    coco = read_json(coco_path, "COCO file")
    if not (isinstance(coco, dict) and all(isinstance(coco.get(k), list) for k in ("images", "annotations",
                                                                                    "categories"))):
        raise UserError(f"{coco_path}: not a COCO file (a JSON object with lists images, annotations, categories)")
    categories, images, ids, warnings = {}, {}, set(), []
    for what, items, table in (("category", coco["categories"], categories), ("image", coco["images"], images)):
        for i, item in enumerate(items):
            key = item.get("id") if isinstance(item, dict) else None
            if type(key) is not int or key in table:
                raise UserError(f"{coco_path}: {what} {i}: " + (f"id {key} given twice" if key in table else
                                                                 "no integer id"))
            table[key] = item
    names = {}
    for key, c in categories.items():
        names[key] = check_class_name(str(c.get("name", "")).strip(), label_map, f"{coco_path}: category {key}")
    out = {}
    for key, im in images.items():
        size, name = (im.get("width"), im.get("height")), im.get("file_name")
        if not (isinstance(name, str) and name and all(isinstance(v, (int, float)) and v > 0 for v in size)):
            raise UserError(f"{coco_path}: image {key}: needs a file_name and a positive width and height")
        if name in out:
            raise UserError(f"{coco_path}: image {key}: file_name {name!r} is another image's too")
        out[name] = (size, {"boxes": [], "labels": [], "difficulties": []}, set())
        images[key] = name
    for i, a in enumerate(coco["annotations"]):
        a = a if isinstance(a, dict) else {}
        where = f"{coco_path}: annotation {a.get('id', i)}"
        if a.get("id") in ids:
            raise UserError(f"{where}: id given twice")
        ids.add(a.get("id"))
        if a.get("image_id") not in images or a.get("category_id") not in categories:
            raise UserError(f"{where}: " + (f"image_id {a.get('image_id')!r} is not among the images"
                                            if a.get("image_id") not in images else
                                            f"category_id {a.get('category_id')!r} is not among the categories"))
        bbox = a.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) and not
                                                                  isinstance(v, bool) for v in bbox)):
            raise UserError(f"{where}: bbox must be [x, y, width, height] in pixels, not {str(bbox)[:80]}")
        size, objects, seen = out[images[a["image_id"]]]
        cls = names[a["category_id"]]
        add_box(objects, seen, warnings, coco_path, f"annotation {a.get('id', i)} ({cls})",
                [bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3]], cls if label_map is None else label_map[cls],
                1 if a.get("iscrowd") else 0, size)
    return ({name: (size, objects) for name, (size, objects, _) in out.items()}, warnings,
            [names[key] for key in sorted(names)])


MAX_JSON_BYTES = 256 << 20


def read_json(path, what="file"):
    """A JSON file's content; UserError naming it when it is missing, not a regular file, too large or malformed."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: {what} not found" if not os.path.lexists(path) else f"{path}: not a regular file")
    if os.path.getsize(path) > MAX_JSON_BYTES:
        raise UserError(f"{path}: {os.path.getsize(path):,} bytes, too large for a {what}")
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: nested deeper than Python's stack
        raise UserError(f"{path}: unreadable {what} ({getattr(e, 'strerror', None) or e})") from None


EXIF_ORIENTATION = 0x0112  # the EXIF tag a camera or phone sets for a picture taken turned: 1 upright, 5-8 turned 90


def orientation(im):
    """An open PIL image's EXIF orientation, 1 (upright) where it has none or an invalid one."""
    value = im.getexif().get(EXIF_ORIENTATION, 1)
    return value if value in range(1, 9) else 1


def upright_size(im):
    """(width, height) of an open PIL image as shown upright: its EXIF orientation applied, as detect.py reads it."""
    return im.size[::-1] if orientation(im) >= 5 else im.size


def load_image(path):
    """Read an image file as a uint8 tensor (3, H, W), RGB, upright (its EXIF orientation applied, as image viewers and
    detect.py show it, and as detect.py --save-labels boxes it). Any PIL mode is converted; errors name the file."""
    try:
        with Image.open(path) as im:
            return pil_to_tensor(ImageOps.exif_transpose(im) if orientation(im) != 1 else im)
    except FileNotFoundError:
        raise UserError(f"{path}: image not found") from None
    except Exception as e:
        raise UserError(f"{path}: cannot read image ({type(e).__name__}: {first_line(e, path)})") from None


def first_line(error, path=None):
    """The first line of an error's message, without the file's name where it repeats it (PIL's does)."""
    text = str(error).replace(f" {os.fspath(path)!r}", "") if isinstance(path, (str, os.PathLike)) else str(error)
    return (text.splitlines() or [""])[0][:120]


def pil_to_tensor(image):
    """PIL image of any mode -> uint8 RGB tensor (3, H, W)."""
    if image.mode != "RGB":
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16/32-bit grey, integer or float: scale to 8 bits,
            # not clip (float in [0, 1] as 0-255); not-a-number and infinite values are black
            arr = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0., posinf=0., neginf=0.)
            image = Image.fromarray((arr * (255.0 / max(float(arr.max()), 1.0))).clip(0, 255).astype(np.uint8))
        image = image.convert("RGB")
    import torchvision.transforms.functional as FT  # here, not at the top: misc.check_torch_pair
    return FT.pil_to_tensor(image)


# ---------------------------------------------------------------------------------------------
# Box math
# ---------------------------------------------------------------------------------------------

def xy_to_cxcy(xy):
    """(x_min, y_min, x_max, y_max) -> (c_x, c_y, w, h); boxes (..., 4)."""
    return torch.cat([(xy[..., 2:] + xy[..., :2]) / 2, xy[..., 2:] - xy[..., :2]], -1)


def cxcy_to_xy(cxcy):
    """(c_x, c_y, w, h) -> (x_min, y_min, x_max, y_max); boxes (..., 4)."""
    return torch.cat([cxcy[..., :2] - cxcy[..., 2:] / 2, cxcy[..., :2] + cxcy[..., 2:] / 2], -1)


# The "variances" 10 and 5 are empirical constants from the original Caffe SSD code: they scale the
# offsets to about unit variance so that one Smooth L1 loss suits both centres and sizes.
CENTER_VARIANCE = 10.
SIZE_VARIANCE = 5.


def cxcy_to_gcxgcy(cxcy, priors_cxcy):
    """Encode boxes as offsets from the priors they are matched to (paper, eq. 2).

    g_cx = (c_x - p_cx) / (p_w / 10), g_cy likewise, g_w = 5 log(w / p_w), g_h likewise.
    cxcy: (..., P, 4), priors_cxcy: (P, 4) -> (..., P, 4).
    """
    return torch.cat([(cxcy[..., :2] - priors_cxcy[..., :2]) / (priors_cxcy[..., 2:] / CENTER_VARIANCE),
                      torch.log(cxcy[..., 2:] / priors_cxcy[..., 2:]) * SIZE_VARIANCE], -1)


def gcxgcy_to_cxcy(gcxgcy, priors_cxcy):
    """Decode predicted offsets into boxes; the inverse of cxcy_to_gcxgcy. (..., P, 4) -> (..., P, 4)."""
    return torch.cat([gcxgcy[..., :2] * priors_cxcy[..., 2:] / CENTER_VARIANCE + priors_cxcy[..., :2],
                      torch.exp(gcxgcy[..., 2:] / SIZE_VARIANCE) * priors_cxcy[..., 2:]], -1)


def _coordinates(set_1, set_2):
    """x_min, y_min, x_max, y_max of both sets, shaped (..., n1, 1) and (..., 1, n2) to broadcast.

    set_2's are made contiguous: on a CPU, strided (n1, n2) arithmetic is several times slower.
    """
    return ([c[..., :, None] for c in set_1.unbind(-1)], [c.contiguous()[..., None, :] for c in set_2.unbind(-1)])


def find_intersection(set_1, set_2):
    """Areas of intersection of every box in set_1 with every box in set_2.

    set_1: (..., n1, 4), set_2: (..., n2, 4) in xy form; leading dims broadcast -> (..., n1, n2).
    """
    (x1a, y1a, x2a, y2a), (x1b, y1b, x2b, y2b) = _coordinates(set_1, set_2)
    w = torch.min(x2a, x2b).sub_(torch.max(x1a, x1b)).clamp_(min=0)  # (..., n1, n2)
    h = torch.min(y2a, y2b).sub_(torch.max(y1a, y1b)).clamp_(min=0)
    return w.mul_(h)


def find_jaccard_overlap(set_1, set_2):
    """Jaccard overlap (IoU) of every box in set_1 with every box in set_2: (..., n1, 4), (..., n2, 4) -> (..., n1, n2)."""
    inter = find_intersection(set_1, set_2)
    area_1 = (set_1[..., 2] - set_1[..., 0]) * (set_1[..., 3] - set_1[..., 1])  # (..., n1)
    area_2 = (set_2[..., 2] - set_2[..., 0]) * (set_2[..., 3] - set_2[..., 1])  # (..., n2)
    union = torch.add(area_1[..., :, None], area_2[..., None, :]).sub_(inter)
    return inter.div_(union)


def decimate(tensor, m):
    """Keep every m[d]-th value along each dimension d (None = keep all).

    Used to turn VGG's fully connected fc6/fc7 into the smaller conv6/conv7 (paper, Sec. 3):
    fc6's (4096, 512, 7, 7) becomes (1024, 512, 3, 3) with m = [4, None, 3, 3], made atrous
    (dilation 6) to keep the field of view.
    """
    assert tensor.dim() == len(m)
    for d, step in enumerate(m):
        if step is not None:
            tensor = tensor.index_select(d, torch.arange(0, tensor.size(d), step, device=tensor.device))
    return tensor


# ---------------------------------------------------------------------------------------------
# Data transforms
#
# The tutorial transforms a PIL image step by step: distort colours, zoom out onto a 1-4x canvas,
# crop, flip, resize to 300x300. Materializing a 4x canvas (2560x1920) and distorting a 640x480
# image costs tens of milliseconds an image, so here the geometric steps (expand, random_crop,
# flip) only move a *window* (x_min, y_min, x_max, y_max) in the original image's pixel
# coordinates; the window may reach outside the image, where the zoom-out canvas would be. The
# boxes stay in original pixel coordinates. resize() then renders the window once: the part of
# the image inside it is resized (bilinear, antialiased like PIL) straight to its place in the
# 300x300 output, the colour distortions are applied to those pixels, and the rest is the
# ImageNet mean, as in the tutorial's zoom-out. The random draws are those of the tutorial.
# All randomness comes from one torch.Generator, so an item is reproducible from its seed.
# ---------------------------------------------------------------------------------------------

# ImageNet statistics: the VGG base was trained on images normalized this way (tutorial, "Images").
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_MEAN_UINT8 = tuple(round(255 * m) for m in IMAGENET_MEAN)  # the zoom-out canvas colour: (124, 116, 104)


def _uniform(g, low, high):
    return low + (high - low) * torch.rand((), generator=g).item()


def _randint(g, low, high):
    """Integer in [low, high], both ends included (like random.randint)."""
    return int(torch.randint(low, high + 1, (), generator=g))


def adjust_hue(image, hue_factor):
    """torchvision's adjust_hue for a float (3, h, w) image in [0, 1], step for step the same arithmetic (so
    the same result), but with elementwise max/min and selections where torchvision reduces over the channel
    dimension and multiplies by a one-hot mask (an einsum): about 3x faster, and hue is the costliest
    augmentation. RGB -> HSV, h shifted by hue_factor (in [-0.5, 0.5]) modulo 1, HSV -> RGB. Other dtypes and
    shapes go to torchvision's."""
    if image.dtype != torch.float32 or image.shape[0] != 3 or image.dim() != 3 or not -0.5 <= hue_factor <= 0.5:
        import torchvision.transforms.functional as FT  # here, not at the top: misc.check_torch_pair
        return FT.adjust_hue(image, hue_factor)
    r, g, b = image.unbind(0)
    maxc = torch.maximum(torch.maximum(r, g), b)  # = v
    minc = torch.minimum(torch.minimum(r, g), b)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_divisor = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / cr_divisor, (maxc - g) / cr_divisor, (maxc - b) / cr_divisor
    h = ((maxc == r) * (bc - gc) + ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
         + ((maxc != g) & (maxc != r)) * (4.0 + gc - rc))
    h = (torch.fmod(h / 6.0 + 1.0, 1.0) + hue_factor) % 1.0
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    sector = i.to(torch.int32) % 6
    p = torch.clamp(maxc * (1.0 - s), 0.0, 1.0)
    q = torch.clamp(maxc * (1.0 - s * f), 0.0, 1.0)
    t = torch.clamp(maxc * (1.0 - s * (1.0 - f)), 0.0, 1.0)
    # by sector, R is (v, q, p, p, t, v), G (t, v, v, q, p, p) and B (p, p, t, v, v, q): indices into (v, q, p, t)
    pick = torch.tensor([[0, 1, 2, 2, 3, 0], [3, 0, 0, 1, 2, 2], [2, 2, 3, 0, 0, 1]], device=image.device)
    return torch.stack([maxc, q, p, t]).gather(0, pick.index_select(1, sector.flatten()).view_as(image))


def photometric_distort(image, g=None):
    """Adjust brightness, contrast, saturation and hue, each with 50% chance, in random order.

    image: float tensor (3, h, w) in [0, 1]. Factors as in the tutorial: U(0.5, 1.5) for
    brightness, contrast and saturation; U(-18/255, 18/255) for hue. Here the image is the part
    of the original visible in the output (see the note above), so contrast blends towards its
    mean grey rather than the whole original image's.
    """
    import torchvision.transforms.functional as FT  # here, not at the top: misc.check_torch_pair
    distortions = [FT.adjust_brightness, FT.adjust_contrast, FT.adjust_saturation, adjust_hue]
    for i in torch.randperm(4, generator=g).tolist():
        if torch.rand((), generator=g) < 0.5:
            d = distortions[i]
            factor = _uniform(g, -18 / 255., 18 / 255.) if d is adjust_hue else _uniform(g, 0.5, 1.5)
            image = d(image, factor)
    return image


def expand(window, g=None, max_scale=4):
    """Zoom out: place the image at a random spot of a canvas 1 to `max_scale` times as large.

    Returns the canvas as a window in the image's pixel coordinates (it reaches outside the
    image, where the canvas is filled with the ImageNet mean). Helps to learn small objects
    (paper, Sec. 3.6: "zoom out").
    """
    x0, y0, x1, y1 = window
    w, h = x1 - x0, y1 - y0
    scale = _uniform(g, 1, max_scale)
    new_w, new_h = int(scale * w), int(scale * h)
    left, top = _randint(g, 0, new_w - w), _randint(g, 0, new_h - h)
    return (x0 - left, y0 - top, x0 - left + new_w, y0 - top + new_h)


_MIN_OVERLAPS = (0., .1, .3, .5, .7, .9, None)  # None: no crop
CROP_KEEP = ("centre", "visible")
CROP_MIN_VISIBLE = 0.15  # 99 % of the 7,572 red cells TXL-PBC train boxes at the image's edge show more of a cell


def random_crop(window, boxes, labels, difficulties, g=None, max_trials=50, keep="centre"):
    """Zoom in: crop the window as in the paper (Sec. 3.6) and the tutorial.

    A minimum overlap is drawn from {0, .1, .3, .5, .7, .9, no crop}; then up to `max_trials`
    crops with sides 0.3-1 of the window and aspect ratio between 0.5 and 2 are tried (drawn all
    at once here) and the first is kept that overlaps some box by at least that much and keeps a box. Another
    minimum overlap is drawn if no trial succeeds. boxes: (n, 4) pixels, same frame as window.
    keep (CROP_KEEP), the boxes a crop keeps, clipped (the rest are dropped): "centre", those whose centres fall inside
    (the paper's); "visible", those with more than CROP_MIN_VISIBLE of their area inside, where the annotations box
    cells cut by the image's edge (TXL-PBC's do): the crop's edge then cuts cells as the image's does.
    Returns (window, boxes, labels, difficulties).
    """
    if boxes.size(0) == 0:  # nothing to keep: the crop conditions cannot be met
        return window, boxes, labels, difficulties
    x0, y0, x1, y1 = window
    w, h = x1 - x0, y1 - y0
    centers, area = (boxes[:, :2] + boxes[:, 2:]) / 2, (boxes[:, 2:] - boxes[:, :2]).prod(1)  # (n, 2), (n,)
    while True:
        min_overlap = _MIN_OVERLAPS[_randint(g, 0, len(_MIN_OVERLAPS) - 1)]
        if min_overlap is None:
            return window, boxes, labels, difficulties
        scale = 0.3 + 0.7 * torch.rand(max_trials, 2, generator=g, dtype=torch.float64)  # (T, 2) w, h
        new_w, new_h = (scale[:, 0] * w).long(), (scale[:, 1] * h).long()
        aspect_ok = (new_h > 0.5 * new_w) & (new_h < 2 * new_w)
        left = (torch.rand(max_trials, generator=g, dtype=torch.float64) * (w - new_w + 1)).long()
        top = (torch.rand(max_trials, generator=g, dtype=torch.float64) * (h - new_h + 1)).long()
        crops = torch.stack([x0 + left, y0 + top, x0 + left + new_w, y0 + top + new_h], 1).float()  # (T, 4)
        overlap = find_jaccard_overlap(crops, boxes)  # (T, n)
        if keep == "centre":
            inside = ((centers[None] > crops[:, None, :2]) & (centers[None] < crops[:, None, 2:])).all(-1)  # (T, n)
        else:
            inside = find_intersection(crops, boxes) > CROP_MIN_VISIBLE * area  # (T, n)
        ok = aspect_ok & (overlap.max(1).values >= min_overlap) & inside.any(1)
        if ok.any():
            t = int(ok.nonzero()[0])
            crop, keep = crops[t], inside[t]
            new_boxes = boxes[keep]
            new_boxes = torch.cat([torch.max(new_boxes[:, :2], crop[:2]), torch.min(new_boxes[:, 2:], crop[2:])], 1)
            return tuple(int(v) for v in crop.tolist()), new_boxes, labels[keep], difficulties[keep]


def flip(boxes, window):
    """Mirror boxes horizontally inside the window (the image itself is flipped in resize)."""
    x0, _, x1, _ = window
    return torch.stack([x0 + x1 - boxes[:, 2], boxes[:, 1], x0 + x1 - boxes[:, 0], boxes[:, 3]], 1)


FLIPS = ("h", "d4")  # transform()'s geometric symmetries: the tutorial's horizontal flip, or all 8 of the square


def flip_rotate(image, boxes, vflip=False, transpose=False):
    """Flip a square image (..., S, S) upside down and/or transpose it (swap x and y), with its boxes (n, 4)
    fractional xy. With resize()'s horizontal flip these make the 8 symmetries of the square (the 90-degree
    rotations among them): a blood smear has no up or left, so each is as likely a view as the original."""
    if vflip:
        image = image.flip(-2)
        boxes = torch.stack([boxes[:, 0], 1 - boxes[:, 3], boxes[:, 2], 1 - boxes[:, 1]], 1)
    if transpose:
        image = image.transpose(-1, -2).contiguous()
        boxes = boxes[:, [1, 0, 3, 2]]
    return image, boxes


def resize_placement(window, image_size, dims=(300, 300)):
    """Where resize() puts `window` (x_min, y_min, x_max, y_max, whole pixels, may reach outside) of an image of
    image_size (width, height) in an output of dims (height, width): ((ix0, iy0, ix1, iy1) the visible part in
    image pixels, (ox0, oy0, ox1, oy1) where it lands in output pixels, rounded to whole pixels)."""
    W, H = image_size
    out_h, out_w = dims
    x0, y0, x1, y1 = window
    ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x1, W), min(y1, H)  # visible part, in image pixels
    sx, sy = out_w / (x1 - x0), out_h / (y1 - y0)
    ox0, ox1 = round((ix0 - x0) * sx), max(round((ix1 - x0) * sx), round((ix0 - x0) * sx) + 1)
    oy0, oy1 = round((iy0 - y0) * sy), max(round((iy1 - y0) * sy), round((iy0 - y0) * sy) + 1)
    ox1, oy1 = min(ox1, out_w), min(oy1, out_h)
    ox0, oy0 = min(ox0, ox1 - 1), min(oy0, oy1 - 1)
    return (ix0, iy0, ix1, iy1), (ox0, oy0, ox1, oy1)


def resize(image, window, boxes, dims=(300, 300), hflip=False, distort=None):
    """Render `window` of `image` at `dims` and express boxes in fractional output coordinates.

    image: uint8 (3, H, W); window: (x_min, y_min, x_max, y_max) in its pixels, may reach outside;
    boxes: (n, 4) in the same pixels. The visible part is resized with antialiasing (as PIL
    does), optionally distorted (`distort(float image in [0,1])`) and pasted on a canvas of the
    ImageNet mean. Returns (uint8 image (3, *dims), boxes): images stay uint8 until normalize()
    on the device, a quarter of the bytes to pass from DataLoader workers and to copy to a GPU.
    """
    _, H, W = image.shape
    out_h, out_w = dims
    (ix0, iy0, ix1, iy1), (ox0, oy0, ox1, oy1) = resize_placement(window, (W, H), dims)

    patch = image[None, :, iy0:iy1, ix0:ix1]
    if (iy1 - iy0, ix1 - ix0) != (oy1 - oy0, ox1 - ox0):
        patch = F.interpolate(patch, size=(oy1 - oy0, ox1 - ox0), mode="bilinear", antialias=True, align_corners=False)
    patch = patch[0]
    if distort is not None:
        patch = distort(patch.float().div_(255)).mul_(255).round_().clamp_(0, 255).to(torch.uint8)
    if (oy0, ox0, oy1, ox1) == (0, 0, out_h, out_w):
        out = patch.clone() if distort is None else patch  # never a view of the (possibly cached) input
    else:
        out = torch.tensor(IMAGENET_MEAN_UINT8, dtype=torch.uint8)[:, None, None].repeat(1, out_h, out_w)
        out[:, oy0:oy1, ox0:ox1] = patch

    # map boxes with the exact (rounded) transform the pixels went through, then to fractions
    scale = boxes.new_tensor([(ox1 - ox0) / (ix1 - ix0), (oy1 - oy0) / (iy1 - iy0)] * 2)
    offset_in = boxes.new_tensor([ix0, iy0, ix0, iy0])
    offset_out = boxes.new_tensor([ox0, oy0, ox0, oy0])
    new_boxes = ((boxes - offset_in) * scale + offset_out) / boxes.new_tensor([out_w, out_h, out_w, out_h])
    new_boxes = new_boxes.clamp_(0, 1)  # rounding can reach 1 + 1e-7
    if hflip:
        out = out.flip(-1)
        new_boxes = flip(new_boxes, (0, 0, 1, 1))
    return out, new_boxes


def normalize(images):
    """uint8 images (..., 3, H, W), as transform() gives them, -> float, normalized with ImageNet's mean and
    std (the tutorial's last transform, done here on the device the model runs on)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize() takes uint8 images (0-255), not {images.dtype}")
    out = images.float().div_(255)
    for c, (mean, std) in enumerate(zip(IMAGENET_MEAN, IMAGENET_STD)):  # Python numbers: no host-to-GPU copy, no sync
        out[..., c, :, :].sub_(mean).div_(std)
    return out


def transform(image, boxes, labels, difficulties, split, g=None, max_zoom=4., flips="h", crop_keep="centre"):
    """Apply the tutorial's transformations (section "Data Transforms").

    image: uint8 tensor (3, H, W); boxes: (n, 4) pixel xy; labels, difficulties: (n,).
    split: 'TRAIN' (photometric distortions, zoom out 50%, random crop, flip 50%, resize) or
    'TEST' (resize); the tutorial's last step, normalization, is normalize(), applied to whole
    batches on the device. g: torch.Generator for the random draws.
    max_zoom: the largest zoom-out canvas, as a multiple of the image (paper: 4; 1 disables it).
    flips: "h", the tutorial's horizontal flip, or "d4", also a vertical flip and a transpose (50% each, after
    resizing, so that every symmetry of the square is as likely: flip_rotate). crop_keep: random_crop's keep.
    Returns (image uint8 (3, 300, 300), boxes fractional (n, 4), labels, difficulties).
    """
    split = split.upper()
    assert split in ("TRAIN", "TEST") and flips in FLIPS and crop_keep in CROP_KEEP
    _, H, W = image.shape
    window = (0, 0, W, H)
    hflip, distort = False, None
    if split == "TRAIN":
        distort = lambda im: photometric_distort(im, g)  # applied in resize, to the visible pixels only
        if torch.rand((), generator=g) < 0.5 and max_zoom > 1:
            window = expand(window, g, max_scale=max_zoom)
        window, boxes, labels, difficulties = random_crop(window, boxes, labels, difficulties, g, keep=crop_keep)
        hflip = bool(torch.rand((), generator=g) < 0.5)
    image, boxes = resize(image, window, boxes, hflip=hflip, distort=distort)
    if split == "TRAIN" and flips == "d4":  # drawn after all of the tutorial's draws, which stay as they were
        vflip, transpose = (torch.rand(2, generator=g) < 0.5).tolist()
        image, boxes = flip_rotate(image, boxes, vflip, transpose)
    return image, boxes, labels, difficulties


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------

def _average_precision(precision, recall, interpolation):
    """AP from a precision/recall curve (detections sorted by decreasing score).

    '11point': VOC2007, mean over recall in {0, .1, ..., 1} of the best precision at recall >= it.
    'all': VOC2010+, area under the monotone precision envelope. '101point': COCO's 101 recall points.
    """
    if recall.numel() == 0:
        return recall.new_zeros(())
    if interpolation in ("11point", "101point"):
        n_points = 11 if interpolation == "11point" else 101
        # k / (n - 1) exactly rounded, as recall = TP / n is: a recall of exactly 0.53 reaches the point 0.53
        points = torch.arange(n_points, dtype=recall.dtype, device=recall.device) / (n_points - 1)
        # best precision at recall >= t: suffix max of precision, looked up at the first index with recall >= t
        envelope = precision.flip(0).cummax(0).values.flip(0)
        idx = torch.searchsorted(recall.contiguous(), points)  # recall is non-decreasing
        found = idx < recall.numel()
        p = torch.where(found, envelope[idx.clamp(max=recall.numel() - 1)], torch.zeros_like(points))
        return p.mean()
    if interpolation == "all":
        envelope = precision.flip(0).cummax(0).values.flip(0)
        dr = torch.diff(recall, prepend=recall.new_zeros(1))
        return (dr * envelope).sum()
    raise ValueError(f"unknown interpolation {interpolation!r}")


def calculate_mAP(det_boxes, det_labels, det_scores, true_boxes, true_labels, true_difficulties,
                  iou_threshold=0.5, interpolation="11point", label_names=None):
    """Mean Average Precision of detections, the tutorial's signature and VOC2007 rules.

    Each argument is a list over images of tensors: det_boxes (n_d, 4) xy, det_labels (n_d,),
    det_scores (n_d,), true_boxes (n_t, 4) xy (same scale as the detections), true_labels (n_t,),
    true_difficulties (n_t,). Detections are matched to objects as match_detections says.
    interpolation: '11point' (VOC2007, the tutorial's), 'all' (VOC2010+) or '101point' (COCO).
    Returns (dict class name -> AP as float, mAP as float). A class without (non-difficult) objects is left out.
    """
    average_precisions = {}
    for name, (_, tp, n_easy) in match_detections(det_boxes, det_labels, det_scores, true_boxes, true_labels,
                                                  true_difficulties, iou_threshold, label_names).items():
        cum_tp = tp.cumsum(0).float()
        precision = cum_tp / torch.arange(1, len(tp) + 1, device=tp.device)  # TP / (TP + FP) at each detection
        average_precisions[name] = float(_average_precision(precision, cum_tp / n_easy, interpolation))
    return average_precisions, sum(average_precisions.values()) / max(len(average_precisions), 1)  # and the mAP


def match_detections(det_boxes, det_labels, det_scores, true_boxes, true_labels, true_difficulties,
                     iou_threshold=0.5, label_names=None):
    """VOC2007 matching of detections to objects, per class (calculate_mAP's arguments): {class name: (scores
    (n,), true_positive (n,) bool, number of non-difficult objects)}, the detections in order of decreasing score.

    For each class, detections are taken in order of decreasing score; a detection is a true positive if its
    best-overlapping object of that class in the same image has IoU > iou_threshold, is not difficult and was not
    detected before; matched to a difficult object it is neither true nor false positive, and left out;
    otherwise it is a false positive. A class without (non-difficult) objects is left out.

    Vectorized: all images of a class are processed together, in one IoU matrix masked to pairs from the same
    image; "was not detected before" is "is the highest-scoring detection matched to that object".
    """
    label_names = label_names or {v: k for k, v in label_map.items() if v != 0}
    assert len({len(x) for x in (det_boxes, det_labels, det_scores, true_boxes, true_labels, true_difficulties)}) == 1
    device = true_boxes[0].device if true_boxes else torch.device("cpu")

    def flat(tensors, dtype, four=False):
        shape = (-1, 4) if four else (-1,)
        return torch.cat([t.to(device, dtype).reshape(shape) for t in tensors] +
                         [torch.zeros((0, 4) if four else (0,), dtype=dtype, device=device)])

    def image_ids(labels):
        return torch.cat([torch.full((len(l),), i, device=device) for i, l in enumerate(labels)] +
                         [torch.zeros(0, dtype=torch.long, device=device)])

    t_img, t_boxes = image_ids(true_labels), flat(true_boxes, torch.float, four=True)
    t_labels, t_diff = flat(true_labels, torch.long), flat(true_difficulties, torch.bool)
    d_img, d_boxes = image_ids(det_labels), flat(det_boxes, torch.float, four=True)
    d_labels, d_scores = flat(det_labels, torch.long), flat(det_scores, torch.float)

    matches = {}
    for c, name in sorted(label_names.items()):
        t_mask = t_labels == c
        n_easy = int((t_mask & ~t_diff).sum())
        if n_easy == 0:  # AP is undefined for a class with no (non-difficult) object
            continue
        gt, gt_diff, gt_img = t_boxes[t_mask], t_diff[t_mask], t_img[t_mask]
        d_mask = d_labels == c
        boxes, scores, img = d_boxes[d_mask], d_scores[d_mask], d_img[d_mask]
        order = scores.argsort(descending=True, stable=True)
        boxes, scores, img = boxes[order], scores[order], img[order]
        overlap = find_jaccard_overlap(boxes, gt)  # (n_d, n_gt), all images at once
        overlap.masked_fill_(img[:, None] != gt_img[None, :], -1.)  # objects of other images never match
        best_iou, best_gt = overlap.max(1)  # (n_d,)
        matched = best_iou > iou_threshold
        difficult = matched & gt_diff[best_gt]
        # the first (highest-scoring) detection matched to an object takes it; later ones are FPs
        rank = torch.arange(boxes.size(0), device=device)
        first = torch.full((gt.size(0),), boxes.size(0), dtype=torch.long, device=device)
        first.scatter_reduce_(0, best_gt[matched], rank[matched], reduce="amin")
        tp = matched & ~difficult & (first[best_gt] == rank)
        matches[name] = (scores[~difficult], tp[~difficult], n_easy)
    return matches
