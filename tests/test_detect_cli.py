"""detect.py's command line: its flags, the output folder it writes as it goes (files.py), and runs that stop.

    python -m pytest tests/test_detect_cli.py -q

Hostile and careless inputs are each one line on stderr, a non-zero exit status and no traceback, checked before
the model runs where they can be, and what earlier runs wrote survives. The command runs in this process as
`python detect.py ...` would (conftest's run_main: misc.run_cli with sys.argv set), or as a command where only a
separate process shows it (signals). The model is conftest's untrained SSD300 on the tiny generated images.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import detect
import files
import misc
from conftest import make_voc
from misc import Terminated, UserError
from tiling import BCCD_FIELD, MAX_WINDOWS, tile_windows, tiling
from utils import bccd_labels


@pytest.fixture(scope="module")
def world(tmp_path_factory, untrained_checkpoint):
    """A tiny VOC dataset, a random checkpoint, a file, a pipe, and output folders with something in the way."""
    root = tmp_path_factory.mktemp("detect-cli")
    make_voc(root / "voc", n_trainval=4, n_test=2)
    shutil.copy(untrained_checkpoint, root / "checkpoint.pt")  # conftest's untrained SSD300
    (root / "file").write_text("a file where a folder should be\n")
    os.mkfifo(root / "fifo")  # as a device such as /dev/full: os.replace would put a regular file in its place
    (root / "fifo-out").mkdir()
    os.mkfifo(root / "fifo-out" / "counts.csv")
    (root / "out").mkdir()
    (root / "out" / "counts.csv").write_text("image,RBC,WBC,Platelets\nearlier.jpg,1,2,3\n")
    (root / "thumbs-out").mkdir()  # report.html's thumbnails folder: a file, or holding a file of someone else's
    (root / "thumbs-out" / "thumbnails").write_text("a file where a folder should be\n")
    (root / "foreign-thumbs" / "thumbnails").mkdir(parents=True)
    (root / "foreign-thumbs" / "thumbnails" / "BloodImage_00002.jpg.jpg").write_text("a user's file\n")
    (root / "report-out" / "report.html").mkdir(parents=True)
    return root


@pytest.fixture
def detect_cli(run_main):
    """detect_cli(argv) -> (exit status, stdout, stderr) of `python detect.py argv`, run in this process."""
    def run(argv):
        result = run_main("detect.py", *argv)
        return result.returncode, result.stdout, result.stderr
    return run


def assert_one_line_error(code, err, script, says):
    """Status 1, one line on stderr, `script.py: error: ` and the words `says`, no traceback."""
    assert code == 1 and "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith(f"{script}.py: error: ") and all(w in err for w in says), err


def fill(argv, root):
    return [str(a).format(root=root) for a in argv]


def snapshot(paths):
    return {p: (p.read_bytes() if p.is_file() else None) for p in paths}


# ---------------------------------------------------------------------------------------------
# flags and output folders refused before any work
# ---------------------------------------------------------------------------------------------

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


@pytest.mark.parametrize("case, argv, says", DETECT, ids=[c[0] for c in DETECT])
def test_detect(case, argv, says, world, detect_cli, monkeypatch):
    kept = snapshot([world / "out" / "counts.csv"])
    inputs = [a for a in argv if not a.startswith("--")] if not argv[0].startswith("--") else DETECT_BASE[:1]
    argv = argv if argv[0].startswith("--") else []
    code, _, err = detect_cli(fill(inputs + DETECT_BASE[1:] + argv, world))
    assert_one_line_error(code, err, "detect", says)
    assert snapshot([world / "out" / "counts.csv"]) == kept  # nothing was detected: the earlier results stay
    assert sorted(os.listdir(world / "out")) == ["counts.csv"]


def test_min_score_per_class_by_name_after_the_flags_come_the_inputs(world, images, tmp_path, detect_cli, monkeypatch):
    """--min-score takes one word: the inputs after it are inputs. Named classes get their value, the others keep
    the model's (the untrained checkpoint records none: the tutorial's 0.2)."""
    out = tmp_path / "out"
    for value, shown in (("0.5", "0.5"), ("WBC=0.9", "RBC=0.2,WBC=0.9,Platelets=0.2")):
        code, stdout, err = detect_cli(["--min-score", value, images, "--checkpoint", world / "checkpoint.pt",
                                        "--output-dir", out, "--device", "cpu"])
        assert code == 0, err
        assert "4 image(s) in" in stdout and f"at min_score {shown}, max_overlap 0.5;" in stdout, stdout
        records = json.loads((out / "detections.json").read_text())
        assert len(records) == 4
        floor = {"RBC": 0.2, "WBC": 0.9, "Platelets": 0.2} if "=" in value else dict.fromkeys(bccd_labels, 0.5)
        assert all(s > floor[l] for r in records for l, s in zip(r["labels"], r["scores"]))


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


def test_the_precision_is_in_every_output(world, images, tmp_path, detect_cli):
    """The summary, each record of detections.json and report.html say how the detections were computed: bf16 or
    fp32 as the flag says, or by misc.bf16_choice's rule for this CPU."""
    default, why = misc.bf16_choice(torch.device("cpu"))
    for flags, precision, because in (([], "bf16" if default else "fp32", why), (["--no-amp"], "fp32", "--no-amp"),
                                      (["--amp"], "bf16", "--amp")):
        out = tmp_path / "-".join(["out", *flags])  # one image: bf16 is slow on a CPU without it
        code, stdout, err = detect_cli([images / "smear0.jpg", "--checkpoint", world / "checkpoint.pt", "--output-dir", out,
                                        "--device", "cpu", *flags])
        assert code == 0 and f"; precision {precision}; results in {out}" in stdout, err
        assert {r["precision"] for r in read_results(out)[1]} == {precision}
        page = (out / "report.html").read_text(encoding="utf-8")
        assert f"<tr><th>precision</th><td>{precision} ({because})</td></tr>" in page


@pytest.mark.parametrize("exception, code, says", [(KeyboardInterrupt, 130, "interrupted"),
                                                   (Terminated, 143, "terminated")], ids=["ctrl-c", "sigterm"])
def test_interrupted_detect_keeps_the_images_it_finished(exception, code, says, world, images, tmp_path, detect_cli,
                                                         monkeypatch):
    out = tmp_path / "out"
    stop_at_the_third_image(exception, monkeypatch)
    status, _, err = detect_cli([images, "--checkpoint", world / "checkpoint.pt", "--output-dir", out, "--device",
                                 "cpu"])
    assert status == code and "Traceback" not in err
    assert err.strip().splitlines() == [f"detect.py: {says} after 2 of 4 image(s); counts.csv and detections.json in "
                                        f"{out} hold those; the same command takes the run up where it stopped"]
    rows, records = read_results(out)
    assert rows[0] == "image,RBC,WBC,Platelets" and [r.split(",")[0] for r in rows[1:]] == \
        [str(images / "smear0.jpg"), str(images / "smear1.jpg")]
    assert [r["image"] for r in records] == [str(images / "smear0.jpg"), str(images / "smear1.jpg")]
    assert "ended early, after 2 of 4 images" in (out / "report.html").read_text(encoding="utf-8")
    monkeypatch.undo()
    status, stdout, err = detect_cli([images, "--checkpoint", world / "checkpoint.pt", "--output-dir", out,
                                      "--device", "cpu"])  # the same command: the two others are counted
    assert status == 0 and f"taking up the run stopped in {out}: 2 of 4 image(s) were counted" in stdout, err
    assert "2 image(s) (and 2 counted before) in" in stdout and stdout.count("smear") == 2
    rows, records = read_results(out)
    assert [r["image"] for r in records] == [str(images / f"smear{i}.jpg") for i in range(4)] and len(rows) == 1 + 4
    assert "done: 4 images" in (out / "report.html").read_text(encoding="utf-8")
    assert not (out / files.JOURNAL).exists()


def test_a_stopped_detect_never_replaces_an_earlier_whole_run(world, images, tmp_path, detect_cli, monkeypatch):
    """A whole run, then one stopped after two images: the first run's counts.csv, detections.json and report.html
    are kept, and the stopped run's are beside them (.partial); the next whole run replaces both."""
    out, first = tmp_path / "out", [images / "smear0.jpg", images / "smear1.jpg", images / "smear2.jpg"]
    command = ["--checkpoint", world / "checkpoint.pt", "--output-dir", out, "--device", "cpu"]
    status, _, err = detect_cli([*first, *command])
    assert status == 0, err
    whole = snapshot([out / "counts.csv", out / "detections.json", out / "report.html"])
    stop_at_the_third_image(Terminated, monkeypatch)
    status, _, err = detect_cli([images, *command, "--min-score", "0.5"])
    assert status == 143 and err.strip().splitlines() == [
        f"detect.py: terminated after 2 of 4 image(s); counts.partial.csv and detections.partial.json in {out} hold "
        f"those (the earlier run's counts.csv, detections.json and report.html are kept); the same command takes the "
        f"run up where it stopped"]
    assert snapshot([out / "counts.csv", out / "detections.json", out / "report.html"]) == whole
    assert len((out / "counts.partial.csv").read_text().splitlines()) == 1 + 2
    assert len(json.loads((out / "detections.partial.json").read_text())) == 2
    assert "ended early, after 2 of 4 images" in (out / "report.partial.html").read_text(encoding="utf-8")
    monkeypatch.undo()

    stopped = snapshot([out / name for name in os.listdir(out) if os.path.isfile(out / name)])
    status, _, err = detect_cli([images, *command])  # other settings: it is not taken up, and nothing changes
    assert_one_line_error(status, err, "detect", [f"--output-dir {out}: the run stopped there counted 2 image(s) "
                                                  f"with min_score [0.5, 0.5, 0.5], not [0.2, 0.2, 0.2]", "--no-resume"])
    assert snapshot([out / name for name in os.listdir(out) if os.path.isfile(out / name)]) == stopped
    status, _, err = detect_cli([images, *command, "--no-resume"])  # whole: it replaces the earlier run's
    assert status == 0, err
    rows, records = read_results(out)
    assert len(rows) == 1 + 4 and len(records) == 4
    assert not [n for n in os.listdir(out) if ".partial." in n or n.endswith(".tmp")]


@pytest.mark.parametrize("key, value, says", [("tta", ["h"], "test-time augmentation is one of"),
                                              ("tta", {"h": 1}, "test-time augmentation is one of"),
                                              ("args", [1, 2], "its 'args' (the train.py arguments) must be a dict")],
                         ids=["tta-list", "tta-dict", "args-list"])
def test_a_checkpoint_with_a_field_of_the_wrong_type_is_one_line(key, value, says, world, images, tmp_path,
                                                                  detect_cli):
    ckpt = torch.load(world / "checkpoint.pt", weights_only=True)
    torch.save({**ckpt, key: value}, tmp_path / "odd.pt")
    code, _, err = detect_cli([images, "--checkpoint", tmp_path / "odd.pt", "--output-dir", tmp_path / "out",
                               "--device", "cpu"])
    assert_one_line_error(code, err, "detect", ["odd.pt", says])
    assert not (tmp_path / "out").exists()


def test_output_names_are_distinct_whatever_the_inputs():
    long = "x" * 250
    paths = ["a/s.jpg", "b/s.jpg", "c/s_1.jpg", "d/S.JPG", "e/s.tif", "f/s.png", "g/counts.csv.png", f"h/{long}.jpg",
             f"i/{long}.jpg", os.fsdecode(b"j/s\xff.jpg"), os.fsdecode(b"k/s\xff.jpg"), "l/s_1.jpg"]
    names = files.output_names(paths)
    assert len({n.casefold() for n in names}) == len(paths)
    assert all(len(os.fsencode(n)) <= 255 for n in names)
    assert names[:6] == ["s.jpg", "s_1.jpg", "s_1_1.jpg", "S_2.jpg", "s.png", "s_1.png"]
    assert "counts.csv" not in names and "detections.json" not in names


def test_detect_names_any_bytes_and_counts_a_file_given_twice_once(world, images, tmp_path, detect_cli, monkeypatch):
    odd = Path(os.fsdecode(bytes(images) + b"/sm\xffear.jpg"))  # not UTF-8: Linux allows it
    (images / "smear0.jpg").rename(odd)
    out = tmp_path / "out"
    status, stdout, err = detect_cli([images, odd, images / "smear1.jpg", "--checkpoint", world / "checkpoint.pt",
                                      "--output-dir", out, "--device", "cpu"])
    assert status == 0, err
    assert "2 input file(s) given more than once; each is counted once" in stdout
    rows, records = read_results(out)
    assert len(rows) == 1 + 4 and len(records) == 4
    shown = str(images) + "/sm\\xffear.jpg"  # as `ls -b` shows it
    assert sum(r.startswith(shown + ",") for r in rows) == 1 and sum(r["image"] == shown for r in records) == 1
    assert os.path.exists(out / os.path.basename(odd))  # the annotated image keeps the name's bytes
    assert shown in stdout


def test_a_second_detect_into_a_folder_another_is_writing_is_refused(world, images, tmp_path, detect_cli, monkeypatch):
    import fcntl
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running detect.py holds it
        code, _, err = detect_cli([images, "--checkpoint", world / "checkpoint.pt", "--output-dir", out,
                                   "--device", "cpu"])
        assert_one_line_error(code, err, "detect", [f"--output-dir {out}: another detect.py is writing there"])
        assert os.listdir(out) == []
    finally:
        os.close(fd)
    for _ in range(2):  # released at the end of a run: the next one writes there
        code, _, err = detect_cli([images, "--checkpoint", world / "checkpoint.pt", "--output-dir", out,
                                   "--device", "cpu"])
        assert code == 0, err


def test_a_file_name_with_a_newline_stays_on_one_line(world, images, tmp_path, detect_cli, monkeypatch):
    bad = images / "not\nan image.jpg"
    bad.write_text("text")
    status, stdout, err = detect_cli([images, "--checkpoint", world / "checkpoint.pt", "--output-dir",
                                      tmp_path / "out", "--device", "cpu"])
    assert status == 1 and err.strip().splitlines() == [
        f"detect.py: error: {images}/not\\x0aan image.jpg: cannot read image (UnidentifiedImageError: cannot "
        f"identify image file)".replace("\n", "\\x0a")]  # PIL's message without the name it repeats
    assert len(stdout.strip().splitlines()) == 1 + 4 + 1  # header, the four images, the summary


def test_second_run_into_an_output_folder_inside_the_inputs_skips_it(world, images, detect_cli, monkeypatch):
    argv = [images, "--checkpoint", world / "checkpoint.pt", "--output-dir", images / "detections", "--device", "cpu"]
    for _ in range(2):
        status, _, err = detect_cli(argv)
        assert status == 0, err
        rows, _ = read_results(images / "detections")
        assert len(rows) == 1 + 4  # not the annotated images of the first run


def test_a_link_to_nothing_is_one_line_and_the_others_are_counted(world, images, tmp_path, detect_cli, monkeypatch):
    smears = tmp_path / "smears"
    shutil.copytree(images, smears)
    (smears / "gone.jpg").symlink_to(tmp_path / "moved.jpg")
    status, out, err = detect_cli([smears, "--checkpoint", world / "checkpoint.pt", "--output-dir", tmp_path / "out",
                                   "--device", "cpu"])
    assert status == 1 and err.strip().splitlines() == [
        f"detect.py: error: {smears}/gone.jpg: no such file (a link to {tmp_path}/moved.jpg)"]
    assert len(read_results(tmp_path / "out")[0]) == 1 + 4


def test_an_earlier_runs_output_inside_the_inputs_is_left_out_of_another_run(world, images, tmp_path, detect_cli,
                                                                              monkeypatch):
    smears = tmp_path / "smears"
    shutil.copytree(images, smears)
    argv = [smears, "--checkpoint", world / "checkpoint.pt", "--device", "cpu", "--output-dir"]
    status, _, err = detect_cli(argv + [smears / "det"])
    assert status == 0, err
    status, out, err = detect_cli(argv + [tmp_path / "other"])
    assert status == 0, err
    rows, _ = read_results(tmp_path / "other")
    assert len(rows) == 1 + 4  # the four smears, not the first run's annotated images and thumbnails
    assert f"note: left out 1 folder(s) holding detect.py's output (annotated images, not smears): {smears}/det" in out


def test_a_folder_named_counts_csv_in_the_output_is_one_line(world, images, tmp_path, detect_cli, monkeypatch):
    (tmp_path / "out" / "counts.csv").mkdir(parents=True)
    status, _, err = detect_cli([images, "--checkpoint", world / "checkpoint.pt", "--output-dir", tmp_path / "out",
                                 "--device", "cpu"])
    assert_one_line_error(status, err, "detect", ["--output-dir", "cannot write", "counts.csv"])


@pytest.mark.parametrize("inputs", ["{root}/file", "{root}/fifo"], ids=["no-readable-image", "input-is-a-pipe"])
def test_a_failed_detect_run_creates_no_output_folder(inputs, world, tmp_path, detect_cli, monkeypatch):
    """Found when the inputs are read, after the output folder was checked (without creating it)."""
    code, _, err = detect_cli(fill([inputs, "--checkpoint", world / "checkpoint.pt", "--device", "cpu",
                                    "--output-dir", tmp_path / "new" / "out"], world))
    assert code == 1 and "Traceback" not in err
    assert not (tmp_path / "new").exists()


def test_detect_replaces_links_in_the_output_folder_not_what_they_point_to(world, images, tmp_path, detect_cli,
                                                                          monkeypatch):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    for name in ("counts.csv", "detections.json", "smear0.jpg"):
        (elsewhere / name).write_text("not to be overwritten\n")
        (out / name).symlink_to(elsewhere / name)
    status, _, err = detect_cli([images, "--checkpoint", world / "checkpoint.pt", "--output-dir", out, "--device",
                                 "cpu"])  # smear0.jpg there: not written by detect.py
    assert_one_line_error(status, err, "detect", ["smear0.jpg is there and no earlier detect.py wrote it"])
    earlier = '[\n{"image": "in/smear0.jpg", "output": "smear0.jpg"}'  # a killed run's, without its ]
    (elsewhere / "earlier.json").write_text(earlier)  # now smear0.jpg is an earlier run's: it may be replaced
    (out / "detections.json").unlink()
    (out / "detections.json").symlink_to(elsewhere / "earlier.json")
    status, _, err = detect_cli([images, "--checkpoint", world / "checkpoint.pt", "--output-dir", out, "--device",
                                 "cpu"])
    assert status == 0, err
    assert (elsewhere / "earlier.json").read_text() == earlier and not (out / "detections.json").is_symlink()
    for name in ("counts.csv", "smear0.jpg"):
        assert (elsewhere / name).read_text() == "not to be overwritten\n"
        assert not (out / name).is_symlink()
    rows, records = read_results(out)
    assert len(rows) == 1 + 4 and len(records) == 4
    assert Image.open(out / "smear0.jpg").size == Image.open(images / "smear0.jpg").size
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_an_annotated_image_that_cannot_be_written_is_said_and_its_counts_kept(world, images, tmp_path, detect_cli,
                                                                             monkeypatch):
    out = tmp_path / "out"
    (out / "smear1.jpg").mkdir(parents=True)  # a folder where the annotated image goes, which an earlier run
    (out / "detections.json").write_text('[{"output": "smear1.jpg"}]')  # says it wrote (so it may be replaced)
    status, _, err = detect_cli([images, "--checkpoint", world / "checkpoint.pt", "--output-dir", out, "--device",
                                 "cpu"])
    assert status == 1 and "Traceback" not in err
    assert err.strip().splitlines() == [f"detect.py: error: the annotated image {out / 'smear1.jpg'}: cannot write (Is a "
                                        f"directory); the earlier file is kept"]
    rows, records = read_results(out)
    assert len(rows) == 1 + 4 and len(records) == 4  # counted all the same
    assert (out / "smear1.jpg").is_dir() and not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_a_full_disk_is_one_line_and_never_a_truncated_file(world, images, tmp_path, detect_cli, monkeypatch):
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
    add = files.Results.add

    def add_then_fill(self, *args):
        if self.n == 1:
            self.counts = open("/dev/full", "w")
            self.csv = files.csv.writer(self.counts, lineterminator="\n")
        return add(self, *args)

    monkeypatch.setattr(files.Results, "add", add_then_fill)
    code, _, err = detect_cli([images, "--checkpoint", world / "checkpoint.pt", "--output-dir", out, "--device",
                               "cpu"])
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


# ---------------------------------------------------------------------------------------------
# taking up a stopped run: kill -9 twice, a line cut short, other settings, other inputs
# ---------------------------------------------------------------------------------------------

SCRIPT = Path(__file__).resolve().parents[1] / "detect.py"


@pytest.fixture(scope="module")
def smears(tmp_path_factory):
    """12 small images of the tiny dataset, each other."""
    return make_voc(tmp_path_factory.mktemp("smears") / "voc", n_trainval=9, n_test=3) / "JPEGImages"


def killed_after(argv, rows, folder):
    """Run `python detect.py argv` and kill it (SIGKILL: no clean-up at all) once it has printed `rows` rows of
    counts (of images in `folder`): the images of those rows."""
    p = subprocess.Popen([sys.executable, str(SCRIPT), *map(str, argv)], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    printed = []
    try:
        while len(printed) < rows:
            line = p.stdout.readline()
            assert line, "detect.py ended before it was killed"
            printed += [line.split()[0]] if line.startswith(str(folder)) else []
    finally:
        p.kill()
        p.wait(timeout=60)
    return printed


def image_table(page):
    return page[page.index('<table id="images">'):page.index("</table>", page.index('<table id="images">'))]


def test_a_run_killed_twice_is_taken_up_and_ends_as_one_that_never_stopped(world, smears, tmp_path, detect_cli):
    command = [smears, "--checkpoint", world / "checkpoint.pt", "--device", "cpu", "--output-dir"]
    code, _, err = detect_cli([*command, tmp_path / "straight"])
    assert code == 0, err
    out = tmp_path / "out"
    first = killed_after([*command, out], 3, smears)
    record = files.read_record(out / files.JOURNAL)  # every line whole; the files as valid as ever
    assert 3 <= len(record) - 1 < 12 and [r["image"] for r in record[1:4]] == first
    rows = (out / "counts.csv").read_text().splitlines()
    assert rows[0] == "image,RBC,WBC,Platelets" and all(len(row.split(",")) == 4 for row in rows)
    assert len({row.split(",")[0] for row in rows[1:]} - {r["image"] for r in record[1:]}) <= 1  # the image being
    # written when killed: its row, and no line of the record yet (it is counted again)
    assert not (out / "detections.json").exists() and "in progress" in (out / "report.html").read_text()
    with open(out / files.JOURNAL, "a") as f:
        f.write('{"image": "' + str(smears / "BloodImage_00011.jpg"))  # a line that a kill cut short
    second = killed_after([*command, out], 3, smears)
    taken = files.read_record(out / files.JOURNAL)
    assert taken[:len(record)] == record and len(taken) - 1 >= len(record) - 1 + 3  # the first stop's kept, added to
    assert not set(second) & set(r["image"] for r in record[1:])  # and not counted again
    code, stdout, err = detect_cli([*command, out])
    assert code == 0 and f"{len(taken) - 1} of 12 image(s) were counted" in stdout, err
    assert not (out / files.JOURNAL).exists()
    for name in ["counts.csv", "detections.json", *(p.name for p in smears.iterdir()),
                 *(f"thumbnails/{p.name}.jpg" for p in smears.iterdir())]:
        assert (out / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name
    pages = [(folder / "report.html").read_text(encoding="utf-8") for folder in (out, tmp_path / "straight")]
    assert image_table(pages[0]) == image_table(pages[1]) and "done: 12 images" in pages[0]


def test_a_stopped_run_is_taken_up_only_with_its_inputs_and_settings(world, images, tmp_path, detect_cli,
                                                                    monkeypatch):
    out = tmp_path / "out"
    command = ["--checkpoint", world / "checkpoint.pt", "--device", "cpu", "--output-dir", out]
    stop_at_the_third_image(Terminated, monkeypatch)
    assert detect_cli([images, *command])[0] == 143
    monkeypatch.undo()
    stopped = snapshot([out / name for name in os.listdir(out) if os.path.isfile(out / name)])
    ckpt = torch.load(world / "checkpoint.pt", weights_only=True)
    torch.save({**ckpt, "count_thresholds": {"min_score": dict.fromkeys(bccd_labels, 0.2), "max_overlap": 0.5}},
               tmp_path / "same-thresholds.pt")  # another file: another model, though it counts the same
    for argv, says in (([images / "smear2.jpg", images / "smear3.jpg", *command],
                        [f"the run stopped there counted {images / 'smear0.jpg'}, which is not among this run's "
                         f"inputs", "--no-resume"]),
                       ([images, *command, "--checkpoint", tmp_path / "same-thresholds.pt"], ["with model_sha256"]),
                       ([images, *command, "--top-k", "20"], ["with top_k 200, not 20"]),
                       ([images, *command, "--tile", "off"], ["with tiling [[640, 480], 354, 8.0], not None"])):
        code, _, err = detect_cli(argv)
        assert_one_line_error(code, err, "detect", says)
        assert snapshot([out / name for name in os.listdir(out) if os.path.isfile(out / name)]) == stopped
    (out / files.JOURNAL).write_text('{"something": "else"}\n')
    code, _, err = detect_cli([images, *command])
    assert_one_line_error(code, err, "detect", [f"{files.JOURNAL} there is not detect.py's record", "--no-resume"])
    code, _, err = detect_cli([images, *command, "--no-resume"])  # counted again, whole
    assert code == 0 and len(read_results(out)[1]) == 4 and not (out / files.JOURNAL).exists(), err


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


def test_a_damaged_detections_json_in_the_output_folder_is_no_traceback(world, images, tmp_path, detect_cli, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "detections.json").write_text("[" * 100_000 + "]" * 100_000)  # deeper than Python's stack
    assert files.earlier_outputs(out) == set()
    (out / "detections.json").write_text('[{"output": ["a.jpg"]}, {"output": 5}, "x", {"output": "smear9.jpg"}]')
    assert files.earlier_outputs(out) == {"smear9.jpg"}
    code, _, err = detect_cli([images, "--checkpoint", world / "checkpoint.pt", "--output-dir", out, "--device",
                               "cpu"])
    assert code == 0, err
    assert len(read_results(out)[1]) == 4


def test_an_image_too_large_to_save_as_jpeg_is_counted_and_said(world, tmp_path, detect_cli, monkeypatch):
    """A PNG named .jpg, wider than JPEG's 65,535 px: its annotated copy cannot be a JPEG; its counts are kept."""
    (tmp_path / "in").mkdir()
    Image.new("RGB", (70000, 8)).save(tmp_path / "in" / "wide.jpg", format="PNG")
    out = tmp_path / "out"
    code, _, err = detect_cli([tmp_path / "in", "--checkpoint", world / "checkpoint.pt", "--output-dir", out,
                               "--device", "cpu", "--tile", "off"])
    assert_one_line_error(code, err, "detect", ["wide.jpg: cannot encode the image"])
    assert len(read_results(out)[1]) == 1 and not (out / "wide.jpg").exists()


def test_an_image_that_needs_too_many_windows_is_refused_not_run_out_of_memory(world, tmp_path, detect_cli, monkeypatch):
    tiles = tiling(BCCD_FIELD, "auto", 0.1)
    with pytest.raises(UserError, match=r"4000x3000 px would be cut into [\d,]+ windows of 64x48 px, more than"):
        tile_windows(4000, 3000, tiles)
    assert len(tile_windows(1000, 800, tiles)) <= MAX_WINDOWS
    (tmp_path / "in").mkdir()
    Image.new("RGB", (4000, 3000)).save(tmp_path / "in" / "scan.png")
    code, _, err = detect_cli([tmp_path / "in", "--checkpoint", world / "checkpoint.pt", "--output-dir",
                               tmp_path / "out", "--device", "cpu", "--scale", "0.1"])
    assert_one_line_error(code, err, "detect", ["scan.png: 4000x3000 px would be cut into", "--tile off"])
    assert not (tmp_path / "out").exists()


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
    paths, missing, repeats, outputs = files.find_images([top])
    assert [Path(p).relative_to(top).as_posix() for p in paths] == ["day1/a.jpg", "day2/b.jpg"]
    assert (missing, repeats, outputs) == ([], 0, [])


def test_counts_csv_keeps_a_formula_as_text():
    assert files.spreadsheet_text('=HYPERLINK("http://x","y").jpg') == '\'=HYPERLINK("http://x","y").jpg'
    assert [files.spreadsheet_text(t) for t in ("+1.jpg", "-a.jpg", "@b.jpg", "\tc.jpg", "a=b.jpg")] == [
        "'+1.jpg", "'-a.jpg", "'@b.jpg", "'\tc.jpg", "a=b.jpg"]


def test_detect_missing_input_is_named_on_one_line(untrained_checkpoint, tmp_path, capsys):
    missing = tmp_path / "no-such-smear.jpg"
    args = detect.get_args_parser().parse_args([str(missing), "--checkpoint", str(untrained_checkpoint), "--output-dir",
                                                str(tmp_path / "out"), "--device", "cpu", "--workers", "0"])
    with pytest.raises(UserError, match=f"^{re.escape(str(missing))}: no such file or folder$"):
        detect.main(args)  # nothing to detect: a user error before anything is written
    assert not (tmp_path / "out").exists()


def test_detect_refuses_to_overwrite_its_inputs(tmp_path, untrained_checkpoint):
    folder = tmp_path / "smears"
    folder.mkdir()
    Image.new("RGB", (64, 48), "white").save(folder / "a.jpg")
    before = (folder / "a.jpg").read_bytes()
    args = detect.get_args_parser().parse_args([str(folder), "--checkpoint", str(untrained_checkpoint), "--output-dir",
                                                str(folder), "--device", "cpu"])
    with pytest.raises(UserError, match="overwrite an input image"):
        detect.main(args)
    assert (folder / "a.jpg").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["a.jpg"]
