"""Parse BCCD, or any Pascal VOC dataset, into the JSON lists that datasets.BCCDDataset reads (tutorial,
"Parse raw data").

    python create_data_lists.py                      # data/BCCD -> data/lists
    python create_data_lists.py --download           # fetch BCCD into data/BCCD first
    python create_data_lists.py --data-folder ../shared/data/BCCD --output-folder data/lists
    python create_data_lists.py --train-split train --test-split val   # tune without the test set
    python create_data_lists.py --data-folder my_cells --output-folder my_lists --classes "Sickle cell" Normal
    python create_data_lists.py --data-folder my_cells --output-folder my_lists --test-fraction 0.2 --seed 0

BCCD (MIT licence) is the BCCD folder of https://github.com/Shenggan/BCCD_Dataset: 364 VOC XML
annotations of 640x480 blood smear images, classes RBC, WBC and Platelets. Another dataset needs the
same layout, as annotation tools export it (Pascal VOC): Annotations/<id>.xml, JPEGImages/ (any image
format) and ImageSets/Main/<split>.txt, which --test-fraction writes for a dataset that has none.
The classes are written beside the lists, in label_map.json (see utils.create_data_lists for their order).
"""
import argparse
import hashlib
import http.client
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib

from misc import UserError, check_writable, run_cli, write_text_atomic
from utils import create_data_lists

BCCD_REPOSITORY = "https://github.com/Shenggan/BCCD_Dataset"
BCCD_ARCHIVE_URL = BCCD_REPOSITORY + "/archive/refs/heads/master.zip"
BCCD_IMAGES = 364


def get_args_parser():
    parser = argparse.ArgumentParser("create_data_lists.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-folder", default="data/BCCD", help="BCCD, or another VOC folder (Annotations, "
                        "ImageSets/Main, JPEGImages)")
    parser.add_argument("--output-folder", default="data/lists", help="where the JSON lists are written")
    parser.add_argument("--train-split", default="trainval", help="ImageSets/Main/<name>.txt used as TRAIN (trainval: 292 images; train: 205)")
    parser.add_argument("--test-split", default="test", help="ImageSets/Main/<name>.txt used as TEST (test: 72 images; val: 87)")
    parser.add_argument("--classes", nargs="+", default=None, metavar="NAME",
                        help="class names in label order (label 1, 2, ...); an annotated object of another class is an "
                        "error. Default: the annotations' classes, in BCCD's order when they are BCCD's, else sorted by "
                        "name ignoring case")
    parser.add_argument("--test-fraction", type=float, default=None, metavar="F",
                        help="first write a seeded split to ImageSets/Main: test.txt gets this fraction of the "
                        "annotated images, trainval.txt the rest, and train.txt/val.txt split trainval the same way; "
                        "split files already there are never overwritten")
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


def split_ids(ids, fraction, seed):
    """ids -> (the others, a `fraction` of them), at least one in each, both sorted. The fraction taken is the
    first in the order of sha256(seed, id): it depends on the seed and the ids only, the same on every machine
    and Python version."""
    ranked = sorted(ids, key=lambda i: hashlib.sha256(f"{seed} {i}".encode("utf-8")).hexdigest())
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


def main(args):
    if not os.path.isdir(args.data_folder):
        if not args.download:
            raise UserError(missing_data_message(args.data_folder))
        check_writable(args.output_folder, "--output-folder", folder=True, create=False)  # before the download
        download_bccd(args.data_folder, args.url)
    if args.test_fraction is not None:
        make_splits(args.data_folder, args.test_fraction, args.seed)
    create_data_lists(args.data_folder, args.output_folder, train_split=args.train_split, test_split=args.test_split,
                      classes=args.classes)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
