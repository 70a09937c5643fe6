"""The tutorial's workflow as a user runs it: train.py, eval.py and detect.py (and their checkpoints).

    python -m pytest tests/test_workflow.py -q
    python -m pytest tests/test_workflow.py -q -m "not slow"    # without the tests that train or run many images

Everything runs on the CPU on a few images: a training step at batch 2 takes seconds. The scripts are
called in-process, `train.main(train.get_args_parser().parse_args([...]))`, which is fast, and as
commands (the run_script fixture) where the exit status, stderr and the absence of a traceback are
the point. Each script's `__main__` is `run_cli(main, parser)`, which prints a UserError as one line
and exits with status 1: the command tests check that once per script; the in-process tests check
that each user error raises a one-line UserError (anything else would be a traceback).

Shared runs and checkpoints (module fixtures, made once):
  * straight_run: 3 iterations on 4 TRAIN images at batch 2 (2 epochs), --val-every 1.
  * resumed_run: the same flags stopped after iteration 2 (one epoch), then resumed to iteration 3.
  * random_checkpoint: an untrained SSD300 (seed 0); its detections depend on the image.
  * smear_images: images of every PIL mode, size and orientation, each with one bright rectangle
    at a known place, plus an unreadable file.
"""
import csv
import errno
import hashlib
import json
import math
import os
import re
import shutil
import signal
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as FT
from PIL import Image, ImageOps

import checkpoints
import detect
import eval as eval_script
import misc
import plots
import train
from conftest import CURVE
from misc import UserError, bf16_is_fast
from model import SSD300, create_prior_boxes
from utils import IMAGENET_MEAN, IMAGENET_STD, bccd_labels, calculate_mAP, label_color_map, label_map
from datasets import BCCDDataset

CHECKPOINT_KEYS = {"model", "model_args", "optimizer", "epoch", "iteration", "args", "label_map", "field",
                   "run_info", "ema", "ema_updates"}  # the last two: SCHEDULE has --ema-decay
# A schedule that does not depend on the length of the run, so that a run stopped early and resumed
# can be compared with one run straight through: 2 iterations of linear warm-up from lr/10, then lr
# (no decay: --decay-at with no value). Iterations 0, 1, 2 get 0.1, 0.55 and 1 times LR, so a resume
# that restarted the schedule would show.
LR = 1e-3
SCHEDULE = ["--lr", str(LR), "--schedule", "step", "--warmup", "2", "--ema-decay", "0.9", "--flips", "d4", "--decay-at"]


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def train_argv(data_folder, out_dir, *extra):
    """train.py's command line for the tiny runs here: batch 2, CPU, no workers, SCHEDULE."""
    return ["--data-folder", str(data_folder), "--out-dir", str(out_dir), "--batch-size", "2", "--workers", "0",
            "--device", "cpu", "--no-cache-images", *SCHEDULE, *map(str, extra)]


def train_args(data_folder, out_dir, *extra):
    return train.get_args_parser().parse_args(train_argv(data_folder, out_dir, *extra))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def read_log(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def assert_same(a, b, where="checkpoint"):
    """a and b are equal, tensors bit for bit (same dtype, same values), recursively through dicts and lists."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def truncate_lists(src, dst, n_train, n_test):
    """Copy the lists of `src` to `dst`, keeping the first n_train TRAIN and n_test TEST images."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for split, n in (("TRAIN", n_train), ("TEST", n_test)):
        for kind in ("images", "objects"):
            items = json.loads((Path(src) / f"{split}_{kind}.json").read_text())
            (dst / f"{split}_{kind}.json").write_text(json.dumps(items[:n]))
    shutil.copy(Path(src) / "label_map.json", dst / "label_map.json")
    return dst


def list_test_images(data_folder):
    return json.loads((Path(data_folder) / "TEST_images.json").read_text())


def error_lines(stderr):
    """The lines a script printed as errors ("<script>: error: ..."); tqdm's bars are not among them."""
    return [line for line in stderr.splitlines() if re.match(r"\w+\.py: error: ", line)]


def assert_one_line_error(result, script, says):
    """A finished command failed as a user error should: status 1, one error line saying `says`, no traceback."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: "), result.stderr
    assert says in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Data, runs and checkpoints shared by the tests
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lists4(tiny_lists):
    """conftest's tiny_lists: 4 TRAIN images of 64x48 (2 steps an epoch at batch 2), 2 TEST."""
    return tiny_lists


@pytest.fixture(scope="module")
def lists2(lists4, tmp_path_factory):
    """The first 2 TRAIN and 1 TEST image of lists4: one step an epoch at batch 2."""
    return truncate_lists(lists4, tmp_path_factory.mktemp("lists2"), 2, 1)


@pytest.fixture(scope="module")
def straight_run(lists4, tmp_path_factory):
    """--iterations 3 on 4 images at batch 2: 2 epochs (2 steps, then 1). Records every checkpoint save."""
    out = tmp_path_factory.mktemp("straight")
    saves, real_save = [], checkpoints.save_atomic

    def spy(obj, path):
        saves.append((obj["epoch"], obj["iteration"], Path(path)))
        real_save(obj, path)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoints, "save_atomic", spy)
        train.main(train_args(lists4, out, "--iterations", 3, "--val-every", 1))
    return SimpleNamespace(out=out, checkpoint=out / "checkpoint.pt", saves=saves, log=read_log(out))


@pytest.fixture(scope="module")
def resumed_run(lists4, tmp_path_factory):
    """straight_run's flags stopped after iteration 2 (end of epoch 1) in `first`, resumed to iteration 3 in `second`."""
    first, second = tmp_path_factory.mktemp("first"), tmp_path_factory.mktemp("resumed")
    train.main(train_args(lists4, first, "--iterations", 2, "--val-every", 1))
    train.main(train_args(lists4, second, "--iterations", 3, "--val-every", 1, "--resume", first / "checkpoint.pt"))
    return SimpleNamespace(first=first, second=second)


@pytest.fixture(scope="module")
def random_checkpoint(untrained_checkpoint):
    """conftest's untrained SSD300 (BatchNorm, BCCD priors, seed 0); its detections depend on the image."""
    return untrained_checkpoint


# ---------------------------------------------------------------------------------------------
# train.py: outputs, checkpoints, --iterations, --resume
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_checkpoint_after_every_epoch_and_a_log_line_each(straight_run):
    ckpt = straight_run.checkpoint
    assert straight_run.saves == [(0, 2, ckpt), (1, 3, ckpt)]  # (epoch, iteration, path) of each save
    assert sorted(os.listdir(straight_run.out)) == ["checkpoint.pt", "log.jsonl", *CURVE]  # no temporary file left
    log = straight_run.log
    assert [(r["epoch"], r["iteration"]) for r in log] == [(1, 2), (2, 3)]
    # lr of each epoch's last step: iteration 1 (half-way through the warm-up), iteration 2 (warm-up done)
    assert [r["lr"] for r in log] == [pytest.approx(0.55 * LR), pytest.approx(LR)]
    for record, n_images in zip(log, (4, 2)):  # epoch 2 stops after its first step: 2 images
        assert math.isfinite(record["loss"]) and record["loss"] > 0
        assert record["seconds"] > 0
        assert record["images_per_s"] == pytest.approx(n_images / record["seconds"], abs=0.06 + 0.01 * record["images_per_s"])
        assert set(record["AP"]) == set(bccd_labels)  # --val-every 1
        assert record["mAP"] == pytest.approx(sum(record["AP"].values()) / 3, abs=2e-5)


@pytest.mark.slow
def test_iterations_convert_to_epochs_with_the_batch_size(straight_run):
    ckpt = load(straight_run.checkpoint)
    # 4 images at batch 2 = 2 steps an epoch: --iterations 3 = 2 epochs, the second cut after 1 step
    assert (ckpt["epoch"], ckpt["iteration"]) == (1, 3)
    assert len(straight_run.log) == 2


@pytest.mark.slow
def test_checkpoint_is_plain_data_that_rebuilds_the_model(straight_run):
    ckpt = load(straight_run.checkpoint)  # weights_only=True: tensors and plain data, or it raises
    assert set(ckpt) == CHECKPOINT_KEYS
    json.dumps({k: ckpt[k] for k in ("model_args", "epoch", "iteration", "args", "label_map")})  # plain data
    assert ckpt["label_map"] == label_map
    assert ckpt["args"]["batch_size"] == 2 and ckpt["args"]["lr"] == LR
    assert ckpt["field"] == [64, 48]  # the median size of the TRAIN images, for detect.py's tiling

    model = SSD300.from_checkpoint(ckpt)  # nothing else needed
    assert_same(model.state_dict(), ckpt["model"], "model")
    # the non-default BCCD priors and BatchNorm came from model_args, not from SSD300's defaults
    assert model.batch_norm
    assert torch.equal(model.priors_cxcy, create_prior_boxes(train.BCCD_PRIOR_SCALES))
    assert not torch.equal(model.priors_cxcy, create_prior_boxes())


@pytest.mark.slow
def test_a_new_run_refuses_an_out_dir_that_holds_a_run(straight_run, lists4, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(straight_run.out, out)
    before = sha256(out / "checkpoint.pt"), (out / "log.jsonl").read_text()
    with pytest.raises(UserError) as e:
        train.main(train_args(lists4, out, "--iterations", 1))
    assert "\n" not in str(e.value) and f"--resume {out / 'checkpoint.pt'}" in str(e.value), str(e.value)
    with pytest.raises(UserError, match="already holds a training run"):  # resuming another run into it
        train.main(train_args(lists4, out, "--iterations", 4, "--resume", straight_run.checkpoint))
    assert (sha256(out / "checkpoint.pt"), (out / "log.jsonl").read_text()) == before  # untouched


def test_resume_gives_the_same_weights_as_a_straight_run(straight_run, resumed_run):
    straight = load(straight_run.checkpoint)
    first = load(resumed_run.first / "checkpoint.pt")
    resumed = load(resumed_run.second / "checkpoint.pt")
    assert (first["epoch"], first["iteration"]) == (0, 2)
    assert (resumed["epoch"], resumed["iteration"]) == (straight["epoch"], straight["iteration"]) == (1, 3)
    assert not torch.equal(first["model"]["pred_convs.cl_conv4_3.weight"],
                           resumed["model"]["pred_convs.cl_conv4_3.weight"])  # the resumed epoch trained
    assert_same(resumed["model"], straight["model"], "model")  # bit for bit, BatchNorm statistics included
    assert_same(resumed["optimizer"], straight["optimizer"], "optimizer")  # momentum buffers and lr
    assert_same(resumed["ema"], straight["ema"], "ema")  # the weight average (--ema-decay) and its step count
    assert resumed["ema_updates"] == straight["ema_updates"] == 3

    # same losses, same lr (the schedule went on at iteration 2, not from 0), same validation
    assert [untimed(r) for r in read_log(resumed_run.first) + read_log(resumed_run.second)] == \
           [untimed(r) for r in straight_run.log]


@pytest.mark.slow
def test_resume_from_the_middle_of_an_epoch_trains_the_remaining_iterations(straight_run, lists4, tmp_path):
    # straight_run stopped after 3 iterations, in the middle of its 2nd epoch; ask for one more
    shutil.copy(straight_run.checkpoint, tmp_path / "checkpoint.pt")
    train.main(train_args(lists4, tmp_path, "--iterations", 4, "--resume", tmp_path / "checkpoint.pt"))
    ckpt = load(tmp_path / "checkpoint.pt")
    assert ckpt["iteration"] == 4, (f"resumed at iteration 3 with --iterations 4, but the checkpoint is at "
                                    f"iteration {ckpt['iteration']}: the remaining iteration was not trained")


@pytest.mark.slow
def test_non_finite_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(resumed_run, lists4, tmp_path,
                                                                                 run_main):
    out = tmp_path / "run"
    shutil.copytree(resumed_run.first, out)  # one good epoch: checkpoint.pt and log.jsonl
    checkpoint_before, log_before = sha256(out / "checkpoint.pt"), (out / "log.jsonl").read_text()
    # the first step of epoch 2 still has a finite loss; its update at lr 1e30 makes the second one nan/inf
    result = run_main("train.py", *train_argv(lists4, out, "--iterations", 4, "--lr", "1e30",
                                              "--resume", out / "checkpoint.pt"))
    line = assert_one_line_error(result, "train.py", "epoch 2")
    assert re.search(r"loss is -?(nan|inf)", line), line
    assert sha256(out / "checkpoint.pt") == checkpoint_before
    assert (out / "log.jsonl").read_text() == log_before  # no line for the failed epoch
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "log.jsonl", *CURVE]


@pytest.mark.slow
def test_failed_checkpoint_save_keeps_the_old_checkpoint(resumed_run, lists2, tmp_path, monkeypatch):
    shutil.copy(resumed_run.first / "checkpoint.pt", tmp_path / "checkpoint.pt")
    before = sha256(tmp_path / "checkpoint.pt")
    written = []

    real_open = open

    def open_that_fails_half_way(path, mode="r", **kwargs):  # what a full disk leaves while the checkpoint is written
        if "w" in mode and os.path.basename(path).startswith("checkpoint.pt"):
            written.append(Path(path))
            Path(path).write_bytes(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, **kwargs)

    monkeypatch.setattr(misc, "open", open_that_fails_half_way, raising=False)  # the files misc writes
    with pytest.raises(UserError) as e:  # lists2: 1 step an epoch, so one step, then the save
        train.main(train_args(lists2, tmp_path, "--iterations", 3, "--resume", tmp_path / "checkpoint.pt"))
    assert str(e.value) == f"{tmp_path / 'checkpoint.pt'}: cannot write (No space left on device); the earlier file is kept"
    assert len(written) == 1
    assert written[0].parent == tmp_path and written[0].name != "checkpoint.pt"  # a temporary file beside it
    assert sha256(tmp_path / "checkpoint.pt") == before
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "log.jsonl"]  # the temporary file is removed


@pytest.mark.slow
def test_missing_lists_are_made_from_the_bccd_folder(tiny_voc, tmp_path, capsys):
    voc = tiny_voc(n_trainval=2, n_test=1)
    lists = tmp_path / "lists"  # does not exist
    train.main(train_args(lists, tmp_path / "run", "--bccd-folder", voc, "--epochs", 1))
    assert f"making the lists in {lists} from {voc}" in capsys.readouterr().out
    assert {p.name for p in lists.iterdir()} == {"TRAIN_images.json", "TRAIN_objects.json", "TEST_images.json",
                                                 "TEST_objects.json", "label_map.json"}
    images = json.loads((lists / "TRAIN_images.json").read_text())
    assert [Path(p).name for p in images] == ["BloodImage_00000.jpg", "BloodImage_00001.jpg"]
    assert load(tmp_path / "run" / "checkpoint.pt")["iteration"] == 1


def interrupt_at_step(monkeypatch, step, sig=signal.SIGINT):
    """Make train.py receive `sig` during its `step`-th training step (1-based), as a Ctrl-C or a kill would."""
    calls, compute_loss = [], train.compute_loss

    def compute_loss_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), sig)  # the handler runs in this (the main) thread, in the middle of the step
        return compute_loss(*args, **kwargs)

    monkeypatch.setattr(train, "compute_loss", compute_loss_then_signal)


def untimed(record):
    return {k: v for k, v in record.items() if k not in ("seconds", "images_per_s")}


@pytest.mark.slow
@pytest.mark.parametrize("sig, step", [(signal.SIGINT, 1), (signal.SIGTERM, 2)], ids=["sigint-mid-epoch",
                                                                                         "sigterm-end-of-epoch"])
def test_interrupted_run_saves_says_how_to_resume_and_resumes_exactly(straight_run, lists4, tmp_path, monkeypatch,
                                                                      capsys, sig, step):
    """Ctrl-C (SIGINT) or a kill (SIGTERM) finishes the step, saves where it stopped and exits 130 / 143; the
    printed command then continues bit for bit as the uninterrupted run, and the log holds each epoch once."""
    out = tmp_path / "run"
    interrupt_at_step(monkeypatch, step, sig)
    with pytest.raises(SystemExit) as e:
        train.main(train_args(lists4, out, "--iterations", 3, "--val-every", 1))
    assert e.value.code == 128 + sig
    err = capsys.readouterr().err
    assert f"stopped at iteration {step} (" in err and f"python train.py --resume {out / 'checkpoint.pt'}" in err
    ckpt = load(out / "checkpoint.pt")
    assert ckpt["iteration"] == step
    assert (ckpt["epoch"], "partial_epoch" in ckpt) == ((-1, True) if step == 1 else (0, False))
    assert sorted(os.listdir(out)) == (["checkpoint.pt"] if step == 1 else ["checkpoint.pt", "log.jsonl", *CURVE])
    monkeypatch.undo()
    # resumed with the command it printed: every other flag comes from the checkpoint
    train.main(train.get_args_parser().parse_args(["--resume", str(out / "checkpoint.pt"), "--workers", "0"]))
    resumed = load(out / "checkpoint.pt")
    straight = load(straight_run.checkpoint)
    assert (resumed["epoch"], resumed["iteration"]) == (straight["epoch"], straight["iteration"]) == (1, 3)
    assert_same(resumed["model"], straight["model"], "model")
    assert_same(resumed["optimizer"], straight["optimizer"], "optimizer")
    assert [untimed(r) for r in read_log(out)] == [untimed(r) for r in straight_run.log]
    assert "partial_epoch" not in resumed


def test_validation_redraws_the_training_curve_a_resumed_run_one_curve(resumed_run, tmp_path):
    """--val-every 1: training.png after each validated epoch, drawn from the whole log (plots.read_log), which
    holds the epochs before the resume too, each once."""
    if not CURVE:
        pytest.skip("matplotlib is not installed: no training.png (pip install matplotlib)")
    first, second = resumed_run.first, resumed_run.second  # second: resumed from first's checkpoint after epoch 1
    assert [r["epoch"] for r in plots.read_log(second / "log.jsonl")] == [2]
    records = plots.run_records(second / "log.jsonl", first / "log.jsonl", 1)
    assert [r["epoch"] for r in records] == [1, 2]
    for out, drawn in ((first, plots.read_log(first / "log.jsonl")), (second, records)):
        again = plots.plot_training({None: drawn}, tmp_path / f"{out.name}.png", f"train.py --out-dir {out}")
        assert (out / "training.png").read_bytes() == Path(again).read_bytes()  # what train.py drew: all epochs


@pytest.mark.slow
def test_resume_removes_what_a_killed_run_left(resumed_run, lists4, tmp_path):
    """A run killed (SIGKILL) after logging epoch 2 but before saving it, and in the middle of a save: on resume
    the temporary file is removed and the log holds epochs 1 and 2 once each (2 trained again)."""
    out = tmp_path / "run"
    shutil.copytree(resumed_run.first, out)  # checkpoint after epoch 1, log of epoch 1
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "iteration": 3, "loss": 1.0}) + "\n" + '{"epoch": 3, "itera')
    (out / "checkpoint.pt.12345.tmp").write_bytes(b"half a checkpoint")
    train.main(train_args(lists4, out, "--iterations", 3, "--val-every", 1, "--resume", out / "checkpoint.pt"))
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "log.jsonl", *CURVE]
    assert [r["epoch"] for r in read_log(out)] == [1, 2] and read_log(out)[1]["loss"] != 1.0


def test_a_split_too_small_for_batch_norm_is_refused_up_front_and_trains_without_it(lists4, tmp_path, capsys):
    one = truncate_lists(lists4, tmp_path / "one", 1, 1)
    with pytest.raises(UserError, match=r"TRAIN \(.*\) holds 1 image per process: with BatchNorm every step needs at "
                                        "least 2 images; use --batch-size 2 or more and more TRAIN images or train "
                                        "with --no-batch-norm"):
        train.main(train_args(one, tmp_path / "run", "--iterations", 1))
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    train.main(train_args(one, tmp_path / "run", "--iterations", 1, "--no-batch-norm", "--batch-size", 1))
    assert load(tmp_path / "run" / "checkpoint.pt")["iteration"] == 1


def test_a_second_run_into_a_locked_out_dir_is_refused(lists4, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    import fcntl
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running train.py holds it
        with pytest.raises(UserError, match=f"--out-dir {out}: another train.py is writing there"):
            train.main(train_args(lists4, out, "--iterations", 1))
    finally:
        os.close(fd)
    assert os.listdir(out) == []


@pytest.mark.slow
def test_resume_takes_the_runs_flags_refuses_other_architecture_and_notes_other_settings(resumed_run, lists4,
                                                                                         tmp_path, capsys):
    ckpt_path = resumed_run.first / "checkpoint.pt"
    for flag, says in ((["--no-batch-norm"], "its model has batch norm True, not False"),
                       (["--prior-scales", "0.1", "0.2", "0.375", "0.55", "0.725", "0.9"], "its model has prior scales")):
        with pytest.raises(UserError, match=says):
            train.main(train.get_args_parser().parse_args(["--resume", str(ckpt_path), "--out-dir", str(tmp_path / "x"),
                                                           *flag]))
    args = train.get_args_parser().parse_args(["--resume", str(ckpt_path), "--out-dir", str(tmp_path / "y"),
                                               "--iterations", "3", "--lr", "0.002", "--workers", "0"])
    train.main(args)
    assert "note: resuming with other flags than the run's: --lr 0.002 (the run's: 0.001)" in capsys.readouterr().out
    assert (args.batch_size, args.warmup, args.schedule, args.decay_at) == (2, 2, "step", [])  # the run's
    assert (args.data_folder, args.cache_images) == (str(lists4), False)


# ---------------------------------------------------------------------------------------------
# eval.py
# ---------------------------------------------------------------------------------------------

def independent_detections(checkpoint, data_folder, min_score=0.01, max_overlap=0.45):
    """TEST detections as eval.py must make them, by another path: the model rebuilt from the checkpoint
    file, the BCCDDataset TEST items (difficult objects kept) in one batch, detect_objects at 0.01 / 0.45 / 200
    (or the given min_score and max_overlap). Returns the six lists calculate_mAP takes."""
    model = SSD300.from_checkpoint(load(checkpoint)).eval()
    test_set = BCCDDataset(data_folder, "test", keep_difficult=True)
    images, boxes, labels, difficulties = zip(*(test_set[i] for i in range(len(test_set))))
    with torch.no_grad():
        locs, scores = model(FT.normalize(torch.stack(images).float() / 255, IMAGENET_MEAN, IMAGENET_STD))
        dets = model.detect_objects(locs, scores, min_score=min_score, max_overlap=max_overlap, top_k=200)
    return (*dets, list(boxes), list(labels), list(difficulties))


@pytest.fixture(scope="module")
def eval_lists(lists4, random_checkpoint, tmp_path_factory):
    """lists4 with TEST objects made from random_checkpoint's own detections, so that the APs are neither 0 nor 1
    and depend on which image each detection belongs to: per image and class, its (i+1)-th and (i+3)-th best
    detections become objects (the first RBC one difficult), plus one object in a corner that may be missed."""
    folder = truncate_lists(lists4, tmp_path_factory.mktemp("eval_lists"), 4, 2)
    det_boxes, det_labels, _, _, _, _ = independent_detections(random_checkpoint, folder)
    objects = []
    for i, (path, boxes, labels) in enumerate(zip(list_test_images(folder), det_boxes, det_labels)):
        with Image.open(path) as im:
            scale = torch.tensor([*im.size, *im.size], dtype=torch.float)
        obj = {"boxes": [], "labels": [], "difficulties": []}
        for c in range(1, len(label_map)):
            of_class = (labels == c).nonzero().flatten()
            for rank in (i + 1, i + 3):
                if rank < len(of_class):
                    obj["boxes"].append((boxes[of_class[rank]] * scale).tolist())
                    obj["labels"].append(c)
                    obj["difficulties"].append(int(c == 1 and rank == i + 1))
        obj["boxes"].append([0., 0., float(scale[0]) / 3, float(scale[1]) / 3])
        obj["labels"].append(label_map["WBC"])
        obj["difficulties"].append(0)
        objects.append(obj)
    (folder / "TEST_objects.json").write_text(json.dumps(objects))
    return folder


@pytest.mark.slow
def test_eval_reports_the_maps_of_calculate_mAP_on_independent_detections(eval_lists, random_checkpoint, tmp_path,
                                                                          capsys, monkeypatch):
    settings, detect_objects = [], SSD300.detect_objects

    def spy(self, locs, scores, min_score, max_overlap, top_k, **kwargs):
        settings.append((min_score, max_overlap, top_k))
        return detect_objects(self, locs, scores, min_score, max_overlap, top_k, **kwargs)

    monkeypatch.setattr(SSD300, "detect_objects", spy)
    output = tmp_path / "eval.json"
    eval_script.main(eval_script.get_args_parser().parse_args(
        ["--checkpoint", str(random_checkpoint), "--data-folder", str(eval_lists), "--output", str(output),
         "--device", "cpu", "--workers", "0", "--no-amp"]))  # fp32, as the reference detections below
    printed = capsys.readouterr().out
    result = json.loads(output.read_text())
    # the paper's and the tutorial's evaluation setting (these scores are all above 0.5, so the mAPs can't tell),
    # then detect.py's defaults for counting
    assert settings == [(0.01, 0.45, 200), (0.2, 0.5, 200)]
    monkeypatch.undo()

    dets = independent_detections(random_checkpoint, eval_lists)
    assert any(d.any() for d in dets[5])  # a difficult object is there, so keep_difficult matters
    aps, mean_ap = calculate_mAP(*dets)
    _, mean_ap_all = calculate_mAP(*dets, interpolation="all")
    thresholds = [0.5 + 0.05 * i for i in range(10)]
    mean_ap_coco = sum(calculate_mAP(*dets, iou_threshold=t, interpolation="101point")[1] for t in thresholds) / 10

    assert set(result["AP"]) == {"RBC", "WBC", "Platelets"}
    assert result["AP"] == pytest.approx(aps, abs=1e-9)
    assert result["mAP"] == pytest.approx(mean_ap, abs=1e-9)
    assert result["mAP_all_point"] == pytest.approx(mean_ap_all, abs=1e-9)
    assert result["mAP_coco"] == pytest.approx(mean_ap_coco, abs=1e-9)
    assert 0 < result["mAP"] < 1 and sum(ap > 0 for ap in aps.values()) >= 2  # the comparison means something
    assert result["images"] == 2

    # the table: one row per class and the mAP, VOC07 AP first
    ap_table, count_table = printed.split("counting at")
    rows = {line.split()[0]: line.split()[1:] for line in ap_table.splitlines() if line.strip()}
    for name in bccd_labels:
        assert rows[name][0] == f"{aps[name]:.4f}"
    assert rows["mAP"][:3] == [f"{mean_ap:.4f}", f"{mean_ap_all:.4f}", f"{mean_ap_coco:.4f}"]

    # counting: the detections at 0.2 / 0.5 against all annotated objects (difficult ones too), image by image
    counted = independent_detections(random_checkpoint, eval_lists, min_score=0.2, max_overlap=0.5)[1]
    assert result["counts"]["min_score"] == 0.2 and result["counts"]["max_overlap"] == 0.5
    for c, name in enumerate(bccd_labels, start=1):
        predicted = [int((labels == c).sum()) for labels in counted]
        true = [int((labels == c).sum()) for labels in dets[4]]
        errors = [p - t for p, t in zip(predicted, true)]
        assert result["counts"][name] == pytest.approx(
            {"true_mean": sum(true) / 2, "predicted_mean": sum(predicted) / 2, "mae": sum(map(abs, errors)) / 2,
             "bias": sum(errors) / 2, "relative_error": sum(map(abs, errors)) / max(sum(true), 1)})
        assert count_table.count(f"\n{name} ") == 1
    assert sum(result["counts"][name]["mae"] for name in bccd_labels) > 0  # the random model miscounts


def test_count_errors_by_hand():
    det = [torch.tensor([1, 1, 1, 3]), torch.tensor([], dtype=torch.long), torch.tensor([2, 1])]
    true = [torch.tensor([1, 1, 3, 3]), torch.tensor([1]), torch.tensor([2])]
    counts = eval_script.count_errors(det, true)
    # RBC: counted 3, 0, 1 of 2, 1, 0 -> errors +1, -1, +1
    assert counts["RBC"] == pytest.approx({"true_mean": 1, "predicted_mean": 4 / 3, "mae": 1, "bias": 1 / 3,
                                           "relative_error": 1})
    assert counts["WBC"] == pytest.approx({"true_mean": 1 / 3, "predicted_mean": 1 / 3, "mae": 0, "bias": 0,
                                           "relative_error": 0})
    # Platelets: counted 1, 0, 0 of 2, 0, 0
    assert counts["Platelets"] == pytest.approx({"true_mean": 2 / 3, "predicted_mean": 1 / 3, "mae": 1 / 3,
                                                 "bias": -1 / 3, "relative_error": 1 / 2})


def test_count_sweep_chooses_per_class_the_min_score_that_counts_best():
    """sweep_counts by hand: two images, 1 RBC and 2 WBC annotated each (no platelets)."""
    true = [torch.tensor([1, 2, 2]), torch.tensor([1, 2, 2])]
    ms, mo = eval_script.SWEEP_MIN_SCORES, eval_script.SWEEP_MAX_OVERLAPS
    # RBC counted right only at 0.5 (3 per image below it, none above); WBC right from 0.3 to 0.45 (4 per image
    # below, 1 above); at max_overlap 0.3 every count is one too many
    def labels(s, o):
        rbc = 1 if s == 0.5 else (3 if s < 0.5 else 0)
        wbc = 4 if s < 0.3 else (2 if s <= 0.45 else 1)
        extra = [3] if o == 0.3 else []
        return [torch.tensor([1] * rbc + [2] * wbc + extra)] * 2
    counted = {(s, o): labels(s, o) for s in ms for o in mo}
    sweep = eval_script.sweep_counts(counted, true)
    assert sweep["chosen"]["max_overlap"] == 0.4  # the first of the equally good ones
    assert sweep["chosen"]["min_score"] == {"RBC": 0.5, "WBC": 0.3, "Platelets": 0.1}  # lowest of ties
    assert sweep["chosen"]["error"] == {"RBC": 0, "WBC": 0, "Platelets": 0}
    assert sweep["errors"][0.5]["RBC"][ms.index(0.1)] == pytest.approx(2.0)  # |3 - 1| x 2 images / 2 annotated
    assert sweep["errors"][0.3]["Platelets"][0] == pytest.approx(1.0)  # none annotated: mean absolute error


def test_counting_thresholds_come_from_the_checkpoint_or_the_tutorial(tmp_path):
    from detect import counting_defaults
    assert counting_defaults({}, bccd_labels) == (0.2, 0.5)
    recorded = {"count_thresholds": {"min_score": {"WBC": 0.3, "RBC": 0.55, "Platelets": 0.4}, "max_overlap": 0.45}}
    assert counting_defaults(recorded, bccd_labels) == ([0.55, 0.3, 0.4], 0.45)  # label order, whatever the dict's
    for bad in ({"min_score": {"RBC": 0.5}, "max_overlap": 0.5}, {"min_score": {"RBC": 1.5, "WBC": 0.3,
                "Platelets": 0.3}, "max_overlap": 0.5}, {"min_score": {"RBC": 0.5, "WBC": 0.3, "Platelets": 0.3},
                "max_overlap": float("nan")}, "0.5"):
        with pytest.raises(UserError, match="bad.pt: unusable count_thresholds"):
            counting_defaults({"count_thresholds": bad}, bccd_labels, "bad.pt")


# ---------------------------------------------------------------------------------------------
# detect.py
# ---------------------------------------------------------------------------------------------

DARK, BRIGHT = 40, 230


def bright_rectangle(size, rect):
    """uint8 (H, W) array: DARK everywhere, BRIGHT inside rect (x0, y0, x1, y1)."""
    w, h = size
    a = np.full((h, w), DARK, np.uint8)
    x0, y0, x1, y1 = rect
    a[y0:y1, x0:x1] = BRIGHT
    return a


def rgb_with_rectangle(size, rect):
    a = bright_rectangle(size, rect)
    return Image.fromarray(np.stack([a, a - 10, a], -1))  # RGB, a little pink


@pytest.fixture(scope="module")
def smear_images(tmp_path_factory):
    """A folder of images, one of each kind detect.py must take, each with one bright rectangle, and a loose
    file outside it. Returns (folder, loose file, {path: (upright width, upright height, rectangle upright)},
    unreadable file)."""
    root = tmp_path_factory.mktemp("smears")
    folder = root / "smears"
    (folder / "sub").mkdir(parents=True)
    expected = {}

    def add(name, image, size, rect, **save):
        path = (root if name == "loose.bmp" else folder) / name
        image.save(path, **save)
        expected[str(path)] = (*size, rect)

    size, rect = (160, 120), (40, 30, 100, 80)
    rgb = rgb_with_rectangle(size, rect)
    grey = Image.fromarray(bright_rectangle(size, rect))
    add("rgb.jpg", rgb, size, rect, quality=95)
    add("rgb_x3.jpg", rgb.resize((480, 360), Image.Resampling.NEAREST), (480, 360), tuple(3 * v for v in rect), quality=95)
    add("grey.jpg", grey, size, rect, quality=95)
    add("grey_alpha.png", grey.convert("LA"), size, rect)
    add("palette.png", rgb.convert("P", palette=Image.Palette.ADAPTIVE), size, rect)
    add("rgba.png", rgb.convert("RGBA"), size, rect)
    add("cmyk.jpg", rgb.convert("CMYK"), size, rect, quality=95)
    # 16 bits: 10000 and 60000 of 65535; clipping to 8 bits would make the whole image bright
    add("grey16.png", Image.fromarray(np.where(bright_rectangle(size, rect) == BRIGHT, 60000, 10000).astype(np.uint16)),
        size, rect)
    # 32-bit float grey (TIFF mode F): in [0, 1], and in 16-bit units with a pixel that is not a number
    bright = bright_rectangle(size, rect) == BRIGHT
    add("float01.tif", Image.fromarray(np.where(bright, 0.95, 0.15).astype(np.float32)), size, rect)
    float16 = np.where(bright, 60000, 10000).astype(np.float32)
    float16[0, 0] = np.nan
    add("float16.tif", Image.fromarray(float16), size, rect)
    add("tiny.png", rgb_with_rectangle((17, 9), (4, 2, 12, 7)), (17, 9), (4, 2, 12, 7))
    add("big.jpg", rgb_with_rectangle((3000, 2000), (900, 600, 2100, 1500)), (3000, 2000), (900, 600, 2100, 1500))
    # EXIF orientation 6: the stored pixels are the upright image turned 90 degrees; viewers turn it back
    upright_size, upright_rect = (40, 80), (5, 10, 30, 35)
    exif = Image.Exif()
    exif[0x0112] = 6
    add("rotated.jpg", rgb_with_rectangle(upright_size, upright_rect).transpose(Image.Transpose.ROTATE_90),
        upright_size, upright_rect, exif=exif, quality=95)
    add("sub/nested.png", rgb_with_rectangle((100, 100), (10, 60, 50, 90)), (100, 100), (10, 60, 50, 90))
    add("loose.bmp", rgb_with_rectangle((90, 70), (20, 20, 60, 50)), (90, 70), (20, 20, 60, 50))

    modes = {Path(p).name: Image.open(p).mode for p in expected}
    assert modes["grey16.png"] == "I;16" and modes["cmyk.jpg"] == "CMYK" and modes["palette.png"] == "P"
    assert modes["float01.tif"] == modes["float16.tif"] == "F"
    assert modes["grey_alpha.png"] == "LA" and modes["rgba.png"] == "RGBA" and modes["grey.jpg"] == "L"
    with Image.open(folder / "rotated.jpg") as im:
        assert im.size == (80, 40) and ImageOps.exif_transpose(im).size == upright_size
    garbage = folder / "garbage.jpg"
    garbage.write_bytes(b"this is not a JPEG\n" * 10)
    return SimpleNamespace(folder=folder, loose=root / "loose.bmp", expected=expected, garbage=garbage)


def bright_region_detector(model, images, min_score=0.2, max_overlap=0.5, top_k=200, amp=True):
    """Stands in for detect.predict: one RBC box (score 0.9) around the pixels of the 300x300 input brighter than 0.6."""
    boxes, labels, scores = [], [], []
    for image in images:
        ys, xs = ((image.float() / 255).mean(0) > 0.6).nonzero(as_tuple=True)
        boxes.append(torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()[None] / 300)
        labels.append(torch.tensor([label_map["RBC"]]))
        scores.append(torch.tensor([0.9]))
    return boxes, labels, scores


@pytest.mark.slow
def test_detect_command_on_a_folder_and_a_file(smear_images, random_checkpoint, tmp_path, run_main):
    # the untrained model: its detections depend on the image, and some score above 0.3. The flags come first:
    # --min-score takes one word, and the inputs after it stay inputs
    out = tmp_path / "out"
    result = run_main("detect.py", "--checkpoint", random_checkpoint, "--min-score", "0.3", smear_images.folder,
                      smear_images.loose, "--output-dir", out, "--device", "cpu", "--top-k", "50", "--scale", "3")

    # the unreadable file is named on one line and makes the status 1; every other image is done
    line = assert_one_line_error(result, "detect.py", str(smear_images.garbage))
    assert "cannot read image" in line
    with open(out / "counts.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["image", "RBC", "WBC", "Platelets"]
        counts = {r["image"]: {k: int(v) for k, v in r.items() if k != "image"} for r in reader}
    records = {r["image"]: r for r in json.loads((out / "detections.json").read_text())}
    assert set(records) == set(counts) == set(smear_images.expected)  # the folder recursively, and the loose file

    # counts.csv counts the detections of detections.json, which follow --min-score and --top-k
    for image, r in records.items():
        found = Counter(r["labels"])
        assert counts[image] == {name: found[name] for name in bccd_labels}, image
        assert len(r["boxes"]) == len(r["labels"]) == len(r["scores"]) <= 50 * r["windows"]  # --top-k per window
        assert all(s > 0.3 for s in r["scores"])
    assert sum(len(r["labels"]) for r in records.values()) > 0  # there were detections to check
    # big.jpg (3000x2000) is tiled in windows of 3 x BCCD's field (1920x1440, 9 of them), the others are resized whole
    assert {Path(p).name: r["windows"] for p, r in records.items() if r["windows"] > 1} == {"big.jpg": 3 * 3}

    # and prints them: a row per image, its three counts last
    printed = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines() if line.strip()}
    for image, c in counts.items():
        assert printed[image] == [str(c[name]) for name in bccd_labels]

    # boxes in pixels of the upright original; annotated images of its size (EXIF orientation 6: 40x80, not 80x40)
    for path, (width, height, _) in smear_images.expected.items():
        r = records[path]
        assert (r["width"], r["height"]) == (width, height), path
        for x0, y0, x1, y1 in r["boxes"]:
            assert 0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height, (path, [x0, y0, x1, y1])
        with Image.open(out / r["output"]) as annotated:
            assert annotated.size == (width, height), path
    assert records[str(smear_images.loose)]["output"] == "loose.png"  # BMP in, PNG out


def test_detect_boxes_are_in_pixels_of_the_upright_original_whatever_the_image(smear_images, random_checkpoint,
                                                                               tmp_path, monkeypatch, capsys):
    # the model is replaced by a detector of the bright rectangle, whose place in every image is known: what
    # is checked is reading (mode, depth, orientation, size) and the conversion of boxes to pixels. Each image
    # is resized whole (big.jpg's rectangle is larger than a window; tiling: test_tiling.py)
    monkeypatch.setattr(detect, "predict", bright_region_detector)
    args = detect.get_args_parser().parse_args(
        [str(smear_images.folder), str(smear_images.loose), "--checkpoint", str(random_checkpoint),
         "--output-dir", str(tmp_path), "--device", "cpu", "--workers", "0", "--tile", "off"])
    with pytest.raises(SystemExit) as e:  # the unreadable file
        detect.main(args)
    assert e.value.code == 1
    records = {r["image"]: r for r in json.loads((tmp_path / "detections.json").read_text())}
    assert set(records) == set(smear_images.expected)
    for path, (width, height, rect) in smear_images.expected.items():
        r = records[path]
        assert (r["width"], r["height"]) == (width, height), path
        assert len(r["boxes"]) == 1, path
        # one pixel of the 300x300 input, where the edge was found, is max(width, height) / 300 pixels here
        tolerance = 1.5 + 2 * max(width, height) / 300
        assert r["boxes"][0] == pytest.approx(rect, abs=tolerance), (path, r["boxes"][0], rect)

    # a larger copy gives proportionally larger boxes
    small, large = (records[str(smear_images.folder / n)]["boxes"][0] for n in ("rgb.jpg", "rgb_x3.jpg"))
    assert large == pytest.approx([3 * v for v in small], abs=3 * (1.5 + 2 * 160 / 300) + 1.5 + 2 * 480 / 300)


def hex_rgb(color):
    return tuple(int(color[i:i + 2], 16) for i in (1, 3, 5))


def test_detect_function_returns_the_original_size_annotated(random_checkpoint):
    model = detect.load_model(random_checkpoint)
    original = Image.new("L", (400, 200), 128)  # flat: any 300x300 resize of it gives the same input
    annotated = detect.detect(original, min_score=0.2, max_overlap=0.5, top_k=1, model=model)
    assert annotated.size == (400, 200) and annotated.mode == "RGB"
    assert original.getextrema() == (128, 128)  # drawn on a copy

    # where the one detection must be drawn: the model's box, in pixels of the 400x200 original
    x = torch.full((1, 3, 300, 300), 128 / 255)
    x = (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_is_fast(torch.device("cpu"))):
        locs, scores = model(x.contiguous(memory_format=torch.channels_last))
    boxes, labels, _ = model.detect_objects(locs, scores, min_score=0.2, max_overlap=0.5, top_k=1)
    assert len(labels[0]) == 1
    x0, y0, x1, y1 = (boxes[0][0] * torch.tensor([400, 200, 400, 200])).tolist()
    pixels = np.asarray(annotated).astype(int)
    changed = (pixels != 128).any(-1)
    ys, xs = changed.nonzero()
    assert abs(xs.min() - x0) <= 1.5 and abs(ys.max() + 1 - y1) <= 1.5, ((xs.min(), ys.max()), (x0, y1))
    assert model.label_color_map == label_color_map  # BCCD's own colours
    color = hex_rgb(model.label_color_map[model.rev_label_map[int(labels[0][0])]])
    assert (pixels[changed] == color).all(-1).any()  # drawn in its class colour


def test_detect_missing_input_is_named_on_one_line(random_checkpoint, tmp_path, capsys):
    missing = tmp_path / "no-such-smear.jpg"
    args = detect.get_args_parser().parse_args([str(missing), "--checkpoint", str(random_checkpoint), "--output-dir",
                                                str(tmp_path / "out"), "--device", "cpu", "--workers", "0"])
    with pytest.raises(UserError, match=f"^{re.escape(str(missing))}: no such file or folder$"):
        detect.main(args)  # nothing to detect: a user error before anything is written
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Checkpoints that carry code, and user errors
# ---------------------------------------------------------------------------------------------

class CreatesFileWhenUnpickled:
    """Unpickling this object calls open(path, "w"): a loader that runs pickled code creates the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


class PickledObject:
    """An object of a class of this module: loading it needs more than tensors and plain data."""


@pytest.fixture(scope="module")
def hostile_checkpoints(random_checkpoint, tmp_path_factory):
    """random_checkpoint plus one pickled object: `code` (creates `marker` if run) and `object`."""
    folder = tmp_path_factory.mktemp("hostile")
    # the payload is live: an unsafe load runs it
    torch.save({"extra": CreatesFileWhenUnpickled(folder / "control")}, folder / "control.pt")
    torch.load(folder / "control.pt", weights_only=False)
    assert (folder / "control").exists()

    ckpt = load(random_checkpoint)
    torch.save({**ckpt, "extra": CreatesFileWhenUnpickled(folder / "marker")}, folder / "code.pt")
    torch.save({**ckpt, "extra": PickledObject()}, folder / "object.pt")
    return SimpleNamespace(code=folder / "code.pt", object=folder / "object.pt", marker=folder / "marker")


def command_line(script, checkpoint, lists, image, tmp_path):
    """Arguments that make `script` load `checkpoint` (train.py: --resume) and otherwise run."""
    if script == "train":
        return train_argv(lists, tmp_path / "run", "--iterations", 1, "--resume", checkpoint)
    if script == "eval":
        return ["--checkpoint", str(checkpoint), "--data-folder", str(lists), "--device", "cpu", "--workers", "0"]
    return [str(image), "--checkpoint", str(checkpoint), "--output-dir", str(tmp_path / "out"), "--device", "cpu",
            "--workers", "0"]


SCRIPTS = {"train": train, "eval": eval_script, "detect": detect}


@pytest.mark.parametrize("script", ["train", "eval", "detect"])
def test_checkpoint_with_pickled_code_is_refused_not_run(script, hostile_checkpoints, lists4, tmp_path, run_main):
    image = list_test_images(lists4)[0]
    result = run_main(f"{script}.py", *command_line(script, hostile_checkpoints.code, lists4, image, tmp_path))
    assert not hostile_checkpoints.marker.exists(), "loading the checkpoint ran the code it carries"
    assert_one_line_error(result, f"{script}.py", f"{hostile_checkpoints.code}: refused")
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize("script", ["train", "eval", "detect"])
def test_checkpoint_with_a_pickled_object_is_refused(script, hostile_checkpoints, lists4, tmp_path):
    image = list_test_images(lists4)[0]
    module = SCRIPTS[script]
    args = module.get_args_parser().parse_args(command_line(script, hostile_checkpoints.object, lists4, image, tmp_path))
    with pytest.raises(UserError, match="refused") as e:
        module.main(args)
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def bad_checkpoints(random_checkpoint, tmp_path_factory):
    """Files that are not checkpoints of this project's SSD300 (see BAD_CHECKPOINTS)."""
    folder = tmp_path_factory.mktemp("bad")
    (folder / "notes.txt").write_text("not a checkpoint\n")
    five = SSD300(n_classes=5, base_weights=None, batch_norm=True, prior_scales=train.BCCD_PRIOR_SCALES)
    torch.save({"model": five.state_dict(), "model_args": {**five.model_args, "n_classes": 4}}, folder / "wrong_shape.pt")
    optimizer = train.make_optimizer(five, train.get_args_parser().parse_args([]))
    torch.save({"model": five.state_dict(), "model_args": five.model_args, "optimizer": optimizer.state_dict(),
                "epoch": 0, "iteration": 2, "args": {}, "label_map": {**label_map, "Lymphocyte": 4}},
               folder / "five_classes.pt")
    torch.save(five.base.state_dict(), folder / "state_dict.pt")  # a bare state_dict, as the tutorial's users have
    ckpt = torch.load(random_checkpoint, weights_only=True)  # hand-edited weights that load_state_dict would take
    negative = {**ckpt, "model": {**ckpt["model"], "base.bn1_1.running_var": -ckpt["model"]["base.bn1_1.running_var"]}}
    torch.save(negative, folder / "negative_variance.pt")  # fused into the convolutions: nan weights, no detection
    integer = {**ckpt, "model": {**ckpt["model"], "base.conv1_1.weight": ckpt["model"]["base.conv1_1.weight"].long()}}
    torch.save(integer, folder / "integer_weights.pt")
    return SimpleNamespace(missing=folder / "missing.pt", text=folder / "notes.txt", state_dict=folder / "state_dict.pt",
                           wrong_shape=folder / "wrong_shape.pt", five_classes=folder / "five_classes.pt",
                           negative_variance=folder / "negative_variance.pt",
                           integer_weights=folder / "integer_weights.pt", random=random_checkpoint)


# (name, what the message must say, what it must not say): checkpoints every script must refuse with one line
BAD_CHECKPOINTS = [("missing", "no such checkpoint file", None),
                   ("text", "", "pickled"),  # a text file holds no pickled objects: don't say it does
                   ("state_dict", "not a checkpoint of this project", None),
                   ("wrong_shape", "", None),  # SSD300 with 5 classes saved with model_args of 4
                   ("negative_variance", "", None),  # train.py: no optimizer state; eval and detect: damaged weights
                   ("integer_weights", "", None)]
@pytest.mark.parametrize("case, says, must_not_say", BAD_CHECKPOINTS, ids=[c for c, _, _ in BAD_CHECKPOINTS])
@pytest.mark.parametrize("script", ["train", "eval", "detect"])
def test_bad_checkpoint_is_one_line_user_error(script, case, says, must_not_say, bad_checkpoints, lists4, tmp_path):
    checkpoint = getattr(bad_checkpoints, case)
    module = SCRIPTS[script]
    args = module.get_args_parser().parse_args(command_line(script, checkpoint, lists4, list_test_images(lists4)[0],
                                                            tmp_path))
    with pytest.raises(UserError) as e:
        module.main(args)
    message = str(e.value)
    assert "\n" not in message and str(checkpoint) in message and says in message, message
    assert must_not_say is None or must_not_say not in message, message


@pytest.mark.parametrize("case, says", [("negative_variance", "base.bn1_1.running_var holds a negative variance"),
                                        ("integer_weights", "base.conv1_1.weight is not floating point")])
def test_weights_that_load_but_cannot_be_right_are_refused(case, says, bad_checkpoints):
    with pytest.raises(UserError, match=f"damaged weights: {says}"):
        detect.load_model(getattr(bad_checkpoints, case))


@pytest.mark.parametrize("script", ["train", "eval"])
def test_checkpoint_of_other_classes_is_refused_on_bccd_lists(script, bad_checkpoints, lists4, tmp_path):
    """A consistent model of 4 classes + background is a good checkpoint (detect.py counts the classes of any such
    checkpoint: test_classes.py), but training or evaluating it on lists of BCCD's classes is refused, in one line
    naming both sets of classes."""
    module = SCRIPTS[script]
    args = module.get_args_parser().parse_args(command_line(script, bad_checkpoints.five_classes, lists4, None, tmp_path))
    with pytest.raises(UserError) as e:
        module.main(args)
    message = str(e.value)
    assert "\n" not in message and str(bad_checkpoints.five_classes) in message, message
    assert "RBC, WBC, Platelets, Lymphocyte" in message and str(lists4) in message and "label_map.json" in message
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# End to end, as commands: lists -> train -> eval -> detect
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_end_to_end_as_commands(bccd_dir, tmp_path, run_script):
    """The README's workflow as a user runs it, each step a fresh `python script.py`, on BCCD (or, without it, the
    generated copy), with 4 TRAIN and 2 TEST images so that it is quick. Resuming is tested bit for bit above, and
    as a command under torchrun (test_distributed.py)."""
    result = run_script("create_data_lists.py", "--data-folder", bccd_dir, "--output-folder", tmp_path / "all")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^TRAIN: \d+ images, \d+ objects \(RBC \d+, WBC \d+, Platelets \d+\)$", result.stdout, re.M)
    lists, run = truncate_lists(tmp_path / "all", tmp_path / "lists", 4, 2), tmp_path / "run"
    result = run_script("train.py", *train_argv(lists, run, "--iterations", 2), timeout=600)
    assert result.returncode == 0, result.stderr
    ckpt = load(run / "checkpoint.pt")
    assert (ckpt["epoch"], ckpt["iteration"]) == (0, 2) and [r["iteration"] for r in read_log(run)] == [2]

    result = run_script("eval.py", "--checkpoint", run / "checkpoint.pt", "--data-folder", lists,
                        "--output", tmp_path / "eval.json", "--device", "cpu", "--workers", "0", timeout=600)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "eval.json").read_text())
    assert metrics["images"] == 2 and metrics["checkpoint"] == str(run / "checkpoint.pt")  # outside the repository
    assert metrics["AP"] and metrics["mAP"] == pytest.approx(sum(metrics["AP"].values()) / len(metrics["AP"]))
    printed = re.search(r"^mAP\s+(\d\.\d{4})\s+(\d\.\d{4})\s+(\d\.\d{4})$", result.stdout, re.M)
    assert printed and [float(v) for v in printed.groups()] == pytest.approx(
        [metrics["mAP"], metrics["mAP_all_point"], metrics["mAP_coco"]], abs=5e-5), result.stdout

    images = list_test_images(lists)
    result = run_script("detect.py", "--checkpoint", run / "checkpoint.pt", *images, "--output-dir",
                        tmp_path / "detections", "--device", "cpu", timeout=600)
    assert result.returncode == 0, result.stderr
    records = json.loads((tmp_path / "detections" / "detections.json").read_text())
    assert [r["image"] for r in records] == [str(p) for p in images]
    with open(tmp_path / "detections" / "counts.csv") as f:
        rows = list(csv.DictReader(f))
    for r, row in zip(records, rows):
        with Image.open(r["image"]) as im:
            assert (r["width"], r["height"]) == im.size
        assert (tmp_path / "detections" / r["output"]).is_file()
        assert {name: int(row[name]) for name in bccd_labels} == {name: r["labels"].count(name) for name in bccd_labels}
    assert len(rows) == len(images)


def test_detect_refuses_to_overwrite_its_inputs(tmp_path, random_checkpoint):
    folder = tmp_path / "smears"
    folder.mkdir()
    Image.new("RGB", (64, 48), "white").save(folder / "a.jpg")
    before = (folder / "a.jpg").read_bytes()
    args = detect.get_args_parser().parse_args([str(folder), "--checkpoint", str(random_checkpoint), "--output-dir",
                                                str(folder), "--device", "cpu"])
    with pytest.raises(UserError, match="overwrite an input image"):
        detect.main(args)
    assert (folder / "a.jpg").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["a.jpg"]


def test_bf16_is_chosen_on_a_cpu_only_where_it_is_faster(monkeypatch):
    """CPUs with the same bf16 instructions differ: bf16 ran 2.2x faster than fp32 on one we measured, 1.75x slower on
    another; so bf16_is_fast times a convolution in both (once per process) and takes bf16 only when clearly faster."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    for speedup, expected in ((2.2, True), (1.31, True), (1.1, False), (0.57, False)):
        monkeypatch.setattr(misc, "_cpu_bf16_speedup", lambda threads: speedup)
        assert misc.bf16_is_fast(cpu) is expected
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)  # emulated: never
    monkeypatch.setattr(misc, "_cpu_bf16_speedup", lambda threads: 9.)
    assert not misc.bf16_is_fast(cpu)
    monkeypatch.undo()
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)  # so that the timing runs
    misc._cpu_bf16_speedup.cache_clear()
    answers = [misc.bf16_is_fast(cpu) for _ in range(3)]
    assert misc._cpu_bf16_speedup.cache_info().misses == 1 and len(set(answers)) == 1  # timed once per process
    speedup = misc._cpu_bf16_speedup(torch.get_num_threads())
    assert 0.05 < speedup < 20, speedup  # a ratio of two real times of one convolution, not 0, inf or nan
