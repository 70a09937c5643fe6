"""train.py's run on disk: its --out-dir (check_out_dir, prepare_out_dir, trim_log) and its checkpoint, written
(save_checkpoint) and resumed from (check_resumable, resume_state, recorded_flags).

    checkpoint.pt: {"model", "model_args", "optimizer", "epoch", "iteration", "args", "label_map", "field",
                    "run_info"}, with "ema" and "ema_updates" (--ema-decay), and "partial_epoch" (a run stopped in
                    the middle of an epoch: its steps done, their loss sum and seconds)
    log.jsonl:     one JSON line per epoch, each epoch once (a resumed run trims what a killed one logged after its
                    checkpoint)
Plain data only, written to a temporary file and moved into place (misc.save_atomic); read with
misc.load_checkpoint (torch.load(..., weights_only=True)).
"""
import contextlib
import io
import json
import math
import os

import torch

from misc import (UserError, all_finite, check_writable, lock_folder, remove_stale_temporaries, save_atomic,
                  write_text_atomic)
from plots import TRAINING_PNG


def check_out_dir(out_dir, resume=None):
    """Before anything is written: --out-dir must not hold another run, which this one would overwrite and whose log
    it would mix with its own. Returns (the checkpoint's path there, whether the run continues the one there)."""
    out_ckpt = os.path.join(out_dir, "checkpoint.pt")
    earlier = [f for f in ("checkpoint.pt", "log.jsonl") if os.path.exists(os.path.join(out_dir, f))]
    continuing = resume is not None and os.path.exists(out_ckpt) and os.path.samefile(resume, out_ckpt)
    if earlier and not continuing:
        hint = f"continue it with --resume {out_ckpt}" if "checkpoint.pt" in earlier else "delete it"
        raise UserError(f"{out_dir} already holds a training run ({' and '.join(earlier)}); {hint}, or choose "
                        f"another --out-dir")
    return out_ckpt, continuing


def prepare_out_dir(out):
    """Create --out-dir, check that it can be written, lock it against a second train.py, and remove the temporary
    files a killed run left. Returns the lock's file descriptor."""
    check_writable(out, "--out-dir", folder=True)
    for name in ("checkpoint.pt", "log.jsonl", TRAINING_PNG):  # no folder, device or pipe where they go
        if os.path.islink(os.path.join(out, name)):  # log.jsonl is appended to, which would write through a link
            raise UserError(f"--out-dir {out}: {name} there is a link; train.py writes its own files: remove the link "
                            f"or choose another --out-dir")
        check_writable(os.path.join(out, name), "--out-dir")
    fd = lock_folder(out, f"--out-dir {out}: another train.py is writing there")
    remove_stale_temporaries(out, ("checkpoint.pt", "log.jsonl", TRAINING_PNG))
    return fd


def trim_log(log_path, last_epoch):
    """Keep the log's lines of epochs 1..last_epoch (those the resumed checkpoint holds), each once."""
    if not os.path.exists(log_path):
        return
    kept = {}
    with open(log_path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):  # a line cut by a kill, or nested deeper than the stack
                continue
            if isinstance(record, dict) and isinstance(record.get("epoch"), int) and record["epoch"] <= last_epoch:
                kept[record["epoch"]] = line if line.endswith("\n") else line + "\n"
    write_text_atomic("".join(kept[e] for e in sorted(kept)), log_path)


def save_checkpoint(path, model, optimizer, ema, epoch, iteration, record, partial_epoch=None):
    """checkpoint.pt: plain data, enough to rebuild the model and to resume (also in the middle of an epoch, from
    `partial_epoch`). record: what every checkpoint of the run carries (its args, label map, field, run_info)."""
    state = {"model": model.state_dict(), "model_args": model.model_args, "optimizer": optimizer.state_dict(),
             "epoch": epoch, "iteration": iteration, **record}
    if ema is not None:
        state.update(ema=ema.module.state_dict(), ema_updates=ema.updates)
    if partial_epoch:
        state["partial_epoch"] = partial_epoch
    save_atomic(state, path)


def check_resumable(ckpt, path):
    """A checkpoint train.py can continue: the state it saves, of the right kinds (a damaged or hand-edited file,
    or a weights-only file such as the shipped model, is refused in one line before anything is written; its
    flags are checked by recorded_flags)."""
    def integer(v, low):
        return isinstance(v, int) and not isinstance(v, bool) and v >= low
    partial = ckpt.get("partial_epoch") or {}
    problem = ("it holds no optimizer state (a weights-only file, such as the shipped model: start a new run "
               "instead)" if not isinstance(ckpt.get("optimizer"), dict) else
               "its epoch or iteration is not a count" if not (integer(ckpt.get("epoch"), -1) and
                                                                 integer(ckpt.get("iteration"), 0)) else
               "its args are not a dict of flags" if not isinstance(ckpt.get("args"), dict) else
               "its partial_epoch is damaged" if partial and not (
                   isinstance(partial, dict) and integer(partial.get("steps"), 1)
                   and isinstance(partial.get("loss_sum"), torch.Tensor) and partial["loss_sum"].numel() == 1
                   and bool(torch.isfinite(partial["loss_sum"]).all()) and isinstance(partial.get("seconds"), (int, float))
                   and 0 <= partial["seconds"] < math.inf) else None)
    if problem:
        raise UserError(f"--resume {path}: cannot resume from this checkpoint: {problem}")
    return ckpt


def resume_state(ckpt, path, optimizer, ema, steps_per_epoch):
    """Where a run starts: (first epoch, iteration, the interrupted epoch's steps done, loss sum and seconds or {}).
    Resumed, the optimizer's state and the weight average are loaded; either damaged is a UserError."""
    if ckpt is None:
        return 0, 0, {}
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        if not all(isinstance(g.get("lr_mult"), (int, float)) for g in optimizer.param_groups) or any(
                not isinstance(s.get("momentum_buffer"), (torch.Tensor, type(None)))
                or (s.get("momentum_buffer") is not None and (s["momentum_buffer"].shape != p.shape
                                                             or not torch.isfinite(s["momentum_buffer"]).all()))
                for p, s in optimizer.state.items()):
            raise ValueError("a learning rate multiplier or a momentum buffer does not fit the model, or is not finite")
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(f"--resume {path}: cannot resume from this checkpoint: its optimizer state is damaged "
                        f"({type(e).__name__}: {e})") from None
    if ema is not None and "ema" in ckpt:  # without one (a run without --ema-decay, resumed with it): a new average
        try:
            if not (isinstance(ckpt.get("ema_updates"), int) and ckpt["ema_updates"] >= 0):
                raise ValueError("ema_updates is not a count")
            ema.module.load_state_dict(ckpt["ema"])
            if not all_finite(ema.module.state_dict().values()):
                raise ValueError("a weight is not finite (nan or inf)")
            ema.updates = ckpt["ema_updates"]
        except (RuntimeError, TypeError, ValueError, AttributeError) as e:
            detail = " ".join(str(e).split())[:160]
            raise UserError(f"--resume {path}: cannot resume from this checkpoint: its weight average (ema) is "
                            f"damaged ({type(e).__name__}: {detail})") from None
    partial = ckpt.get("partial_epoch") or {}
    if partial.get("steps", 0) >= steps_per_epoch:  # another --batch-size or data since it stopped mid-epoch
        raise UserError(f"--resume {path}: it stopped after step {partial['steps']} of an epoch, and an epoch now has "
                        f"{steps_per_epoch} steps; resume with the run's --batch-size and --data-folder to finish that "
                        f"epoch, or start a new run")
    return ckpt["epoch"] + 1, ckpt["iteration"], partial


def recorded_flags(ckpt, path, parser, leave_out=()):
    """The flags a checkpoint's run had (its args), each checked as train.py's command line (`parser`) checks it, a
    boolean as --flag or --no-flag (BooleanOptionalAction): a value no flag takes (a damaged or hand-edited checkpoint)
    is a UserError. Left out: those recorded as None (not
    given), those no flag of `parser` has (another version's), and those named in `leave_out`."""
    flags, wrong, names = {}, [], vars(parser.parse_args([]))
    for name, value in ckpt["args"].items():
        if name not in names or name in leave_out or value is None:
            continue
        flag = "--" + name.replace("_", "-")
        words = ([flag if value else f"--no-{flag[2:]}"] if isinstance(value, bool) else
                 [flag, *map(str, value)] if isinstance(value, (list, tuple)) else [f"{flag}={value}"])
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # argparse's usage and message: one line below instead
                parsed = getattr(parser.parse_args(words), name)
        except SystemExit:
            parsed = None
        if parsed == value and isinstance(parsed, bool) == isinstance(value, bool):
            flags[name] = parsed
        else:
            wrong.append(f"{flag} {value!r}")
    if wrong:
        raise UserError(f"--resume {path}: cannot resume from this checkpoint: its args hold values no flag takes: "
                        f"{', '.join(wrong)}")
    return flags
