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

import bench
import create_data_lists
import detect
import eval as eval_script
import plots
import train
from conftest import make_voc
from create_data_lists import create_data_lists as make_lists
from misc import run_cli

SCRIPTS = {"create_data_lists": create_data_lists, "train": train, "eval": eval_script, "detect": detect,
           "bench": bench, "plots": plots}


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

TRAIN_BASE = ["--data-folder", "{root}/lists", "--out-dir", "{root}/run", "--device", "cpu", "--workers", "0",
              "--no-cache-images", "--batch-size", "2", "--iterations", "1"]
TRAIN = [
    ("lr-nan", ["--lr", "nan"], ["--lr must be a finite number > 0, not nan"]),
    ("lr-inf", ["--lr", "inf"], ["--lr"]),
    ("lr-0", ["--lr", "0"], ["--lr must be a finite number > 0"]),
    ("lr-negative", ["--lr", "-1"], ["--lr"]),
    ("momentum-nan", ["--momentum", "nan"], ["--momentum"]),
    ("momentum-1", ["--momentum", "1"], ["--momentum must be below 1"]),
    ("weight-decay-nan", ["--weight-decay", "nan"], ["--weight-decay"]),
    ("grad-clip-inf", ["--grad-clip", "inf"], ["--grad-clip"]),
    ("max-zoom-0.5", ["--max-zoom", "0.5"], ["--max-zoom must be between 1 and 16"]),
    ("prior-scales-nan", ["--prior-scales", "nan", "0.2", "0.3", "0.4", "0.5", "0.6"], ["--prior-scales"]),
    ("decay-at-nan", ["--schedule", "step", "--decay-at", "nan"], ["--decay-at"]),
    ("device-nonsense", ["--device", "nonsense"], ["nonsense"]),
    ("weight-decay-negative", ["--weight-decay", "-1"], ["--weight-decay"]),
    ("grad-clip-nan", ["--grad-clip", "nan"], ["--grad-clip"]),
    ("warmup-negative", ["--warmup", "-5"], ["--warmup"]),
    ("max-zoom-huge", ["--max-zoom", "1e6"], ["--max-zoom must be between 1 and 16"]),
    ("prior-scales-inf", ["--prior-scales", "0.1", "0.2", "0.3", "0.4", "0.5", "inf"], ["--prior-scales"]),
    ("batch-size-0", ["--batch-size", "0"], ["--batch-size must be 1 to"]),
    ("batch-size-1-batch-norm", ["--batch-size", "1"], ["BatchNorm", "--batch-size 2", "--no-batch-norm"]),
    ("epochs-0", ["--epochs", "0"], ["--epochs must be 1 to"]),
    ("workers-negative", ["--workers", "-1"], ["--workers"]),
    ("workers-1000", ["--workers", "1000"], ["--workers 1000: give 0", "the CPUs available here"]),
    ("out-dir-under-a-file", ["--out-dir", "{root}/file/run"], ["--out-dir", "cannot write there"]),
    ("resume-missing", ["--resume", "{root}/none.pt"], ["none.pt: no such checkpoint file"]),
    ("resume-not-a-checkpoint", ["--resume", "{root}/file"], ["not a checkpoint file"]),
    ("resume-other-architecture", ["--resume", "{root}/earlier-run/checkpoint.pt", "--no-batch-norm"],
     ["its model has batch norm True, not False"]),
    ("out-dir-holds-a-run", ["--out-dir", "{root}/earlier-run"], ["already holds a training run",
                                                                  "--resume"]),
    ("no-lists", ["--data-folder", "{root}/none", "--bccd-folder", "{root}/none"], ["BCCD not found"]),
    ("resume-weights-only", ["--resume", "{root}/checkpoint.pt"], ["cannot resume", "no optimizer state"]),
    ("batch-size-huge", ["--batch-size", "99999999999999999999"], ["--batch-size must be 1 to"]),
    ("out-dir-empty", ["--out-dir", ""], ["--out-dir is empty"]),
    ("resume-args-lr-text", ["--resume", "{root}/damaged-lr-text.pt"], ["args hold values no flag takes", "--lr '0.1'"]),
    ("resume-args-schedule-unknown", ["--resume", "{root}/damaged-schedule-unknown.pt"], ["--schedule 'weird'"]),
    ("resume-args-decay-at-number", ["--resume", "{root}/damaged-decay-at-number.pt"], ["--decay-at 5"]),
    ("resume-optimizer-no-lr-mult", ["--resume", "{root}/damaged-no-lr-mult.pt"], ["optimizer state"]),
    ("resume-optimizer-buffer-shape", ["--resume", "{root}/damaged-momentum-buffer-shape.pt"], ["optimizer state"]),
    ("resume-ema-shape", ["--resume", "{root}/damaged-ema-shape.pt"], ["weight average (ema) is damaged"]),
    ("resume-ema-updates-text", ["--resume", "{root}/damaged-ema-updates-text.pt"], ["ema_updates is not a count"]),
    ("resume-ema-nan", ["--resume", "{root}/damaged-ema-nan.pt"], ["weight average (ema) is damaged", "not finite"]),
    ("resume-optimizer-buffer-nan", ["--resume", "{root}/damaged-momentum-buffer-nan.pt"], ["optimizer state",
                                                                                          "not finite"]),
    ("resume-partial-loss-nan", ["--resume", "{root}/damaged-partial-loss-nan.pt"], ["partial_epoch is damaged"]),
    ("resume-partial-epoch-too-long", ["--resume", "{root}/damaged-partial-too-long.pt"],  # 2 steps an epoch here
     ["stopped after step 5 of an epoch", "now has 2 steps"]),
    ("val-no-object-to-score", ["--data-folder", "{root}/no-objects", "--val-every", "1"],
     ["TEST_objects.json: no object to score"]),
    ("resume-lists-gone", ["--resume", "{root}/earlier-run/checkpoint.pt", "--data-folder", "{root}/gone"],
     ["no lists in", "gone", "a resumed run does not make them"]),
    ("ema-decay-1", ["--ema-decay", "1"], ["--ema-decay must be 0 (no average) or in (0, 1), not 1.0"]),
    ("ema-decay-nan", ["--ema-decay", "nan"], ["--ema-decay must be 0"]),
    ("init-weights-missing", ["--init-weights", "{root}/none.pt"], ["none.pt: no such checkpoint file"]),
    ("init-weights-not-a-checkpoint", ["--init-weights", "{root}/file"], ["not a checkpoint file"]),
    ("init-weights-and-resume", ["--init-weights", "{root}/checkpoint.pt", "--resume",
                                 "{root}/earlier-run/checkpoint.pt"], ["--init-weights", "--resume", "give one of them"]),
    ("init-weights-other-architecture", ["--init-weights", "{root}/checkpoint.pt", "--no-batch-norm"],
     ["--init-weights", "its model has batch norm True, not False"]),
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

@pytest.fixture(scope="module")
def earlier_run(world):
    """A finished 1-iteration training run in {root}/earlier-run."""
    argv = fill(TRAIN_BASE, world)
    argv[argv.index("--out-dir") + 1] = str(world / "earlier-run")
    train.main(train.get_args_parser().parse_args(argv))
    ckpt = torch.load(world / "earlier-run" / "checkpoint.pt", weights_only=True)
    for name, edit in DAMAGED_RUNS.items():  # hand-edited copies: {root}/damaged-<name>.pt, without the momentum
        damaged = {**ckpt, "args": dict(ckpt["args"]), "optimizer": {**ckpt["optimizer"], "param_groups": [
            dict(g) for g in ckpt["optimizer"]["param_groups"]], "state": {}}}  # buffers (a fresh SGD has none)
        edit(damaged)
        torch.save(damaged, world / f"damaged-{name}.pt")
    return world / "earlier-run"


DAMAGED_RUNS = {
    "lr-text": lambda c: c["args"].update(lr="0.1"),
    "schedule-unknown": lambda c: c["args"].update(schedule="weird"),
    "decay-at-number": lambda c: c["args"].update(decay_at=5),
    "no-lr-mult": lambda c: c["optimizer"]["param_groups"][0].pop("lr_mult"),
    "momentum-buffer-shape": lambda c: c["optimizer"]["state"].update(
        {0: {"momentum_buffer": torch.zeros(3)}}),
    # a run with --ema-decay (a run without one never loads an average, and would resume with nothing to do)
    "ema-shape": lambda c: c.update(ema={**c["model"], "rescale_factors": torch.zeros(3)}, ema_updates=1,
                                    args={**c["args"], "ema_decay": 0.999}),
    "ema-updates-text": lambda c: c.update(ema=c["model"], ema_updates="1", args={**c["args"], "ema_decay": 0.999}),
    "ema-nan": lambda c: c.update(ema={k: v * float("nan") if v.is_floating_point() else v for k, v in c["model"].items()},
                                  ema_updates=1, args={**c["args"], "ema_decay": 0.999}),
    "momentum-buffer-nan": lambda c: c["optimizer"]["state"].update(  # parameter 0: conv4_3's rescale factors
        {0: {"momentum_buffer": torch.full_like(c["model"]["rescale_factors"], float("nan"))}}),
    "partial-loss-nan": lambda c: c.update(partial_epoch={"steps": 1, "loss_sum": torch.tensor(float("nan")),
                                                          "seconds": 1.0}),
    "partial-too-long": lambda c: c.update(partial_epoch={"steps": 5, "loss_sum": torch.tensor(1.), "seconds": 1.0}),
}


@pytest.mark.parametrize("case, argv, says, keep", CREATE_DATA_LISTS, ids=[c[0] for c in CREATE_DATA_LISTS])
def test_create_data_lists(case, argv, says, keep, world, monkeypatch, capsys):
    kept = snapshot([world / k for k in keep])
    code, _, err = cli("create_data_lists", fill(argv, world), monkeypatch, capsys)
    assert_one_line_error(code, err, "create_data_lists", says)
    assert snapshot([world / k for k in keep]) == kept


@pytest.mark.parametrize("case, argv, says", TRAIN, ids=[c[0] for c in TRAIN])
def test_train(case, argv, says, world, earlier_run, monkeypatch, capsys):
    kept = snapshot([earlier_run / "checkpoint.pt", earlier_run / "log.jsonl", world / "file"])
    code, _, err = cli("train", fill(TRAIN_BASE + argv, world), monkeypatch, capsys)
    assert_one_line_error(code, err, "train", says)
    assert snapshot([earlier_run / "checkpoint.pt", earlier_run / "log.jsonl", world / "file"]) == kept
    assert not (world / "run").exists()  # refused before anything was written
    assert sorted(os.listdir(earlier_run)) == ["checkpoint.pt", "log.jsonl"]


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
    ("train", TRAIN_BASE + ["--max-zoom", "0.5"], ["--max-zoom must be between 1 and 16"]),
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


@pytest.mark.parametrize("script, argv, says", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_a_user_error_as_a_command_is_one_line_and_status_1(script, argv, says, world, run_script):
    ckpt = torch.load(world / "checkpoint.pt", weights_only=True)
    torch.save({**ckpt, "extra": CreatesFileWhenUnpickled(world / "marker")}, world / "code.pt")
    result = run_script(f"{script}.py", *fill(argv, world))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"{script}.py: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert all(w in result.stderr for w in says), result.stderr
    assert not (world / "marker").exists(), "loading the checkpoint ran the code it carries"


def test_progress_bar_shows_the_loss_of_every_step(world, tmp_path, capsys):
    """Not only at an epoch's end: with 2 steps an epoch, the bar shows a loss after the first step."""
    argv = fill(TRAIN_BASE, world)
    argv[argv.index("--out-dir") + 1], argv[argv.index("--iterations") + 1] = str(tmp_path / "run"), "2"
    train.main(train.get_args_parser().parse_args(argv))
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()
    first_step = [line for line in bar if " 1/2 " in line]
    assert first_step and all("loss=" in line for line in first_step), bar
    running = train.RunningLoss(torch.device("cpu"))
    assert running.update(torch.tensor(2.5)) == 2.5  # on a CPU at once; on CUDA a step later, without a sync


@pytest.mark.parametrize("seed", ["18446744073709551616", "-1"])
def test_train_seed_out_of_range_is_one_line(seed, world, monkeypatch, capsys):
    code, _, err = cli("train", fill(TRAIN_BASE, world) + ["--seed", seed], monkeypatch, capsys)
    assert_one_line_error(code, err, "train", [f"--seed must be 0 to 2**63 - 1, not {seed}"])
    assert not (world / "run").exists()


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


def test_a_test_image_unreadable_at_validation_keeps_the_epochs_training(world, tmp_path, monkeypatch, capsys):
    """--val-every: a TEST image that cannot be read stops the run after its epoch is saved, not before."""
    argv = fill(TRAIN_BASE, world) + ["--data-folder", world / "bad-image", "--out-dir", tmp_path / "run",
                                      "--val-every", "1", "--iterations", "4"]  # 2 steps an epoch: 2 epochs
    code, _, err = cli("train", argv, monkeypatch, capsys)
    assert_one_line_error(code, err, "train", ["validating epoch 1", "truncated.jpg", "the epoch's training is saved",
                                               f"--resume {tmp_path / 'run' / 'checkpoint.pt'}"])
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["iteration"]) == (0, 2)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1] and "mAP" not in log[0]


def test_a_train_image_unreadable_mid_epoch_keeps_the_steps_before_it(world, tmp_path, monkeypatch, capsys):
    """A TRAIN image that cannot be read any more (changed since the lists were made) stops the run after the steps
    before it are saved; fixed, the run resumes there."""
    import datasets
    calls, load = [], datasets.load_image

    def failing_third(path):  # the first batch (2 images) trains; the second batch's first image fails
        calls.append(path)
        if len(calls) == 3:
            raise train.UserError(f"{path}: cannot read image (OSError: image file is truncated)")
        return load(path)
    monkeypatch.setattr(datasets, "load_image", failing_third)
    argv = fill(TRAIN_BASE, world) + ["--out-dir", tmp_path / "run", "--iterations", "4"]  # 2 steps an epoch
    code, _, err = cli("train", argv, monkeypatch, capsys)
    assert_one_line_error(code, err, "train", ["epoch 1, step 2:", "image file is truncated", "is saved in",
                                               f"--resume {tmp_path / 'run' / 'checkpoint.pt'}"])
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["iteration"], ckpt["partial_epoch"]["steps"]) == (-1, 1, 1)
    monkeypatch.setattr(datasets, "load_image", load)
    code, _, _ = cli("train", ["--resume", tmp_path / "run" / "checkpoint.pt"], monkeypatch, capsys)
    assert code == 0 and torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["iteration"] == 4


def test_outputs_that_are_inputs_links_or_pipes_are_refused_before_any_work(world, tmp_path, monkeypatch, capsys):
    """eval.py's --output on an OpenVINO export's .bin; plots.py's --output on one of its logs; a pipe named
    detections.json in detect.py's --output-dir (open() would wait for ever); a link to nothing as --plots or
    --output-dir; a link as train.py's log.jsonl (appending would write through it)."""
    (tmp_path / "m.xml").write_text("<net/>")
    (tmp_path / "m.bin").write_bytes(b"weights")
    code, _, err = cli("eval", ["--checkpoint", tmp_path / "m.xml", "--data-folder", world / "lists", "--output",
                                tmp_path / "m.bin"], monkeypatch, capsys)
    assert_one_line_error(code, err, "eval", ["m.bin", "which this run reads"])
    assert (tmp_path / "m.bin").read_bytes() == b"weights"
    (tmp_path / "log.jsonl").write_text('{"epoch": 1, "loss": 3.0, "lr": 0.001}\n')
    code, _, err = cli("plots", ["a=" + str(tmp_path / "log.jsonl"), "--output", tmp_path / "log.jsonl"],
                       monkeypatch, capsys)
    assert_one_line_error(code, err, "plots", ["log.jsonl", "which this run reads"])
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
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.jsonl").symlink_to(tmp_path / "elsewhere.jsonl")
    code, _, err = cli("train", fill(TRAIN_BASE, world) + ["--out-dir", tmp_path / "run"], monkeypatch, capsys)
    assert_one_line_error(code, err, "train", ["log.jsonl there is a link"])
    assert not (tmp_path / "elsewhere.jsonl").exists()


def test_plots_draw_dollar_signs_as_text_and_skip_values_that_are_not_numbers(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    log = tmp_path / "log.jsonl"
    log.write_text('{"epoch": 1, "loss": null, "lr": "0.1"}\n{"epoch": 2, "loss": 3.0, "lr": 0.001, "mAP": true}\n')
    code, out, _ = cli("plots", ["run $a^$=" + str(log), "--output", tmp_path / "p.png", "--title", "lr $a^$"],
                       monkeypatch, capsys)
    assert code in (0, None) and (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    code, _, err = cli("plots", ["a=" + str(log), "a=" + str(log), "--output", tmp_path / "q.png"], monkeypatch, capsys)
    assert_one_line_error(code, err, "plots", ["the name 'a' is given twice"])


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
