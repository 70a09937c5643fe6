"""create_data_lists beyond VOC: YOLO and COCO datasets, several datasets in one list set, and the leakage guard.

    python -m pytest tests/test_formats.py -q

Datasets are generated here; the expected boxes are computed by hand from the fractions written, not by utils.
"""
import json
import math
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

import create_data_lists as cdl
import formats
from conftest import CLASSES
from create_data_lists import create_data_lists, find_duplicates
from misc import UserError

BCCD_LABELS = {"background": 0, "RBC": 1, "WBC": 2, "Platelets": 3}
TXL_NAMES = ["WBC", "RBC", "Platelets"]  # TXL-PBC's class ids: 0 WBC, 1 RBC, 2 Platelets


def textured(seed, size=(96, 72)):
    """A smear-like image of its own: a smooth random field (so that a small hash tells two apart) with noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize(size, Image.BICUBIC), dtype=np.int16)
    return Image.fromarray(np.clip(smooth + rng.integers(-8, 9, smooth.shape), 0, 255).astype(np.uint8))


def make_yolo(root, splits, names=TXL_NAMES, yaml_text=None, size=(96, 72)):
    """A YOLO dataset (Ultralytics layout) at root: splits = {split: {stem: [label lines] or None (no file)}}."""
    seed = 0
    for split, images in splits.items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for stem, lines in images.items():
            seed += 1
            textured(seed, size).save(root / "images" / split / f"{stem}.jpg", quality=95)
            if lines is not None:
                (root / "labels" / split / f"{stem}.txt").write_text("".join(line + "\n" for line in lines))
    if yaml_text is None:
        yaml_text = "".join(f"{s}: ./images/{s}/\n" for s in splits) + f"nc: {len(names)}\nnames: {names}\n"
    (root / "data.yaml").write_text(yaml_text)
    return root


def read_lists(folder, split):
    return (json.loads((folder / f"{split}_images.json").read_text()),
            json.loads((folder / f"{split}_objects.json").read_text()))


def test_yolo_boxes_are_the_fractions_of_their_image(tmp_path):
    yolo = make_yolo(tmp_path / "yolo", {"train": {"a": ["0 0.5 0.5 0.25 0.5", "1 0.1 0.2 0.1 0.2", "", "2 1 1 0.2 0.2"],
                                                   "b": None, "c": []},
                                         "val": {"d": ["1 0.25 0.75 0.5 0.5"]}})
    summary = create_data_lists(yolo, tmp_path / "lists", train_split="train", test_split="val", verbose=False)
    assert json.loads((tmp_path / "lists" / "label_map.json").read_text()) == BCCD_LABELS  # by name, BCCD's order
    images, objects = read_lists(tmp_path / "lists", "TRAIN")
    assert [p.rsplit("/", 1)[1] for p in images] == ["a.jpg", "b.jpg", "c.jpg"]  # b: no label file, no objects
    expected = [[36, 18, 60, 54], [4.8, 7.2, 14.4, 21.6], [86.4, 64.8, 96, 72]]  # 96x72: (cx -+ w/2) * 96, ...
    assert len(objects[0]["boxes"]) == 3
    for box, want in zip(objects[0]["boxes"], expected):
        assert all(math.isclose(a, b, abs_tol=1e-9) for a, b in zip(box, want)), (box, want)
    assert objects[0]["labels"] == [2, 1, 3] and objects[0]["difficulties"] == [0, 0, 0]  # WBC, RBC, Platelets
    assert [o["boxes"] for o in objects[1:]] == [[], []]
    assert {o["source"] for o in objects} == {"yolo:train"}
    assert summary["TEST"] == {"images": 1, "objects": 1, "classes": {"RBC": 1, "WBC": 0, "Platelets": 0},
                               "sources": {"yolo:val": 1}}


@pytest.mark.parametrize("names_yaml", ["names: {0: WBC, 1: RBC, 2: Platelets}",
                                        "names:\n  - WBC\n  - RBC\n  - Platelets"], ids=["dict", "block-list"])
def test_yolo_names_in_ultralytics_forms(names_yaml, tmp_path):
    yolo = make_yolo(tmp_path / "yolo", {"train": {"a": ["2 0.5 0.5 0.2 0.2"]}, "test": {"b": ["0 0.5 0.5 0.2 0.2"]}},
                     yaml_text=f"path: {tmp_path / 'yolo'}\ntrain: images/train\ntest: images/test\n{names_yaml}\n")
    create_data_lists(yolo / "data.yaml", tmp_path / "lists", verbose=False)  # the yaml itself; train/test by default
    assert read_lists(tmp_path / "lists", "TRAIN")[1][0]["labels"] == [3]
    assert read_lists(tmp_path / "lists", "TEST")[1][0]["labels"] == [2]


def test_roboflow_layout_with_its_dotdot_paths(tmp_path):
    root = tmp_path / "rf"
    for split, stem in (("train", "a"), ("valid", "b")):
        (root / split / "images").mkdir(parents=True)
        (root / split / "labels").mkdir(parents=True)
        textured(len(stem) + ord(stem)).save(root / split / "images" / f"{stem}.jpg")
        (root / split / "labels" / f"{stem}.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    (root / "data.yaml").write_text("train: ../train/images\nval: ../valid/images\nnc: 2\nnames: ['cell', 'other']\n"
                                    "roboflow:\n  workspace: lab\n  version: 1\n")
    create_data_lists(root, tmp_path / "lists", train_split="train", test_split="val", verbose=False)
    assert json.loads((tmp_path / "lists" / "label_map.json").read_text()) == {"background": 0, "cell": 1, "other": 2}
    assert read_lists(tmp_path / "lists", "TEST")[1][0]["boxes"] == [[24.0, 18.0, 72.0, 54.0]]


def test_labelimg_yolo_folder_with_classes_txt_split_by_fraction(tmp_path):
    root = tmp_path / "labelimg"
    root.mkdir()
    for i in range(10):
        textured(100 + i).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text("1 0.5 0.5 0.5 0.5\n")
    (root / "classes.txt").write_text("Normal\nSickle cell\n")
    summary = create_data_lists(root, tmp_path / "lists", test_fraction=0.3, verbose=False)
    assert (summary["TRAIN"]["images"], summary["TEST"]["images"]) == (7, 3)
    assert summary["TRAIN"]["classes"] == {"Normal": 0, "Sickle cell": 7}
    again = create_data_lists(root, tmp_path / "again", test_fraction=0.3, verbose=False)  # seeded: the same split
    assert read_lists(tmp_path / "lists", "TEST") == read_lists(tmp_path / "again", "TEST") and again == summary


def yolo_line_problem(line):
    return lambda root: (root / "labels" / "train" / "a.txt").write_text(f"1 0.5 0.5 0.2 0.2\n{line}\n")


@pytest.mark.parametrize("line,reason", [
    ("3 0.5 0.5 0.2 0.2", r"line 2: class 3 is not among the 3 classes"),
    ("-1 0.5 0.5 0.2 0.2", r"line 2: class -1 is not among"),
    ("1 1.2 0.5 0.2 0.2", r"line 2: c_x c_y w h must be fractions of the image in \[0, 1\]"),
    ("1 0.5 -0.1 0.2 0.2", r"line 2: .*\[0, 1\]"),
    ("1 0.5 0.5 nan 0.2", r"line 2: .*\[0, 1\]"),
    ("1 0.5 0.5 0.2 inf", r"line 2: .*\[0, 1\]"),
    ("1 0.5 0.5 0.2", r"line 2: 4 fields, expected 5"),
    ("1 0.5 0.5 0.2 0.2 0.9", r"line 2: 6 fields, expected 5"),
    ("RBC 0.5 0.5 0.2 0.2", r"line 2: not numbers"),
    ("1.5 0.5 0.5 0.2 0.2", r"line 2: not numbers"),
], ids=["class-too-large", "class-negative", "cx-above-1", "cy-negative", "nan", "inf", "4-fields", "6-fields",
        "class-name", "class-float"])
def test_yolo_bad_line_is_one_line_naming_file_and_line(line, reason, tmp_path, run_main):
    yolo = make_yolo(tmp_path / "yolo", {"train": {"a": [], "b": ["0 0.5 0.5 0.1 0.1"]}, "val": {"c": []}})
    yolo_line_problem(line)(yolo)
    create_data_lists(make_yolo(tmp_path / "good", {"train": {"a": ["1 0.5 0.5 0.2 0.2"]}, "val": {"c": []}}),
                      tmp_path / "lists", train_split="train", test_split="val", verbose=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "lists").iterdir()}
    result = run_main("create_data_lists.py", "--data-folder", yolo, "--train-split", "train", "--test-split", "val",
                      "--output-folder", tmp_path / "lists")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    problems = [l for l in result.stderr.splitlines() if "a.txt" in l]
    assert len(problems) == 1 and __import__("re").search(reason, problems[0]), result.stderr
    assert str(yolo / "labels" / "train" / "a.txt") in problems[0]
    assert {p.name: p.read_bytes() for p in (tmp_path / "lists").iterdir()} == before  # refused up front


def test_yolo_problems_of_the_dataset(tmp_path):
    yolo = make_yolo(tmp_path / "yolo", {"train": {"a": []}})
    with pytest.raises(UserError, match=r"data.yaml: no split 'test' \(it has train\)"):
        create_data_lists(yolo, tmp_path / "lists", verbose=False)
    (yolo / "data.yaml").write_text("train: images/train\nnames: 3\n")
    with pytest.raises(UserError, match=r"data.yaml: no class names"):
        create_data_lists(yolo, tmp_path / "lists", train_split="train", test_split="train", verbose=False)
    for names, shown in (("{0: a, 2: b}", "0, 2"), ("{'0': a, 1: b}", "'0', 1"), ("{true: a}", "True")):
        (yolo / "data.yaml").write_text(f"train: images/train\nnames: {names}\n")
        with pytest.raises(UserError, match=rf"data.yaml: names must be numbered 0, 1, 2, ... without a gap, .* not "
                                            rf"{shown}$"):
            create_data_lists(yolo, tmp_path / "lists", train_split="train", test_split="train", verbose=False)
    (yolo / "data.yaml").write_text("train: images/train\nnames: [a, b\n")
    with pytest.raises(UserError, match=r"data.yaml: unreadable YAML") as error:
        create_data_lists(yolo, tmp_path / "lists", train_split="train", test_split="train", verbose=False)
    assert str(error.value).splitlines()[-1].endswith("line 3, column 1)")  # PyYAML's message spans lines: one here
    (yolo / "list.txt").write_bytes(b"images/train/a.jpg\n\xff\xfe\n")  # a list of images that is not UTF-8
    (yolo / "data.yaml").write_text("train: list.txt\nnames: [a, b]\n")
    with pytest.raises(UserError, match=r"list.txt: unreadable \('utf-8' codec can't decode"):
        create_data_lists(yolo, tmp_path / "lists", train_split="train", test_split="train", verbose=False)
    (yolo / "data.yaml").unlink()
    (yolo / "classes.txt").write_bytes("a\nb\n".encode("utf-16"))  # Notepad's "Unicode"
    with pytest.raises(UserError, match=r"classes.txt: unreadable \('utf-8' codec can't decode"):
        create_data_lists(yolo, tmp_path / "lists", train_split="train", test_split="train", verbose=False)
    (yolo / "data.yaml").write_text("train: images/nowhere\ntest: images/train\nnames: [a, b, background]\n")
    with pytest.raises(UserError, match=r"names: 'background' is reserved"):
        create_data_lists(yolo, tmp_path / "lists", verbose=False)


def test_reading_data_yaml_without_pyyaml_names_the_pip_command(tmp_path, monkeypatch):
    yolo = make_yolo(tmp_path / "yolo", {"train": {"a": []}, "test": {"b": []}})
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml then fails, as where PyYAML is not installed
    with pytest.raises(UserError, match=r"^reading a YOLO dataset's data.yaml needs PyYAML: pip install -r "
                                        r"requirements-yolo.txt$"):
        create_data_lists(yolo, tmp_path / "lists", verbose=False)


# ---------------------------------------------------------------------------------------------
# COCO
# ---------------------------------------------------------------------------------------------

def make_coco(root, n=4, size=(96, 72)):
    """A COCO file at root/annotations.json with its images in root/images (CVAT's layout)."""
    (root / "images").mkdir(parents=True)
    coco = {"images": [], "annotations": [], "categories": [{"id": 7, "name": "RBC"}, {"id": 9, "name": "WBC"}]}
    for i in range(n):
        textured(200 + i, size).save(root / "images" / f"f{i}.jpg", quality=95)
        coco["images"].append({"id": 100 + i, "file_name": f"f{i}.jpg", "width": size[0], "height": size[1]})
        coco["annotations"].append({"id": 1000 + i, "image_id": 100 + i, "category_id": 7 if i % 2 else 9,
                                    "bbox": [10.5, 5.25, 20, 30], "area": 600, "iscrowd": 0})
    coco["annotations"].append({"id": 2000, "image_id": 100, "category_id": 7, "bbox": [40, 30, 10, 10], "iscrowd": 1})
    path = root / "annotations.json"
    path.write_text(json.dumps(coco))
    return path, coco


def test_coco_boxes_crowds_and_fraction_split(tmp_path):
    path, _ = make_coco(tmp_path / "coco")
    summary = create_data_lists(path, tmp_path / "lists", test_fraction=0.25, verbose=False)
    assert (summary["TRAIN"]["images"], summary["TEST"]["images"]) == (3, 1)
    entries = dict(zip(*read_lists(tmp_path / "lists", "TRAIN")), **dict(zip(*read_lists(tmp_path / "lists", "TEST"))))
    f0 = next(o for p, o in entries.items() if p.endswith("f0.jpg"))
    assert f0 == {"boxes": [[10.5, 5.25, 30.5, 35.25], [40, 30, 50, 40]], "labels": [2, 1], "difficulties": [0, 1],
                  "source": f0["source"]}  # the crowd region: difficult, as VOC ignores it
    assert f0["source"] in ("annotations:train", "annotations:test")


@pytest.mark.parametrize("change,reason", [
    (lambda c: c["annotations"][1].update(image_id=555), r"annotation 1001: image_id 555 is not among the images"),
    (lambda c: c["annotations"][1].update(category_id=8), r"annotation 1001: category_id 8 is not among the categories"),
    (lambda c: c["images"][1].update(id=100), r"image 1: id 100 given twice"),
    (lambda c: c["annotations"][2].update(id=1000), r"annotation 1000: id given twice"),
    (lambda c: c["categories"].append({"id": 3, "name": "Neutrophil"}), r"category 3: unknown class 'Neutrophil'"),
    (lambda c: c["annotations"][1].update(bbox=[200, 10, 5, 5]), r"annotation 1001 \(RBC\): box .* lies outside the "
                                                                  r"96x72 image"),
    (lambda c: c["annotations"][1].update(bbox=[1, 2, 3]), r"annotation 1001: bbox must be \[x, y, width, height\]"),
    (lambda c: c["images"][1].update(width=640), r"f1.jpg: 96x72 pixels, but .*annotations.json says 640x72"),
    (lambda c: c.pop("categories"), r"not a COCO file"),
], ids=["unknown-image", "unknown-category", "image-id-twice", "annotation-id-twice", "class-not-the-models",
        "box-outside", "bbox-three-numbers", "size-mismatch", "no-categories"])
def test_coco_bad_input_is_one_line(change, reason, tmp_path, run_main):
    path, coco = make_coco(tmp_path / "coco")
    change(coco)
    path.write_text(json.dumps(coco))
    result = run_main("create_data_lists.py", "--data-folder", path, "--test-fraction", "0.25", "--output-folder",
                      tmp_path / "lists", "--classes", *CLASSES)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert __import__("re").search(reason, result.stderr), result.stderr
    assert not (tmp_path / "lists").exists()


# ---------------------------------------------------------------------------------------------
# Several datasets in one list set
# ---------------------------------------------------------------------------------------------

def test_voc_and_yolo_combined_each_image_keeps_its_source(tiny_voc, tmp_path, capsys):
    voc = tiny_voc()
    yolo = make_yolo(tmp_path / "txl", {"train": {"a": ["1 0.5 0.5 0.2 0.2"], "b": ["0 0.4 0.4 0.2 0.2"]},
                                        "val": {"c": ["2 0.5 0.5 0.1 0.1"]}})
    summary = create_data_lists([voc, yolo], tmp_path / "lists", train_split=["trainval", "train"],
                                test_split=["test", "val"])
    assert summary["TRAIN"]["sources"] == {f"{voc.name}:trainval": 4, "txl:train": 2}
    assert summary["TEST"]["sources"] == {f"{voc.name}:test": 2, "txl:val": 1}
    images, objects = read_lists(tmp_path / "lists", "TRAIN")
    assert [o["source"] for o in objects] == [f"{voc.name}:trainval"] * 4 + ["txl:train"] * 2  # in dataset order
    assert images[4].endswith("a.jpg") and objects[4]["labels"] == [1]
    assert f"from {voc.name}:trainval 4, txl:train 2" in capsys.readouterr().out
    create_data_lists([voc, yolo], tmp_path / "none", train_split=["trainval", "train"], test_split=["test", "none"],
                      verbose=False)
    assert {o["source"] for o in read_lists(tmp_path / "none", "TEST")[1]} == {f"{voc.name}:test"}
    with pytest.raises(UserError, match=r"--train-split: 3 names for 2 datasets"):
        create_data_lists([voc, yolo], tmp_path / "x", train_split=["a", "b", "c"], verbose=False)


# ---------------------------------------------------------------------------------------------
# The leakage guard
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def test_image(tmp_path, bccd_dir):
    """A BCCD TEST image (the real one where BCCD is here), copied out."""
    first = (bccd_dir / "ImageSets" / "Main" / "test.txt").read_text().split()[0]
    (tmp_path / "guarded").mkdir()
    path = tmp_path / "guarded" / "test.jpg"
    shutil.copy(bccd_dir / "JPEGImages" / f"{first}.jpg", path)
    return path


DISGUISES = {
    "416x416-png": lambda im: im.resize((416, 416), Image.BILINEAR),
    "flipped": lambda im: im.transpose(Image.FLIP_LEFT_RIGHT),
    "rotated-90": lambda im: im.transpose(Image.ROTATE_90),
    "416x416-flipped-rotated": lambda im: im.resize((416, 416)).transpose(Image.FLIP_TOP_BOTTOM).transpose(Image.ROTATE_270),
    "half-size": lambda im: im.resize((im.width // 2, im.height // 2), Image.LANCZOS),
}


@pytest.mark.parametrize("disguise", DISGUISES, ids=list(DISGUISES))
def test_guard_finds_a_test_image_resized_flipped_rotated_renamed(disguise, test_image, tmp_path, capsys):
    yolo = make_yolo(tmp_path / "txl", {"train": {"x": ["1 0.5 0.5 0.2 0.2"], "y": []}, "val": {"z": []}})
    copy = yolo / "images" / "train" / "0f3c-renamed.png"
    with Image.open(test_image) as im:
        DISGUISES[disguise](im.convert("RGB")).save(copy)
    (yolo / "labels" / "train" / "0f3c-renamed.txt").write_text("1 0.5 0.5 0.3 0.3\n")
    guard = [str(test_image.parent)]  # a folder of images
    with pytest.raises(UserError) as e:
        create_data_lists(yolo, tmp_path / "lists", train_split="train", test_split="val", guard=guard, verbose=False)
    lines = [l for l in str(e.value).splitlines() if "has the pixels of" in l]
    assert lines == [f"{copy} (TRAIN) has the pixels of {test_image} (guarded image; resized, flipped or rotated copies "
                     f"count): a score on it would be partly a training score; remove one, or --drop-duplicates"]
    assert not (tmp_path / "lists").exists()
    summary = create_data_lists(yolo, tmp_path / "lists", train_split="train", test_split="val", guard=guard,
                                drop_duplicates=True, verbose=False)
    assert "dropped 1 TRAIN image(s) that duplicate test images (--drop-duplicates)" in capsys.readouterr().out
    assert summary["TRAIN"]["images"] == 2
    assert not any("renamed" in p for p in read_lists(tmp_path / "lists", "TRAIN")[0])


def test_guard_takes_a_dataset_split_and_checks_test_too(tiny_voc, tmp_path):
    voc = tiny_voc()
    test_id = (voc / "ImageSets" / "Main" / "test.txt").read_text().split()[0]
    yolo = make_yolo(tmp_path / "txl", {"train": {"a": []}, "val": {"b": []}})
    shutil.copy(voc / "JPEGImages" / f"{test_id}.jpg", yolo / "images" / "val" / "leak.jpg")  # in TEST: guarded too
    with pytest.raises(UserError, match=r"leak.jpg \(TEST\) has the pixels of .*" + test_id):
        create_data_lists(yolo, tmp_path / "lists", train_split="train", test_split="val", guard=[f"{voc}:test"],
                          verbose=False)
    create_data_lists(yolo, tmp_path / "lists", train_split="train", test_split="val", guard=[f"{voc}:train"],
                      verbose=False)  # not in train.txt: nothing to refuse


def test_guard_leaves_different_pictures_alone(tmp_path):
    paths = []
    for i in range(40):
        paths.append(tmp_path / f"{i}.jpg")
        textured(300 + i, (128, 96)).save(paths[-1], quality=90)
    assert find_duplicates([str(p) for p in paths[:20]], [str(p) for p in paths[20:]]) == []
    assert find_duplicates([str(paths[3])], [str(p) for p in paths[:20]]) == [(0, 3)]


def test_guard_unreadable_image_is_one_line(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(UserError, match=r"bad.jpg: not a readable image"):
        find_duplicates([str(bad)], [str(bad)])


@pytest.mark.slow
def test_guard_reports_no_pair_between_txl_pbc_here_and_bccd_test(real_bccd_dir):
    txl = real_bccd_dir.parent / "TXL-PBC"
    if not (txl / "data.yaml").is_file():
        pytest.skip("needs TXL-PBC beside BCCD (../shared/data/TXL-PBC)")
    _, train = formats.yolo_split_images(formats.find_dataset(str(txl)), "train")
    _, val = formats.yolo_split_images(formats.find_dataset(str(txl)), "val")
    test = cdl.guard_images(f"{real_bccd_dir}:test")
    assert (len(train), len(val), len(test)) == (824, 239, 72)
    assert find_duplicates(train + val, test) == []
    # and the guard does see BCCD's own images in TXL-PBC: its 163 re-annotated BCCD fields (640x480) are trainval's
    bccd = cdl.guard_images(f"{real_bccd_dir}:trainval")
    fields = [p for p in train + val if Image.open(p).size == (640, 480)]
    assert len(fields) == 163 and len({i for i, _ in find_duplicates(fields, bccd)}) == 163


def test_an_image_turned_by_its_exif_orientation_is_read_upright_everywhere(tmp_path):
    """A phone's picture taken turned (EXIF orientation 6): its stored pixels are the upright image turned 90 degrees.
    The training, eval.py and the lists read it upright, as detect.py does (and boxes it with --save-labels); a VOC
    annotation whose <size> is the stored pixels' (LabelImg shows those) is refused in one line."""
    from conftest import annotation_xml, make_voc
    from datasets import BCCDDataset, median_image_size
    from files import open_image
    from utils import load_image
    voc = make_voc(tmp_path / "voc", n_trainval=2, n_test=0, size=(64, 48),
                   objects={"BloodImage_00000": [{"name": "WBC", "box": [40, 10, 60, 30]}]})
    image = voc / "JPEGImages" / "BloodImage_00000.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(image).transpose(Image.Transpose.ROTATE_90).save(image, exif=exif, quality=95)  # stored 48x64
    assert Image.open(image).size == (48, 64)
    assert load_image(image).shape == (3, 48, 64) and load_image(image).equal(open_image(image))
    assert median_image_size([image, image]) == (64, 48)
    create_data_lists(voc, tmp_path / "lists", train_split="trainval", test_split="none", verbose=False)
    assert BCCDDataset(tmp_path / "lists", "train").objects[0]["boxes"] == [[40, 10, 60, 30]]  # not clipped to 48x64
    (voc / "Annotations" / "BloodImage_00000.xml").write_text(annotation_xml("BloodImage_00000.jpg", (48, 64), [
        {"name": "WBC", "box": [10, 4, 30, 24]}]))
    with pytest.raises(UserError, match=r"BloodImage_00000.xml: boxes .*BloodImage_00000.jpg as its pixels are stored "
                                        r"\(48x64\), but its EXIF orientation turns it upright \(64x48\)"):
        create_data_lists(voc, tmp_path / "lists2", train_split="trainval", test_split="none", verbose=False)
    path, coco = make_coco(tmp_path / "coco")  # a COCO file giving the stored pixels' size: the same, said so
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.open(path.parent / "images" / "f1.jpg").save(path.parent / "images" / "f1.jpg", exif=exif)  # 96x72 stored
    with pytest.raises(UserError, match=r"f1.jpg: 72x96 pixels, but .*annotations.json says 96x72 \(its pixels as "
                                        r"stored, before the EXIF orientation"):
        create_data_lists(path, tmp_path / "lists3", test_fraction=0.25, verbose=False)
