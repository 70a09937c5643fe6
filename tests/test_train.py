"""train.py's command line: its flags and their defaults, the flags of a resumed run, and every bad flag or bad
checkpoint refused in one line before anything is written.

    python -m pytest tests/test_train.py -q

The table runs train.py's command line in this process (run_main: misc.run_cli with sys.argv set); one case runs
it as a command, in a fresh Python. The runs themselves are tests/test_train_runs.py's.
"""
import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch

import train
from conftest import assert_one_line_error, make_voc
from create_data_lists import create_data_lists


def fill(argv, root):
    return [str(a).format(root=root) for a in argv]


def snapshot(paths):
    return {p: (p.read_bytes() if p.is_file() else None) for p in paths}


@pytest.fixture(scope="module")
def world(tmp_path_factory, untrained_checkpoint):
    """A tiny VOC dataset and its lists, a copy of them whose TEST has no object, the untrained checkpoint (weights
    only), a file where a folder should be; earlier_run adds a finished run and damaged copies of its checkpoint."""
    root = tmp_path_factory.mktemp("train-flags")
    create_data_lists(make_voc(root / "voc", n_trainval=4, n_test=2), root / "lists", verbose=False)
    shutil.copy(untrained_checkpoint, root / "checkpoint.pt")
    (root / "file").write_text("a file where a folder should be\n")
    (root / "no-objects").mkdir()
    for name in os.listdir(root / "lists"):
        shutil.copy(root / "lists" / name, root / "no-objects" / name)
    objects = json.loads((root / "lists" / "TEST_objects.json").read_text())
    (root / "no-objects" / "TEST_objects.json").write_text(json.dumps([{"boxes": [], "labels": [], "difficulties": []}
                                                                        for _ in objects]))
    return root


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
    ("repeat-unknown-class", ["--repeat", "Platlets=2"], ["--repeat Platlets=2: 'Platlets' is not a class",
                                                         "(its classes: RBC, WBC, Platelets)"]),
    ("repeat-background", ["--repeat", "background=2"], ["'background' is not a class"]),
    ("repeat-named-twice", ["--repeat", "WBC=2,WBC=3"], ["'WBC' is named twice"]),
    ("repeat-count-0", ["--repeat", "Platelets=0"], ["Platelets's count must be a whole number from 1 to 100, not '0'"]),
    ("repeat-count-fraction", ["--repeat", "Platelets=1.5"], ["not '1.5'"]),
    ("repeat-no-count", ["--repeat", "Platelets"], ["not ''"]),
    ("repeat-count-superscript", ["--repeat", "Platelets=\u00b2"], ["not '\u00b2'"]),
    ("ema-decay-1", ["--ema-decay", "1"], ["--ema-decay must be 0 (no average) or in (0, 1), not 1.0"]),
    ("ema-decay-nan", ["--ema-decay", "nan"], ["--ema-decay must be 0"]),
    ("init-weights-missing", ["--init-weights", "{root}/none.pt"], ["none.pt: no such checkpoint file"]),
    ("init-weights-not-a-checkpoint", ["--init-weights", "{root}/file"], ["not a checkpoint file"]),
    ("init-weights-and-resume", ["--init-weights", "{root}/checkpoint.pt", "--resume",
                                 "{root}/earlier-run/checkpoint.pt"], ["--init-weights", "--resume", "give one of them"]),
    ("init-weights-other-architecture", ["--init-weights", "{root}/checkpoint.pt", "--no-batch-norm"],
     ["--init-weights", "its model has batch norm True, not False"]),
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


@pytest.mark.parametrize("case, argv, says", TRAIN, ids=[c[0] for c in TRAIN])
def test_train(case, argv, says, world, earlier_run, run_main):
    kept = snapshot([earlier_run / "checkpoint.pt", earlier_run / "log.jsonl", world / "file"])
    assert_one_line_error(run_main("train.py", *fill(TRAIN_BASE + argv, world)), "train.py", says)
    assert snapshot([earlier_run / "checkpoint.pt", earlier_run / "log.jsonl", world / "file"]) == kept
    assert not (world / "run").exists()  # refused before anything was written
    assert sorted(os.listdir(earlier_run)) == ["checkpoint.pt", "log.jsonl"]


@pytest.mark.parametrize("seed", ["18446744073709551616", "-1"])
def test_train_seed_out_of_range_is_one_line(seed, world, run_main):
    assert_one_line_error(run_main("train.py", *fill(TRAIN_BASE, world), "--seed", seed), "train.py",
                          f"--seed must be 0 to 2**63 - 1, not {seed}")
    assert not (world / "run").exists()


def test_a_user_error_as_a_command_is_one_line_and_status_1(world, run_script):
    """In a fresh Python, as a user runs it: status 1, one line on stderr and nothing else, no traceback."""
    result = run_script("train.py", *fill(TRAIN_BASE, world), "--max-zoom", "0.5")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("train.py: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "--max-zoom must be between 1 and 16" in result.stderr


def test_a_link_as_its_log_is_refused_before_any_work(world, tmp_path, run_main):
    """log.jsonl is appended to: a link there would write through it."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.jsonl").symlink_to(tmp_path / "elsewhere.jsonl")
    result = run_main("train.py", *fill(TRAIN_BASE, world), "--out-dir", tmp_path / "run")
    assert_one_line_error(result, "train.py", "log.jsonl there is a link")
    assert not (tmp_path / "elsewhere.jsonl").exists()


# ---------------------------------------------------------------------------------------------
# the flags: defaults in the parser, those given noted, a resumed run's own for the others
# ---------------------------------------------------------------------------------------------

def test_repeat_counts_each_image_by_the_largest_repeat_of_its_classes(world, run_main):
    lists = SimpleNamespace(label_map={"background": 0, "RBC": 1, "WBC": 2, "Platelets": 3}, data_folder="lists",
                            objects=[{"labels": [1, 1]}, {"labels": [1, 3]}, {"labels": [2, 3, 1]}, {"labels": []},
                                     {"labels": [2]}])
    assert train.image_repeats("Platelets=2,WBC=3", lists) == [1, 2, 3, 1, 3]
    assert train.image_repeats(" Platelets = 4 ", lists) == [1, 4, 4, 1, 1]
    assert train.image_repeats("RBC=1", lists) == [1] * 5
    objects = json.loads((world / "lists" / "TRAIN_objects.json").read_text())
    n = sum(2 if 1 in o["labels"] else 1 for o in objects)
    assert n > len(objects)
    result = run_main("train.py", *fill(TRAIN_BASE, world), "--repeat", "RBC=2", "--out-dir", world / "repeat-run")
    assert result.returncode == 0, result.stderr
    assert f"{len(objects)} images ({n} an epoch with --repeat RBC=2), {n // 2} steps/epoch" in result.stdout
    assert torch.load(world / "repeat-run" / "checkpoint.pt", weights_only=True)["args"]["repeat"] == "RBC=2"


def test_the_flags_given_are_noted_even_at_their_default_value():
    parser = train.get_args_parser()
    assert parser.parse_args([]).given == set()
    args = parser.parse_args(["--lr", "0.004", "--no-batch-norm", "--val", "2", "--decay-at"])  # --val: abbreviated
    assert args.given == {"lr", "batch_norm", "val_every", "decay_at"}
    assert (args.lr, args.batch_norm, args.val_every, args.decay_at, args.momentum) == (0.004, False, 2, [], 0.9)


def test_every_flag_has_its_default_in_the_parser_and_its_help_says_it():
    args = vars(train.get_args_parser().parse_args([]))
    assert {k: args[k] for k in ("data_folder", "out_dir", "batch_size", "lr", "warmup", "prior_scales", "flips",
                                 "crop_keep", "ema_decay", "cache_images", "checkpoint_every")} == {
        "data_folder": "data/lists", "out_dir": "runs/ssd300", "batch_size": 32, "lr": 0.004, "warmup": 300,
        "prior_scales": list(train.BCCD_PRIOR_SCALES), "flips": "h", "crop_keep": "centre", "ema_decay": 0.,
        "cache_images": True, "checkpoint_every": 1}
    text = " ".join(train.get_args_parser().format_help().split())
    for said in ("default: data/lists", "default: 0.004", "default: 300", "default: 20.0", "default: cosine",
                 "default: 0.06 0.15 0.33 0.51 0.69 0.87", "when neither is given: 200"):
        assert said in text, said


def recorded(**flags):
    """A checkpoint's args as a run of these flags recorded them (vars of its parsed command line)."""
    args = vars(train.get_args_parser().parse_args([]))
    args.pop("given")
    return {**args, "amp": False, "channels_last": False, **flags}


def resolve(argv, ckpt_args, model_args=None):
    notes = []
    ckpt = {"args": ckpt_args, "model_args": model_args or {"batch_norm": True,
                                                             "prior_scales": list(train.BCCD_PRIOR_SCALES)}}
    args = train.resolve_args(train.get_args_parser().parse_args(["--resume", "runs/a/checkpoint.pt", *argv]), ckpt,
                              ckpt["model_args"], say=notes.append)
    return args, notes


def test_a_resumed_run_takes_its_own_flags_but_those_given():
    run = recorded(lr=0.002, batch_size=8, flips="d4", ema_decay=0.995, epochs=10, val_every=2, workers=3,
                   device="cuda", out_dir="elsewhere", data_folder="data/txl-lists", amp=True, crop_keep="visible")
    args, notes = resolve([], run)
    assert (args.lr, args.batch_size, args.flips, args.ema_decay, args.epochs, args.iterations, args.val_every,
            args.data_folder, args.amp, args.crop_keep) == (0.002, 8, "d4", 0.995, 10, None, 2, "data/txl-lists",
                                                            True, "visible")
    old_run = dict(run)
    del old_run["crop_keep"]  # a checkpoint of the code before --crop-keep: the paper's rule, as it had
    assert resolve([], old_run)[0].crop_keep == "centre"
    assert (args.workers, args.device) == (train.get_args_parser().parse_args([]).workers, "auto")  # this process's
    assert args.out_dir == os.path.abspath("runs/a") and notes == []  # the checkpoint's folder
    args, notes = resolve(["--lr", "0.004", "--iterations", "500", "--out-dir", "b"], run)  # 0.004: the default
    assert (args.lr, args.epochs, args.iterations, args.out_dir, args.batch_size) == (0.004, None, 500, "b", 8)
    assert notes == ["note: resuming with other flags than the run's: --lr 0.004 (the run's: 0.002); --epochs None "
                     "--iterations 500 (the run's: 10, None); the rest of the run follows them"]


def test_a_resumed_run_has_its_models_architecture():
    run = recorded(batch_norm=True, prior_scales=[0.1, 0.2, 0.375, 0.55, 0.725, 0.9])
    model_args = {"batch_norm": False, "prior_scales": [0.1, 0.2, 0.375, 0.55, 0.725, 0.9]}  # the weights' own
    args, _ = resolve([], run, model_args)
    assert (args.batch_norm, args.prior_scales) == (False, model_args["prior_scales"])
    with pytest.raises(train.UserError, match="its model has batch norm False, not True; leave out --batch-norm"):
        resolve(["--batch-norm"], run, model_args)


def test_recorded_flags_are_checked_as_the_command_line_checks_them():
    parser = train.get_args_parser()
    flags = train.recorded_flags({"args": recorded(seed=3, lr=1, decay_at=[], gone_flag=1, epochs=None)}, "c.pt",
                                 parser, leave_out=train.THIS_PROCESS)
    assert (flags["seed"], flags["lr"], flags["decay_at"]) == (3, 1.0, [])
    assert not {"gone_flag", "epochs", "workers", "device", "out_dir"} & set(flags)
    every = recorded()  # every flag as a run records it, booleans false too: each taken back as it was
    assert train.recorded_flags({"args": every}, "c.pt", parser, train.THIS_PROCESS) == {
        k: v for k, v in every.items() if v is not None and k not in train.THIS_PROCESS}
    for name, value in (("lr", True), ("batch_norm", 1), ("seed", 3.0), ("prior_scales", [0.1] * 5), ("flips", "x"),
                        ("val_every", "2"), ("decay_at", [0.5, "a"])):
        with pytest.raises(train.UserError, match=f"its args hold values no flag takes: --{name.replace('_', '-')} "):
            train.recorded_flags({"args": {name: value}}, "c.pt", parser)


def test_fine_tune_is_a_preset_for_the_flags_not_given():
    shipped = {"batch_norm": True, "prior_scales": list(train.BCCD_PRIOR_SCALES)}
    parse = train.get_args_parser().parse_args
    args = train.resolve_args(parse(["--fine-tune", "--init-weights", "w.pt"]), None, shipped)
    assert {k: getattr(args, k) for k in train.FINE_TUNE} == train.FINE_TUNE and args.epochs is None
    args = train.resolve_args(parse(["--fine-tune", "--init-weights", "w.pt", "--lr", "0.004", "--epochs", "3"]), None,
                              shipped)
    assert (args.lr, args.epochs, args.iterations, args.batch_size) == (0.004, 3, None, 8)  # --epochs: the length
    assert args.crop_keep == "visible"
    args = train.resolve_args(parse(["--fine-tune", "--init-weights", "w.pt", "--crop-keep", "centre"]), None, shipped)
    assert args.crop_keep == "centre" and args.max_zoom == 2  # annotations that leave cut cells out
    assert train.resolve_args(parse(["--init-weights", "w.pt"]), None, shipped).batch_size == 32  # no preset


def test_fine_tune_needs_a_model_to_start_from(world, run_main):
    assert_one_line_error(run_main("train.py", *fill(TRAIN_BASE, world), "--fine-tune"), "train.py",
                          "--fine-tune starts from a trained model: give --init-weights")
    assert not (world / "run").exists()
