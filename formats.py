"""Datasets on disk, read split by split for create_data_lists: Pascal VOC, YOLO and COCO.

    from formats import find_dataset, READERS
    dataset = find_dataset("data/TXL-PBC")        # Dataset(format="yolo", root=..., where=.../data.yaml)
    entries, warnings, errors, names = READERS[dataset.format](dataset, "train", label_map=None)

Each reader walks one split of a dataset, finds each image and parses its annotation with utils' parsers
(parse_annotation, parse_yolo_labels, parse_coco): entries are [(image path, objects)], labels still class names
(or label_map's labels when one is given), and every problem is collected in `errors`, one line each, so that
create_data_lists can report them all at once. The layouts each format may have are find_dataset's docstring.
"""
import os
import re
from collections import Counter
from typing import NamedTuple

from PIL import Image

from misc import UserError, one_line
from utils import (check_classes, image_extensions, parse_annotation, parse_coco, parse_yolo_labels, read_annotation,
                   upright_size)



class Dataset(NamedTuple):
    """A dataset found at a path: its format ("voc", "yolo" or "coco"), its root folder and, by format, where its
    annotations are (VOC: the Annotations folder or the folder of flat .xml files; YOLO: data.yaml or None; COCO:
    {split: json path})."""
    format: str
    root: str
    where: object
    images: str = None  # the folder of the images, where they are not beside their labels (with_images)


ALL = "all"  # the split name of every image a dataset has
NONE = "none"  # a dataset that gives a list nothing


def find_dataset(path):
    """The Dataset at `path`: a VOC folder (Annotations/ and JPEGImages/, or .xml files beside their images), a
    YOLO dataset (its data.yaml, a folder holding one, or images/ and labels/ folders, or .txt files beside their
    images with classes.txt) or a COCO file (a .json, or a folder of <split>/*.json as Roboflow exports it)."""
    if os.path.isfile(path) and path.lower().endswith((".yaml", ".yml")):
        return Dataset("yolo", os.path.dirname(os.path.abspath(path)), os.path.abspath(path))
    if os.path.isfile(path) and path.lower().endswith(".json"):
        return Dataset("coco", os.path.dirname(os.path.abspath(path)), {ALL: os.path.abspath(path)})
    if not os.path.isdir(path):
        raise UserError(f"{path}: no such dataset (a VOC or YOLO folder, a data.yaml or a COCO .json)"
                        if not os.path.lexists(path) else f"{path}: not a folder, a data.yaml or a COCO .json")
    root = os.path.abspath(path)
    names = set(os.listdir(root))
    if "Annotations" in names:
        return Dataset("voc", root, os.path.join(root, "Annotations"))
    yamls = sorted(n for n in names if n.lower() in ("data.yaml", "data.yml", "dataset.yaml"))
    if yamls:
        return Dataset("yolo", root, os.path.join(root, yamls[0]))
    cocos = {d: sorted(f for f in os.listdir(os.path.join(root, d)) if f.lower().endswith(".json"))
             for d in sorted(names) if os.path.isdir(os.path.join(root, d))}
    cocos = {d: os.path.join(root, d, fs[0]) for d, fs in cocos.items() if len(fs) == 1}
    if cocos:
        return Dataset("coco", root, cocos)
    jsons = sorted(n for n in names if n.lower().endswith(".json"))
    if len(jsons) == 1:
        return Dataset("coco", root, {ALL: os.path.join(root, jsons[0])})
    if "labels" in names or any(n.lower().endswith(".txt") and n != "classes.txt" for n in names):
        return Dataset("yolo", root, None)
    if any(n.lower().endswith(".xml") for n in names):
        return Dataset("voc", root, root)
    raise UserError(f"{path}: no dataset found: no Annotations/ (Pascal VOC), data.yaml or labels/ (YOLO) or .json "
                    f"(COCO) in it")


def with_images(dataset, folder):
    """The dataset with its images in `folder` (create_data_lists --images), as a labelling tool leaves label files
    apart from their images (LabelImg's Change Save Dir; detect.py --save-labels): a folder of VOC .xml files, a
    folder of YOLO .txt files with classes.txt, or a COCO file."""
    if not os.path.isdir(folder):
        raise UserError(f"--images {folder}: no such folder")
    if (dataset.format == "voc" and dataset.where != dataset.root) or (dataset.format == "yolo" and dataset.where):
        raise UserError(f"--images {folder}: {dataset.where} says where its images are; --images is for a folder "
                        f"of label files without their images (detect.py --save-labels: labels/voc, "
                        f"labels/yolo/obj_train_data or labels/coco.json)")
    return dataset._replace(images=os.path.abspath(folder))


def list_images(folder):
    """The image files under `folder` (searched recursively), sorted; [] when it is not a folder."""
    found = []
    for top, dirs, files in os.walk(folder):
        dirs.sort()
        found += [os.path.join(top, f) for f in sorted(files) if os.path.splitext(f)[1].lower() in image_extensions()]
    return found


def image_size(path, stored=False):
    """(width, height) of an image as shown upright (its EXIF orientation applied, as detect.py and the training read
    it), decoded whole (a truncated or damaged file is found now, not mid-training). stored: also (width, height) of
    its pixels as stored, before the EXIF orientation: (upright, stored)."""
    if not os.path.isfile(path):  # a pipe or a device: opening it could wait for ever
        raise UserError(f"{path}: not a regular file (a pipe, socket or device), not an image")
    try:
        with Image.open(path) as im:
            im.load()
            return (upright_size(im), im.size) if stored else upright_size(im)
    except Exception as e:
        raise UserError(f"{path}: not a readable image ({type(e).__name__}"
                        f"{': ' + str(e).splitlines()[0][:120] if str(e) else ''})") from None


def read_voc(dataset, split, label_map):
    """[(image path, objects)], warnings of a VOC dataset's split: ImageSets/Main/<split>.txt, or all annotations."""
    flat = dataset.where == dataset.root
    if split == ALL:
        ids = sorted(f[:-4] for f in os.listdir(dataset.where) if f.endswith(".xml"))
    elif flat:
        raise UserError(f"{dataset.root}: a folder of .xml files has no splits; use split {ALL} (--train-split "
                        f"{ALL}), or --test-fraction")
    else:
        ids = read_split(dataset.root, split)
    entries, warnings, errors, listings, owners = [], [], [], {}, {}
    for image_id in ids:  # the tutorial's loop: each annotation, its image, its objects
        try:
            xml_path = os.path.join(dataset.where, image_id + ".xml")
            if not os.path.isfile(xml_path):
                raise UserError(f"{xml_path}: no annotation for id {image_id!r} of {split}.txt")
            root = read_annotation(xml_path)
            img_path = find_image(dataset.images or (dataset.root if flat else os.path.join(dataset.root, "JPEGImages")),
                                  image_id, (root.findtext("filename") or "").strip(), listings)
            other = owners.setdefault(os.path.realpath(img_path), image_id)
            if other != image_id:  # a <filename> naming another id's image
                raise UserError(f"{img_path}: the image of both {other}.xml and {image_id}.xml (its <filename>); each "
                                f"image must be annotated once")
            size, stored = image_size(img_path, stored=True)
            check_upright(xml_path, root, img_path, size, stored)
            objects, warns = parse_annotation(xml_path, size, label_map, root)
            entries.append((img_path, objects))
            warnings += warns
        except UserError as e:
            errors.append(str(e))
    return entries, warnings, errors, []


def check_upright(xml_path, root, img_path, size, stored):
    """UserError where a VOC annotation boxes an image turned by its EXIF orientation as its pixels are stored (its
    <size> is theirs, not the upright image's: LabelImg shows the stored pixels), while the tool reads it upright."""
    try:
        said = (int(float(root.findtext("size/width"))), int(float(root.findtext("size/height"))))
    except (TypeError, ValueError, OverflowError):
        return
    if size != stored and said == tuple(stored):
        raise UserError(f"{xml_path}: boxes {img_path} as its pixels are stored ({stored[0]}x{stored[1]}), but its "
                        f"EXIF orientation turns it upright ({size[0]}x{size[1]}), as detect.py and the training read "
                        f"it: remove the tag (exiftool -Orientation= -n FILE) or annotate the upright image")


def find_image(folder, image_id, filename=None, listings=None):
    """The image file of annotation `image_id` in `folder` (VOC's JPEGImages): <filename> when the XML's <filename>
    names a file there, else <image_id>.<ext> for any extension PIL opens (the first in sorted order); UserError
    when there is none. listings: a dict that keeps folder listings from one call to the next."""
    if filename and not os.path.isabs(filename) and ".." not in re.split(r"[\\/]", filename):
        if os.path.isfile(os.path.join(folder, filename)):
            return os.path.join(folder, filename)
    sub, stem = os.path.split(os.path.join(folder, image_id))
    listings = {} if listings is None else listings
    if sub not in listings:
        listings[sub] = {}
        for f in sorted(os.listdir(sub)) if os.path.isdir(sub) else []:
            if os.path.splitext(f)[1].lower() in image_extensions():
                listings[sub].setdefault(os.path.splitext(f)[0], f)
    if stem not in listings[sub]:
        raise UserError(f"{os.path.join(folder, filename or image_id + '.jpg')}: image missing (annotated in "
                        f"{image_id}.xml; no {image_id}.<image extension> either)")
    return os.path.join(sub, listings[sub][stem])


def read_lines(path):
    """The lines of a text file (a split, a list of images, classes.txt) that are not blank, stripped; UserError naming
    it if it cannot be read or is not UTF-8 (a byte-order mark is read: it is not part of the first line)."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: unreadable ({getattr(e, 'strerror', None) or e})") from None


def read_split(voc_path, split_name):
    """The ids of ImageSets/Main/<split_name>.txt, one a line; UserError if the file is missing, unreadable, empty, or
    lists an id twice or one that climbs out of Annotations/."""
    split_file = os.path.join(voc_path, "ImageSets", "Main", split_name + ".txt")
    if not os.path.isfile(split_file):
        raise UserError(f"{split_file}: split file not found (a dataset without splits: make a seeded one with "
                        f"create_data_lists.py --test-fraction 0.2)")
    ids = read_lines(split_file)
    if not ids:
        raise UserError(f"{split_file}: empty split")
    twice = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) < len(ids) else []
    if twice:
        raise UserError(f"{split_file}: {len(twice)} id(s) listed more than once ({', '.join(twice[:5])}"
                        f"{', ...' if len(twice) > 5 else ''}): each image must be counted once")
    outside = [i for i in ids if os.path.isabs(i) or ".." in re.split(r"[\\/]", i)]
    if outside:
        raise UserError(f"{split_file}: id {outside[0]!r} points outside the dataset's Annotations/; an id is a "
                        f"file name there, without .xml")
    return ids


YAML_KEYS = ("path", "names", "nc", "download", "roboflow", "license", "url")  # data.yaml keys that are not splits


def yaml_module():
    """PyYAML, an optional extra: UserError naming the pip command where it is missing."""
    try:
        import yaml
    except ImportError:
        raise UserError("reading a YOLO dataset's data.yaml needs PyYAML: pip install -r requirements-yolo.txt") from None
    return yaml


def read_data_yaml(path):
    """(class names, {split: [folders or list files]}) of an Ultralytics/Roboflow data.yaml."""
    yaml = yaml_module()
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(f"{path}: unreadable YAML ({' '.join(one_line(e).split())})") from None  # PyYAML's: lines
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, dict) and names:  # {0: WBC, 1: RBC}
        ids = list(names)
        if not all(type(i) is int for i in ids) or sorted(ids) != list(range(len(ids))):
            raise UserError(f"{path}: names must be numbered 0, 1, 2, ... without a gap, as the label files' class ids "
                            f"are, not {', '.join(map(repr, ids[:6]))}")
        names = [names[i] for i in range(len(names))]
    if not (isinstance(names, list) and names and all(isinstance(n, (str, int)) for n in names)):
        raise UserError(f"{path}: no class names (names: [a, b] or names: {{0: a, 1: b}})")
    base = os.path.dirname(path)
    if isinstance(data.get("path"), str):
        given = os.path.join(base, os.path.expanduser(data["path"]))
        base = given if os.path.isdir(given) else base  # a path of the machine it was made on: the yaml's folder
    splits = {}
    for key, value in data.items():
        values = value if isinstance(value, list) else [value]
        if key in YAML_KEYS or not values or not all(isinstance(v, str) and v for v in values):
            continue
        # Roboflow writes ../train/images for a folder beside data.yaml: Ultralytics tries it without the ../ too
        splits[str(key)] = [p if os.path.exists(p) or not v.startswith("../") else os.path.join(base, v[3:])
                            for v in values for p in [os.path.normpath(os.path.join(base, v))]]
    return check_classes([str(n) for n in names], f"{path}: names"), splits


def stem(path):
    """A file's name without its folder and extension: what a label file kept apart from its image is named after."""
    return os.path.splitext(os.path.basename(path))[0]


def label_path(image_path):
    """The YOLO label file of an image: its path with the last images/ folder made labels/ and the extension .txt
    (Ultralytics' rule); beside the image when its path has no images/ folder (LabelImg's)."""
    head, sep, tail = image_path.rpartition(os.sep + "images" + os.sep)
    return os.path.splitext(head + os.sep + "labels" + os.sep + tail if sep else image_path)[0] + ".txt"


def yolo_split_images(dataset, split):
    """(class names, image paths) of a YOLO dataset's split."""
    if dataset.where is not None:
        names, splits = read_data_yaml(dataset.where)
        if split == ALL:
            sources = [p for ps in splits.values() for p in ps]
        elif split not in splits:
            raise UserError(f"{dataset.where}: no split {split!r} (it has {', '.join(splits) or 'none'})")
        else:
            sources = splits[split]
    else:
        classes = [p for p in (os.path.join(dataset.root, "classes.txt"),
                               os.path.join(dataset.root, "labels", "classes.txt")) if os.path.isfile(p)]
        if not classes:
            raise UserError(f"{dataset.root}: a YOLO folder needs its class names: a data.yaml or a classes.txt "
                            f"(one name a line, in class-id order)")
        names = check_classes(read_lines(classes[0]), classes[0])
        images = dataset.images or os.path.join(dataset.root, "images")
        if split == ALL:
            sources = [images if os.path.isdir(images) else dataset.root]
        elif os.path.isdir(os.path.join(images, split)):
            sources = [os.path.join(images, split)]
        else:
            raise UserError(f"{dataset.root}: no split {split!r} (no images/{split}/ folder)")
    paths = []
    for source in sources:
        if os.path.isfile(source):  # a .txt list of images, relative to its folder
            paths += [os.path.normpath(os.path.join(os.path.dirname(source), line)) for line in read_lines(source)]
        elif os.path.isdir(source):
            paths += list_images(source)
        else:
            raise UserError(f"{dataset.where or dataset.root}: split {split!r}: {source} not found")
    return names, list(dict.fromkeys(paths))


def read_yolo(dataset, split, label_map):
    """[(image path, objects)], warnings, errors and the class names of a YOLO dataset's split."""
    names, paths = yolo_split_images(dataset, split)
    entries, warnings, errors = [], [], []
    if dataset.images:  # the label files in root, named after their images
        stems = Counter(stem(p) for p in paths)
        errors = [f"{os.path.join(dataset.root, f)}: no image {f[:-4]}.<image extension> in {dataset.images}"
                  for f in sorted(os.listdir(dataset.root)) if f.endswith(".txt") and f != "classes.txt"
                  and f[:-4] not in stems]
        errors += [f"{dataset.images}: {n} images named {name}.*: a label file names its image by name alone; give "
                   f"a folder where each name is once" for name, n in stems.items() if n > 1]
    for path in paths:
        try:
            labels_file = os.path.join(dataset.root, stem(path) + ".txt") if dataset.images else label_path(path)
            objects, warns = parse_yolo_labels(labels_file, image_size(path), names, label_map)
            entries.append((path, objects))
            warnings += warns
        except UserError as e:
            errors.append(str(e))
    return entries, warnings, errors, names


def coco_image(coco_path, file_name, images=None):
    """The image a COCO file's file_name names: in the folder `images` when given, else beside the file, in its
    images/ folder, or in ../images/ (CVAT's and Label Studio's exports), by that relative path or its base name;
    None if none."""
    base = os.path.dirname(coco_path)
    names = [file_name] if not os.path.isabs(file_name) and ".." not in re.split(r"[\\/]", file_name) else []
    names.append(os.path.basename(file_name.replace("\\", "/")))
    for folder in [images] if images else (base, os.path.join(base, "images"), os.path.join(os.path.dirname(base), "images")):
        for name in names:
            if os.path.isfile(os.path.join(folder, name)):
                return os.path.join(folder, name)
    return None


def read_coco(dataset, split, label_map):
    """[(image path, objects)], warnings, errors and the category names of a COCO dataset's split."""
    if split not in dataset.where:
        raise UserError(f"{dataset.root}: no split {split!r} (it has {', '.join(dataset.where)})")
    coco_path = dataset.where[split]
    images, warnings, names = parse_coco(coco_path, label_map)
    entries, errors = [], []
    for file_name, (size, objects) in images.items():
        path = coco_image(coco_path, file_name, dataset.images)
        try:
            if path is None:
                raise UserError(f"{coco_path}: image {file_name!r} not found " + (
                    f"in {dataset.images}" if dataset.images else "beside it, in images/ or in ../images/"))
            upright, stored = image_size(path, stored=True)
            if tuple(upright) != tuple(size):
                raise UserError(f"{path}: {'x'.join(map(str, upright))} pixels, but {coco_path} says "
                                f"{size[0]}x{size[1]}" + (" (its pixels as stored, before the EXIF orientation that "
                                                          "turns it upright: remove the tag, or annotate the upright "
                                                          "image)" if tuple(stored) == tuple(size) else ""))
            entries.append((path, objects))
        except UserError as e:
            errors.append(str(e))
    return entries, warnings, errors, names


READERS = {"voc": read_voc, "yolo": read_yolo, "coco": read_coco}
