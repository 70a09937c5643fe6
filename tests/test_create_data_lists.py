"""Tests of create_data_lists on Pascal VOC (parsing BCCD, its problems, getting it) and the lists it writes.

    python -m pytest tests/test_create_data_lists.py -q

Runs on the real BCCD where it is present (see conftest.py), otherwise on generated data; the
tests that need BCCD's own numbers are skipped then. Expected values are computed here from the
XML files and the images (read_split), independently of utils. YOLO, COCO, several datasets and the leakage
guard: tests/test_formats.py.
"""
import functools
import http.server
import io
import json
import os
import re
import socket
import threading
import xml.etree.ElementTree as ET
import zipfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import create_data_lists as cdl
import utils
from conftest import CLASSES, annotation_xml, image_id
from create_data_lists import create_data_lists
from misc import UserError


LABEL_MAP = {"background": 0, "RBC": 1, "WBC": 2, "Platelets": 3}
LIST_FILES = ("TRAIN_images.json", "TRAIN_objects.json", "TEST_images.json", "TEST_objects.json", "label_map.json")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def split_ids(bccd_dir, split):
    lines = (Path(bccd_dir) / "ImageSets" / "Main" / f"{split}.txt").read_text().splitlines()
    return [line.split()[0] for line in lines if line.strip()]


@functools.lru_cache(maxsize=None)
def read_split(bccd_dir, split):
    """What the lists of ImageSets/Main/<split>.txt must hold, from the files: (ids, objects, dropped, clipped).

    A plain re-implementation of the rules: names stripped, missing <difficult> is 0, boxes clipped
    to the image (size from the JPEG header), zero-area or inverted boxes dropped; `dropped` and
    `clipped` list (id, box as written) of those. bccd_dir must be a str (cached).
    """
    ids, objects, dropped, clipped = split_ids(bccd_dir, split), [], [], []
    for i in ids:
        root = ET.parse(Path(bccd_dir) / "Annotations" / f"{i}.xml").getroot()
        with Image.open(Path(bccd_dir) / "JPEGImages" / f"{i}.jpg") as im:
            width, height = im.size
        entry = {"boxes": [], "labels": [], "difficulties": []}
        for obj in root.findall("object"):
            box = [float(obj.find(f"bndbox/{k}").text) for k in ("xmin", "ymin", "xmax", "ymax")]
            x0, x1 = (min(max(v, 0.), width) for v in box[0::2])
            y0, y1 = (min(max(v, 0.), height) for v in box[1::2])
            if x1 <= x0 or y1 <= y0:
                dropped.append((i, box))
                continue
            if [x0, y0, x1, y1] != box:
                clipped.append((i, box))
            entry["boxes"].append([x0, y0, x1, y1])
            entry["labels"].append(LABEL_MAP[obj.find("name").text.strip()])
            entry["difficulties"].append(int(obj.findtext("difficult", "0").strip() or 0))
        objects.append(entry)
    return ids, objects, dropped, clipped


def class_counts(objects):
    counts = {name: sum(o["labels"].count(LABEL_MAP[name]) for o in objects) for name in ("RBC", "WBC", "Platelets")}
    return {"images": len(objects), "objects": sum(counts.values()), **counts}


def load_lists(folder, split):
    folder = Path(folder)
    return (json.loads((folder / f"{split}_images.json").read_text()),
            json.loads((folder / f"{split}_objects.json").read_text()))


def snapshot(folder):
    """Name -> (bytes, mtime, inode) of every file in `folder`: any write or replacement changes it."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_ino) for p in sorted(Path(folder).iterdir())}


def cdl_main(*argv):
    """create_data_lists.py's main in this process: (stdout, stderr). A UserError propagates."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        cdl.main(cdl.get_args_parser().parse_args([str(a) for a in argv]))
    return out.getvalue(), err.getvalue()


def names_box(line, box):
    """True if the line shows the four coordinates of `box`, in order (ints or floats)."""
    numbers = [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?", line)]
    return any(numbers[k:k + 4] == [float(v) for v in box] for k in range(len(numbers) - 3))


# ---------------------------------------------------------------------------------------------
# create_data_lists: what is written and printed
# ---------------------------------------------------------------------------------------------

def test_lists_get_the_permissions_of_any_new_file(tiny_voc, tmp_path):
    """Lists are made to be shared: mode as open() gives under the umask, not mkstemp's owner-only 0600."""
    create_data_lists(tiny_voc(), tmp_path / "lists", verbose=False)
    (tmp_path / "probe").touch()
    expected = oct((tmp_path / "probe").stat().st_mode)
    assert {name: oct((tmp_path / "lists" / name).stat().st_mode) for name in LIST_FILES} == dict.fromkeys(LIST_FILES, expected)


def test_label_map(data_lists):
    assert utils.label_map == LABEL_MAP
    assert json.loads((Path(data_lists) / "label_map.json").read_text()) == LABEL_MAP
    assert {v: k for k, v in LABEL_MAP.items()} == utils.rev_label_map


@pytest.mark.parametrize("split,split_name", [("TRAIN", "trainval"), ("TEST", "test")])
def test_lists_match_annotations(bccd_dir, data_lists, split, split_name):
    ids, expected, _, _ = read_split(str(bccd_dir), split_name)
    images, objects = load_lists(data_lists, split)
    assert [Path(p).name for p in images] == [f"{i}.jpg" for i in ids]  # in split-file order
    assert all(Path(p).samefile(Path(bccd_dir) / "JPEGImages" / f"{i}.jpg") for p, i in zip(images, ids))
    assert objects == [{**o, "source": f"{Path(bccd_dir).name}:{split_name}"} for o in expected]  # and where it came from


@pytest.fixture(scope="module", params=[("trainval", "test"), ("train", "val")], ids=["trainval-test", "train-val"])
def cli_run(request, bccd_dir, tmp_path_factory):
    """create_data_lists.py's main on bccd_dir with one pair of splits: (splits, output folder, stdout, stderr)."""
    train_split, test_split = request.param
    out = tmp_path_factory.mktemp("cli_lists")
    stdout, stderr = cdl_main("--data-folder", bccd_dir, "--output-folder", out,
                              "--train-split", train_split, "--test-split", test_split)
    return request.param, out, stdout, stderr


def test_printed_counts_are_object_counts(cli_run, bccd_dir):
    (train_split, test_split), out, stdout, _ = cli_run
    for split, split_name in (("TRAIN", train_split), ("TEST", test_split)):
        expected = class_counts(read_split(str(bccd_dir), split_name)[1])
        line = re.search(rf"^{split}: (\d+) images, (\d+) objects \(RBC (\d+), WBC (\d+), Platelets (\d+)\)$", stdout, re.M)
        assert line, f"no count line for {split} in:\n{stdout}"
        assert [int(v) for v in line.groups()] == [expected[k] for k in ("images", "objects", "RBC", "WBC", "Platelets")]
        images, objects = load_lists(out, split)
        assert len(images) == len(objects) == len(split_ids(bccd_dir, split_name))


def test_dropped_and_clipped_boxes_are_warned(cli_run, bccd_dir):
    (train_split, test_split), _, _, stderr = cli_run
    train, test = read_split(str(bccd_dir), train_split), read_split(str(bccd_dir), test_split)
    expected = {(image, tuple(box)) for image, box in train[2] + train[3] + test[2] + test[3]}  # once each
    warnings = [line for line in stderr.splitlines() if "warning" in line.lower()]
    for image, box in expected:
        assert sum(image in line and names_box(line.replace(image, ""), box) for line in warnings) == 1, (image, box, stderr)
    assert len(warnings) == len(expected)  # nothing else to warn of


def test_real_bccd_numbers(real_bccd_dir, cli_run):
    """BCCD's published numbers, counted here from the XML: the ground truth the other tests rely on."""
    (train_split, test_split), out, stdout, stderr = cli_run
    expected = {
        "trainval": {"images": 292, "objects": 3941, "RBC": 3348, "WBC": 301, "Platelets": 292},
        "test": {"images": 72, "objects": 945, "RBC": 805, "WBC": 71, "Platelets": 69},
        "train": {"images": 205}, "val": {"images": 87},
    }
    for split, split_name in (("TRAIN", train_split), ("TEST", test_split)):
        counted = class_counts(read_split(str(real_bccd_dir), split_name)[1])
        assert {k: counted[k] for k in expected[split_name]} == expected[split_name]
        assert len(load_lists(out, split)[0]) == expected[split_name]["images"]
        if "objects" in expected[split_name]:
            n = expected[split_name]
            assert (f"{split}: {n['images']} images, {n['objects']} objects "
                    f"(RBC {n['RBC']}, WBC {n['WBC']}, Platelets {n['Platelets']})") in stdout.splitlines()
    # the two zero-area boxes of BCCD (an RBC each), dropped with a warning naming file and box
    dropped = read_split(str(real_bccd_dir), train_split)[2] + read_split(str(real_bccd_dir), test_split)[2]
    assert sorted(dropped) == [("BloodImage_00338", [504., 337., 504., 337.]), ("BloodImage_00343", [181., 329., 181., 329.])]
    assert re.search(r"BloodImage_00338.*504(\.0)?, 337(\.0)?, 504(\.0)?, 337", stderr)
    assert re.search(r"BloodImage_00343.*181(\.0)?, 329(\.0)?, 181(\.0)?, 329", stderr)


# ---------------------------------------------------------------------------------------------
# create_data_lists: annotation problems, one test each
# ---------------------------------------------------------------------------------------------

FIRST = image_id(0)  # an image of TRAIN in tiny_voc


def test_class_names_are_stripped(tiny_voc, tmp_path):
    voc = tiny_voc(objects={FIRST: [{"name": " RBC\n", "box": [1, 1, 10, 10]}, {"name": "\tWBC  ", "box": [20, 5, 40, 30]},
                                    {"name": "\nPlatelets\n\t", "box": [45, 30, 60, 45]}]})
    create_data_lists(voc, tmp_path / "lists", verbose=False)
    assert load_lists(tmp_path / "lists", "TRAIN")[1][0]["labels"] == [1, 2, 3]


def test_missing_difficult_means_zero(tiny_voc, tmp_path):
    voc = tiny_voc(objects={FIRST: [{"name": "RBC", "box": [1, 1, 10, 10], "difficult": None},
                                    {"name": "WBC", "box": [20, 5, 40, 30], "difficult": 1},
                                    {"name": "RBC", "box": [45, 30, 60, 45], "difficult": None}]})
    assert "<difficult>" not in (voc / "Annotations" / f"{FIRST}.xml").read_text().split("</object>")[0]
    create_data_lists(voc, tmp_path / "lists", verbose=False)
    assert load_lists(tmp_path / "lists", "TRAIN")[1][0]["difficulties"] == [0, 1, 0]


def test_float_coordinates_parse(tiny_voc, tmp_path):
    boxes = [[10.5, 5.25, 30.75, 20.5], [1.0, 2.0, 3.5, 47.999]]
    voc = tiny_voc(objects={FIRST: [{"name": "RBC", "box": b} for b in boxes]})
    create_data_lists(voc, tmp_path / "lists", verbose=False)
    assert load_lists(tmp_path / "lists", "TRAIN")[1][0]["boxes"] == boxes


def test_zero_area_and_inverted_boxes_are_dropped_with_a_warning(tiny_voc, tmp_path, capsys):
    bad = [[10, 10, 10, 20], [30, 20, 20, 30], [5, 25, 25, 25]]  # no width, inverted, no height
    voc = tiny_voc(objects={FIRST: [{"name": "WBC", "box": [2, 3, 12, 13]}] + [{"name": "RBC", "box": b} for b in bad]})
    create_data_lists(voc, tmp_path / "lists", verbose=False)
    entry = load_lists(tmp_path / "lists", "TRAIN")[1][0]
    assert entry == {"boxes": [[2., 3., 12., 13.]], "labels": [2], "difficulties": [0], "source": f"{voc.name}:trainval"}
    warnings = [line for line in capsys.readouterr().err.splitlines() if FIRST in line]
    for box in bad:
        assert sum(names_box(line.replace(FIRST, ""), box) for line in warnings) == 1, (box, warnings)


def test_box_outside_image_is_clipped_with_a_warning(tiny_voc, tmp_path, capsys):
    # the image is 64x48
    voc = tiny_voc(objects={FIRST: [{"name": "RBC", "box": [-5, 10, 70, 40]}, {"name": "WBC", "box": [10, -3.5, 20, 60]},
                                    {"name": "Platelets", "box": [1, 2, 3, 4]}]})
    create_data_lists(voc, tmp_path / "lists", verbose=False)
    assert load_lists(tmp_path / "lists", "TRAIN")[1][0]["boxes"] == [[0, 10, 64, 40], [10, 0, 20, 48], [1, 2, 3, 4]]
    warnings = [line for line in capsys.readouterr().err.splitlines() if FIRST in line]
    assert len(warnings) == 2
    assert names_box(warnings[0].replace(FIRST, ""), [-5, 10, 70, 40])
    assert names_box(warnings[1].replace(FIRST, ""), [10, -3.5, 20, 60])


def _malformed_xml(voc):
    path = voc / "Annotations" / f"{image_id(0)}.xml"
    path.write_text(path.read_text()[:-40])  # cut off: no closing tags
    return str(path), r"malformed"


def _unknown_class(voc):  # with the classes given (--classes); else the annotations' classes make the label map
    path = voc / "Annotations" / f"{image_id(1)}.xml"
    path.write_text(path.read_text().replace("<name>RBC</name>", "<name>Neutrophil</name>"))
    return str(path), r"unknown class.*Neutrophil"


def _missing_image(voc):
    path = voc / "JPEGImages" / f"{image_id(2)}.jpg"
    path.unlink()
    return str(path), r"missing|not found"


def _corrupt_image(voc):
    path = voc / "JPEGImages" / f"{image_id(3)}.jpg"
    path.write_bytes(b"this is not a JPEG" * 10)
    return str(path), r"image"


def _id_without_annotation(voc):
    with open(voc / "ImageSets" / "Main" / "trainval.txt", "a") as f:
        f.write("BloodImage_09999\n")
    return "BloodImage_09999", r"annotation"


def _empty_split(voc):
    path = voc / "ImageSets" / "Main" / "test.txt"
    path.write_text("\n")
    return str(path), r"empty"


def _nan_coordinate(voc):
    path = voc / "Annotations" / f"{image_id(4)}.xml"
    text = path.read_text()
    start = text.index("<xmin>") + len("<xmin>")
    path.write_text(text[:start] + "nan" + text[text.index("</xmin>"):])
    return str(path), r"object 0 .*: box \[nan, .* is not finite"


def _infinite_difficult(voc):
    path = voc / "Annotations" / f"{image_id(5)}.xml"
    path.write_text(path.read_text().replace("<difficult>0</difficult>", "<difficult>inf</difficult>", 1))
    return str(path), r"object 0 .*non-numeric"


def _id_listed_twice(voc):
    path = voc / "ImageSets" / "Main" / "test.txt"
    ids = path.read_text().split()
    path.write_text("\n".join(ids + ids[:1]) + "\n")
    return str(path), rf"1 id\(s\) listed more than once \({ids[0]}\)"


def _split_not_text(voc):
    path = voc / "ImageSets" / "Main" / "trainval.txt"
    path.write_bytes(b"\xff\xfe\x00BloodImage\x81\n")
    return str(path), r"unreadable"


def _unknown_xml_encoding(voc):
    path = voc / "Annotations" / f"{image_id(0)}.xml"
    text = path.read_text()
    path.write_text('<?xml version="1.0" encoding="x-nonsense"?>\n' + text[text.index("<annotation"):])
    return str(path), r"malformed XML"


def _image_is_a_pipe(voc):  # opened, it would wait for ever
    path = voc / "JPEGImages" / f"{image_id(1)}.jpg"
    path.unlink()
    os.mkfifo(path)
    return str(path), r"not a regular file"


def _id_outside_the_dataset(voc):
    path = voc / "ImageSets" / "Main" / "test.txt"
    path.write_text(path.read_text() + str(voc / "Annotations" / image_id(0)) + "\n")
    return str(path), r"points outside the dataset's Annotations/"


def _filename_of_another_image(voc):
    path = voc / "Annotations" / f"{image_id(1)}.xml"
    text = path.read_text()
    start, end = text.index("<filename>") + len("<filename>"), text.index("</filename>")
    path.write_text(text[:start] + f"{image_id(0)}.jpg" + text[end:])
    return f"{image_id(0)}.xml and {image_id(1)}.xml", r"each image must be annotated once"


def _box_outside_the_image(voc):  # the image is 64x48: not a cell of it
    path = voc / "Annotations" / f"{image_id(2)}.xml"
    text = path.read_text()
    start, end = text.index("<bndbox>"), text.index("</bndbox>")
    path.write_text(text[:start] + "<bndbox><xmin>70</xmin><ymin>10</ymin><xmax>80</xmax><ymax>20</ymax>" + text[end:])
    return str(path), r"object 0 .*box \[70.0, 10.0, 80.0, 20.0\] lies outside the 64x48 image"


PROBLEMS = [_malformed_xml, _unknown_class, _missing_image, _corrupt_image, _id_without_annotation, _empty_split,
            _nan_coordinate, _infinite_difficult, _id_listed_twice, _split_not_text, _unknown_xml_encoding,
            _image_is_a_pipe, _id_outside_the_dataset, _filename_of_another_image, _box_outside_the_image]


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda f: f.__name__[1:])
def test_problem_is_an_error_and_nothing_is_written(problem, tiny_voc, tmp_path):
    voc = tiny_voc()
    lists = tmp_path / "lists"
    create_data_lists(voc, lists, verbose=False)  # earlier lists, which a failed run must leave as they are
    before = snapshot(lists)
    assert sorted(before) == sorted(LIST_FILES)
    thing, reason = problem(voc)
    with pytest.raises(UserError) as e:
        create_data_lists(voc, lists, classes=CLASSES, verbose=False)
    assert any(thing in line and re.search(reason, line) for line in str(e.value).splitlines()), str(e.value)
    assert snapshot(lists) == before
    with pytest.raises(UserError):
        create_data_lists(voc, tmp_path / "new", classes=CLASSES, verbose=False)
    assert not (tmp_path / "new").exists()


def test_split_file_with_a_byte_order_mark_and_crlf_lines_reads_as_ids(tiny_voc, tmp_path):
    voc = tiny_voc()
    path = voc / "ImageSets" / "Main" / "test.txt"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_text().replace("\n", "\r\n").encode())  # as Windows' Notepad saves
    assert create_data_lists(voc, tmp_path / "lists", verbose=False)["TEST"]["images"] == 2


def test_splits_sharing_images_are_refused_or_dropped(tiny_voc, tmp_path, capsys):
    voc = tiny_voc()  # val.txt's image is in trainval.txt too
    (shared,) = (voc / "ImageSets" / "Main" / "val.txt").read_text().split()
    with pytest.raises(UserError, match=rf"{shared}.jpg \(TRAIN\) has the pixels of .*{shared}.jpg \(TEST image"):
        create_data_lists(voc, tmp_path / "lists", train_split="trainval", test_split="val", verbose=False)
    assert not (tmp_path / "lists").exists()
    summary = create_data_lists(voc, tmp_path / "lists", train_split="trainval", test_split="val", verbose=False,
                                drop_duplicates=True)
    assert "dropped 1 TRAIN image(s) that duplicate test images" in capsys.readouterr().out
    trainval = (voc / "ImageSets" / "Main" / "trainval.txt").read_text().split()
    assert summary["TRAIN"]["images"] == len(trainval) - 1 and summary["TEST"]["images"] == 1
    assert shared not in "".join(json.loads((tmp_path / "lists" / "TRAIN_images.json").read_text()))


@pytest.mark.parametrize("where", ["{tmp}/file/lists", "{tmp}/file"])
def test_output_folder_that_cannot_be_written_is_refused_before_parsing(where, tiny_voc, tmp_path):
    voc = tiny_voc()
    (tmp_path / "file").write_text("a file where a folder should be")
    with pytest.raises(UserError, match=f"--output-folder {re.escape(where.format(tmp=tmp_path))}: cannot write there \\(.*/file is a file, not a folder\\)$"):
        create_data_lists(voc, where.format(tmp=tmp_path), verbose=False)
    assert (tmp_path / "file").read_text() == "a file where a folder should be"


def test_cli_reports_all_errors_together(tiny_voc, tmp_path, run_main):
    voc = tiny_voc(n_trainval=5, n_test=2)
    lists = tmp_path / "lists"
    create_data_lists(voc, lists, verbose=False)
    before = snapshot(lists)
    problems = [problem(voc) for problem in PROBLEMS[:7]]  # the others hide these: a split file's, or image 5's (test)
    result = run_main("create_data_lists.py", "--data-folder", voc, "--output-folder", lists, "--classes", *CLASSES)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    for thing, reason in problems:  # each on a line of its own, with its reason
        assert sum(thing in line and bool(re.search(reason, line)) for line in lines) == 1, (thing, result.stderr)
    assert snapshot(lists) == before


# ---------------------------------------------------------------------------------------------
# Getting the data
# ---------------------------------------------------------------------------------------------

def test_cli_missing_data_says_where_to_get_it(tmp_path, run_main):
    missing = tmp_path / "nowhere" / "BCCD"
    result = run_main("create_data_lists.py", "--data-folder", missing, "--output-folder", tmp_path / "lists")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1, message
    for needed in ("github.com/Shenggan/BCCD_Dataset", "--download", str(missing), "Annotations", "JPEGImages"):
        assert needed in message
    assert not (tmp_path / "lists").exists() and not missing.exists()


def bccd_archive(path, n_images, top="BCCD_Dataset-master"):
    """A zip like GitHub's archive of the BCCD repository, with n_images 8x8 images (noise, each its own: identical
    pixels in TRAIN and TEST would be refused as a leak) and their XML."""
    ids = [image_id(i) for i in range(n_images)]
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{top}/README.md", "# BCCD Dataset\n")
        for i in ids:
            z.writestr(f"{top}/BCCD/Annotations/{i}.xml", annotation_xml(f"{i}.jpg", (8, 8), [{"name": "RBC", "box": [1, 1, 6, 7]}]))
            jpeg = io.BytesIO()
            noise = np.random.default_rng(int(i[-5:])).integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(noise).save(jpeg, "JPEG", quality=95)
            z.writestr(f"{top}/BCCD/JPEGImages/{i}.jpg", jpeg.getvalue())
        z.writestr(f"{top}/BCCD/ImageSets/Main/trainval.txt", "".join(f"{i}\n" for i in ids[:292]))
        z.writestr(f"{top}/BCCD/ImageSets/Main/test.txt", "".join(f"{i}\n" for i in ids[292:]))


@pytest.fixture(scope="module")
def archive_server(tmp_path_factory):
    """Base URL of an HTTP server on 127.0.0.1 serving bccd.zip (364 images) and short.zip (363)."""
    folder = tmp_path_factory.mktemp("www")
    bccd_archive(folder / "bccd.zip", 364)
    bccd_archive(folder / "short.zip", 363)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_cli_download_places_bccd(archive_server, tmp_path, run_main):
    data = tmp_path / "data" / "BCCD"
    result = run_main("create_data_lists.py", "--data-folder", data, "--output-folder", tmp_path / "lists",
                        "--download", "--url", f"{archive_server}/bccd.zip")
    assert result.returncode == 0, result.stderr
    assert len(list((data / "Annotations").glob("*.xml"))) == 364
    assert len(list((data / "JPEGImages").glob("*.jpg"))) == 364
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["BCCD"]  # no temporary folder left
    assert re.search(r"^TRAIN: 292 images, 292 objects", result.stdout, re.M)
    images, _ = load_lists(tmp_path / "lists", "TRAIN")
    assert len(images) == 292 and all(Path(p).parent.samefile(data / "JPEGImages") for p in images[:3])


def test_download_refuses_wrong_count(archive_server, tmp_path, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    data = tmp_path / "data" / "BCCD"
    with pytest.raises(UserError, match=r"363.*364"):
        cdl_main("--data-folder", data, "--output-folder", tmp_path / "lists", "--download", "--url", f"{archive_server}/short.zip")
    assert not data.exists() and not (tmp_path / "lists").exists()
    assert list((tmp_path / "data").iterdir()) == []  # no temporary folder left either


def test_cli_unreachable_url_is_one_line_error(tmp_path, run_main):
    with socket.socket() as s:  # a port that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/bccd.zip"
    data = tmp_path / "data" / "BCCD"
    result = run_main("create_data_lists.py", "--data-folder", data, "--output-folder", tmp_path / "lists",
                        "--download", "--url", url)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert url in result.stderr
    assert not data.exists() and not (tmp_path / "lists").exists()
