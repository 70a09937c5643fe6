"""Parse BCCD, or any Pascal VOC, YOLO or COCO dataset, into the JSON lists that datasets.BCCDDataset reads (tutorial,
"Parse raw data").

    python create_data_lists.py                      # data/BCCD -> data/lists
    python create_data_lists.py --download           # fetch BCCD into data/BCCD first
    python create_data_lists.py --data-folder ../shared/data/BCCD --output-folder data/lists
    python create_data_lists.py --train-split train --test-split val   # tune without the test set
    python create_data_lists.py --data-folder data/TXL-PBC --train-split train --test-split val \
        --output-folder data/lists-txl --guard data/BCCD:test          # a YOLO dataset, kept apart from BCCD's TEST
    python create_data_lists.py --data-folder data/BCCD data/TXL-PBC --train-split trainval train \
        --test-split test none --output-folder data/lists-both        # two datasets in one list set
    python create_data_lists.py --data-folder corrected/coco.json --test-fraction 0.2 --output-folder my_lists
    python create_data_lists.py --data-folder my_cells --output-folder my_lists --classes "Sickle cell" Normal

A dataset is one of:
  * Pascal VOC (BCCD, LabelImg, CVAT): Annotations/<id>.xml, JPEGImages/ (any image format) and
    ImageSets/Main/<split>.txt, which --test-fraction writes for a dataset that has none; or a folder of .xml files
    beside their images (split "all");
  * YOLO (Ultralytics, Roboflow, TXL-PBC, LabelImg's YOLO mode): a data.yaml (class names, and a folder or image
    list per split; reading it needs PyYAML: pip install -r requirements-yolo.txt), images/<split>/ with
    labels/<split>/*.txt, one box a line, `class c_x c_y w h` as fractions of the image; an image without a label
    file has no objects. Or images/ and labels/ (or .txt files beside the images) with a classes.txt;
  * COCO (CVAT, Label Studio, Roboflow): a .json file (split "all"), or a folder of <split>/ folders holding one each.
BCCD (MIT licence) is the BCCD folder of https://github.com/Shenggan/BCCD_Dataset: 364 VOC XML annotations of
640x480 blood smear images, classes RBC, WBC and Platelets. The classes are written beside the lists, in
label_map.json (see create_data_lists for their order), and every entry records the dataset and split it came from.

The leakage guard: a TRAIN image whose pixels are those of a TEST image, or of a --guard test set (resized, flipped,
rotated by 90 degrees, under any name or format), refuses the list set, naming the pairs; --drop-duplicates drops
them instead. TXL-PBC as published holds 40 of BCCD's 72 TEST images under other names: --guard data/BCCD:test.
"""
import argparse
import collections
import hashlib
import http.client
import os
import re
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from typing import NamedTuple

import numpy as np
from PIL import Image

from misc import UserError, check_writable, one_line, run_cli, write_json_files_atomic, write_text_atomic
from utils import (bccd_labels, check_classes, class_names, image_extensions, make_label_map, parse_annotation,
                   parse_coco, parse_yolo_labels, read_annotation)

BCCD_REPOSITORY = "https://github.com/Shenggan/BCCD_Dataset"
BCCD_ARCHIVE_URL = BCCD_REPOSITORY + "/archive/refs/heads/master.zip"
BCCD_IMAGES = 364


def get_args_parser():
    parser = argparse.ArgumentParser("create_data_lists.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-folder", nargs="+", default=["data/BCCD"], metavar="DATASET",
                        help="BCCD, or other datasets (a VOC or YOLO folder, a data.yaml, a COCO .json), combined")
    parser.add_argument("--output-folder", default="data/lists", help="where the JSON lists are written")
    parser.add_argument("--train-split", nargs="+", default=None, metavar="SPLIT",
                        help="the split used as TRAIN, one for all datasets or one each; all: every image, none: no "
                        "image (default: VOC's trainval, BCCD's 292 images; YOLO's and COCO's train)")
    parser.add_argument("--test-split", nargs="+", default=None, metavar="SPLIT",
                        help="the split used as TEST, likewise (default: test, BCCD's 72 images; its val has 87)")
    parser.add_argument("--classes", nargs="+", default=None, metavar="NAME",
                        help="class names in label order (label 1, 2, ...); an annotated object of another class is an "
                        "error. Default: the annotations' classes, in BCCD's order when they are BCCD's, else sorted by "
                        "name ignoring case")
    parser.add_argument("--guard", nargs="+", default=[], metavar="TEST_SET",
                        help="test sets that no TRAIN or TEST image may duplicate (resized, flipped, rotated, renamed): "
                        "DATASET:SPLIT, a dataset (its test split) or a folder of images, e.g. data/BCCD:test")
    parser.add_argument("--drop-duplicates", action="store_true",
                        help="drop the images that duplicate TEST or --guard images, instead of refusing the lists")
    parser.add_argument("--test-fraction", type=float, default=None, metavar="F",
                        help="split each dataset's images, seeded: TEST gets this fraction, TRAIN the rest. A VOC "
                        "dataset gets split files in ImageSets/Main (test.txt this fraction, trainval.txt the rest, "
                        "train.txt/val.txt trainval split the same way; files already there are never overwritten)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --test-fraction's split")
    parser.add_argument("--download", action="store_true", help="download BCCD into --data-folder first, if it is not there")
    parser.add_argument("--url", default=BCCD_ARCHIVE_URL, help="archive of the BCCD repository to download")
    return parser


def missing_data_message(folder):
    return (f"{folder}: BCCD not found. Get it with `python create_data_lists.py --download`, or download "
            f"{BCCD_REPOSITORY} yourself and place its BCCD folder (Annotations, ImageSets, JPEGImages) at {folder}")


def download_bccd(folder, url=BCCD_ARCHIVE_URL, timeout=60):
    """Download the BCCD repository archive, check it, and put its BCCD folder at `folder`.

    Nothing is placed unless the archive holds 364 annotations and 364 images.
    """
    if not str(folder).strip():
        raise UserError("--data-folder is empty: name the folder BCCD goes to")
    if os.path.exists(folder):
        raise UserError(f"--data-folder {folder}: already there (not a dataset folder); choose another place")
    folder = os.path.abspath(folder)
    parent = os.path.dirname(folder)
    check_writable(parent, "--data-folder", folder=True)  # before the download, not after
    with tempfile.TemporaryDirectory(dir=parent, prefix=".bccd-download-") as tmp:
        archive = os.path.join(tmp, "bccd.zip")
        print(f"downloading {url} ...")
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(archive, "wb") as f:
                shutil.copyfileobj(response, f)
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", None) or e
            raise UserError(f"cannot download {url} ({reason}); without network, copy BCCD to {folder} by hand") from None
        try:
            with zipfile.ZipFile(archive) as z:
                z.extractall(os.path.join(tmp, "unpacked"))
        except zipfile.BadZipFile:
            raise UserError(f"{url}: the download is not a zip archive") from None
        except (zlib.error, EOFError, OSError) as e:  # a damaged archive, or a disk that cannot hold it
            raise UserError(f"{url}: cannot unpack the download ({type(e).__name__}: {str(e)[:120]})") from None
        found = [root for root, dirs, _ in os.walk(os.path.join(tmp, "unpacked"))
                 if {"Annotations", "JPEGImages", "ImageSets"} <= set(dirs)]
        if not found:
            raise UserError(f"{url}: no BCCD folder (Annotations, ImageSets, JPEGImages) in the archive")
        bccd = found[0]
        n_xml = sum(f.endswith(".xml") for f in os.listdir(os.path.join(bccd, "Annotations")))
        n_jpg = sum(f.lower().endswith(".jpg") for f in os.listdir(os.path.join(bccd, "JPEGImages")))
        if (n_xml, n_jpg) != (BCCD_IMAGES, BCCD_IMAGES):
            raise UserError(f"{url}: unpacked {n_xml} annotations and {n_jpg} images, expected {BCCD_IMAGES} of each")
        try:
            os.replace(bccd, folder)
        except OSError as e:
            raise UserError(f"--data-folder {folder}: cannot place BCCD there ({e.strerror or e})") from None
    print(f"BCCD ({BCCD_IMAGES} images) placed at {folder}")


SPLITS = ("trainval", "test", "train", "val")


def split_ids(ids, fraction, seed, key=str):
    """ids -> (the others, a `fraction` of them), at least one in each, both sorted. The fraction taken is the
    first in the order of sha256(seed, key(id)): it depends on the seed and the keys only, the same on every machine
    and Python version."""
    ranked = sorted(ids, key=lambda i: hashlib.sha256(f"{seed} {key(i)}".encode("utf-8")).hexdigest())
    n = min(max(round(len(ids) * fraction), 1), len(ids) - 1)
    return sorted(ranked[n:]), sorted(ranked[:n])


def make_splits(voc_folder, test_fraction, seed=0):
    """Write a seeded split of the annotated images (Annotations/*.xml) to ImageSets/Main: trainval.txt and
    test.txt (a `test_fraction` of them), then train.txt and val.txt, which split trainval the same way.

    A split file already there is never overwritten: if it holds what would be written it is kept, else
    nothing is written and UserError names it. Prints what was written. Returns {split: ids}.
    """
    if not 0 < test_fraction < 1:
        raise UserError(f"--test-fraction must be between 0 and 1, not {test_fraction}")
    annotations = os.path.join(voc_folder, "Annotations")
    ids = sorted(f[:-4] for f in os.listdir(annotations) if f.endswith(".xml")) if os.path.isdir(annotations) else []
    if len(ids) < 2:
        raise UserError(f"{annotations}: {len(ids)} annotation(s) (.xml); a split needs at least 2")
    trainval, test = split_ids(ids, test_fraction, seed)
    train, val = split_ids(trainval, test_fraction, seed) if len(trainval) > 1 else (trainval, [])
    splits = dict(zip(SPLITS, (trainval, test, train, val)))
    folder = os.path.join(voc_folder, "ImageSets", "Main")
    texts = {split: "".join(f"{i}\n" for i in members) for split, members in splits.items()}
    paths = {split: os.path.join(folder, split + ".txt") for split in SPLITS}
    existing = {}
    for split, path in paths.items():
        if os.path.lexists(path):
            if not os.path.isfile(path):  # a folder, or a pipe that open() would wait on for ever
                raise UserError(f"{path}: not a regular file (a folder, a pipe, a broken link); remove it, or drop "
                                f"--test-fraction")
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    existing[split] = f.read()
            except OSError as e:
                raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    differ = [paths[split] for split, text in existing.items() if text != texts[split]]
    if differ:
        raise UserError(f"{', '.join(differ)}: already there and not the split of --test-fraction {test_fraction} "
                        f"--seed {seed}; split files are never overwritten: drop --test-fraction to use them, or "
                        f"remove them")
    written = [split for split in SPLITS if split not in existing]
    for split in written:
        write_text_atomic(texts[split], paths[split])
    print(f"split of the {len(ids)} annotated images, --test-fraction {test_fraction} --seed {seed}: "
          + ", ".join(f"{split}.txt {len(splits[split])} images" for split in SPLITS))
    print(f"written to {folder}: {', '.join(split + '.txt' for split in written) or 'none'}"
          + (f"; kept, already the same: {', '.join(split + '.txt' for split in existing)}" if existing else ""))
    return splits


# ---------------------------------------------------------------------------------------------
# Reading a dataset's split: Pascal VOC, YOLO or COCO, each image with its objects (labels still class names)
# ---------------------------------------------------------------------------------------------

class Dataset(NamedTuple):
    """A dataset found at a path: its format ("voc", "yolo" or "coco"), its root folder and, by format, where its
    annotations are (VOC: the Annotations folder or the folder of flat .xml files; YOLO: data.yaml or None; COCO:
    {split: json path})."""
    format: str
    root: str
    where: object


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


def list_images(folder):
    """The image files under `folder` (searched recursively), sorted; [] when it is not a folder."""
    found = []
    for top, dirs, files in os.walk(folder):
        dirs.sort()
        found += [os.path.join(top, f) for f in sorted(files) if os.path.splitext(f)[1].lower() in image_extensions()]
    return found


def image_size(path):
    """(width, height) of an image, decoded whole (a truncated or damaged file is found now, not mid-training)."""
    if not os.path.isfile(path):  # a pipe or a device: opening it could wait for ever
        raise UserError(f"{path}: not a regular file (a pipe, socket or device), not an image")
    try:
        with Image.open(path) as im:
            im.load()
            return im.size
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
            img_path = find_image(dataset.root if flat else os.path.join(dataset.root, "JPEGImages"), image_id,
                                  (root.findtext("filename") or "").strip(), listings)
            other = owners.setdefault(os.path.realpath(img_path), image_id)
            if other != image_id:  # a <filename> naming another id's image
                raise UserError(f"{img_path}: the image of both {other}.xml and {image_id}.xml (its <filename>); each "
                                f"image must be annotated once")
            objects, warns = parse_annotation(xml_path, image_size(img_path), label_map, root)
            entries.append((img_path, objects))
            warnings += warns
        except UserError as e:
            errors.append(str(e))
    return entries, warnings, errors, []


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


def read_split(voc_path, split_name):
    """The ids of ImageSets/Main/<split_name>.txt, one a line; UserError if the file is missing, unreadable, empty, or
    lists an id twice or one that climbs out of Annotations/."""
    split_file = os.path.join(voc_path, "ImageSets", "Main", split_name + ".txt")
    if not os.path.isfile(split_file):
        raise UserError(f"{split_file}: split file not found (a dataset without splits: make a seeded one with "
                        f"create_data_lists.py --test-fraction 0.2)")
    try:
        with open(split_file, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not part of the first id
            ids = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{split_file}: unreadable ({getattr(e, 'strerror', None) or e})") from None
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
        raise UserError(f"{path}: unreadable YAML ({one_line(e)})") from None
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, dict) and sorted(names) == list(range(len(names))):  # {0: WBC, 1: RBC}
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
        with open(classes[0], encoding="utf-8-sig") as f:
            names = check_classes([line.strip() for line in f if line.strip()], classes[0])
        images = os.path.join(dataset.root, "images")
        if split == ALL:
            sources = [images if os.path.isdir(images) else dataset.root]
        elif os.path.isdir(os.path.join(images, split)):
            sources = [os.path.join(images, split)]
        else:
            raise UserError(f"{dataset.root}: no split {split!r} (no images/{split}/ folder)")
    paths = []
    for source in sources:
        if os.path.isfile(source):  # a .txt list of images, relative to its folder
            with open(source, encoding="utf-8-sig") as f:
                paths += [os.path.normpath(os.path.join(os.path.dirname(source), line.strip()))
                          for line in f if line.strip()]
        elif os.path.isdir(source):
            paths += list_images(source)
        else:
            raise UserError(f"{dataset.where or dataset.root}: split {split!r}: {source} not found")
    return names, list(dict.fromkeys(paths))


def read_yolo(dataset, split, label_map):
    """[(image path, objects)], warnings, errors and the class names of a YOLO dataset's split."""
    names, paths = yolo_split_images(dataset, split)
    entries, warnings, errors = [], [], []
    for path in paths:
        try:
            objects, warns = parse_yolo_labels(label_path(path), image_size(path), names, label_map)
            entries.append((path, objects))
            warnings += warns
        except UserError as e:
            errors.append(str(e))
    return entries, warnings, errors, names


def coco_image(coco_path, file_name):
    """The image a COCO file's file_name names: beside the file, in its images/ folder, or in ../images/ (CVAT's
    and Label Studio's exports), by that relative path or its base name; None if none."""
    base = os.path.dirname(coco_path)
    names = [file_name] if not os.path.isabs(file_name) and ".." not in re.split(r"[\\/]", file_name) else []
    names.append(os.path.basename(file_name.replace("\\", "/")))
    for folder in (base, os.path.join(base, "images"), os.path.join(os.path.dirname(base), "images")):
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
        path = coco_image(coco_path, file_name)
        try:
            if path is None:
                raise UserError(f"{coco_path}: image {file_name!r} not found beside it, in images/ or in ../images/")
            if tuple(image_size(path)) != tuple(size):
                raise UserError(f"{path}: {'x'.join(map(str, image_size(path)))} pixels, but {coco_path} says "
                                f"{size[0]}x{size[1]}")
            entries.append((path, objects))
        except UserError as e:
            errors.append(str(e))
    return entries, warnings, errors, names


READERS = {"voc": read_voc, "yolo": read_yolo, "coco": read_coco}


# ---------------------------------------------------------------------------------------------
# The leakage guard: training or validation images whose pixels are a test image's
# ---------------------------------------------------------------------------------------------

HASH_GRID = 64  # images are compared as 64x64 grey thumbnails, whatever their size and aspect ratio ...
HASH_BITS = 16  # ... by the signs of the 16x16 lowest frequencies of their DCT against their median (pHash)
# Of 256 bits. Measured on BCCD and TXL-PBC (results/2026-12-07-cpu/leakage-guard.md): resized, flipped, rotated and
# re-encoded copies differ by at most 8, other pictures by 24 or more (82 or more across datasets). The 64 bits of a
# 32x32 thumbnail's 8x8 were too few: other smears came within 10 bits, copies within 2.
MAX_HASH_DISTANCE = 16


def thumbnail(path):
    """A 64x64 grey thumbnail (float32) of an image file, read at the smallest scale its decoder offers."""
    try:
        with Image.open(path) as im:
            im.draft("L", (2 * HASH_GRID, 2 * HASH_GRID))  # JPEG: decoded at 1/2 to 1/8 scale, several times faster
            return np.asarray(im.convert("L").resize((HASH_GRID, HASH_GRID), Image.BOX), dtype=np.float32)
    except Exception as e:
        raise UserError(f"{path}: not a readable image ({type(e).__name__}"
                        f"{': ' + str(e).splitlines()[0][:120] if str(e) else ''})") from None


def perceptual_hashes(thumbnails):
    """(n, 64, 64) thumbnails -> (n, 256) bits: the signs of the lowest 16x16 DCT frequencies against their median.
    A resized, re-encoded or slightly re-coloured copy keeps nearly all of them; another picture keeps about half."""
    k = np.arange(HASH_GRID)
    dct = np.cos(np.pi * (2 * k[None, :] + 1) * k[:HASH_BITS, None] / (2 * HASH_GRID)).astype(np.float32)  # (16, 64)
    low = (dct @ thumbnails @ dct.T).reshape(len(thumbnails), -1)  # (n, 256)
    return low > np.median(low[:, 1:], axis=1, keepdims=True)  # the mean (frequency 0) is left out of the median


def d4_orbit(thumbnails):
    """(n, 64, 64) -> (n, 8, 64, 64): each thumbnail rotated by 0, 90, 180 and 270 degrees, and mirrored."""
    turns = [np.rot90(thumbnails, k, axes=(1, 2)) for k in range(4)]
    return np.stack(turns + [t[:, :, ::-1] for t in turns], axis=1)


def find_duplicates(paths, references, max_distance=MAX_HASH_DISTANCE):
    """Pairs (i, j): paths[i]'s pixels are those of references[j], resized (to any aspect ratio), flipped, rotated by
    90 degrees, re-encoded in another format or under another name. Each image is decoded once, at a small scale;
    the comparison is one matrix product (the Hamming distances of 256-bit hashes), no loop over pairs."""
    if not paths or not references:
        return []
    thumbs = {p: thumbnail(p) for p in dict.fromkeys([*paths, *references])}
    ours = perceptual_hashes(np.stack([thumbs[p] for p in paths])).astype(np.float32) * 2 - 1  # (n, 256) of +-1
    theirs = perceptual_hashes(d4_orbit(np.stack([thumbs[p] for p in references])).reshape(-1, HASH_GRID, HASH_GRID))
    theirs = theirs.astype(np.float32) * 2 - 1  # (8 m, 256)
    pairs = []
    for start in range(0, len(paths), 1024):  # (1024, 8 m) distances at a time
        distance = (ours.shape[1] - ours[start:start + 1024] @ theirs.T) / 2
        close = distance.reshape(len(distance), len(references), 8).min(2) <= max_distance
        pairs += [(start + i, j) for i, j in zip(*np.nonzero(close))]
    return pairs


# ---------------------------------------------------------------------------------------------
# The lists
# ---------------------------------------------------------------------------------------------

def per_dataset(value, datasets, flag, default):
    """A split flag's value for each dataset: one name for all, or one per dataset; `default` by format."""
    values = [value] if value is None or isinstance(value, str) else list(value)
    if len(values) not in (1, len(datasets)):
        raise UserError(f"{flag}: {len(values)} names for {len(datasets)} datasets; give one for all, or one each")
    values = values * len(datasets) if len(values) == 1 else values
    return [v if v is not None else default(d) for v, d in zip(values, datasets)]


def default_split(split):
    """The TRAIN or TEST split of a dataset when none is named: VOC's trainval/test, YOLO's and COCO's train/test."""
    return lambda d: {"TRAIN": "trainval" if d.format == "voc" else "train", "TEST": "test"}[split]


def create_data_lists(data_folders, output_folder, train_split=None, test_split=None, classes=None, verbose=True,
                      guard=(), drop_duplicates=False, test_fraction=None, seed=0):
    """Parse one dataset or several (Pascal VOC, YOLO or COCO; BCCD by default) and write the JSON lists the Dataset
    reads (tutorial, "Parse raw data").

    Writes, in `output_folder`: TRAIN_images.json, TRAIN_objects.json, TEST_images.json, TEST_objects.json (entry
    i: {"boxes": [[x_min, y_min, x_max, y_max], ...] in pixels, "labels", "difficulties", "source": the dataset and
    split it came from, "BCCD:test"}), in each dataset's order, and label_map.json ({"background": 0, class: 1, ...}).

    data_folders: a dataset, or a list of them, combined (find_dataset says what a dataset may be).
    train_split, test_split: the split of each dataset for TRAIN and TEST: one name for all or one per dataset;
        "all" is every image a dataset has, "none" nothing. Default: VOC's trainval and test (BCCD: 292 and 72
        images), YOLO's and COCO's train and test.
    test_fraction: instead, a seeded `test_fraction` of each dataset's images (all of them) is TEST, the rest TRAIN.
    classes: the class names in label order (label 1, 2, ...): an object of another class is an error.
        None: the classes of the annotations of both splits; in BCCD's order when they are all BCCD's (the label
        map is then BCCD's, so that BCCD lists and checkpoints stay valid), else sorted by name, ignoring case
        (str.casefold); names that differ only in case ("RBC", "rbc") are refused.
    guard: test sets nothing in TRAIN or TEST may duplicate: datasets ("FOLDER:SPLIT", "FOLDER" for its test split)
        or folders of images. A TRAIN image that duplicates a TEST or guarded image, or a TEST image that
        duplicates a guarded one (find_duplicates: resized, flipped, rotated, under any name or format), is an
        error naming the pairs; drop_duplicates drops them instead, and says how many.

    Every problem found is collected; if there is any, a UserError lists them all (one per line) and no file is
    written, so earlier lists stay as they were. Returns a summary dict {split: {"images": n, "objects": n,
    "classes": {name: n}, "sources": {source: n}}}.
    """
    folders = [data_folders] if isinstance(data_folders, (str, os.PathLike)) else list(data_folders)
    datasets = [find_dataset(str(folder)) for folder in folders]
    if any(d.format == "yolo" and d.where for d in datasets):
        yaml_module()  # one line now, rather than one per split
    given = None if classes is None else make_label_map(check_classes(classes))
    check_writable(output_folder, "--output-folder", folder=True, create=False)  # before the parsing, not after
    if test_fraction is not None:
        if train_split is not None or test_split is not None:
            raise UserError("--test-fraction makes the splits: leave out --train-split and --test-split")
        if not 0 < test_fraction < 1:
            raise UserError(f"--test-fraction must be between 0 and 1, not {test_fraction}")
        train_split = test_split = ALL
    splits = {"TRAIN": per_dataset(train_split, datasets, "--train-split", default_split("TRAIN")),
              "TEST": per_dataset(test_split, datasets, "--test-split", default_split("TEST"))}
    lists, errors, warnings, declared = {"TRAIN": [], "TEST": []}, [], [], []
    for d, (folder, dataset) in enumerate(zip(folders, datasets)):
        name = os.path.basename(os.path.normpath(dataset.root if dataset.format != "coco" else str(folder)))
        name = os.path.splitext(name)[0] if dataset.format == "coco" else name
        read = {}
        for split in ("TRAIN", "TEST"):
            split_name = splits[split][d]
            if split_name == NONE or split_name in read:
                continue
            try:
                read[split_name] = READERS[dataset.format](dataset, split_name, given)
            except UserError as e:
                errors.append(str(e))
                read[split_name] = [], [], [], []
            warnings += read[split_name][1]
            errors += read[split_name][2]
            declared += read[split_name][3]
        for split in ("TRAIN", "TEST"):
            entries = read.get(splits[split][d], ([],))[0]
            if test_fraction is not None:
                train, test = split_ids(range(len(entries)), test_fraction, seed,
                                        key=lambda i: os.path.basename(entries[i][0]))
                entries = [entries[i] for i in (train if split == "TRAIN" else test)]
            source = f"{name}:{splits[split][d]}" if test_fraction is None else f"{name}:{split.lower()}"
            lists[split] += [(path, {**objects, "source": source}) for path, objects in entries]
    for w in dict.fromkeys(warnings):  # an image in both splits warns once
        print(f"warning: {w}", file=sys.stderr)
    if not errors:
        errors = check_duplicates(lists, guard, drop_duplicates)
    if errors:
        where = folders[0] if len(folders) == 1 else f"{len(folders)} datasets"
        errors = list(dict.fromkeys(errors))  # a dataset's problem, met again in its other split, is said once
        raise UserError(f"{len(errors)} problem(s) in {where}; no list written:\n" + "\n".join(errors))
    return write_lists(lists, output_folder, given, list(dict.fromkeys(declared)), verbose)


def guard_images(spec):
    """The images of a --guard: a dataset's split (FOLDER:SPLIT; FOLDER alone: its test split) or a folder of images."""
    folder, _, split = spec.rpartition(":") if ":" in spec and not os.path.exists(spec) else (spec, "", "")
    folder = folder or spec
    try:
        dataset = find_dataset(folder)
    except UserError:
        if split or not os.path.isdir(folder):
            raise
        return list_images(folder)
    split = split or default_split("TEST")(dataset)
    return [path for path, _ in READERS[dataset.format](dataset, split, None)[0]]


def check_duplicates(lists, guard, drop):
    """Problems (lines) for the TRAIN images that duplicate TEST or guarded images and the TEST images that duplicate
    guarded ones; with `drop`, those images are taken out of `lists` instead, and the number said."""
    guarded = [path for spec in guard for path in guard_images(str(spec))]
    train, test = [path for path, _ in lists["TRAIN"]], [path for path, _ in lists["TEST"]]
    found = {"TRAIN": [(i, test[j], "TEST") for i, j in find_duplicates(train, test)]
             + [(i, guarded[j], "guarded") for i, j in find_duplicates(train, guarded)],
             "TEST": [(i, guarded[j], "guarded") for i, j in find_duplicates(test, guarded)]}
    if drop:
        for split, pairs in found.items():
            dropped = {i for i, _, _ in pairs}
            if dropped:
                print(f"dropped {len(dropped)} {split} image(s) that duplicate test images (--drop-duplicates)")
            lists[split] = [entry for i, entry in enumerate(lists[split]) if i not in dropped]
        return []
    return [f"{lists[split][i][0]} ({split}) has the pixels of {other} ({kind} image; resized, flipped or rotated "
            f"copies count): a score on it would be partly a training score; remove one, or --drop-duplicates"
            for split, pairs in found.items() for i, other, kind in sorted(pairs)]


def write_lists(lists, output_folder, given, declared, verbose):
    """Make the label map, write the lists atomically, print and return the summary (create_data_lists).
    declared: the class names YOLO's and COCO's files declare, in their order, before those VOC's objects have."""
    label_map = given
    if label_map is None:  # the annotations' classes; their labels are still names
        found = set(declared) | {name for entries in lists.values() for _, o in entries for name in o["labels"]}
        folded = {}
        for name in sorted(found):
            folded.setdefault(name.casefold(), []).append(name)
        twins = [", ".join(map(repr, names)) for names in folded.values() if len(names) > 1]
        if twins:  # "RBC" and "rbc": one class written two ways, most likely, that would become two
            raise UserError(f"class names that differ only in case: {'; '.join(twins)}; correct the annotations, or "
                            f"give --classes (an object of another name is then named with its file)")
        if not found:
            raise UserError("no annotated object in either split: nothing to learn classes from; give --classes")
        label_map = make_label_map(bccd_labels if found <= set(bccd_labels) else
                                   declared + sorted(found - set(declared), key=str.casefold))
        for entries in lists.values():
            for _, o in entries:
                o["labels"] = [label_map[name] for name in o["labels"]]
    names = class_names(label_map)
    summary = {}
    for split, entries in lists.items():
        counts = {name: sum(o["labels"].count(label_map[name]) for _, o in entries) for name in names}
        sources = collections.Counter(o["source"] for _, o in entries)
        summary[split] = {"images": len(entries), "objects": sum(counts.values()), "classes": counts,
                          "sources": dict(sources)}
    os.makedirs(output_folder, exist_ok=True)
    files = {os.path.join(output_folder, f"{split}_{kind}.json"): [entry[k] for entry in entries]
             for split, entries in lists.items() for k, kind in ((0, "images"), (1, "objects"))}
    write_json_files_atomic({**files, os.path.join(output_folder, "label_map.json"): label_map})
    if verbose:
        print(f"classes ({'--classes' if given else 'from the annotations'}): "
              + ", ".join(f"{label} {name}" for name, label in label_map.items()))
        for split, s in summary.items():
            per_class = ", ".join(f"{name} {n}" for name, n in s["classes"].items())
            from_ = f"; from {', '.join(f'{k} {n}' for k, n in s['sources'].items())}" if len(s["sources"]) > 1 else ""
            print(f"{split}: {s['images']} images, {s['objects']} objects ({per_class}){from_}")
        for name, n in summary["TRAIN"]["classes"].items():
            if n == 0:
                print(f"warning: no {name} object in TRAIN: the model cannot learn that class", file=sys.stderr)
        print(f"lists saved to {os.path.abspath(output_folder)}")
    return summary


def main(args):
    folders, fraction = args.data_folder, args.test_fraction
    if len(folders) == 1 and not os.path.lexists(folders[0]):
        if not args.download:
            raise UserError(missing_data_message(folders[0]))
        check_writable(args.output_folder, "--output-folder", folder=True, create=False)  # before the download
        download_bccd(folders[0], args.url)
    if fraction is not None and len(folders) == 1 and os.path.isdir(os.path.join(folders[0], "Annotations")):
        make_splits(folders[0], fraction, args.seed)  # a VOC dataset keeps its split in files, as VOC's own
        fraction = None
    create_data_lists(folders, args.output_folder, train_split=args.train_split, test_split=args.test_split,
                      classes=args.classes, guard=args.guard, drop_duplicates=args.drop_duplicates,
                      test_fraction=fraction, seed=args.seed)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
