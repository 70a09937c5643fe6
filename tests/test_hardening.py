"""Hostile and careless inputs at every entry point: each is one line on stderr, a non-zero exit status and no
traceback, checked before long work where it can be, and what earlier runs wrote survives.

    python -m pytest tests/test_hardening.py -q

Each script's command line runs in this process as `python <script>.py ...` would (misc.run_cli with sys.argv
set): the exit status and stderr are those a user sees, without the seconds a fresh Python and torch cost.
One table per entry point: (case, command line, the message's words, files it must leave as they were).
"""
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bench
import create_data_lists
import detect
import eval as eval_script
from conftest import REPO, child_env, make_voc
from create_data_lists import create_data_lists as make_lists
from misc import ignore_stop_signals, iterate, run_cli

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
    (root / "blocked").mkdir()  # lists whose label_map.json is a folder: no list may be replaced
    for name in ("TRAIN_images.json", "TRAIN_objects.json", "TEST_images.json", "TEST_objects.json"):
        (root / "blocked" / name).write_bytes((root / "lists" / name).read_bytes())
    (root / "blocked" / "label_map.json").mkdir()
    damaged_lists(root)
    for name in ("eval.json", "bench.json"):
        (root / name).write_text('{"earlier": true}\n')
    (root / "out").mkdir()
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
    copy("folder-as-image", lambda lists: lists["TEST_images.json"].__setitem__(0, str(root / "lists")))
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
    ("image-missing", ["--data-folder", "{root}/missing-image"], ["moved.jpg", "not found (moved or deleted?)"]),
    ("image-a-folder", ["--data-folder", "{root}/folder-as-image"], ["lists: image of TEST_images.json not a regular "
                                                                      "file"]),
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


# the contract as commands, once per script: a fresh Python, status 1, one line on stderr and nothing else, no
# traceback (the tables above run the same run_cli in this process); eval.py's is a checkpoint carrying code
COMMANDS = [
    ("create_data_lists", ["--data-folder", "{root}/nowhere", "--output-folder", "{root}/lists"], ["BCCD not found"]),
    ("eval", EVAL_BASE + ["--checkpoint", "{root}/code.pt"], ["code.pt: refused", "could run code"]),
    ("detect", ["--min-score", "0.5", "{root}/none.jpg", "--checkpoint", "{root}/none.pt"], ["none.pt: no such checkpoint"]),
    ("bench", ["--device", "cpu", "--data-folder", "{root}/lists", "--only", "parts", "--json", "{root}/bench.json",
               "--iters", "0"], ["--iters"]),
]


class CreatesFileWhenUnpickled:
    """Unpickling this object calls open(path, "w"): a loader that runs pickled code creates the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture(scope="module")
def commands(world):
    """{script: its CompletedProcess} of COMMANDS, each `python script.py argv` in a fresh Python, all started at once
    (on 2 cores, half the time of one by one); eval.py's checkpoint carries code."""
    ckpt = torch.load(world / "checkpoint.pt", weights_only=True)
    torch.save({**ckpt, "extra": CreatesFileWhenUnpickled(world / "marker")}, world / "code.pt")
    started = {script: subprocess.Popen([sys.executable, str(REPO / f"{script}.py"), *map(str, fill(argv, world))],
                                        cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True) for script, argv, _ in COMMANDS}
    try:
        outputs = {script: p.communicate(timeout=120) for script, p in started.items()}
        yield {script: subprocess.CompletedProcess(p.args, p.returncode, *outputs[script]) for script, p in started.items()}
    finally:
        for p in started.values():
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.parametrize("script, argv, says", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_a_user_error_as_a_command_is_one_line_and_status_1(script, argv, says, world, commands):
    result = commands[script]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"{script}.py: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert all(w in result.stderr for w in says), result.stderr
    assert not (world / "marker").exists(), "loading the checkpoint ran the code it carries"




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


def test_create_data_lists_finds_damaged_images_split_files_that_are_not_files_and_drops_twice_annotated_cells(
        tmp_path, monkeypatch, capsys):
    voc = make_voc(tmp_path / "voc", n_trainval=3, n_test=1, objects={"BloodImage_00000": [
        {"name": "RBC", "box": [2, 2, 20, 20]}, {"name": "RBC", "box": [2, 2, 20, 20]},
        {"name": "WBC", "box": [2, 2, 20, 20]}]})
    code, out, err = cli("create_data_lists", ["--data-folder", voc, "--output-folder", tmp_path / "lists"],
                         monkeypatch, capsys)
    assert code == 0 and "dropped object 1 (RBC), box" in out + err, out + err
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


class FailsAtTwo(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        if i == 2:
            raise ValueError("image 2 cannot be read")
        return i


@pytest.mark.parametrize("stop", ["a worker's error", "close"])
def test_a_loader_stopped_early_frees_its_workers_at_once(stop):
    """misc.iterate (eval.py, train.py, detect.py): the workers are shut down when the iteration stops, not when the
    garbage collector gets to the iterator, which waits torch's 5-second join timeout (a bad image held eval.py and
    train.py 5 s before they could exit, and the next test here 5 s)."""
    batches = iterate(torch.utils.data.DataLoader(FailsAtTwo(), num_workers=1, worker_init_fn=ignore_stop_signals))
    if stop == "close":
        assert next(batches).tolist() == [0]
        batches.close()
    else:
        with pytest.raises(ValueError, match="image 2 cannot be read"):
            list(batches)
    start = time.perf_counter()
    gc.collect()
    assert time.perf_counter() - start < 2
