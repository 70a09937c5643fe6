"""detect.py --save-labels voc|yolo|coco: pre-annotations that name the original images as the labelling tools match
them, and read back, each with a parser of its own format, as the boxes, classes and sizes detect.py counted.

    python -m pytest tests/test_labels.py -q
"""
import json
import os
import shutil
import xml.etree.ElementTree as ET

import pytest
from PIL import Image, ImageOps

from conftest import make_voc
from labels import FORMATS
from utils import bccd_labels

TOLERANCE = 1e-6  # pixels: YOLO's fractions and COCO's widths read back within it


@pytest.fixture(scope="module")
def fields(tmp_path_factory):
    """Four tiny fields, one of them again under the same name in a sub-folder, and one as TIFF."""
    voc = make_voc(tmp_path_factory.mktemp("labels") / "voc", n_trainval=4, n_test=0)
    folder = voc / "JPEGImages"
    (folder / "again").mkdir()
    Image.open(folder / "BloodImage_00000.jpg").transpose(Image.Transpose.ROTATE_90).save(
        folder / "again" / "BloodImage_00000.jpg")  # the same file name: a label file of its own
    Image.open(folder / "BloodImage_00003.jpg").save(folder / "BloodImage_00003.jpg.tif")
    exif = Image.Exif()
    exif[0x0112] = 6  # taken turned (a phone on the eyepiece): stored 48x64, shown upright 64x48
    Image.open(folder / "BloodImage_00001.jpg").transpose(Image.Transpose.ROTATE_90).save(
        folder / "turned.jpg", exif=exif, quality=95)
    return folder


def upright_size(path):
    with Image.open(path) as im:
        return ImageOps.exif_transpose(im).size


def read_back(fmt, out, index, record):
    """(file name of the image, (width, height), [(class, [x0, y0, x1, y1])]) of the index-th image's labels."""
    stem = os.path.splitext(record["output"])[0]
    if fmt == "voc":
        root = ET.parse(out / "labels" / "voc" / f"{stem}.xml").getroot()
        boxes = [(o.findtext("name"), [float(o.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")])
                 for o in root.iter("object")]
        return root.findtext("filename"), (int(root.findtext("size/width")), int(root.findtext("size/height"))), boxes
    if fmt == "yolo":  # no size in the files: the tools take the image's own
        folder = out / "labels" / "yolo"
        classes = (folder / "obj_train_data" / "classes.txt").read_text().splitlines()
        assert classes == (folder / "obj.names").read_text().splitlines() == list(bccd_labels)
        name = (folder / "train.txt").read_text().splitlines()[index].removeprefix("obj_train_data/")
        w, h = upright_size(record["image"])
        boxes = []
        for line in (folder / "obj_train_data" / f"{stem}.txt").read_text().splitlines():
            k, cx, cy, bw, bh = line.split()
            cx, cy, bw, bh = float(cx) * w, float(cy) * h, float(bw) * w, float(bh) * h
            boxes.append((classes[int(k)], [cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2]))
        return name, (w, h), boxes
    coco = json.loads((out / "labels" / "coco.json").read_text())
    categories = {c["id"]: c["name"] for c in coco["categories"]}
    image = next(i for i in coco["images"] if i["id"] == index + 1)
    boxes = [(categories[a["category_id"]], [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                                            a["bbox"][1] + a["bbox"][3]])
             for a in coco["annotations"] if a["image_id"] == image["id"]]
    return image["file_name"], (image["width"], image["height"]), boxes


@pytest.mark.parametrize("fmt", FORMATS)
def test_pre_annotations_read_back_as_the_boxes_counted(fmt, fields, untrained_checkpoint, tmp_path, run_main):
    out = tmp_path / "out"
    result = run_main("detect.py", fields, "--checkpoint", untrained_checkpoint, "--output-dir", out, "--device",
                      "cpu", "--min-score", "0.2", "--top-k", "20", "--save-labels", fmt)
    assert result.returncode == 0, result.stderr
    records = json.loads((out / "detections.json").read_text())
    assert len(records) == 7 and sum(len(r["boxes"]) for r in records) > 0
    for index, record in enumerate(records):
        name, size, boxes = read_back(fmt, out, index, record)
        assert name == os.path.basename(record["image"]) and size == (record["width"], record["height"]), record
        assert [label for label, _ in boxes] == record["labels"]
        for (_, box), counted in zip(boxes, record["boxes"]):
            assert max(abs(a - b) for a, b in zip(box, counted)) <= (0 if fmt == "voc" else TOLERANCE), (box, counted)


LABEL_FILES = {"voc": "labels/voc", "yolo": "labels/yolo/obj_train_data", "coco": "labels/coco.json"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_pre_annotations_come_back_through_create_data_lists_as_counted(fmt, fields, untrained_checkpoint, tmp_path,
                                                                         run_main):
    """The lab's loop: detect.py --save-labels, the files corrected (here: unchanged), create_data_lists.py --images
    reads them back into lists: the same images, boxes, classes and sizes detect.py counted."""
    folder = tmp_path / "fields"
    folder.mkdir()
    for image in fields.iterdir():
        if image.is_file():  # names that are distinct: one folder of images beside one folder of label files
            shutil.copyfile(image, folder / image.name)
    out, lists = tmp_path / "out", tmp_path / "lists"
    result = run_main("detect.py", folder, "--checkpoint", untrained_checkpoint, "--output-dir", out, "--device", "cpu",
                      "--min-score", "0.2", "--top-k", "20", "--save-labels", fmt)
    assert result.returncode == 0, result.stderr
    result = run_main("create_data_lists.py", "--data-folder", out / LABEL_FILES[fmt], "--images", folder,
                      "--train-split", "all", "--test-split", "none", "--output-folder", lists,
                      "--classes", *bccd_labels)
    assert result.returncode == 0, result.stderr
    records = {os.path.realpath(r["image"]): r for r in json.loads((out / "detections.json").read_text())}
    images = [os.path.realpath(p) for p in json.loads((lists / "TRAIN_images.json").read_text())]
    objects = json.loads((lists / "TRAIN_objects.json").read_text())
    assert sorted(images) == sorted(records) and len(images) == 6
    names = {v: k for k, v in json.loads((lists / "label_map.json").read_text()).items()}
    assert sum(len(o["boxes"]) for o in objects) > 0
    for image, o in zip(images, objects):
        record = records[image]
        assert upright_size(image) == (record["width"], record["height"])  # as detect.py read it: upright
        assert [names[label] for label in o["labels"]] == record["labels"]
        for box, counted in zip(o["boxes"], record["boxes"]):
            assert max(abs(a - b) for a, b in zip(box, counted)) <= (0 if fmt == "voc" else TOLERANCE), (box, counted)


def test_label_files_without_their_images_are_one_line_each(fields, tmp_path, run_main):
    (tmp_path / "yolo").mkdir()
    (tmp_path / "yolo" / "classes.txt").write_text("RBC\nWBC\nPlatelets\n")
    (tmp_path / "yolo" / "BloodImage_00000.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    (tmp_path / "yolo" / "elsewhere.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    result = run_main("create_data_lists.py", "--data-folder", tmp_path / "yolo", "--images", fields,
                      "--train-split", "all", "--test-split", "none", "--output-folder", tmp_path / "lists")
    assert result.returncode == 1 and "elsewhere.txt: no image elsewhere.<image extension> in" in result.stderr
    assert not (tmp_path / "lists").exists()
    result = run_main("create_data_lists.py", "--data-folder", tmp_path / "yolo", "--images", fields.parent,
                      "--train-split", "all", "--test-split", "none", "--output-folder", tmp_path / "lists")
    assert result.returncode == 1 and "2 images named BloodImage_00000.*: a label file names its image" in result.stderr
    result = run_main("create_data_lists.py", "--data-folder", tmp_path / "yolo", "--images", tmp_path / "none",
                      "--train-split", "all", "--output-folder", tmp_path / "lists")
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].endswith("--images " + str(
        tmp_path / "none") + ": no such folder")
