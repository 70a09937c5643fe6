"""Parse BCCD, or any Pascal VOC dataset, into the JSON lists that datasets.BCCDDataset reads (tutorial,
"Parse raw data").

    python create_data_lists.py                      # data/BCCD -> data/lists
    python create_data_lists.py --download           # fetch BCCD into data/BCCD first
    python create_data_lists.py --data-folder ../shared/data/BCCD --output-folder data/lists
    python create_data_lists.py --train-split train --test-split val   # tune without the test set
    python create_data_lists.py --data-folder my_cells --output-folder my_lists --classes "Sickle cell" Normal

BCCD (MIT licence) is the BCCD folder of https://github.com/Shenggan/BCCD_Dataset: 364 VOC XML
annotations of 640x480 blood smear images, classes RBC, WBC and Platelets. Another dataset needs the
same layout, as annotation tools export it (Pascal VOC): Annotations/<id>.xml, JPEGImages/ (any image
format) and ImageSets/Main/<split>.txt.
The classes are written beside the lists, in label_map.json (see utils.create_data_lists for their order).
"""
import argparse
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile

from utils import UserError, create_data_lists, run_cli

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
    folder = os.path.abspath(folder)
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent, prefix=".bccd-download-") as tmp:
        archive = os.path.join(tmp, "bccd.zip")
        print(f"downloading {url} ...")
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(archive, "wb") as f:
                shutil.copyfileobj(response, f)
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise UserError(f"cannot download {url} ({reason}); without network, copy BCCD to {folder} by hand") from None
        try:
            with zipfile.ZipFile(archive) as z:
                z.extractall(os.path.join(tmp, "unpacked"))
        except zipfile.BadZipFile:
            raise UserError(f"{url}: the download is not a zip archive") from None
        found = [root for root, dirs, _ in os.walk(os.path.join(tmp, "unpacked"))
                 if {"Annotations", "JPEGImages", "ImageSets"} <= set(dirs)]
        if not found:
            raise UserError(f"{url}: no BCCD folder (Annotations, ImageSets, JPEGImages) in the archive")
        bccd = found[0]
        n_xml = sum(f.endswith(".xml") for f in os.listdir(os.path.join(bccd, "Annotations")))
        n_jpg = sum(f.lower().endswith(".jpg") for f in os.listdir(os.path.join(bccd, "JPEGImages")))
        if (n_xml, n_jpg) != (BCCD_IMAGES, BCCD_IMAGES):
            raise UserError(f"{url}: unpacked {n_xml} annotations and {n_jpg} images, expected {BCCD_IMAGES} of each")
        os.replace(bccd, folder)
    print(f"BCCD ({BCCD_IMAGES} images) placed at {folder}")


def main(args):
    if not os.path.isdir(args.data_folder):
        if not args.download:
            raise UserError(missing_data_message(args.data_folder))
        download_bccd(args.data_folder, args.url)
    create_data_lists(args.data_folder, args.output_folder, train_split=args.train_split, test_split=args.test_split,
                      classes=args.classes)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
