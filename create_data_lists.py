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
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib

import numpy as np
from PIL import Image

from formats import ALL, NONE, READERS, find_dataset, list_images, with_images, yaml_module
from misc import UserError, check_writable, run_cli, write_json_files_atomic, write_text_atomic
from utils import bccd_labels, check_classes, class_names, make_label_map

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
    parser.add_argument("--images", default=None, metavar="FOLDER",
                        help="the folder of the images, where a folder of label files (VOC .xml, YOLO .txt with "
                        "classes.txt) or a COCO file is kept apart from them: LabelImg's Change Save Dir, detect.py "
                        "--save-labels")
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
# The leakage guard: training or validation images whose pixels are a test image's
# ---------------------------------------------------------------------------------------------

HASH_GRID = 64  # images are compared as 64x64 grey thumbnails, whatever their size and aspect ratio ...
HASH_BITS = 16  # ... by the signs of the 16x16 lowest frequencies of their DCT against their median (pHash)
# Of 256 bits. Measured by tools/guard_calibration.py (results/2026-12-07-cpu/guard-calibration.json): copies
# resized, flipped, rotated and re-encoded differ by at most 8; other pictures by 84 or more across BCCD and TXL-PBC,
# and by 22 within BCCD (BloodImage_00037 and _00038: the same field taken twice, not a copy). The 64 bits of a
# 32x32 thumbnail's 8x8 frequencies were too few: other smears came within 10 bits.
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
                      guard=(), drop_duplicates=False, test_fraction=None, seed=0, images=None):
    """Parse one dataset or several (Pascal VOC, YOLO or COCO; BCCD by default) and write the JSON lists the Dataset
    reads (tutorial, "Parse raw data").

    Writes, in `output_folder`: TRAIN_images.json, TRAIN_objects.json, TEST_images.json, TEST_objects.json (entry
    i: {"boxes": [[x_min, y_min, x_max, y_max], ...] in pixels, "labels", "difficulties", "source": the dataset and
    split it came from, "BCCD:test"}), in each dataset's order, and label_map.json ({"background": 0, class: 1, ...}).

    data_folders: a dataset, or a list of them, combined (find_dataset says what a dataset may be).
    train_split, test_split: the split of each dataset for TRAIN and TEST: one name for all or one per dataset;
        "all" is every image a dataset has, "none" nothing. Default: VOC's trainval and test (BCCD: 292 and 72
        images), YOLO's and COCO's train and test.
    images: the folder of the images of label files kept apart from them (find_dataset's folder of VOC .xml or YOLO
        .txt files, or a COCO file): LabelImg's Change Save Dir, detect.py --save-labels.
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
    datasets = [with_images(d, str(images)) for d in datasets] if images is not None else datasets
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
    # --download onto a file: download_bccd refuses it in one line
    if len(folders) == 1 and not os.path.isdir(folders[0]) and (args.download or not os.path.lexists(folders[0])):
        if not args.download:
            raise UserError(missing_data_message(folders[0]))
        check_writable(args.output_folder, "--output-folder", folder=True, create=False)  # before the download
        download_bccd(folders[0], args.url)
    if fraction is not None and len(folders) == 1 and os.path.isdir(os.path.join(folders[0], "Annotations")):
        make_splits(folders[0], fraction, args.seed)  # a VOC dataset keeps its split in files, as VOC's own
        fraction = None
    create_data_lists(folders, args.output_folder, train_split=args.train_split, test_split=args.test_split,
                      classes=args.classes, guard=args.guard, drop_duplicates=args.drop_duplicates,
                      test_fraction=fraction, seed=args.seed, images=args.images)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
