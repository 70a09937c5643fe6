"""train.py's runs: outputs, checkpoints, --iterations, --resume, stops (a signal, an unreadable image, a loss that
is not finite), and the resume of a checkpoint that the train.py of before its redesign wrote.

    python -m pytest tests/test_train_runs.py -q
    python -m pytest tests/test_train_runs.py -q -m "not slow"    # without the tests that train several runs

Everything runs on the CPU on a few images of 64x48: a training step at batch 2 takes seconds. train.py is called
in-process, `train.main(train.get_args_parser().parse_args([...]))`, or as a command in this process (run_main)
where the exit status and stderr are the point.

Shared runs (module fixtures, made once):
  * straight_run: 3 iterations on 4 TRAIN images at batch 2 (2 epochs), --val-every 1.
  * resumed_run: straight_run as it stood after iteration 2 (its first epoch: the checkpoint and log it had then, and
    the curve train.py draws of them), resumed to iteration 3.
"""
import errno
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import checkpoints
import datasets
import misc
import plots
import train
from conftest import CURVE, LR, REPO, assert_one_line_error, child_env, train_argv, truncate_lists
from misc import UserError
from model import SSD300, create_prior_boxes
from utils import bccd_labels, label_map

CHECKPOINT_KEYS = {"model", "model_args", "optimizer", "epoch", "iteration", "args", "label_map", "field",
                   "run_info", "ema", "ema_updates"}  # the last two: SCHEDULE has --ema-decay


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
    """--iterations 3 on 4 images at batch 2: 2 epochs (2 steps, then 1). Records every checkpoint save, and keeps a
    copy of the run as it stood after its first (first_epoch: the checkpoint and the log)."""
    out, first = tmp_path_factory.mktemp("straight"), tmp_path_factory.mktemp("first")
    saves, real_save = [], checkpoints.save_atomic

    def spy(obj, path):
        saves.append((obj["epoch"], obj["iteration"], Path(path)))
        real_save(obj, path)
        if len(saves) == 1:  # the epoch's log line is written before its save
            shutil.copy(path, first / "checkpoint.pt")
            shutil.copy(out / "log.jsonl", first / "log.jsonl")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoints, "save_atomic", spy)
        train.main(train_args(lists4, out, "--iterations", 3, "--val-every", 1))
    return SimpleNamespace(out=out, checkpoint=out / "checkpoint.pt", saves=saves, log=read_log(out),
                           first_epoch=first)


@pytest.fixture(scope="module")
def resumed_run(straight_run, lists4, tmp_path_factory):
    """straight_run stopped after iteration 2 (end of epoch 1) in `first`, with the curve train.py draws after a
    validated epoch; resumed to iteration 3 in `second`."""
    first, second = straight_run.first_epoch, tmp_path_factory.mktemp("resumed")
    if CURVE:
        plots.TrainingCurve(first / "log.jsonl", first / CURVE[0], f"train.py --out-dir {first}").update()
    train.main(train_args(lists4, second, "--iterations", 3, "--val-every", 1, "--resume", first / "checkpoint.pt"))
    return SimpleNamespace(first=first, second=second)


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


def test_progress_bar_shows_the_loss_of_every_step(lists4, tmp_path, capsys):
    """Not only at an epoch's end: with 2 steps an epoch, the bar shows a loss after the first step."""
    train.main(train_args(lists4, tmp_path / "run", "--iterations", 2))
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()
    first_step = [line for line in bar if " 1/2 " in line]
    assert first_step and all("loss=" in line for line in first_step), bar
    running = misc.RunningLoss(torch.device("cpu"))
    assert running.update(torch.tensor(2.5)) == 2.5  # on a CPU at once; on CUDA a step later, without a sync


@pytest.fixture
def truncated_test_image(lists4, tmp_path):
    """lists4 with its first TEST image cut short (found only when it is decoded)."""
    lists = truncate_lists(lists4, tmp_path / "bad-image", 4, 2)
    images = json.loads((lists / "TEST_images.json").read_text())
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(Path(images[0]).read_bytes()[:400])
    (lists / "TEST_images.json").write_text(json.dumps([str(truncated), *images[1:]]))
    return lists


def test_a_test_image_unreadable_at_validation_keeps_the_epochs_training(truncated_test_image, tmp_path, run_main):
    """--val-every: a TEST image that cannot be read stops the run after its epoch is saved, not before."""
    result = run_main("train.py", *train_argv(truncated_test_image, tmp_path / "run", "--val-every", 1,
                                              "--iterations", 4))  # 2 steps an epoch: 2 epochs
    assert_one_line_error(result, "train.py", ["validating epoch 1", "truncated.jpg", "the epoch's training is saved",
                                               f"--resume {tmp_path / 'run' / 'checkpoint.pt'}"])
    ckpt = load(tmp_path / "run" / "checkpoint.pt")
    assert (ckpt["epoch"], ckpt["iteration"]) == (0, 2)
    log = read_log(tmp_path / "run")
    assert [r["epoch"] for r in log] == [1] and "mAP" not in log[0]


def test_a_train_image_unreadable_mid_epoch_keeps_the_steps_before_it(lists4, tmp_path, monkeypatch, run_main):
    """A TRAIN image that cannot be read any more (changed since the lists were made) stops the run after the steps
    before it are saved; fixed, the run resumes there."""
    calls, load_image = [], datasets.load_image

    def failing_third(path):  # the first batch (2 images) trains; the second batch's first image fails
        calls.append(path)
        if len(calls) == 3:
            raise UserError(f"{path}: cannot read image (OSError: image file is truncated)")
        return load_image(path)
    monkeypatch.setattr(datasets, "load_image", failing_third)
    result = run_main("train.py", *train_argv(lists4, tmp_path / "run", "--iterations", 2))  # 2 steps an epoch
    assert_one_line_error(result, "train.py", ["epoch 1, step 2:", "image file is truncated", "is saved in",
                                               f"--resume {tmp_path / 'run' / 'checkpoint.pt'}"])
    ckpt = load(tmp_path / "run" / "checkpoint.pt")
    assert (ckpt["epoch"], ckpt["iteration"], ckpt["partial_epoch"]["steps"]) == (-1, 1, 1)
    monkeypatch.setattr(datasets, "load_image", load_image)
    assert run_main("train.py", "--resume", tmp_path / "run" / "checkpoint.pt").returncode == 0
    assert load(tmp_path / "run" / "checkpoint.pt")["iteration"] == 2


# ---------------------------------------------------------------------------------------------
# a checkpoint of the train.py of before its redesign (flags in a RECIPE dict) resumes exactly
# ---------------------------------------------------------------------------------------------

OLD_TRAIN_COMMIT = "b4cec21c26d715fb78ffba1613a6ed0daad78214"  # its train.py wrote the checkpoints of runs to resume
OLD_RUN = """import os, signal, sys
sys.path.insert(0, os.getcwd())
import train
step, compute_loss = int(os.environ["STOP_AT_STEP"]), train.compute_loss
def stopping_compute_loss(*args, **kwargs):  # SIGTERM in the middle of this step (1-based), as a kill would
    stopping_compute_loss.calls = getattr(stopping_compute_loss, "calls", 0) + 1
    if stopping_compute_loss.calls == step:
        os.kill(os.getpid(), signal.SIGTERM)
    return compute_loss(*args, **kwargs)
train.compute_loss = stopping_compute_loss
train.main(train.get_args_parser().parse_args(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def old_code(tmp_path_factory):
    """The project's modules at OLD_TRAIN_COMMIT in a folder of their own, and OLD_RUN; skips without git or that
    commit (a copy of the code without its history)."""
    folder = tmp_path_factory.mktemp("old")
    try:
        names = subprocess.run(["git", "ls-tree", "--name-only", OLD_TRAIN_COMMIT], cwd=REPO, capture_output=True,
                               text=True, check=True).stdout.split()
        for name in (n for n in names if n.endswith(".py")):
            (folder / name).write_bytes(subprocess.run(["git", "show", f"{OLD_TRAIN_COMMIT}:{name}"], cwd=REPO,
                                                       capture_output=True, check=True).stdout)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"needs git and commit {OLD_TRAIN_COMMIT[:7]}: the train.py whose checkpoints must resume")
    (folder / "old_run.py").write_text(OLD_RUN)
    return folder


@pytest.mark.slow
def test_a_checkpoint_of_the_old_train_py_resumes_exactly(old_code, lists4, tmp_path):
    """The old code's run of 2 epochs (with --ema-decay, --flips d4 and --val-every, as the long runs have), stopped
    by SIGTERM in the middle of epoch 2, resumed by today's train.py with --resume alone: the same checkpoint and log
    as the old code's run straight through, and the same flags."""
    def old_run(out, stop_at_step):
        return subprocess.run([sys.executable, "old_run.py", *train_argv(lists4, out, "--epochs", 2, "--val-every", 1)],
                              cwd=old_code, env={**child_env(), "STOP_AT_STEP": str(stop_at_step)},
                              capture_output=True, text=True, timeout=600)
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    result = old_run(straight, 0)
    assert result.returncode == 0, result.stderr[-2000:]
    result = old_run(stopped, 3)  # epoch 2's first step: 4 images at batch 2 are 2 steps an epoch
    assert result.returncode == 143, result.stderr[-2000:]
    ckpt = load(stopped / "checkpoint.pt")
    assert (ckpt["epoch"], ckpt["iteration"], ckpt["partial_epoch"]["steps"]) == (0, 3, 1)

    train.main(train.get_args_parser().parse_args(["--resume", str(stopped / "checkpoint.pt"), "--workers", "0"]))
    resumed, expected = load(stopped / "checkpoint.pt"), load(straight / "checkpoint.pt")
    assert set(resumed) == set(expected) == CHECKPOINT_KEYS
    for key in ("model", "optimizer", "ema", "ema_updates", "epoch", "iteration", "label_map", "field"):
        assert_same(resumed[key], expected[key], key)
    new_flags = set(resumed["args"]) - set(expected["args"])  # flags train.py has gained since: at their defaults
    defaults = vars(train.get_args_parser().parse_args([]))
    assert {k: resumed["args"][k] for k in new_flags} == {k: defaults[k] for k in new_flags}
    this_process = ("resume", "out_dir", "device", *new_flags)  # the resumed run's own: --resume, its folder, auto
    assert {k: v for k, v in resumed["args"].items() if k not in this_process} == \
           {k: v for k, v in expected["args"].items() if k not in this_process}
    assert [untimed(r) for r in read_log(stopped)] == [untimed(r) for r in read_log(straight)]
