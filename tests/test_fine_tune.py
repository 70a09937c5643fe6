"""A lab's loop on its own microscope, end to end on a tiny generated dataset: train.py --fine-tune from the shipped
model on its corrected images, set_thresholds.py on the held-out ones, detect.py counting at those thresholds.

    python -m pytest tests/test_fine_tune.py -q

The commands run in this process (run_main), as `python <script> ...` would. The fine-tune is cut to 2 steps of 2
images (--iterations 2 --batch-size 2); every other flag is the preset's (tests/test_train.py checks the preset's
batch size and length at the parser).
"""
import contextlib
import io
import json
import os
import re
from types import SimpleNamespace

import pytest
import torch

import detect
import eval as eval_script
import train
from conftest import REPO, assert_one_line_error, make_voc, truncate_lists
from misc import format_min_score, load_checkpoint
from create_data_lists import create_data_lists
from utils import bccd_labels

SHIPPED = REPO / "weights" / "ssd300_bccd.pt"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """10 corrected images of a lab (BCCD's classes), 3 of them held out as TEST, and their lists."""
    root = tmp_path_factory.mktemp("lab")
    create_data_lists(make_voc(root / "voc", n_trainval=7, n_test=3, size=(96, 72)), root / "lists", verbose=False)
    return root


@pytest.fixture(scope="module")
def fine_tuned(lab):
    """The documented command, cut to 2 steps of 2 images: its checkpoint, and what it printed (stdout, stderr)."""
    argv = ["--fine-tune", "--init-weights", SHIPPED, "--data-folder", lab / "lists", "--out-dir", lab / "run",
            "--iterations", 2, "--batch-size", 2, "--device", "cpu", "--workers", 0]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        train.main(train.get_args_parser().parse_args(list(map(str, argv))))
    return SimpleNamespace(checkpoint=lab / "run" / "checkpoint.pt", stdout=out.getvalue(), stderr=err.getvalue())


def test_fine_tune_from_the_shipped_model_with_the_preset(fine_tuned):
    ckpt, shipped = load_checkpoint(fine_tuned.checkpoint), load_checkpoint(SHIPPED)
    cut = ("iterations", "batch_size")  # given on the command line
    assert {k: ckpt["args"][k] for k in train.FINE_TUNE if k not in cut} == \
           {k: v for k, v in train.FINE_TUNE.items() if k not in cut}
    assert (ckpt["args"]["iterations"], ckpt["iteration"], ckpt["args"]["init_weights"]) == (2, 2, str(SHIPPED))
    assert ckpt["model_args"] == shipped["model_args"] and ckpt["label_map"] == shipped["label_map"]
    assert "count_thresholds" not in ckpt  # a train.py checkpoint: its keys as ever
    # 7 TRAIN images at batch 2: 3 steps an epoch (one image left out), 2 run; the weights moved from the shipped ones
    assert "training on cpu x1: 7 images, 3 steps/epoch at batch 2, epochs 1-1, 2 iterations" in fine_tuned.stdout
    assert not torch.equal(ckpt["model"]["pred_convs.cl_conv4_3.weight"],
                           shipped["model"]["pred_convs.cl_conv4_3.weight"].float())
    # the progress bar and its time estimate ([elapsed<remaining]); the minutes it took
    assert re.search(r" 1/2 \[[\d:]+<[\d:]+", fine_tuned.stderr.replace("\r", "\n")), fine_tuned.stderr
    assert re.search(r"done: 2 iterations, \d+\.\d min; checkpoint in ", fine_tuned.stdout), fine_tuned.stdout


def thresholds(path):
    """The counting thresholds detect.py takes from a checkpoint: (min_score per class, in label order, max_overlap)."""
    return detect.counting_defaults(load_checkpoint(path), list(bccd_labels), str(path))


def test_thresholds_chosen_on_the_held_out_images_are_those_detect_counts_with(fine_tuned, lab, tmp_path, run_main):
    output = tmp_path / "checkpoint.pt"
    result = run_main("set_thresholds.py", "--checkpoint", fine_tuned.checkpoint, "--data-folder", lab / "lists",
                      "--output", output, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    # those that eval.py --count-sweep chose on TEST, the 3 held-out images: its report is kept beside the checkpoint
    sweep = json.loads((tmp_path / "count-sweep.json").read_text())
    assert (sweep["images"], sweep["checkpoint"], sweep["count_sweep"]["min_scores"]) == (
        3, str(fine_tuned.checkpoint), list(eval_script.SWEEP_MIN_SCORES))
    chosen = sweep["count_sweep"]["chosen"]
    min_score, max_overlap = [chosen["min_score"][name] for name in bccd_labels], chosen["max_overlap"]
    assert thresholds(output) == (min_score, max_overlap)
    assert thresholds(fine_tuned.checkpoint) == (0.2, 0.5)  # --output: the run's own checkpoint is as it was
    said = f"--min-score {format_min_score(min_score, list(bccd_labels))} --max-overlap {max_overlap}"
    assert f"count_thresholds written to {output}: {said}" in result.stdout, result.stdout
    # all else kept: the run resumes from it, and detect.py counts at those thresholds
    before, after = load_checkpoint(fine_tuned.checkpoint), load_checkpoint(output)
    assert set(after) == set(before) | {"count_thresholds"}
    assert all(torch.equal(after["model"][k], v) for k, v in before["model"].items())
    image = sorted((lab / "voc" / "JPEGImages").iterdir())[-1]
    result = run_main("detect.py", image, "--checkpoint", output, "--output-dir", tmp_path / "counted", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert f"at min_score {format_min_score(min_score, list(bccd_labels))}, max_overlap {max_overlap}" in result.stdout


def test_a_class_absent_from_the_held_out_images_keeps_its_threshold(fine_tuned, lab, tmp_path, run_main):
    lists = truncate_lists(lab / "lists", tmp_path / "lists", 7, 3)
    objects = json.loads((lists / "TEST_objects.json").read_text())
    platelets = [[label == 3 for label in o["labels"]] for o in objects]  # BCCD's label 3
    (lists / "TEST_objects.json").write_text(json.dumps([{k: [v for v, p in zip(o[k], drop) if not p] if isinstance(
        o[k], list) else o[k] for k in o} for o, drop in zip(objects, platelets)]))
    result = run_main("set_thresholds.py", "--checkpoint", fine_tuned.checkpoint, "--data-folder", lists,
                      "--output", tmp_path / "checkpoint.pt", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "kept for Platelets, not among them" in result.stdout
    assert thresholds(tmp_path / "checkpoint.pt")[0][2] == 0.2  # the run's: the tutorial's, as it recorded none


def test_thresholds_are_never_chosen_on_images_trained_on(fine_tuned, lab, tmp_path, run_main, monkeypatch):
    lists = truncate_lists(lab / "lists", tmp_path / "lists", 7, 3)
    for kind in ("images", "objects"):  # TEST: the run's TRAIN
        (lists / f"TEST_{kind}.json").write_text((lab / "lists" / f"TRAIN_{kind}.json").read_text())
    before = fine_tuned.checkpoint.read_bytes()
    result = run_main("set_thresholds.py", "--checkpoint", fine_tuned.checkpoint, "--data-folder", lists,
                      "--device", "cpu")
    assert_one_line_error(result, "set_thresholds.py", ["7 of its TEST images were trained on", "hold out images"])
    assert fine_tuned.checkpoint.read_bytes() == before
    # the run's --data-folder as given, relative to where train.py ran: found from there, else a note, not silence
    ckpt = load_checkpoint(fine_tuned.checkpoint)
    ckpt["args"]["data_folder"] = os.path.relpath(lab / "lists", tmp_path)
    torch.save(ckpt, tmp_path / "relative.pt")
    monkeypatch.chdir(tmp_path)
    result = run_main("set_thresholds.py", "--checkpoint", "relative.pt", "--data-folder", lists, "--device", "cpu")
    assert_one_line_error(result, "set_thresholds.py", ["7 of its TEST images were trained on"])
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    result = run_main("set_thresholds.py", "--checkpoint", "../relative.pt", "--data-folder", lists, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert (f"note: the run's lists ({ckpt['args']['data_folder']}) are not found from here: whether its TEST images "
            f"were trained on cannot be checked; run set_thresholds.py from the folder train.py ran in") in result.stdout


def test_thresholds_are_not_written_into_a_run_still_training(fine_tuned, lab, tmp_path, run_main):
    import fcntl
    fd = os.open(fine_tuned.checkpoint.parent, os.O_RDONLY)
    before = fine_tuned.checkpoint.read_bytes()
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running train.py holds it
        result = run_main("set_thresholds.py", "--checkpoint", fine_tuned.checkpoint, "--data-folder", lab / "lists",
                          "--device", "cpu")
    finally:
        os.close(fd)
    assert_one_line_error(result, "set_thresholds.py", "a train.py is writing there")
    assert fine_tuned.checkpoint.read_bytes() == before


def test_set_thresholds_refuses_an_export_and_lists_without_test(fine_tuned, tmp_path, run_main):
    (tmp_path / "model.onnx").write_bytes(b"not a checkpoint")
    assert_one_line_error(run_main("set_thresholds.py", "--checkpoint", tmp_path / "model.onnx", "--data-folder",
                                   tmp_path), "set_thresholds.py", "not a checkpoint file")
    assert_one_line_error(run_main("set_thresholds.py", "--checkpoint", fine_tuned.checkpoint, "--data-folder",
                                   tmp_path / "none"), "set_thresholds.py", "no readable TEST_images.json")
