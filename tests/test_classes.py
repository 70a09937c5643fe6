"""Your own cells: a Pascal VOC dataset with classes of its own (lists, splits, train.py, eval.py, detect.py).

    python -m pytest tests/test_classes.py -q

The datasets are generated (conftest.make_voc) with classes other than BCCD's, whose names have spaces,
mixed case and non-ASCII letters. Expected label maps and splits are written out here by hand or
recomputed from the files, not taken from utils.
"""
import csv
import json
import re
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

import create_data_lists as cdl
import detect
import eval as eval_script
import train
from conftest import image_id, make_voc
from model import SSD300
from test_workflow import assert_one_line_error, load, train_argv
from misc import UserError
from create_data_lists import create_data_lists
from utils import PALETTE, class_colors, label_color_map
from utils import label_map as BCCD_LABEL_MAP

OWN = ("Sickle cell", "Lymphozyt ä", "echinocyte", "RBC", "Ödem Zelle")
# OWN sorted by name ignoring case, the order create_data_lists chooses without --classes (plain code-point
# order would be Lymphozyt ä, RBC, Sickle cell, echinocyte, Ödem Zelle)
OWN_SORTED = ["echinocyte", "Lymphozyt ä", "RBC", "Sickle cell", "Ödem Zelle"]
TWO = ("Sickle cell", "Lymphozyt ä")


def read_json(path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def xml_names(xml_path):
    return [obj.findtext("name").strip() for obj in ET.parse(xml_path).getroot().iter("object")]


def split_file_ids(voc, split):
    return (Path(voc) / "ImageSets" / "Main" / f"{split}.txt").read_text(encoding="utf-8").split("\n")[:-1]


def snapshot(folder):
    """Name -> (bytes, mtime, inode) of every file in `folder`: any write or replacement changes it."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_ino) for p in sorted(Path(folder).iterdir())}


def run_cdl(*argv):
    return cdl.main(cdl.get_args_parser().parse_args([str(a) for a in argv]))


def save_random_checkpoint(path, label_map):
    """An untrained SSD300 of the classes of `label_map`, saved with the fields eval.py and detect.py read."""
    torch.manual_seed(0)
    model = SSD300(n_classes=len(label_map), base_weights=None, batch_norm=True, prior_scales=train.BCCD_PRIOR_SCALES,
                   label_map=label_map)
    torch.save({"model": model.state_dict(), "model_args": model.model_args, "label_map": label_map}, path)
    return path


# ---------------------------------------------------------------------------------------------
# create_data_lists: the classes and their order
# ---------------------------------------------------------------------------------------------

def test_classes_come_from_the_annotations_sorted_by_name(tiny_voc, tmp_path):
    voc = tiny_voc(n_trainval=6, n_test=2, classes=OWN)
    create_data_lists(voc, tmp_path / "lists", verbose=False)
    label_map = read_json(tmp_path / "lists" / "label_map.json")
    assert label_map == {"background": 0, "echinocyte": 1, "Lymphozyt ä": 2, "RBC": 3, "Sickle cell": 4, "Ödem Zelle": 5}
    for split, ids in (("TRAIN", [image_id(i) for i in range(6)]), ("TEST", [image_id(6), image_id(7)])):
        objects = read_json(tmp_path / "lists" / f"{split}_objects.json")
        assert [o["labels"] for o in objects] == [[label_map[n] for n in xml_names(voc / "Annotations" / f"{i}.xml")]
                                                  for i in ids]


@pytest.mark.parametrize("classes", [("WBC", "RBC", "Platelets"), ("Platelets", "WBC")])
def test_bccd_classes_or_some_of_them_keep_bccd_label_map(classes, tiny_voc, tmp_path):
    create_data_lists(tiny_voc(classes=classes), tmp_path / "lists", verbose=False)
    assert read_json(tmp_path / "lists" / "label_map.json") == {"background": 0, "RBC": 1, "WBC": 2, "Platelets": 3}


def test_classes_flag_gives_the_order_and_warns_of_a_class_never_seen(tiny_voc, tmp_path, run_main):
    voc = tiny_voc(classes=TWO)
    result = run_main("create_data_lists.py", "--data-folder", voc, "--output-folder", tmp_path / "lists",
                        "--classes", " Sickle cell ", "Spherozyt", "Lymphozyt ä")
    assert result.returncode == 0, result.stderr
    assert read_json(tmp_path / "lists" / "label_map.json") == {"background": 0, "Sickle cell": 1, "Spherozyt": 2,
                                                                 "Lymphozyt ä": 3}
    objects = read_json(tmp_path / "lists" / "TRAIN_objects.json")
    counted = Counter(n for i in range(4) for n in xml_names(voc / "Annotations" / f"{image_id(i)}.xml"))
    assert re.search(rf"^TRAIN: 4 images, {sum(counted.values())} objects \(Sickle cell {counted['Sickle cell']}, "
                     rf"Spherozyt 0, Lymphozyt ä {counted['Lymphozyt ä']}\)$", result.stdout, re.M), result.stdout
    assert sum(len(o["labels"]) for o in objects) == sum(counted.values())
    assert "warning: no Spherozyt object in TRAIN" in result.stderr


def test_unknown_class_with_classes_is_an_error_naming_file_and_class(tiny_voc, tmp_path):
    voc = tiny_voc(n_trainval=4, n_test=2, classes=OWN)
    given = OWN[:3]
    with pytest.raises(UserError) as e:
        create_data_lists(voc, tmp_path / "lists", classes=given, verbose=False)
    lines = str(e.value).splitlines()[1:]
    expected = {}  # every file with another class, and the first such class in it
    for i in range(6):
        path = voc / "Annotations" / f"{image_id(i)}.xml"
        other = next((n for n in xml_names(path) if n not in given), None)
        if other:
            expected[str(path)] = other
    assert len(expected) >= 3 and len(lines) == len(expected), str(e.value)  # all reported together
    for path, name in expected.items():
        assert sum(path in line and f"unknown class {name!r}" in line for line in lines) == 1, (path, name, lines)
    assert not (tmp_path / "lists").exists()


@pytest.mark.parametrize("classes, says", [(["RBC", "background"], "'background' is reserved"),
                                           (["Background", "WBC"], "'Background' is reserved"),
                                           (["Sickle cell", "WBC", "Sickle cell "], "'Sickle cell' given twice"),
                                           (["RBC", " "], "empty")])
def test_reserved_duplicate_or_empty_class_names_are_refused(classes, says, tiny_voc, tmp_path):
    voc = tiny_voc()
    with pytest.raises(UserError) as e:
        run_cdl("--data-folder", voc, "--output-folder", tmp_path / "lists", "--classes", *classes)
    assert str(e.value).startswith("--classes: ") and says in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "lists").exists()


def test_an_object_named_background_is_refused(tiny_voc, tmp_path):
    voc = tiny_voc(classes=TWO, objects={image_id(1): [{"name": "background", "box": [1, 1, 20, 20]}]})
    with pytest.raises(UserError) as e:
        create_data_lists(voc, tmp_path / "lists", verbose=False)
    path = voc / "Annotations" / f"{image_id(1)}.xml"
    assert [line for line in str(e.value).splitlines() if str(path) in line and "'background' is reserved" in line]
    assert not (tmp_path / "lists").exists()


def test_images_of_any_format_found_by_filename_or_by_id(tiny_voc, tmp_path):
    voc = tiny_voc(n_trainval=3, n_test=1, classes=TWO)
    images, annotations = voc / "JPEGImages", voc / "Annotations"
    # 0: a PNG, while its XML still names the .jpg: found by its id
    Image.open(images / f"{image_id(0)}.jpg").save(images / f"{image_id(0)}.png")
    (images / f"{image_id(0)}.jpg").unlink()
    # 1: another name, which its XML's <filename> gives
    (images / f"{image_id(1)}.jpg").rename(images / "smear one.JPEG")
    xml = annotations / f"{image_id(1)}.xml"
    xml.write_text(xml.read_text(encoding="utf-8").replace(f"{image_id(1)}.jpg", "smear one.JPEG"), encoding="utf-8")
    # 2: an id with a space and a non-ASCII letter, a .tif, and no <filename>
    Image.open(images / f"{image_id(2)}.jpg").save(images / "Probe ä 2.tif")
    (images / f"{image_id(2)}.jpg").unlink()
    text = (annotations / f"{image_id(2)}.xml").read_text(encoding="utf-8")
    (annotations / "Probe ä 2.xml").write_text(re.sub(r"<filename>.*</filename>", "", text), encoding="utf-8")
    (annotations / f"{image_id(2)}.xml").unlink()
    trainval = voc / "ImageSets" / "Main" / "trainval.txt"
    trainval.write_text(trainval.read_text().replace(image_id(2), "Probe ä 2"), encoding="utf-8")

    create_data_lists(voc, tmp_path / "lists", verbose=False)
    found = [Path(p).name for p in read_json(tmp_path / "lists" / "TRAIN_images.json")]
    assert found == [f"{image_id(0)}.png", "smear one.JPEG", "Probe ä 2.tif"]
    assert [Path(p).name for p in read_json(tmp_path / "lists" / "TEST_images.json")] == [f"{image_id(3)}.jpg"]


# ---------------------------------------------------------------------------------------------
# A seeded split for a dataset without ImageSets
# ---------------------------------------------------------------------------------------------

def voc_without_splits(root, seed=0):
    voc = Path(root)
    make_voc(voc, n_trainval=16, n_test=4, classes=TWO, seed=seed)
    for f in (voc / "ImageSets" / "Main").iterdir():
        f.unlink()
    return voc


def test_seeded_split_is_written_reproducible_and_never_overwrites(tmp_path, capsys):
    voc = voc_without_splits(tmp_path / "voc")
    ids = sorted(p.stem for p in (voc / "Annotations").iterdir())
    with pytest.raises(UserError, match="--test-fraction"):  # no split files: the error says how to make them
        run_cdl("--data-folder", voc, "--output-folder", tmp_path / "lists")

    run_cdl("--data-folder", voc, "--output-folder", tmp_path / "lists", "--test-fraction", 0.25, "--seed", 3)
    out = capsys.readouterr().out
    assert "written to" in out and "trainval.txt, test.txt, train.txt, val.txt" in out, out
    splits = {s: split_file_ids(voc, s) for s in ("trainval", "test", "train", "val")}
    assert all(v == sorted(v) for v in splits.values())
    assert (len(splits["test"]), len(splits["trainval"]), len(splits["val"]), len(splits["train"])) == (5, 15, 4, 11)
    assert sorted(splits["trainval"] + splits["test"]) == ids  # each image on one side
    assert sorted(splits["train"] + splits["val"]) == splits["trainval"]
    assert [Path(p).stem for p in read_json(tmp_path / "lists" / "TEST_images.json")] == splits["test"]
    assert [Path(p).stem for p in read_json(tmp_path / "lists" / "TRAIN_images.json")] == splits["trainval"]

    # the same seed on another copy gives the same files; another seed another split
    other = voc_without_splits(tmp_path / "other", seed=1)  # same ids, other pixels and objects
    run_cdl("--data-folder", other, "--output-folder", tmp_path / "other_lists", "--test-fraction", 0.25, "--seed", 3)
    for s in splits:
        assert split_file_ids(other, s) == splits[s]
    third = voc_without_splits(tmp_path / "third")
    run_cdl("--data-folder", third, "--output-folder", tmp_path / "third_lists", "--test-fraction", 0.25, "--seed", 4)
    assert split_file_ids(third, "test") != splits["test"] and len(split_file_ids(third, "test")) == 5
    capsys.readouterr()

    # the same command again keeps the files; another seed or fraction is refused and writes nothing
    before = snapshot(voc / "ImageSets" / "Main")
    run_cdl("--data-folder", voc, "--output-folder", tmp_path / "lists", "--test-fraction", 0.25, "--seed", 3)
    assert "kept, already the same: trainval.txt, test.txt, train.txt, val.txt" in capsys.readouterr().out
    assert snapshot(voc / "ImageSets" / "Main") == before
    lists_before = snapshot(tmp_path / "lists")
    for argv in (["--seed", 4], ["--test-fraction", 0.3]):
        with pytest.raises(UserError) as e:
            run_cdl("--data-folder", voc, "--output-folder", tmp_path / "lists", "--test-fraction", 0.25, "--seed", 3,
                    *argv)
        assert "never overwritten" in str(e.value) and str(voc / "ImageSets" / "Main" / "test.txt") in str(e.value)
        assert "\n" not in str(e.value)
        assert snapshot(voc / "ImageSets" / "Main") == before
        assert snapshot(tmp_path / "lists") == lists_before


# ---------------------------------------------------------------------------------------------
# eval.py and checkpoints: which classes
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def two_class_lists(tiny_voc, tmp_path):
    """Lists of a dataset of the classes TWO whose TEST images hold Sickle cells only; label map
    {background 0, Lymphozyt ä 1, Sickle cell 2}."""
    test_objects = [{"name": "Sickle cell", "box": [5, 5, 30, 30]}, {"name": "Sickle cell", "box": [34, 10, 60, 40]}]
    voc = tiny_voc(n_trainval=2, n_test=2, classes=TWO, objects={image_id(2): test_objects, image_id(3): test_objects[:1]})
    create_data_lists(voc, tmp_path / "lists", verbose=False)
    assert read_json(tmp_path / "lists" / "label_map.json") == {"background": 0, "Lymphozyt ä": 1, "Sickle cell": 2}
    return tmp_path / "lists"


def eval_argv(checkpoint, lists, *extra):
    return ["--checkpoint", str(checkpoint), "--data-folder", str(lists), "--device", "cpu", "--workers", "0",
            *map(str, extra)]


def test_class_absent_from_test_is_reported_as_such_and_left_out_of_the_mean(two_class_lists, tmp_path, capsys):
    checkpoint = save_random_checkpoint(tmp_path / "checkpoint.pt", read_json(two_class_lists / "label_map.json"))
    output = tmp_path / "eval.json"
    eval_script.main(eval_script.get_args_parser().parse_args(eval_argv(checkpoint, two_class_lists, "--output", output)))
    result = read_json(output)
    assert result["classes"] == ["Lymphozyt ä", "Sickle cell"]
    assert result["not_in_test"] == ["Lymphozyt ä"]
    for kind in ("", "_all_point", "_coco"):
        assert list(result["AP" + kind]) == ["Sickle cell"]  # no AP 0 for the absent class
        assert result["mAP" + kind] == pytest.approx(result["AP" + kind]["Sickle cell"])  # the mean of the rest
    assert result["counts"]["Lymphozyt ä"]["true_mean"] == 0 and result["counts"]["Lymphozyt ä"]["relative_error"] is None
    ap_table, count_table = capsys.readouterr().out.split("counting at")
    rows = [line for line in ap_table.splitlines() if line.startswith("Lymphozyt ä ")]
    assert len(rows) == 1 and "not in TEST" in rows[0] and not re.search(r"\d", rows[0]), rows
    assert re.search(r"^Sickle cell +\d\.\d{4} +\d\.\d{4} +\d\.\d{4} +\d+\.\d\d%$", ap_table, re.M), ap_table
    assert re.search(r"^Lymphozyt ä +0\.00 +\d+\.\d\d +\d+\.\d\d +- +-$", count_table, re.M), count_table


def test_eval_refuses_lists_whose_label_map_differs(two_class_lists, tiny_voc, tmp_path, run_main):
    checkpoint = save_random_checkpoint(tmp_path / "checkpoint.pt", read_json(two_class_lists / "label_map.json"))
    # the same classes in another order: the labels would mean other classes
    create_data_lists(tiny_voc(classes=TWO), tmp_path / "reordered", classes=TWO, verbose=False)
    result = run_main("eval.py", *eval_argv(checkpoint, tmp_path / "reordered", "--output", tmp_path / "eval.json"))
    line = assert_one_line_error(result, "eval.py", str(checkpoint))
    assert "Lymphozyt ä, Sickle cell" in line and "Sickle cell, Lymphozyt ä" in line and "label_map.json" in line
    assert "--classes 'Lymphozyt ä' 'Sickle cell'" in line  # the command that makes lists of the model's classes
    assert not (tmp_path / "eval.json").exists()
    # and so does train.py --resume (of a checkpoint with a training state; its label map is checked first)
    resumable = torch.load(checkpoint, weights_only=True)
    resumable.update(optimizer={}, epoch=0, iteration=1, args={})
    torch.save(resumable, checkpoint)
    with pytest.raises(UserError, match="label_map.json"):
        train.main(train.get_args_parser().parse_args(train_argv(tmp_path / "reordered", tmp_path / "run", "--iterations",
                                                                 1, "--resume", checkpoint)))


def test_checkpoint_without_label_map_is_bccd(lists_bccd, tmp_path):
    torch.manual_seed(0)
    model = SSD300(base_weights=None, batch_norm=True)
    torch.save({"model": model.state_dict(), "model_args": model.model_args}, tmp_path / "old.pt")  # no label_map
    loaded = detect.load_model(tmp_path / "old.pt")
    assert loaded.label_map == BCCD_LABEL_MAP and loaded.rev_label_map == {0: "background", 1: "RBC", 2: "WBC", 3: "Platelets"}
    output = tmp_path / "eval.json"
    eval_script.main(eval_script.get_args_parser().parse_args(eval_argv(tmp_path / "old.pt", lists_bccd, "--output", output)))
    assert read_json(output)["classes"] == ["RBC", "WBC", "Platelets"]

    five = SSD300(n_classes=5, base_weights=None)
    torch.save({"model": five.state_dict(), "model_args": five.model_args}, tmp_path / "five.pt")
    with pytest.raises(UserError, match="a model of 5 classes .* no label map, so BCCD's of 4"):
        detect.load_model(tmp_path / "five.pt")


@pytest.fixture
def lists_bccd(tiny_voc, tmp_path):
    create_data_lists(tiny_voc(n_trainval=2, n_test=2), tmp_path / "lists_bccd", verbose=False)
    return tmp_path / "lists_bccd"


def test_class_colors_keep_bccd_colours_and_give_others_distinct_ones():
    colors = class_colors(["Sickle cell", "RBC", "Lymphozyt ä", "WBC", "Platelets"])
    assert {k: colors[k] for k in ("RBC", "WBC", "Platelets")} == label_color_map
    assert (colors["Sickle cell"], colors["Lymphozyt ä"]) == PALETTE[:2]
    many = class_colors([f"class {i}" for i in range(len(PALETTE))])
    assert len(set(many.values()) | set(label_color_map.values())) == len(PALETTE) + 3  # all distinct


# ---------------------------------------------------------------------------------------------
# End to end, as commands (in this process: test_workflow.py runs the commands in fresh Pythons)
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_own_classes_end_to_end(tiny_voc, tmp_path, run_main):
    voc = tiny_voc(n_trainval=4, n_test=2, classes=OWN)
    lists, run = tmp_path / "lists", tmp_path / "run"
    result = run_main("create_data_lists.py", "--data-folder", voc, "--output-folder", lists)
    assert result.returncode == 0, result.stderr
    label_map = read_json(lists / "label_map.json")
    assert list(label_map) == ["background", *OWN_SORTED]
    assert "classes (from the annotations): 0 background, 1 echinocyte, 2 Lymphozyt ä" in result.stdout

    result = run_main("train.py", *train_argv(lists, run, "--iterations", 2))
    assert result.returncode == 0, result.stderr
    ckpt = load(run / "checkpoint.pt")
    assert ckpt["label_map"] == label_map and ckpt["model_args"]["n_classes"] == 6
    assert ckpt["model"]["pred_convs.cl_conv4_3.weight"].shape[0] == 4 * 6  # 4 priors a location, 6 classes

    result = run_main("eval.py", *eval_argv(run / "checkpoint.pt", lists, "--output", tmp_path / "eval.json"))
    assert result.returncode == 0, result.stderr
    metrics = read_json(tmp_path / "eval.json")
    in_test = {name for name, label in label_map.items()
               if any(label in o["labels"] for o in read_json(lists / "TEST_objects.json"))}
    assert metrics["classes"] == OWN_SORTED
    assert set(metrics["AP"]) == in_test - {"background"} and set(metrics["not_in_test"]) == set(OWN_SORTED) - in_test
    ap_table = result.stdout.split("counting at")[0]
    for name in OWN_SORTED:  # one row per class: its APs, or that it is not in TEST
        rows = [line[len(name):] for line in ap_table.splitlines() if line.startswith(name + " ")]
        expected = r"^ +\d\.\d{4} +\d\.\d{4} +\d\.\d{4} +\d+\.\d\d%$" if name in in_test else r"^ +not in TEST"
        assert len(rows) == 1 and re.search(expected, rows[0]), (name, ap_table)

    images = read_json(lists / "TEST_images.json")
    result = run_main("detect.py", "--checkpoint", run / "checkpoint.pt", "--min-score", "0.01", *images,
                      "--output-dir", tmp_path / "det", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "det" / "counts.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image", *OWN_SORTED]
    records = read_json(tmp_path / "det" / "detections.json")
    assert [r[0] for r in rows[1:]] == [r["image"] for r in records] == images
    for row, record in zip(rows[1:], records):  # the counts are the detections of each class
        assert [int(n) for n in row[1:]] == [record["labels"].count(name) for name in OWN_SORTED]
    assert sum(len(r["labels"]) for r in records) > 0

    # from Python: the model knows its classes and draws them in their colours
    model = detect.load_model(run / "checkpoint.pt")
    assert model.label_map == label_map and model.rev_label_map[2] == "Lymphozyt ä"
    assert model.label_color_map["RBC"] == label_color_map["RBC"]
    with Image.open(images[0]) as im:
        annotated = detect.detect(im, min_score=0.01, max_overlap=0.5, top_k=5, model=model)
        assert annotated.size == im.size
