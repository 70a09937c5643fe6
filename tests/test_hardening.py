"""Hostile and careless inputs at every entry point: each is one line on stderr, a non-zero exit status and no
traceback, checked before long work where it can be, and what earlier runs wrote survives.

    python -m pytest tests/test_hardening.py -q

Each script's command line runs in this process as `python <script>.py ...` would (misc.run_cli with sys.argv
set): the exit status and stderr are those a user sees, without the seconds a fresh Python and torch cost.
One table per entry point: (case, command line, the message's words, files it must leave as they were).
"""
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import bench
import create_data_lists
import detect
import eval as eval_script
from conftest import make_voc
from misc import Terminated, run_cli
from utils import bccd_labels
from utils import create_data_lists as make_lists

SCRIPTS = {"create_data_lists": create_data_lists, "eval": eval_script, "detect": detect, "bench": bench}


def cli(script, argv, monkeypatch, capsys):
    """Run `python <script>.py argv` in this process: (exit status, stdout, stderr)."""
    module = SCRIPTS[script]
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *map(str, argv)])
    try:
        run_cli(module.main, module.get_args_parser())
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code, err, script, says):
    """Status 1, one error line, no traceback; the words in the error (create_data_lists lists every problem of a
    dataset on a line of its own under its error line)."""
    lines = [line for line in err.splitlines() if line.startswith(f"{script}.py: error: ")]
    assert code == 1 and "Traceback" not in err, err
    message = err[err.index(lines[0]):] if len(lines) == 1 else ""
    assert len(lines) == 1 and all(w in message for w in says), err
    if script != "create_data_lists":
        assert message.strip() == lines[0], err


def snapshot(paths):
    return {p: (p.read_bytes() if p.is_file() else None) for p in paths}


@pytest.fixture(scope="module")
def world(tmp_path_factory, untrained_checkpoint):
    """A tiny VOC dataset, its lists, a random checkpoint, an image, and earlier outputs of every script."""
    root = tmp_path_factory.mktemp("hostile")
    voc = make_voc(root / "voc", n_trainval=4, n_test=2)
    make_voc(root / "voc-case", n_trainval=2, n_test=1, objects={"BloodImage_00001": [
        {"name": "rbc", "box": [2, 2, 20, 20]}]})  # RBC elsewhere, rbc here
    make_lists(voc, root / "lists", verbose=False)
    shutil.copy(untrained_checkpoint, root / "checkpoint.pt")  # conftest's untrained SSD300
    (root / "file").write_text("a file where a folder should be\n")
    os.mkfifo(root / "fifo")  # as a device such as /dev/full: os.replace would put a regular file in its place
    (root / "fifo-out").mkdir()
    os.mkfifo(root / "fifo-out" / "counts.csv")
    (root / "blocked").mkdir()  # lists whose label_map.json is a folder: no list may be replaced
    for name in ("TRAIN_images.json", "TRAIN_objects.json", "TEST_images.json", "TEST_objects.json"):
        (root / "blocked" / name).write_bytes((root / "lists" / name).read_bytes())
    (root / "blocked" / "label_map.json").mkdir()
    damaged_lists(root)
    for name in ("eval.json", "bench.json"):
        (root / name).write_text('{"earlier": true}\n')
    (root / "out").mkdir()
    (root / "out" / "counts.csv").write_text("image,RBC,WBC,Platelets\nearlier.jpg,1,2,3\n")
    (root / "thumbs-out").mkdir()  # report.html's thumbnails folder: a file, or holding a file of someone else's
    (root / "thumbs-out" / "thumbnails").write_text("a file where a folder should be\n")
    (root / "foreign-thumbs" / "thumbnails").mkdir(parents=True)
    (root / "foreign-thumbs" / "thumbnails" / "BloodImage_00002.jpg.jpg").write_text("a user's file\n")
    (root / "report-out" / "report.html").mkdir(parents=True)
    (root / "plots-blocked" / "pr_curves.png").mkdir(parents=True)
    return root


def damaged_lists(root):
    """Copies of {root}/lists with one thing wrong in TEST: bad-difficult, bad-box, bad-image (a truncated JPEG,
    found only when a DataLoader worker reads it), missing-image, empty, box-of-8 (a box of eight numbers),
    box-beyond-image (found when the image is read), box-of-booleans, no-objects (TEST images without objects),
    image-twice (one image listed twice), deep-json (nested deeper than the stack)."""
    def copy(name, edit):
        folder = root / name
        folder.mkdir()
        lists = {f: json.loads((root / "lists" / f).read_text()) for f in os.listdir(root / "lists")}
        edit(lists)
        for f, obj in lists.items():
            (folder / f).write_text(json.dumps(obj))

    def first_object(key, value):
        def edit(lists):
            lists["TEST_objects.json"][0][key][0] = value
        return edit
    truncated = root / "truncated.jpg"
    good = json.loads((root / "lists" / "TEST_images.json").read_text())[0]
    truncated.write_bytes(Path(good).read_bytes()[:400])
    copy("bad-difficult", first_object("difficulties", 300))
    copy("bad-box", first_object("boxes", [-500, -500, -100, -100]))
    copy("bad-image", lambda lists: lists["TEST_images.json"].__setitem__(0, str(truncated)))
    copy("missing-image", lambda lists: lists["TEST_images.json"].__setitem__(0, str(root / "moved.jpg")))
    copy("empty", lambda lists: lists.update({"TEST_images.json": [], "TEST_objects.json": []}))
    copy("box-of-8", lambda lists: lists["TEST_objects.json"][0]["boxes"].__setitem__(0, [1, 1, 9, 9] * 2))
    copy("box-beyond-image", first_object("boxes", [10, 10, 5000, 20]))
    copy("box-of-booleans", first_object("boxes", [True, True, 5, 5]))
    copy("no-objects", lambda lists: lists.update({"TEST_objects.json": [
        {"boxes": [], "labels": [], "difficulties": []} for _ in lists["TEST_objects.json"]]}))
    copy("image-twice", lambda lists: [lists[f].__setitem__(1, lists[f][0]) for f in ("TEST_images.json",
                                                                                      "TEST_objects.json")])
    copy("deep-json", lambda lists: None)
    (root / "deep-json" / "TEST_objects.json").write_text("[" * 100_000 + "]" * 100_000)  # deeper than Python's stack


def fill(argv, root):
    return [str(a).format(root=root) for a in argv]


# ---------------------------------------------------------------------------------------------
# one table per entry point
# ---------------------------------------------------------------------------------------------

LISTS = ["lists/TRAIN_images.json", "lists/TRAIN_objects.json", "lists/TEST_images.json", "lists/label_map.json"]

CREATE_DATA_LISTS = [
    ("class-names-differ-in-case", ["--data-folder", "{root}/voc-case", "--output-folder", "{root}/lists"],
     ["class names that differ only in case: 'RBC', 'rbc'", "--classes"], LISTS),
    ("no-dataset", ["--data-folder", "{root}/nowhere", "--output-folder", "{root}/lists"], ["BCCD not found"], LISTS),
    ("output-under-a-file", ["--data-folder", "{root}/voc", "--output-folder", "{root}/file/lists"],
     ["--output-folder", "cannot write there", "is a file"], ["file"]),
    ("classes-background", ["--data-folder", "{root}/voc", "--output-folder", "{root}/lists", "--classes", "RBC",
                            "Background"], ["reserved"], LISTS),
    ("classes-twice", ["--data-folder", "{root}/voc", "--output-folder", "{root}/lists", "--classes", "RBC", "RBC"],
     ["RBC"], LISTS),
    ("test-fraction-nan", ["--data-folder", "{root}/voc", "--output-folder", "{root}/lists", "--test-fraction", "nan"],
     ["--test-fraction"], LISTS),
    ("test-fraction-1", ["--data-folder", "{root}/voc", "--output-folder", "{root}/lists", "--test-fraction", "1"],
     ["--test-fraction"], LISTS),
    ("no-such-split", ["--data-folder", "{root}/voc", "--output-folder", "{root}/lists", "--test-split", "nosuch"],
     ["nosuch.txt", "split file not found"], LISTS),
    ("label-map-is-a-folder", ["--data-folder", "{root}/voc", "--output-folder", "{root}/blocked"],
     ["label_map.json", "a folder is in the way"],
     ["blocked/TRAIN_images.json", "blocked/TRAIN_objects.json", "blocked/TEST_images.json"]),
    ("output-empty", ["--data-folder", "{root}/voc", "--output-folder", ""], ["--output-folder is empty"], LISTS),
    ("download-under-a-file", ["--download", "--data-folder", "{root}/file/BCCD", "--output-folder", "{root}/lists"],
     ["--data-folder", "cannot write there"], LISTS),
    ("download-onto-a-file", ["--download", "--data-folder", "{root}/file", "--output-folder", "{root}/lists"],
     ["--data-folder", "already there"], LISTS + ["file"]),
    ("download-bad-url", ["--download", "--url", "http://127.0.0.1:notaport/x.zip", "--data-folder", "{root}/dl",
                          "--output-folder", "{root}/lists"], ["cannot download", "notaport"], LISTS),
    ("download-output-under-a-file", ["--download", "--data-folder", "{root}/dl", "--output-folder",
                                      "{root}/file/lists"], ["--output-folder", "cannot write there"], LISTS),
]

EVAL_BASE = ["--checkpoint", "{root}/checkpoint.pt", "--data-folder", "{root}/lists", "--device", "cpu", "--workers",
             "0", "--output", "{root}/eval.json"]
EVAL = [
    ("output-is-a-folder", ["--output", "{root}/out"], ["--output", "cannot write there"]),
    ("output-under-a-file", ["--output", "{root}/file/eval.json"], ["--output", "cannot write there"]),
    ("output-is-a-pipe", ["--output", "{root}/fifo"], ["--output", "not a regular file"]),
    ("count-min-score-nan", ["--count-min-score", "nan"], ["--count-min-score must lie in [0, 1)"]),
    ("count-min-score-2-of-3", ["--count-min-score", "0.1,0.2"], ["one per class"]),
    ("count-min-score-1", ["--count-min-score", "1"], ["--count-min-score must lie in [0, 1)"]),
    ("count-min-score-unknown-class", ["--count-min-score", "RBC=0.3,Lymphocyte=0.2"], ["no class 'Lymphocyte'"]),
    ("count-max-overlap-0", ["--count-max-overlap", "0"], ["--count-max-overlap"]),
    ("ema-absent", ["--ema"], ["--ema", "checkpoint.pt holds no moving average of its weights"]),
    ("batch-size-0", ["--batch-size", "0"], ["--batch-size"]),
    ("checkpoint-missing", ["--checkpoint", "{root}/none.pt"], ["none.pt: no such checkpoint file"]),
    ("checkpoint-text", ["--checkpoint", "{root}/file"], ["not a checkpoint file"]),
    ("lists-missing", ["--data-folder", "{root}/none"], ["not found", "create_data_lists"]),
    ("device-nonsense", ["--device", "gpu7"], ["gpu7"]),
    ("workers-1000", ["--workers", "1000"], ["--workers 1000"]),
    ("device-meta", ["--device", "meta"], ["only cpu and cuda"]),
    ("batch-size-huge", ["--batch-size", "99999999999999999999"], ["--batch-size must be 1 to"]),
    ("output-empty", ["--output", ""], ["--output is empty"]),
    ("difficult-300", ["--data-folder", "{root}/bad-difficult"], ["entry 0", "other than 0 or 1"]),
    ("box-negative", ["--data-folder", "{root}/bad-box"], ["entry 0", "negative"]),
    ("image-truncated-in-a-worker", ["--data-folder", "{root}/bad-image", "--workers", "1"], ["truncated.jpg"]),
    ("image-missing", ["--data-folder", "{root}/missing-image"], ["moved.jpg", "not found"]),
    ("test-list-empty", ["--data-folder", "{root}/empty"], ["TEST_images.json: no images"]),
    ("box-of-8-numbers", ["--data-folder", "{root}/box-of-8"], ["entry 0", "[[x_min, y_min, x_max, y_max], ...]"]),
    ("box-beyond-image", ["--data-folder", "{root}/box-beyond-image", "--workers", "1"],
     ["TEST_objects.json: entry 0", "a box reaches beyond its"]),
    ("box-of-booleans", ["--data-folder", "{root}/box-of-booleans"], ["entry 0", "[[x_min, y_min, x_max, y_max], ...]"]),
    ("json-too-deep", ["--data-folder", "{root}/deep-json"], ["TEST_objects.json: unreadable", "recursion"]),
    ("no-object-to-score", ["--data-folder", "{root}/no-objects"], ["TEST_objects.json: no object to score"]),
    ("image-listed-twice", ["--data-folder", "{root}/image-twice"], ["TEST_images.json", "is listed twice"]),
    ("output-is-the-checkpoint", ["--output", "{root}/checkpoint.pt"], ["--output", "which this run reads"]),
    ("output-is-a-list", ["--output", "{root}/lists/TEST_objects.json"], ["--output", "which this run reads"]),
    ("checkpoint-empty", ["--checkpoint", ""], ["checkpoint's name is empty"]),
    ("plots-under-a-file", ["--plots", "{root}/file/plots"], ["--plots", "cannot write there"]),
    ("plots-is-a-pipe", ["--plots", "{root}/fifo"], ["--plots", "not a regular file"]),
    ("plots-png-is-a-folder", ["--plots", "{root}/plots-blocked"], ["--plots", "a folder is in the way"]),
]

DETECT_BASE = ["{root}/voc/JPEGImages", "--checkpoint", "{root}/checkpoint.pt", "--output-dir", "{root}/out",
               "--device", "cpu"]
DETECT = [
    ("output-under-a-file", ["--output-dir", "{root}/file/out"], ["--output-dir", "cannot write there"]),
    ("output-is-the-input-folder", ["--output-dir", "{root}/voc/JPEGImages"], ["would overwrite an input image"]),
    ("counts-csv-is-a-pipe", ["--output-dir", "{root}/fifo-out"], ["counts.csv", "not a regular file"]),
    ("min-score-2", ["--min-score", "2"], ["--min-score must lie in [0, 1)"]),
    ("min-score-nan", ["--min-score", "nan"], ["--min-score must lie in [0, 1)"]),
    ("min-score-2-of-3", ["--min-score", "0.1,0.2"], ["one per class"]),
    ("min-score-not-a-number", ["--min-score", "smears/"], ["--min-score 'smears/'", "RBC=0.35,WBC=0.25"]),
    ("min-score-unknown-class", ["--min-score", "RBC=0.3,Lymphocyte=0.2"], ["no class 'Lymphocyte'", "RBC, WBC"]),
    ("min-score-class-twice", ["--min-score", "RBC=0.3,RBC=0.2"], ["'RBC' given twice"]),
    ("max-overlap-2", ["--max-overlap", "2"], ["--max-overlap"]),
    ("min-score-some-named", ["--min-score", "RBC=0.3,0.2"], ["name every value's class or none"]),
    ("max-overlap-0", ["--max-overlap", "0"], ["--max-overlap"]),
    ("top-k-0", ["--top-k", "0"], ["--top-k"]),
    ("batch-size-0", ["--batch-size", "0"], ["--top-k and --batch-size must be 1 to 100,000"]),
    ("workers-1000", ["--workers", "1000"], ["--workers 1000"]),
    ("tile-nonsense", ["--tile", "big"], ["--tile"]),
    ("scale-nan", ["--scale", "nan"], ["--scale"]),
    ("scale-and-rbc-width", ["--scale", "2", "--rbc-width", "200"], ["--scale or --rbc-width"]),
    ("checkpoint-missing", ["--checkpoint", "{root}/none.pt"], ["none.pt: no such checkpoint file"]),
    ("no-readable-image", ["{root}/file"], ["cannot read image"]),  # a text file given as an image: nothing written
    ("only-missing-inputs", ["{root}/none.jpg", "{root}/none2.jpg"], ["none.jpg: no such file or folder"]),
    ("input-is-a-pipe", ["{root}/fifo"], ["fifo: not a regular file"]),  # read, it would wait for ever
    ("top-k-huge", ["--top-k", "99999999999999999999"], ["--top-k and --batch-size must be 1 to 100,000"]),
    ("device-mps", ["--device", "mps"], ["only cpu and cuda"]),
    ("device-nonsense", ["--device", "nonsense"], ["nonsense"]),
    ("output-empty", ["--output-dir", ""], ["--output-dir is empty"]),
    ("checkpoint-empty", ["--checkpoint", ""], ["checkpoint's name is empty"]),  # not the shipped model
    ("thumbnails-is-a-file", ["--output-dir", "{root}/thumbs-out"], ["thumbnails there is not a folder"]),
    ("thumbnail-not-ours", ["--output-dir", "{root}/foreign-thumbs"],
     ["thumbnails/BloodImage_00002.jpg.jpg is there and no earlier detect.py wrote it"]),
    ("report-html-is-a-folder", ["--output-dir", "{root}/report-out"], ["report.html", "a folder is in the way"]),
]

BENCH_BASE = ["--device", "cpu", "--data-folder", "{root}/lists", "--only", "parts", "--json", "{root}/bench.json"]
BENCH = [
    ("train-batch-0", ["--train-batch", "0"], ["--train-batch must be 1 to 1,024, not 0"]),
    ("train-batch-huge", ["--train-batch", "5000"], ["--train-batch must be 1 to 1,024, not 5000"]),
    ("train-batch-1-batch-norm", ["--train-batch", "1"], ["BatchNorm"]),
    ("infer-batches-0", ["--infer-batches", "1", "0"], ["--infer-batches"]),
    ("infer-batches-huge", ["--infer-batches", "10000000"], ["--infer-batches must be 1 to 1,024"]),
    ("iters-0", ["--iters", "0"], ["--iters"]),
    ("calibration-images-0", ["--only", "export", "--calibration-images", "0"],
     ["--calibration-images must be 1 to 10,000, not 0"]),
    ("workers-1000", ["--workers", "1000"], ["--workers 1000"]),
    ("json-under-a-file", ["--json", "{root}/file/bench.json"], ["--json", "cannot write there"]),
    ("json-is-a-pipe", ["--json", "{root}/fifo"], ["--json", "not a regular file"]),
    ("tiling-sizes-negative", ["--tiling-sizes=-5x3"], ["--tiling-sizes", "1 to 16384"]),
    ("tiling-sizes-huge", ["--tiling-sizes", "99999x99999"], ["--tiling-sizes", "1 to 16384"]),
    ("tiling-image-unreadable", ["--only", "tiling", "--data-folder", "{root}/bad-image", "--tiling-sizes", "640x480"],
     ["truncated.jpg", "cannot read image"]),
    ("checkpoint-missing", ["--checkpoint", "{root}/none.pt"], ["none.pt: no such checkpoint file"]),
    ("folder-missing", ["--folder", "{root}/none"], ["--folder", "no such folder"]),
    ("folder-without-images", ["--only", "folder", "--checkpoint", "{root}/checkpoint.pt", "--folder",
                               "{root}/blocked"], ["--folder", "no image files in it"]),
    ("json-is-the-checkpoint", ["--checkpoint", "{root}/checkpoint.pt", "--json", "{root}/checkpoint.pt"],
     ["--json", "which this run reads"]),
]


@pytest.mark.parametrize("case, argv, says, keep", CREATE_DATA_LISTS, ids=[c[0] for c in CREATE_DATA_LISTS])
def test_create_data_lists(case, argv, says, keep, world, monkeypatch, capsys):
    kept = snapshot([world / k for k in keep])
    code, _, err = cli("create_data_lists", fill(argv, world), monkeypatch, capsys)
    assert_one_line_error(code, err, "create_data_lists", says)
    assert snapshot([world / k for k in keep]) == kept


@pytest.mark.parametrize("case, argv, says", EVAL, ids=[c[0] for c in EVAL])
def test_eval(case, argv, says, world, monkeypatch, capsys):
    kept = snapshot([world / "eval.json", world / "lists" / "TEST_objects.json"])
    checkpoint = (world / "checkpoint.pt").stat()
    code, _, err = cli("eval", fill(EVAL_BASE + argv, world), monkeypatch, capsys)
    assert_one_line_error(code, err, "eval", says)
    assert snapshot([world / "eval.json", world / "lists" / "TEST_objects.json"]) == kept
    assert (world / "checkpoint.pt").stat().st_mtime_ns == checkpoint.st_mtime_ns


@pytest.mark.parametrize("case, argv, says", DETECT, ids=[c[0] for c in DETECT])
def test_detect(case, argv, says, world, monkeypatch, capsys):
    kept = snapshot([world / "out" / "counts.csv"])
    inputs = [a for a in argv if not a.startswith("--")] if not argv[0].startswith("--") else DETECT_BASE[:1]
    argv = argv if argv[0].startswith("--") else []
    code, _, err = cli("detect", fill(inputs + DETECT_BASE[1:] + argv, world), monkeypatch, capsys)
    assert_one_line_error(code, err, "detect", says)
    assert snapshot([world / "out" / "counts.csv"]) == kept  # nothing was detected: the earlier results stay
    assert sorted(os.listdir(world / "out")) == ["counts.csv"]


@pytest.mark.parametrize("case, argv, says", BENCH, ids=[c[0] for c in BENCH])
def test_bench(case, argv, says, world, monkeypatch, capsys):
    kept = snapshot([world / "bench.json"])
    code, _, err = cli("bench", fill(BENCH_BASE + argv, world), monkeypatch, capsys)
    assert_one_line_error(code, err, "bench", says)
    assert snapshot([world / "bench.json"]) == kept


# the contract as commands, once per script: a fresh Python, status 1, one line on stderr and nothing else, no
# traceback (the tables above run the same run_cli in this process); eval.py's is a checkpoint carrying code
COMMANDS = [
    ("create_data_lists", ["--data-folder", "{root}/nowhere", "--output-folder", "{root}/lists"], ["BCCD not found"]),
    ("eval", EVAL_BASE + ["--checkpoint", "{root}/code.pt"], ["code.pt: refused", "could run code"]),
    ("detect", ["--min-score", "0.5", "{root}/none.jpg", "--checkpoint", "{root}/none.pt"], ["none.pt: no such checkpoint"]),
    ("bench", BENCH_BASE + ["--iters", "0"], ["--iters"]),
]


class CreatesFileWhenUnpickled:
    """Unpickling this object calls open(path, "w"): a loader that runs pickled code creates the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.parametrize("script, argv, says", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_a_user_error_as_a_command_is_one_line_and_status_1(script, argv, says, world, run_script):
    ckpt = torch.load(world / "checkpoint.pt", weights_only=True)
    torch.save({**ckpt, "extra": CreatesFileWhenUnpickled(world / "marker")}, world / "code.pt")
    result = run_script(f"{script}.py", *fill(argv, world))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"{script}.py: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert all(w in result.stderr for w in says), result.stderr
    assert not (world / "marker").exists(), "loading the checkpoint ran the code it carries"


def test_min_score_per_class_by_name_after_the_flags_come_the_inputs(world, images, tmp_path, monkeypatch, capsys):
    """--min-score takes one word: the inputs after it are inputs. Named classes get their value, the others keep
    the model's (the untrained checkpoint records none: the tutorial's 0.2)."""
    out = tmp_path / "out"
    for value, shown in (("0.5", "0.5"), ("WBC=0.9", "RBC=0.2,WBC=0.9,Platelets=0.2")):
        code, stdout, err = cli("detect", ["--min-score", value, images, "--checkpoint", world / "checkpoint.pt",
                                           "--output-dir", out, "--device", "cpu"], monkeypatch, capsys)
        assert code == 0, err
        assert "4 image(s) in" in stdout and f"at min_score {shown}, max_overlap 0.5;" in stdout, stdout
        records = json.loads((out / "detections.json").read_text())
        assert len(records) == 4
        floor = {"RBC": 0.2, "WBC": 0.9, "Platelets": 0.2} if "=" in value else dict.fromkeys(bccd_labels, 0.5)
        assert all(s > floor[l] for r in records for l, s in zip(r["labels"], r["scores"]))


# ---------------------------------------------------------------------------------------------
# detect.py: results written as it goes, names, repeats
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def images(world, tmp_path):
    """Four copies of the tiny dataset's first test image, in a folder."""
    folder = tmp_path / "in"
    folder.mkdir()
    source = Image.open(world / "voc" / "JPEGImages" / "BloodImage_00004.jpg")
    for i in range(4):
        source.save(folder / f"smear{i}.jpg")
    return folder


def read_results(out):
    rows = (out / "counts.csv").read_text(encoding="utf-8").splitlines()
    return rows, json.loads((out / "detections.json").read_text(encoding="utf-8"))


def stop_at_the_third_image(exception, monkeypatch):
    """detect.py raises `exception` (Ctrl-C, SIGTERM) as it is about to annotate its third image."""
    calls, annotate = [], detect.annotate

    def annotate_then_stop(*args):
        calls.append(1)
        if len(calls) == 3:
            raise exception
        return annotate(*args)

    monkeypatch.setattr(detect, "annotate", annotate_then_stop)


@pytest.mark.parametrize("exception, code, says", [(KeyboardInterrupt, 130, "interrupted"),
                                                   (Terminated, 143, "terminated")], ids=["ctrl-c", "sigterm"])
def test_interrupted_detect_keeps_the_images_it_finished(exception, code, says, world, images, tmp_path, monkeypatch,
                                                         capsys):
    out = tmp_path / "out"
    stop_at_the_third_image(exception, monkeypatch)
    status, _, err = cli("detect", [images, "--checkpoint", world / "checkpoint.pt", "--output-dir", out, "--device",
                                    "cpu"], monkeypatch, capsys)
    assert status == code and "Traceback" not in err
    assert err.strip().splitlines() == [f"detect.py: {says} after 2 of 4 image(s); counts.csv and detections.json in "
                                        f"{out} hold those"]
    rows, records = read_results(out)
    assert rows[0] == "image,RBC,WBC,Platelets" and [r.split(",")[0] for r in rows[1:]] == \
        [str(images / "smear0.jpg"), str(images / "smear1.jpg")]
    assert [r["image"] for r in records] == [str(images / "smear0.jpg"), str(images / "smear1.jpg")]
    assert "ended early, after 2 of 4 images" in (out / "report.html").read_text(encoding="utf-8")


def test_a_stopped_detect_never_replaces_an_earlier_whole_run(world, images, tmp_path, monkeypatch, capsys):
    """A whole run, then one stopped after two images: the first run's counts.csv, detections.json and report.html
    are kept, and the stopped run's are beside them (.partial); the next whole run replaces both."""
    out, first = tmp_path / "out", [images / "smear0.jpg", images / "smear1.jpg", images / "smear2.jpg"]
    command = ["--checkpoint", world / "checkpoint.pt", "--output-dir", out, "--device", "cpu"]
    status, _, err = cli("detect", [*first, *command], monkeypatch, capsys)
    assert status == 0, err
    whole = snapshot([out / "counts.csv", out / "detections.json", out / "report.html"])
    stop_at_the_third_image(Terminated, monkeypatch)
    status, _, err = cli("detect", [images, *command, "--min-score", "0.5"], monkeypatch, capsys)
    assert status == 143 and err.strip().splitlines() == [
        f"detect.py: terminated after 2 of 4 image(s); counts.partial.csv and detections.partial.json in {out} hold "
        f"those (the earlier run's counts.csv, detections.json and report.html are kept)"]
    assert snapshot([out / "counts.csv", out / "detections.json", out / "report.html"]) == whole
    assert len((out / "counts.partial.csv").read_text().splitlines()) == 1 + 2
    assert len(json.loads((out / "detections.partial.json").read_text())) == 2
    assert "ended early, after 2 of 4 images" in (out / "report.partial.html").read_text(encoding="utf-8")
    monkeypatch.undo()

    status, _, err = cli("detect", [images, *command], monkeypatch, capsys)  # whole: it replaces the earlier run's
    assert status == 0, err
    rows, records = read_results(out)
    assert len(rows) == 1 + 4 and len(records) == 4
    assert not [n for n in os.listdir(out) if ".partial." in n or n.endswith(".tmp")]


def test_output_names_are_distinct_whatever_the_inputs():
    long = "x" * 250
    paths = ["a/s.jpg", "b/s.jpg", "c/s_1.jpg", "d/S.JPG", "e/s.tif", "f/s.png", "g/counts.csv.png", f"h/{long}.jpg",
             f"i/{long}.jpg", os.fsdecode(b"j/s\xff.jpg"), os.fsdecode(b"k/s\xff.jpg"), "l/s_1.jpg"]
    names = detect.output_names(paths)
    assert len({n.casefold() for n in names}) == len(paths)
    assert all(len(os.fsencode(n)) <= 255 for n in names)
    assert names[:6] == ["s.jpg", "s_1.jpg", "s_1_1.jpg", "S_2.jpg", "s.png", "s_1.png"]
    assert "counts.csv" not in names and "detections.json" not in names


def test_detect_names_any_bytes_and_counts_a_file_given_twice_once(world, images, tmp_path, monkeypatch, capsys):
    odd = Path(os.fsdecode(bytes(images) + b"/sm\xffear.jpg"))  # not UTF-8: Linux allows it
    (images / "smear0.jpg").rename(odd)
    out = tmp_path / "out"
    status, stdout, err = cli("detect", [images, odd, images / "smear1.jpg", "--checkpoint", world / "checkpoint.pt",
                                         "--output-dir", out, "--device", "cpu"], monkeypatch, capsys)
    assert status == 0, err
    assert "2 input file(s) given more than once; each is counted once" in stdout
    rows, records = read_results(out)
    assert len(rows) == 1 + 4 and len(records) == 4
    shown = str(images) + "/sm\\xffear.jpg"  # as `ls -b` shows it
    assert sum(r.startswith(shown + ",") for r in rows) == 1 and sum(r["image"] == shown for r in records) == 1
    assert os.path.exists(out / os.path.basename(odd))  # the annotated image keeps the name's bytes
    assert shown in stdout


def test_a_second_detect_into_a_folder_another_is_writing_is_refused(world, images, tmp_path, monkeypatch, capsys):
    import fcntl
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running detect.py holds it
        code, _, err = cli("detect", [images, "--checkpoint", world / "checkpoint.pt", "--output-dir", out,
                                      "--device", "cpu"], monkeypatch, capsys)
        assert_one_line_error(code, err, "detect", [f"--output-dir {out}: another detect.py is writing there"])
        assert os.listdir(out) == []
    finally:
        os.close(fd)
    for _ in range(2):  # released at the end of a run: the next one writes there
        code, _, err = cli("detect", [images, "--checkpoint", world / "checkpoint.pt", "--output-dir", out,
                                      "--device", "cpu"], monkeypatch, capsys)
        assert code == 0, err


def test_a_file_name_with_a_newline_stays_on_one_line(world, images, tmp_path, monkeypatch, capsys):
    bad = images / "not\nan image.jpg"
    bad.write_text("text")
    status, stdout, err = cli("detect", [images, "--checkpoint", world / "checkpoint.pt", "--output-dir",
                                         tmp_path / "out", "--device", "cpu"], monkeypatch, capsys)
    assert status == 1 and err.strip().splitlines() == [
        f"detect.py: error: {images}/not\\x0aan image.jpg: cannot read image (UnidentifiedImageError: cannot "
        f"identify image file {str(bad)!r})".replace("\n", "\\x0a")]
    assert len(stdout.strip().splitlines()) == 1 + 4 + 1  # header, the four images, the summary


def test_second_run_into_an_output_folder_inside_the_inputs_skips_it(world, images, monkeypatch, capsys):
    argv = [images, "--checkpoint", world / "checkpoint.pt", "--output-dir", images / "detections", "--device", "cpu"]
    for _ in range(2):
        status, _, err = cli("detect", argv, monkeypatch, capsys)
        assert status == 0, err
        rows, _ = read_results(images / "detections")
        assert len(rows) == 1 + 4  # not the annotated images of the first run


def test_a_folder_named_counts_csv_in_the_output_is_one_line(world, images, tmp_path, monkeypatch, capsys):
    (tmp_path / "out" / "counts.csv").mkdir(parents=True)
    status, _, err = cli("detect", [images, "--checkpoint", world / "checkpoint.pt", "--output-dir", tmp_path / "out",
                                    "--device", "cpu"], monkeypatch, capsys)
    assert_one_line_error(status, err, "detect", ["--output-dir", "cannot write", "counts.csv"])


@pytest.mark.parametrize("inputs", ["{root}/file", "{root}/fifo"], ids=["no-readable-image", "input-is-a-pipe"])
def test_a_failed_detect_run_creates_no_output_folder(inputs, world, tmp_path, monkeypatch, capsys):
    """Found when the inputs are read, after the output folder was checked (without creating it)."""
    code, _, err = cli("detect", fill([inputs, "--checkpoint", world / "checkpoint.pt", "--device", "cpu",
                                       "--output-dir", tmp_path / "new" / "out"], world), monkeypatch, capsys)
    assert code == 1 and "Traceback" not in err
    assert not (tmp_path / "new").exists()


def test_detect_replaces_links_in_the_output_folder_not_what_they_point_to(world, images, tmp_path, monkeypatch,
                                                                          capsys):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    for name in ("counts.csv", "detections.json", "smear0.jpg"):
        (elsewhere / name).write_text("not to be overwritten\n")
        (out / name).symlink_to(elsewhere / name)
    status, _, err = cli("detect", [images, "--checkpoint", world / "checkpoint.pt", "--output-dir", out, "--device",
                                    "cpu"], monkeypatch, capsys)  # smear0.jpg there: not written by detect.py
    assert_one_line_error(status, err, "detect", ["smear0.jpg is there and no earlier detect.py wrote it"])
    earlier = '[\n{"image": "in/smear0.jpg", "output": "smear0.jpg"}'  # a killed run's, without its ]
    (elsewhere / "earlier.json").write_text(earlier)  # now smear0.jpg is an earlier run's: it may be replaced
    (out / "detections.json").unlink()
    (out / "detections.json").symlink_to(elsewhere / "earlier.json")
    status, _, err = cli("detect", [images, "--checkpoint", world / "checkpoint.pt", "--output-dir", out, "--device",
                                    "cpu"], monkeypatch, capsys)
    assert status == 0, err
    assert (elsewhere / "earlier.json").read_text() == earlier and not (out / "detections.json").is_symlink()
    for name in ("counts.csv", "smear0.jpg"):
        assert (elsewhere / name).read_text() == "not to be overwritten\n"
        assert not (out / name).is_symlink()
    rows, records = read_results(out)
    assert len(rows) == 1 + 4 and len(records) == 4
    assert Image.open(out / "smear0.jpg").size == Image.open(images / "smear0.jpg").size
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_an_annotated_image_that_cannot_be_written_is_said_and_its_counts_kept(world, images, tmp_path, monkeypatch,
                                                                             capsys):
    out = tmp_path / "out"
    (out / "smear1.jpg").mkdir(parents=True)  # a folder where the annotated image goes, which an earlier run
    (out / "detections.json").write_text('[{"output": "smear1.jpg"}]')  # says it wrote (so it may be replaced)
    status, _, err = cli("detect", [images, "--checkpoint", world / "checkpoint.pt", "--output-dir", out, "--device",
                                    "cpu"], monkeypatch, capsys)
    assert status == 1 and "Traceback" not in err
    assert err.strip().splitlines() == [f"detect.py: error: the annotated image {out / 'smear1.jpg'}: cannot write (Is a "
                                        f"directory); the earlier file is kept"]
    rows, records = read_results(out)
    assert len(rows) == 1 + 4 and len(records) == 4  # counted all the same
    assert (out / "smear1.jpg").is_dir() and not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_a_full_disk_is_one_line_and_never_a_truncated_file(world, images, tmp_path, monkeypatch, capsys):
    """PIL's encoders and torch's writer do not say when a write falls short; every file goes through Python's,
    which raises: here onto /dev/full (every write: no space left), and the earlier file is kept."""
    import builtins
    import misc
    (tmp_path / "disk").mkdir()
    target = tmp_path / "disk" / "kept.jpg"
    target.write_bytes(b"an earlier file")
    monkeypatch.setattr(misc, "open", lambda path, mode="r", **kw: builtins.open("/dev/full", mode, **kw),
                        raising=False)
    for save in (lambda: misc.save_image_atomic(Image.new("RGB", (64, 48)), str(target), quality=90),
                 lambda: misc.save_atomic({"weights": torch.zeros(1000)}, str(target))):
        with pytest.raises(misc.UserError, match=r"No space left on device\); the earlier file is kept"):
            save()
        assert target.read_bytes() == b"an earlier file" and os.listdir(tmp_path / "disk") == ["kept.jpg"]
    monkeypatch.undo()

    out = tmp_path / "out"  # counts.csv on a full disk after the first image: one line, the first image's row kept
    add = detect.Results.add

    def add_then_fill(self, *args):
        if self.n == 1:
            self.counts = open("/dev/full", "w")
            self.csv = detect.csv.writer(self.counts, lineterminator="\n")
        return add(self, *args)

    monkeypatch.setattr(detect.Results, "add", add_then_fill)
    code, _, err = cli("detect", [images, "--checkpoint", world / "checkpoint.pt", "--output-dir", out, "--device",
                                  "cpu"], monkeypatch, capsys)
    assert_one_line_error(code, err, "detect", ["counts.csv", "No space left on device", "the first 1 image(s)"])
    rows, records = read_results(out)
    assert len(rows) == 1 + 1 and len(records) == 1


def test_sigterm_to_the_process_group_stops_detect_and_its_workers_in_one_line(world, tmp_path):
    """A container's stop or a job scheduler signals every process of the group, DataLoader workers too: they
    leave it to the main process (a worker killed by it was a traceback, and the results were not closed)."""
    import signal
    import subprocess
    folder = tmp_path / "many"
    folder.mkdir()
    source = Image.open(world / "voc" / "JPEGImages" / "BloodImage_00004.jpg")
    for i in range(60):
        source.save(folder / f"smear{i:02d}.jpg")
    out = tmp_path / "out"
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "detect.py")
    p = subprocess.Popen([sys.executable, script, str(folder), "--checkpoint", str(world / "checkpoint.pt"),
                          "--output-dir", str(out), "--device", "cpu", "--workers", "1"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        p.stdout.readline()  # the header
        assert "smear00.jpg" in p.stdout.readline()  # the first image counted: the worker runs
        os.killpg(p.pid, signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 143 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("detect.py: terminated after ")
    rows, records = read_results(out)
    assert len(rows) - 1 == len(records) >= 1


def test_a_process_that_exits_with_a_loader_still_open_does_not_wait_for_its_workers():
    """At exit, multiprocessing terminates the DataLoader workers still running (SIGTERM) and waits for them: a
    worker that ignored SIGTERM made that wait last for ever."""
    import subprocess
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from torch.utils.data import DataLoader; "
            "from misc import ignore_stop_signals; "
            "it = iter(DataLoader(range(100), num_workers=1, worker_init_fn=ignore_stop_signals)); next(it)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code, root], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr


# ---------------------------------------------------------------------------------------------
# the Python API: a wrong kind of argument is a TypeError, a value out of range a UserError, each saying which
# ---------------------------------------------------------------------------------------------

API = [
    ("image-is-a-path", lambda m, im: detect.detect_image("smear.jpg", m), TypeError, "a PIL image"),
    ("image-is-a-tensor", lambda m, im: detect.detect_image(torch.zeros(3, 10, 10), m), TypeError, "a PIL image"),
    ("image-is-empty", lambda m, im: detect.detect_image(Image.new("RGB", (0, 0)), m), detect.UserError,
     "an empty image"),
    ("model-is-a-path", lambda m, im: detect.detect(im, model="checkpoint.pt"), TypeError, "load_model()"),
    ("min-score-nan", lambda m, im: detect.detect_image(im, m, min_score=float("nan")), detect.UserError,
     "min_score must lie in [0, 1)"),
    ("min-score-2-of-3", lambda m, im: detect.detect_image(im, m, min_score=[0.1, 0.2]), detect.UserError,
     "one per class"),
    ("min-score-text", lambda m, im: detect.detect_image(im, m, min_score="0.3"), TypeError, "min_score"),
    ("max-overlap-5", lambda m, im: detect.detect_image(im, m, max_overlap=5), detect.UserError, "max_overlap"),
    ("top-k-negative", lambda m, im: detect.detect_image(im, m, top_k=-5), detect.UserError, "top_k"),
    ("top-k-none", lambda m, im: detect.detect_image(im, m, top_k=None), detect.UserError, "top_k"),
    ("batch-size-0", lambda m, im: detect.detect_image(im, m, batch_size=0), detect.UserError, "batch_size"),
    ("amp-text", lambda m, im: detect.detect_image(im, m, amp="no"), TypeError, "amp"),
    ("tile-0x0", lambda m, im: detect.detect_image(im, m, tile=(0, 0)), detect.UserError, "--tile"),
    ("device-nonsense", lambda m, im: detect.load_model(m.source, device="gpu7"), detect.UserError, "gpu7"),
    ("checkpoint-missing", lambda m, im: detect.load_model(m.source + ".none"), detect.UserError,
     "no such checkpoint file"),
]


def test_python_api_takes_numpy_numbers(world):
    import numpy as np
    model = detect.load_model(world / "checkpoint.pt")
    image = Image.new("RGB", (64, 48))
    expected = detect.detect_image(image, model, min_score=0.3, max_overlap=0.5, top_k=50, batch_size=2)
    got = detect.detect_image(image, model, min_score=np.float32(0.3), max_overlap=np.float64(0.5),
                              top_k=np.int64(50), batch_size=np.int32(2))
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    got = detect.detect_image(image, model, min_score=[np.float32(0.3)] * 3, max_overlap=0.5, top_k=50, batch_size=2)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


@pytest.mark.parametrize("case, call, error, says", API, ids=[c[0] for c in API])
def test_python_api(case, call, error, says, world):
    model = detect.load_model(world / "checkpoint.pt")
    model.source = str(world / "checkpoint.pt")
    with pytest.raises(error) as e:
        call(model, Image.new("RGB", (64, 48)))
    assert says in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("key, value, says", [("tta", ["h"], "test-time augmentation is one of"),
                                              ("tta", {"h": 1}, "test-time augmentation is one of"),
                                              ("args", [1, 2], "its 'args' (the train.py arguments) must be a dict")],
                         ids=["tta-list", "tta-dict", "args-list"])
def test_a_checkpoint_with_a_field_of_the_wrong_type_is_one_line(key, value, says, world, images, tmp_path,
                                                                  monkeypatch, capsys):
    ckpt = torch.load(world / "checkpoint.pt", weights_only=True)
    torch.save({**ckpt, key: value}, tmp_path / "odd.pt")
    code, _, err = cli("detect", [images, "--checkpoint", tmp_path / "odd.pt", "--output-dir", tmp_path / "out",
                                  "--device", "cpu"], monkeypatch, capsys)
    assert_one_line_error(code, err, "detect", ["odd.pt", says])
    assert not (tmp_path / "out").exists()


def test_a_damaged_detections_json_in_the_output_folder_is_no_traceback(world, images, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "detections.json").write_text("[" * 100_000 + "]" * 100_000)  # deeper than Python's stack
    assert detect.earlier_outputs(out) == set()
    (out / "detections.json").write_text('[{"output": ["a.jpg"]}, {"output": 5}, "x", {"output": "smear9.jpg"}]')
    assert detect.earlier_outputs(out) == {"smear9.jpg"}
    code, _, err = cli("detect", [images, "--checkpoint", world / "checkpoint.pt", "--output-dir", out, "--device",
                                  "cpu"], monkeypatch, capsys)
    assert code == 0, err
    assert len(read_results(out)[1]) == 4


def test_an_image_too_large_to_save_as_jpeg_is_counted_and_said(world, tmp_path, monkeypatch, capsys):
    """A PNG named .jpg, wider than JPEG's 65,535 px: its annotated copy cannot be a JPEG; its counts are kept."""
    (tmp_path / "in").mkdir()
    Image.new("RGB", (70000, 8)).save(tmp_path / "in" / "wide.jpg", format="PNG")
    out = tmp_path / "out"
    code, _, err = cli("detect", [tmp_path / "in", "--checkpoint", world / "checkpoint.pt", "--output-dir", out,
                                  "--device", "cpu", "--tile", "off"], monkeypatch, capsys)
    assert_one_line_error(code, err, "detect", ["wide.jpg: cannot encode the image"])
    assert len(read_results(out)[1]) == 1 and not (out / "wide.jpg").exists()


def test_an_image_that_needs_too_many_windows_is_refused_not_run_out_of_memory(world, tmp_path, monkeypatch, capsys):
    tiles = detect.tiling(detect.BCCD_FIELD, "auto", 0.1)
    with pytest.raises(detect.UserError, match=r"4000x3000 px would be cut into [\d,]+ windows of 64x48 px, more than"):
        detect.tile_windows(4000, 3000, tiles)
    assert len(detect.tile_windows(1000, 800, tiles)) <= detect.MAX_WINDOWS
    (tmp_path / "in").mkdir()
    Image.new("RGB", (4000, 3000)).save(tmp_path / "in" / "scan.png")
    code, _, err = cli("detect", [tmp_path / "in", "--checkpoint", world / "checkpoint.pt", "--output-dir",
                                  tmp_path / "out", "--device", "cpu", "--scale", "0.1"], monkeypatch, capsys)
    assert_one_line_error(code, err, "detect", ["scan.png: 4000x3000 px would be cut into", "--tile off"])
    assert not (tmp_path / "out").exists()


def test_a_damaged_download_is_one_line(world, tmp_path, monkeypatch, capsys):
    import zipfile
    archive = tmp_path / "bccd.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("BCCD/Annotations/a.xml", os.urandom(20000).hex())
    data = bytearray(archive.read_bytes())
    data[100:400] = bytes(b ^ 0xFF for b in data[100:400])  # the compressed stream, not the directory at the end
    archive.write_bytes(bytes(data))
    code, _, err = cli("create_data_lists", ["--download", "--url", archive.as_uri(), "--data-folder",
                                             tmp_path / "BCCD", "--output-folder", tmp_path / "lists"],
                       monkeypatch, capsys)
    assert_one_line_error(code, err, "create_data_lists", ["bccd.zip: cannot unpack the download"])
    assert not (tmp_path / "BCCD").exists() and not (tmp_path / "lists").exists()


def test_linked_folders_are_searched_once_and_a_loop_ends(world, tmp_path):
    """detect.py's inputs: a link to a folder elsewhere is searched; a link back up the tree (a loop) and a second
    link to the same folder are not searched again."""
    image = sorted((world / "voc" / "JPEGImages").iterdir())[0]
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(image, tmp_path / "elsewhere" / "b.jpg")
    top = tmp_path / "smears"
    (top / "day1").mkdir(parents=True)
    shutil.copy(image, top / "day1" / "a.jpg")
    (top / "day2").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (top / "day2-again").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (top / "day1" / "up").symlink_to(top, target_is_directory=True)  # a loop
    paths, missing, repeats = detect.find_images([top])
    assert [Path(p).relative_to(top).as_posix() for p in paths] == ["day1/a.jpg", "day2/b.jpg"]
    assert (missing, repeats) == ([], 0)


def test_outputs_that_are_inputs_links_or_pipes_are_refused_before_any_work(world, tmp_path, monkeypatch, capsys):
    """eval.py's --output on an OpenVINO export's .bin; a pipe named detections.json in detect.py's --output-dir
    (open() would wait for ever); a link to nothing as --plots or --output-dir. (plots.py's --output on one of its
    logs: tests/test_plots.py; a link as train.py's log.jsonl: tests/test_train.py.)"""
    (tmp_path / "m.xml").write_text("<net/>")
    (tmp_path / "m.bin").write_bytes(b"weights")
    code, _, err = cli("eval", ["--checkpoint", tmp_path / "m.xml", "--data-folder", world / "lists", "--output",
                                tmp_path / "m.bin"], monkeypatch, capsys)
    assert_one_line_error(code, err, "eval", ["m.bin", "which this run reads"])
    assert (tmp_path / "m.bin").read_bytes() == b"weights"
    (tmp_path / "fifo-json").mkdir()
    os.mkfifo(tmp_path / "fifo-json" / "detections.json")
    image = sorted((world / "voc" / "JPEGImages").iterdir())[0]
    code, _, err = cli("detect", [image, "--checkpoint", world / "checkpoint.pt", "--output-dir",
                                  tmp_path / "fifo-json", "--device", "cpu"], monkeypatch, capsys)
    assert_one_line_error(code, err, "detect", ["detections.json", "not a regular file"])
    (tmp_path / "nowhere").symlink_to(tmp_path / "gone" / "plots")
    for script, argv in (("detect", [image, "--checkpoint", world / "checkpoint.pt", "--output-dir",
                                     tmp_path / "nowhere"]),
                         ("eval", ["--checkpoint", world / "checkpoint.pt", "--data-folder", world / "lists",
                                   "--plots", tmp_path / "nowhere"])):
        monkeypatch.setattr(detect, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
        monkeypatch.setattr(eval_script, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
        code, _, err = cli(script, argv, monkeypatch, capsys)
        assert_one_line_error(code, err, script, ["nowhere", "a link to nothing"])


def test_counts_csv_keeps_a_formula_as_text():
    assert detect.spreadsheet_text('=HYPERLINK("http://x","y").jpg') == '\'=HYPERLINK("http://x","y").jpg'
    assert [detect.spreadsheet_text(t) for t in ("+1.jpg", "-a.jpg", "@b.jpg", "\tc.jpg", "a=b.jpg")] == [
        "'+1.jpg", "'-a.jpg", "'@b.jpg", "'\tc.jpg", "a=b.jpg"]


def test_create_data_lists_finds_damaged_images_split_files_that_are_not_files_and_drops_twice_annotated_cells(
        tmp_path, monkeypatch, capsys):
    voc = make_voc(tmp_path / "voc", n_trainval=3, n_test=1, objects={"BloodImage_00000": [
        {"name": "RBC", "box": [2, 2, 20, 20]}, {"name": "RBC", "box": [2, 2, 20, 20]},
        {"name": "WBC", "box": [2, 2, 20, 20]}]})
    code, out, err = cli("create_data_lists", ["--data-folder", voc, "--output-folder", tmp_path / "lists"],
                         monkeypatch, capsys)
    assert code == 0 and "dropped object 1 (RBC box" in out + err, out + err
    objects = json.loads((tmp_path / "lists" / "TRAIN_objects.json").read_text())[0]
    assert objects["boxes"] == [[2, 2, 20, 20]] * 2 and objects["labels"] == [1, 2]  # RBC once, WBC kept
    jpeg = voc / "JPEGImages" / "BloodImage_00001.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:-200])  # the header is whole; the pixels are cut short
    code, _, err = cli("create_data_lists", ["--data-folder", voc, "--output-folder", tmp_path / "lists2"],
                       monkeypatch, capsys)
    assert_one_line_error(code, err, "create_data_lists", ["BloodImage_00001.jpg", "not a readable image", "truncated"])
    with open(voc / "Annotations" / "BloodImage_00002.xml", "r+b") as f:
        f.truncate(65 << 20)  # sparse: no disk used
    code, _, err = cli("create_data_lists", ["--data-folder", voc, "--output-folder", tmp_path / "lists2"],
                       monkeypatch, capsys)
    assert_one_line_error(code, err, "create_data_lists", ["BloodImage_00002.xml", "too large for an annotation"])
    shutil.rmtree(voc / "ImageSets")
    (voc / "ImageSets" / "Main" / "trainval.txt").mkdir(parents=True)
    os.mkfifo(voc / "ImageSets" / "Main" / "test.txt")
    code, _, err = cli("create_data_lists", ["--data-folder", voc, "--output-folder", tmp_path / "lists3",
                                             "--test-fraction", "0.5"], monkeypatch, capsys)
    assert_one_line_error(code, err, "create_data_lists", ["trainval.txt: not a regular file"])
    (voc / "ImageSets" / "Main" / "trainval.txt").rmdir()
    code, _, err = cli("create_data_lists", ["--data-folder", voc, "--output-folder", tmp_path / "lists3",
                                             "--test-fraction", "0.5"], monkeypatch, capsys)
    assert_one_line_error(code, err, "create_data_lists", ["test.txt: not a regular file"])
