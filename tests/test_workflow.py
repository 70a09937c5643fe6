"""The tutorial's workflow as a user runs it: train.py, eval.py and detect.py (and their checkpoints).

    python -m pytest tests/test_workflow.py -q
    python -m pytest tests/test_workflow.py -q -m "not slow"    # without the tests that train or run many images

Everything runs on the CPU on a few images: a training step at batch 2 takes seconds. The scripts are
called in-process, `train.main(train.get_args_parser().parse_args([...]))`, which is fast, and as
commands (the run_script fixture) where the exit status, stderr and the absence of a traceback are
the point. Each script's `__main__` is `run_cli(main, parser)`, which prints a UserError as one line
and exits with status 1: the command tests check that once per script; the in-process tests check
that each user error raises a one-line UserError (anything else would be a traceback).

train.py's own runs are tests/test_train_runs.py's.

Shared checkpoints and images (module fixtures, made once):
  * random_checkpoint: an untrained SSD300 (seed 0); its detections depend on the image.
  * smear_images: images of every PIL mode, size and orientation, each with one bright rectangle
    at a known place, plus an unreadable file.
"""
import csv
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision.transforms.functional as FT
from PIL import Image

import detect
import eval as eval_script
import train
from conftest import assert_one_line_error, train_argv, truncate_lists
from misc import UserError
from model import SSD300
from utils import IMAGENET_MEAN, IMAGENET_STD, bccd_labels, calculate_mAP, label_map
from datasets import BCCDDataset


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def read_log(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]


def list_test_images(data_folder):
    return json.loads((Path(data_folder) / "TEST_images.json").read_text())


# ---------------------------------------------------------------------------------------------
# Data, runs and checkpoints shared by the tests
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lists4(tiny_lists):
    """conftest's tiny_lists: 4 TRAIN images of 64x48 (2 steps an epoch at batch 2), 2 TEST."""
    return tiny_lists


@pytest.fixture(scope="module")
def random_checkpoint(untrained_checkpoint):
    """conftest's untrained SSD300 (BatchNorm, BCCD priors, seed 0); its detections depend on the image."""
    return untrained_checkpoint


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
             "bias": sum(errors) / 2, "relative_error": sum(map(abs, errors)) / max(sum(true), 1),
             "relative_bias": sum(errors) / max(sum(true), 1)})
        assert count_table.count(f"\n{name} ") == 1
    assert sum(result["counts"][name]["mae"] for name in bccd_labels) > 0  # the random model miscounts


def test_count_errors_by_hand():
    det = [torch.tensor([1, 1, 1, 3]), torch.tensor([], dtype=torch.long), torch.tensor([2, 1])]
    true = [torch.tensor([1, 1, 3, 3]), torch.tensor([1]), torch.tensor([2])]
    counts = eval_script.count_errors(det, true)
    # RBC: counted 3, 0, 1 of 2, 1, 0 -> errors +1, -1, +1
    assert counts["RBC"] == pytest.approx({"true_mean": 1, "predicted_mean": 4 / 3, "mae": 1, "bias": 1 / 3,
                                           "relative_error": 1, "relative_bias": 1 / 3})
    assert counts["WBC"] == pytest.approx({"true_mean": 1 / 3, "predicted_mean": 1 / 3, "mae": 0, "bias": 0,
                                           "relative_error": 0, "relative_bias": 0})
    # Platelets: counted 1, 0, 0 of 2, 0, 0
    assert counts["Platelets"] == pytest.approx({"true_mean": 2 / 3, "predicted_mean": 1 / 3, "mae": 1 / 3,
                                                 "bias": -1 / 3, "relative_error": 1 / 2, "relative_bias": -1 / 2})


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


def test_count_sweep_takes_a_lower_min_score_that_counts_one_cell_worse():
    """Ten images of 10 WBC each (100 annotated): counted right at 0.8 only, one cell off (in all) from 0.3 to 0.75,
    more below. A cell in a hundred is chance: 0.3, the lowest within one object of the best, is chosen; two cells
    off is not a tie."""
    ms = eval_script.SWEEP_MIN_SCORES
    true = [torch.tensor([2] * 10)] * 10

    def labels(s, off_by):
        wbc = [10] * 10 if s == 0.8 else ([10] * 9 + [10 + off_by]) if 0.3 <= s else [12] * 10
        return [torch.tensor([2] * n) for n in wbc]
    for off_by, chosen, error in ((1, 0.3, 0.01), (2, 0.8, 0.)):
        counted = {(s, o): labels(s, off_by) for s in ms for o in eval_script.SWEEP_MAX_OVERLAPS}
        sweep = eval_script.sweep_counts(counted, true)
        assert sweep["chosen"]["min_score"]["WBC"] == chosen and sweep["chosen"]["error"]["WBC"] == pytest.approx(error)


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

