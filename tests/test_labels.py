"""detect.py --save-labels voc|yolo|coco: pre-annotations that name the original images as the labelling tools match
them, and read back, each with a parser of its own format, as the boxes, classes and sizes detect.py counted.

    python -m pytest tests/test_labels.py -q
"""
import json
import os
import xml.etree.ElementTree as ET

import pytest
from PIL import Image

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
    return folder


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
        w, h = Image.open(record["image"]).size
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
    assert len(records) == 6 and sum(len(r["boxes"]) for r in records) > 0
    for index, record in enumerate(records):
        name, size, boxes = read_back(fmt, out, index, record)
        assert name == os.path.basename(record["image"]) and size == (record["width"], record["height"]), record
        assert [label for label, _ in boxes] == record["labels"]
        for (_, box), counted in zip(boxes, record["boxes"]):
            assert max(abs(a - b) for a, b in zip(box, counted)) <= (0 if fmt == "voc" else TOLERANCE), (box, counted)
