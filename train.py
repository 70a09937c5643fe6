"""Train SSD300 on BCCD, or on the lists of any VOC dataset (tutorial, "Training").

On one GPU, from scratch, with the BCCD recipe (the defaults; see README "Results"):
    $ python train.py --out-dir runs/ssd300
Resume an interrupted run (same command, plus):
    $ python train.py --out-dir runs/ssd300 --resume runs/ssd300/checkpoint.pt
The tutorial's setting, with ImageNet weights (needs internet once), no BatchNorm, the paper's priors:
    $ python train.py --base-weights imagenet --no-batch-norm --lr 1e-3 --batch-size 8 --schedule step --warmup 0 \
          --grad-clip 0 --prior-scales 0.1 0.2 0.375 0.55 0.725 0.9
On several GPUs (--batch-size is per process):
    $ torchrun --nproc_per_node=4 train.py --out-dir runs/ssd300-4gpu

Writes <out-dir>/checkpoint.pt (after every --checkpoint-every epochs and at the end; plain data,
written to a temporary file and then moved into place), <out-dir>/log.jsonl (one JSON line
per epoch) and, with --val-every, <out-dir>/training.png (loss, lr and validation mAP against epoch,
redrawn after each validation; needs matplotlib, else a note: pip install -r requirements-plots.txt).
The lists in --data-folder are made with create_data_lists when missing. The model has the classes of
the lists (their label_map.json), and the checkpoint carries that label map.
"""
import argparse
import contextlib
import copy
import json
import math
import os
import signal
import sys
import threading
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from create_data_lists import create_data_lists, missing_data_message
from datasets import AugmentationSampler, BCCDDataset, EpochBatches, median_image_size
from eval import check_scorable, evaluate
from misc import (UserError, all_finite, available_cpus, bf16_is_fast, check_workers, check_writable,
                  ignore_stop_signals, init_distributed, load_checkpoint, lock_folder, one_line,
                  remove_stale_temporaries, run_cli, run_info, save_atomic, write_text_atomic)
from model import PRIOR_SCALES, SSD300, MultiBoxLoss, valid_prior_scales
from plots import TRAINING_PNG, TrainingCurve
from utils import FLIPS, check_same_classes, normalize


DEFAULT_EPOCHS = 200
# BCCD recipe (results/README): smaller priors than the paper's, for platelets of 4-8% of the image
BCCD_PRIOR_SCALES = (0.06, 0.15, 0.33, 0.51, 0.69, 0.87)
# The flags of a run: a flag not given takes the resumed run's value (--resume), else this default
RECIPE = {"data_folder": "data/lists", "bccd_folder": "data/BCCD", "batch_size": 32, "lr": 0.004, "momentum": 0.9,
          "weight_decay": 5e-4, "schedule": "cosine", "decay_at": [2 / 3, 5 / 6], "warmup": 300, "grad_clip": 20.,
          "seed": 0, "base_weights": "none", "batch_norm": True, "prior_scales": list(BCCD_PRIOR_SCALES),
          "max_zoom": 4., "flips": "h", "ema_decay": 0., "amp": None, "channels_last": None, "cache_images": True,
          "val_every": 0, "checkpoint_every": 1}
# What a run resumed from a checkpoint of before these flags did (not necessarily RECIPE's value)
BEFORE_FLAG = {"flips": "h", "ema_decay": 0.}
ARCHITECTURE = ("batch_norm", "prior_scales")  # must be the resumed model's
OPERATIONAL = ("data_folder", "bccd_folder", "cache_images", "val_every", "checkpoint_every")  # change nothing learnt


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows the defaults, except where a flag's default is "the resumed run's value" (None in the parser)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def default_workers():
    """DataLoader workers: a core is left to the training process (its augmentation is light), at most 4."""
    return max(0, min(4, available_cpus() - 1))


def get_args_parser():
    p = argparse.ArgumentParser("train.py", description="Train SSD300 on BCCD. Flags not given take the resumed run's "
                                "values with --resume, else the BCCD recipe's (shown here).", formatter_class=HelpFormatter)
    r = RECIPE
    p.add_argument("--data-folder", help=f"JSON lists from create_data_lists.py (made when missing); the model gets "
                   f"the classes of their label_map.json (default: {r['data_folder']})")
    p.add_argument("--bccd-folder", help=f"BCCD, used to make the lists when --data-folder has none (default: "
                   f"{r['bccd_folder']})")
    p.add_argument("--out-dir", help="where checkpoint.pt and log.jsonl go (default: runs/ssd300; with --resume, the "
                   "checkpoint's folder)")
    p.add_argument("--batch-size", type=int, help=f"images per step and per process (paper and default: {r['batch_size']})")
    p.add_argument("--lr", type=float, help=f"peak learning rate; biases get twice it (paper: 1e-3 with an ImageNet "
                   f"base; from scratch with BatchNorm, 0.02 diverged on BCCD; default: {r['lr']})")
    p.add_argument("--momentum", type=float, help=f"SGD momentum (paper and default: {r['momentum']})")
    p.add_argument("--weight-decay", type=float, help="on convolution weights; none on biases and BatchNorm, as the "
                   f"Caffe SSD does for biases (paper and default: {r['weight_decay']})")
    p.add_argument("--iterations", type=int, default=None, help="training steps (the paper counts iterations: 120000 "
                   "at batch 32 on VOC); converted to epochs with the real batch size")
    p.add_argument("--epochs", type=int, default=None, help=f"epochs over TRAIN; overrides --iterations (default, "
                   f"when neither is given: {DEFAULT_EPOCHS})")
    p.add_argument("--schedule", choices=("cosine", "step"), help="cosine decay to zero, or step: x0.1 at each "
                   f"--decay-at (the paper's) (default: {r['schedule']})")
    p.add_argument("--decay-at", type=float, nargs="*", help="step schedule: where the lr is divided by 10, as "
                   "fractions of training (< 1) or iteration numbers (paper: 80000 100000 of 120000; default: 2/3 5/6)")
    p.add_argument("--warmup", type=int, help=f"iterations of linear lr warm-up from 1/10 of --lr (default: {r['warmup']})")
    p.add_argument("--grad-clip", type=float, help="clip the gradient norm to this (the tutorial's remedy for "
                   f"exploding gradients; norms start near 100 from scratch); 0 = off (default: {r['grad_clip']})")
    p.add_argument("--workers", type=int, default=default_workers(), help="DataLoader worker processes (default: "
                   "one core fewer than this machine has, at most 4)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, help=f"seeds initialization, shuffling and augmentation (default: {r['seed']})")
    p.add_argument("--resume", default=None, metavar="PATH", help="continue from this checkpoint (model, optimizer, "
                   "epoch, flags): `python train.py --resume runs/ssd300/checkpoint.pt` continues exactly")
    p.add_argument("--base-weights", help="imagenet (torchvision's VGG-16, downloaded), none (from scratch) or PATH "
                   f"to a torchvision VGG-16 state_dict (default: {r['base_weights']})")
    p.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, default=None,
                   help="BatchNorm after every base and auxiliary convolution (ScratchDet), needed from scratch "
                   "(default: on)")
    p.add_argument("--prior-scales", type=float, nargs=6, metavar="S", help="scales of the priors of conv4_3 ... "
                   f"conv11_2 (paper and tutorial: {' '.join(map(str, PRIOR_SCALES))}; default: "
                   f"{' '.join(map(str, BCCD_PRIOR_SCALES))})")
    p.add_argument("--max-zoom", type=float, help="largest zoom-out of the augmentation, as a multiple of the image "
                   f"(paper and default: {r['max_zoom']:g}; 1 turns zoom-out off)")
    p.add_argument("--flips", choices=FLIPS, help="geometric augmentation: h, the tutorial's horizontal flip; d4, also "
                   "vertical flips and transposes, so every rotation by 90 degrees and mirror image (a smear has no up) "
                   f"(default: {r['flips']})")
    p.add_argument("--ema-decay", type=float, help="keep an exponential moving average of the weights, updated every "
                   "step with this decay (e.g. 0.995: an average over about the last 200 steps), saved in the checkpoint "
                   f"beside the raw weights and validated with them; 0 = none (default: {r['ema_decay']:g})")
    p.add_argument("--init-weights", default=None, metavar="PATH", help="start from the weights of this SSD300 "
                   "checkpoint (a train.py checkpoint or the shipped model, with its architecture) with a new schedule "
                   "and optimizer: a warm start (default: initialized afresh)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on with CUDA, and on CPUs with native bf16 where it is faster: misc.bf16_is_fast)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last memory format (default: on with CUDA)")
    p.add_argument("--cache-images", action=argparse.BooleanOptionalAction, default=None,
                   help="decode TRAIN once and keep it in memory (BCCD: 270 MB) (default: on)")
    p.add_argument("--val-every", type=int, help="evaluate TEST every N epochs, log its mAP and redraw training.png, for "
                   "monitoring only (0 = never, the default); report results from the final checkpoint")
    p.add_argument("--checkpoint-every", type=int, help="save the checkpoint every N epochs and at the end (default: 1)")
    return p


def resolve_args(args, ckpt, say=print):
    """Fill in the flags not given: the resumed run's values (ckpt["args"]), else RECIPE's.

    Resuming, a flag given with another value than the run's is said: an architecture flag (ARCHITECTURE) is
    an error, since the weights are the checkpoint's; another changes the rest of the run, and a note says so."""
    previous = (ckpt or {}).get("args") or {}
    changed = []
    for name, default in RECIPE.items():
        value, before = getattr(args, name), previous.get(name, BEFORE_FLAG.get(name) if ckpt is not None else None)
        if value is None:
            setattr(args, name, before if before is not None else default)
        elif ckpt is not None and before is not None and value != before and name not in OPERATIONAL:
            changed.append(f"--{name.replace('_', '-')} {value} (the run's: {before})")
    if ckpt is not None:
        model_args = ckpt.get("model_args") or {}
        for name in ARCHITECTURE:
            if name in model_args and getattr(args, name) != model_args[name]:
                raise UserError(f"--resume {args.resume}: its model has {name.replace('_', ' ')} "
                                f"{model_args[name]}, not {getattr(args, name)}; leave out --{name.replace('_', '-')} "
                                f"to resume, or start a new run in another --out-dir")
        args.init_weights = previous.get("init_weights")  # where the run started from, kept for its record
        if args.epochs is None and args.iterations is None:
            args.epochs, args.iterations = previous.get("epochs"), previous.get("iterations")
        elif (args.epochs, args.iterations) != (previous.get("epochs"), previous.get("iterations")):
            changed.append(f"--epochs {args.epochs} --iterations {args.iterations} (the run's: "
                           f"{previous.get('epochs')}, {previous.get('iterations')})")
        if changed:
            say(f"note: resuming with other flags than the run's: {'; '.join(changed)}; the rest of the run follows them")
        if args.out_dir is None:
            args.out_dir = os.path.dirname(os.path.abspath(args.resume))
    if args.out_dir is None:
        args.out_dir = "runs/ssd300"
    return args


def check_args(args):
    for name in ("batch_size", "epochs", "iterations", "checkpoint_every"):
        value = getattr(args, name)
        if value is not None and not 1 <= value <= 10**7:
            raise UserError(f"--{name.replace('_', '-')} must be 1 to 10,000,000, not {value}")
    check_workers(args.workers)
    for name in ("lr", "momentum", "weight_decay", "grad_clip", "max_zoom", "warmup", "val_every"):
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
            raise UserError(f"--{name.replace('_', '-')} must be a finite number {'> 0' if name == 'lr' else '>= 0'}, "
                            f"not {value}")
    if not valid_prior_scales(args.prior_scales):
        raise UserError(f"--prior-scales must lie in (0, 1], not {' '.join(map(str, args.prior_scales))}")
    if not 1 <= args.max_zoom <= 16:
        raise UserError(f"--max-zoom must be between 1 and 16 (the paper's is 4), not {args.max_zoom}")
    if any(not math.isfinite(d) or d <= 0 for d in args.decay_at):
        raise UserError(f"--decay-at takes fractions of training in (0, 1) or iteration numbers, not "
                        f"{' '.join(map(str, args.decay_at))}")
    if args.momentum >= 1:
        raise UserError(f"--momentum must be below 1, not {args.momentum}")
    if not 0 <= args.ema_decay < 1:
        raise UserError(f"--ema-decay must be 0 (no average) or in (0, 1), not {args.ema_decay}")
    if args.seed is not None and not 0 <= args.seed < 2**63:
        raise UserError(f"--seed must be 0 to 2**63 - 1, not {args.seed}")



# ---------------------------------------------------------------------------------------------
# distributed training: a plain run is a world of one (misc.init_distributed)
# ---------------------------------------------------------------------------------------------

def compute_loss(model, criterion, images, boxes, labels, amp=False, world=1):
    """The training loss of one step: the MultiBox loss of this process's images divided by the positives
    of the global batch (all processes), times `world` since DDP averages the gradients; so the gradient
    equals that of one process running the whole global batch. A plain run is a world of one."""
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
        predicted_locs, predicted_scores = model(images)  # (N, P, 4), (N, P, C)
    loss_total, n_positives = criterion.sum_and_positives(predicted_locs, predicted_scores, boxes, labels)
    if world > 1:
        dist.all_reduce(n_positives)
    return loss_total * world / n_positives.clamp(min=1)


def lr_at(iteration, total, args):
    """Learning rate multiplier at `iteration` (0-based) of `total`: linear warm-up, then cosine or steps."""
    if iteration < args.warmup:
        return 0.1 + 0.9 * iteration / args.warmup
    if args.schedule == "cosine":
        progress = (iteration - args.warmup) / max(total - args.warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.)))
    milestones = [d * total if d < 1 else d for d in args.decay_at]
    return 0.1 ** sum(iteration >= m for m in milestones)


def make_optimizer(model, args):
    """SGD; biases at twice the learning rate (paper, Caffe); no weight decay on biases and BatchNorm."""
    decay, no_decay, biases = [], [], []
    for name, param in model.named_parameters():
        if name.endswith(".bias"):
            biases.append(param)
        elif param.dim() == 1:  # BatchNorm weights
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "lr_mult": 1., "weight_decay": args.weight_decay},
              {"params": no_decay, "lr_mult": 1., "weight_decay": 0.},
              {"params": biases, "lr_mult": 2., "weight_decay": 0.}]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=args.lr, momentum=args.momentum)


def ensure_lists(args, rank, resuming=False):
    """A new run makes missing lists from --bccd-folder (TRAIN = trainval, TEST = test); a resumed run does not,
    since lists made again with other splits would change its data without a word."""
    if not os.path.isfile(os.path.join(args.data_folder, "TRAIN_images.json")) and rank == 0:
        if resuming:
            raise UserError(f"--resume {args.resume}: no lists in {args.data_folder}; a resumed run does not make "
                            f"them (other splits would change its data): make them again as they were "
                            f"(create_data_lists.py --output-folder {args.data_folder} with the run's splits), or "
                            f"give --data-folder")
        if not os.path.isdir(args.bccd_folder):
            raise UserError(f"{args.data_folder}: no lists; and " + missing_data_message(args.bccd_folder))
        print(f"making the lists in {args.data_folder} from {args.bccd_folder} (TRAIN = trainval, TEST = test)")
        create_data_lists(args.bccd_folder, args.data_folder)


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM while training: finish the step, save, say how to resume, exit. A second
    signal stops at once (the checkpoint of the last finished epoch stays)."""

    def __init__(self):
        self.signal, self.previous = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def __call__(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        tqdm.write(f"{signal.Signals(signum).name}: stopping after this step (again to stop at once)", file=sys.stderr)


class ModelEMA:
    """An exponential moving average of a model's weights and BatchNorm statistics, updated after every step:
    ema = d * ema + (1 - d) * weights, with d = min(decay, (1 + t) / (10 + t)) at update t (TensorFlow's
    ExponentialMovingAverage), so that early on the average follows the weights closely. The step count is kept
    on the host: torch.optim.swa_utils.AveragedModel keeps it on the device and reads it back every step (a host
    sync on CUDA). A no-grad copy in eval mode; `.module` is an SSD300 to validate or save."""

    def __init__(self, model, decay, updates=0):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.updates = decay, updates

    @torch.no_grad()
    def update(self, model):
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        mine, theirs = self.module.state_dict(), model.state_dict()
        floats = [k for k, v in mine.items() if v.is_floating_point()]
        torch._foreach_lerp_([mine[k] for k in floats], [theirs[k] for k in floats], 1 - d)
        for k, v in mine.items():
            if not v.is_floating_point():  # BatchNorm's num_batches_tracked
                v.copy_(theirs[k])


class RunningLoss:
    """The loss of every step, for the progress bar, without a host sync: on CUDA each step's loss is copied
    to pinned memory asynchronously and shown once the copy has landed (a step later); on a CPU at once."""

    def __init__(self, device):
        self.cuda, self.value, self.step = device.type == "cuda", None, 0
        if self.cuda:
            self.buffers = [torch.zeros((), pin_memory=True) for _ in range(2)]
            self.events = [None, None]

    def update(self, loss):
        if not self.cuda:
            self.value = loss.item()
            return self.value
        b = self.step % 2
        if self.events[1 - b] is not None and self.events[1 - b].query():  # the previous step's copy is here
            self.value = self.buffers[1 - b].item()
        self.buffers[b].copy_(loss.detach(), non_blocking=True)
        self.events[b] = torch.cuda.Event()
        self.events[b].record()
        self.step += 1
        return self.value


def prepare_out_dir(args):
    """Create --out-dir, check that it can be written, lock it against a second train.py, and remove what a killed
    run left: its temporary files, and the log lines of epochs after the checkpoint it is resumed from."""
    out = args.out_dir
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


def check_batch(args, model_args, sampler):
    """Refuse, up front, a run whose steps would hold a single image with BatchNorm (which needs two)."""
    per_step = min(args.batch_size, len(sampler))
    if model_args.get("batch_norm") and per_step < 2:
        why = (f"--batch-size {args.batch_size}" if args.batch_size < 2 else
               f"TRAIN ({args.data_folder}) holds {len(sampler)} image{'s' * (len(sampler) != 1)} per process")
        raise UserError(f"{why}: with BatchNorm every step needs at least 2 images; use --batch-size 2 or more "
                        f"{'and more TRAIN images ' if args.batch_size >= 2 else ''}or train with --no-batch-norm")


def check_resumable(ckpt, path):
    """A checkpoint train.py can continue: the state it saves, of the right kinds (a damaged or hand-edited file,
    or a weights-only file such as the shipped model, is refused in one line before anything is written)."""
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
    if not problem:
        actions = {a.dest: a for a in get_args_parser()._actions}
        wrong = [f"--{name.replace('_', '-')} {value!r}" for name, value in ckpt["args"].items()
                 if not _fits_flag(actions.get(name), value)]
        problem = f"its args hold values no flag takes: {', '.join(wrong)}" if wrong else None
    if problem:
        raise UserError(f"--resume {path}: cannot resume from this checkpoint: {problem}")
    return ckpt


def load_optimizer_state(optimizer, ckpt, path):
    """optimizer.load_state_dict(ckpt["optimizer"]), or a UserError if that state does not fit the optimizer."""
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


def load_ema_state(ema, ckpt, path):
    """The checkpoint's weight average (train.py --ema-decay) into `ema`, or a UserError if it does not fit; a
    checkpoint without one (a run without --ema-decay, now resumed with it) starts the average afresh."""
    if "ema" not in ckpt:
        return
    try:
        if not (isinstance(ckpt.get("ema_updates"), int) and ckpt["ema_updates"] >= 0):
            raise ValueError("ema_updates is not a count")
        ema.module.load_state_dict(ckpt["ema"])
        if not all_finite(ema.module.state_dict().values()):
            raise ValueError("a weight is not finite (nan or inf)")
        ema.updates = ckpt["ema_updates"]
    except (RuntimeError, TypeError, ValueError, AttributeError) as e:
        detail = " ".join(str(e).split())[:160]
        raise UserError(f"--resume {path}: cannot resume from this checkpoint: its weight average (ema) is damaged "
                        f"({type(e).__name__}: {detail})") from None


def initial_weights(args):
    """--init-weights: the checkpoint whose weights a new run starts from. Its architecture is the run's: an
    architecture flag given with another value is an error."""
    init = load_checkpoint(args.init_weights)
    model_args = SSD300.from_checkpoint(init, args.init_weights).model_args
    for name in ARCHITECTURE:
        if getattr(args, name) is None:
            setattr(args, name, model_args[name])
        elif getattr(args, name) != model_args[name]:
            raise UserError(f"--init-weights {args.init_weights}: its model has {name.replace('_', ' ')} "
                            f"{model_args[name]}, not {getattr(args, name)}; leave out --{name.replace('_', '-')}")
    return init


def _fits_flag(action, value):
    """Whether a resumed run's recorded args value is one that train.py's flag (argparse `action`; None: no such
    flag) gives (None: not given)."""
    if action is None or value is None:
        return True
    if isinstance(action, argparse.BooleanOptionalAction):
        return isinstance(value, bool)
    values = value if action.nargs in ("*", "+") or isinstance(action.nargs, int) else [value]
    if not isinstance(values, (list, tuple)):
        return False
    kind = {int: int, float: (int, float)}.get(action.type, str)
    return all(isinstance(v, kind) and not isinstance(v, bool)
               and (action.choices is None or v in action.choices) for v in values)


def set_up(args, rank, world, device, cleanup):
    """Everything a run needs before its first step, a new run (from scratch or --init-weights) or one resumed:
    the flags, the data, the model on the device, the optimizer and the weight average with their resumed state,
    the lock on --out-dir. Every check comes before anything is written; a resumed optimizer or average that does
    not fit the model is refused here. Returns the run (a SimpleNamespace, see the end), or None when a resumed
    run has no iteration left."""
    is_main, cuda = rank == 0, device.type == "cuda"
    ckpt = check_resumable(load_checkpoint(args.resume), args.resume) if args.resume else None
    if args.resume and args.init_weights:
        raise UserError("--init-weights starts a new run from a model's weights; --resume continues a run with its "
                        "own: give one of them")
    init = initial_weights(args) if args.init_weights else None
    resolve_args(args, ckpt, say=print if is_main else (lambda _: None))
    check_args(args)
    args.amp = bf16_is_fast(device) if args.amp is None else args.amp
    args.channels_last = cuda if args.channels_last is None else args.channels_last
    torch.manual_seed(args.seed)  # the same on every rank; augmentations differ by rank (AugmentationSampler)
    if cuda:
        torch.backends.cudnn.benchmark = True

    out_ckpt = os.path.join(args.out_dir, "checkpoint.pt")
    earlier = [f for f in ("checkpoint.pt", "log.jsonl") if os.path.exists(os.path.join(args.out_dir, f))]
    continuing = ckpt is not None and os.path.exists(out_ckpt) and os.path.samefile(args.resume, out_ckpt)
    if earlier and not continuing:  # this run would overwrite that checkpoint and mix its log with this one
        hint = f"continue it with --resume {out_ckpt}" if "checkpoint.pt" in earlier else "delete it"
        raise UserError(f"{args.out_dir} already holds a training run ({' and '.join(earlier)}); {hint}, or choose "
                        f"another --out-dir")
    ensure_lists(args, rank, resuming=ckpt is not None)
    if world > 1:
        dist.barrier()
    train_set = BCCDDataset(args.data_folder, "train", max_zoom=args.max_zoom, flips=args.flips)
    val_set = BCCDDataset(args.data_folder, "test", keep_difficult=True) if args.val_every and is_main else None
    if val_set is not None:
        check_scorable(val_set)
    field = median_image_size(train_set.images)  # (width, height) of the training images: detect.py tiles larger ones
    sampler = AugmentationSampler(train_set, seed=args.seed, num_replicas=world, rank=rank)
    if ckpt is not None or init is not None:
        model = SSD300.from_checkpoint(ckpt or init, args.resume or args.init_weights)
        check_same_classes(model.label_map, train_set.label_map, args.resume or args.init_weights, args.data_folder)
    else:  # the classes of the lists (their label_map.json)
        model = SSD300(n_classes=len(train_set.label_map), label_map=train_set.label_map, batch_norm=args.batch_norm,
                       base_weights=None if args.base_weights.lower() == "none" else args.base_weights,
                       prior_scales=args.prior_scales)
    check_batch(args, model.model_args, sampler)
    drop_last = len(sampler) >= args.batch_size  # no ragged last batch for BatchNorm
    steps_per_epoch = len(EpochBatches(sampler, args.batch_size, drop_last, epochs=range(1)))
    if args.epochs is None and args.iterations is not None:
        epochs, total_iterations = None, args.iterations  # epochs: once the starting point is known
    else:
        epochs = args.epochs or DEFAULT_EPOCHS
        total_iterations = epochs * steps_per_epoch

    if world > 1 and cuda and model.batch_norm:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BN statistics over the global batch
    elif world > 1 and model.batch_norm and is_main:  # PyTorch's SyncBatchNorm runs on CUDA only
        print(f"note: BatchNorm without sync on {device.type}: each process normalizes over its own "
              f"{args.batch_size} images; running statistics are rank 0's")
    model = model.to(device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    optimizer = make_optimizer(model, args)
    ema = ModelEMA(model, args.ema_decay) if args.ema_decay else None  # of the weights in place, on the device
    start_epoch, iteration, partial = 0, 0, {}
    if ckpt is not None:  # a damaged optimizer state or average is refused here, before anything is written
        load_optimizer_state(optimizer, ckpt, args.resume)
        if ema is not None:
            load_ema_state(ema, ckpt, args.resume)
        start_epoch, iteration = ckpt["epoch"] + 1, ckpt["iteration"]
        partial = ckpt.get("partial_epoch") or {}  # an interrupted epoch: its steps done, loss sum, seconds
        if partial.get("steps", 0) >= steps_per_epoch:  # another --batch-size or data since it stopped mid-epoch
            raise UserError(f"--resume {args.resume}: it stopped after step {partial['steps']} of an epoch, and an "
                            f"epoch now has {steps_per_epoch} steps; resume with the run's --batch-size and "
                            f"--data-folder to finish that epoch, or start a new run")
    if is_main:  # the checks above passed: the run may write
        cleanup.callback(os.close, prepare_out_dir(args))  # the lock on --out-dir, held until the run ends
    if epochs is None:  # enough epochs for the iterations left (a run may stop in the middle of an epoch)
        epochs = start_epoch + math.ceil(max(total_iterations - iteration + partial.get("steps", 0), 0) / steps_per_epoch)
    if iteration >= total_iterations:
        if is_main:
            print(f"nothing to do: {args.resume} is at iteration {iteration} of {total_iterations}")
        return None
    raw_model = model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)

    val_loader = None
    if val_set is not None:
        val_loader = DataLoader(val_set, batch_size=32, collate_fn=BCCDDataset.collate_fn,
                                num_workers=min(args.workers, 4), pin_memory=cuda, worker_init_fn=ignore_stop_signals)
    if args.cache_images:
        train_set.cache()  # after the checks above: decoding BCCD takes seconds, a large dataset minutes
    log_path = os.path.join(args.out_dir, "log.jsonl")
    if is_main:
        if continuing:
            trim_log(log_path, start_epoch)  # epochs logged after the checkpoint was saved are trained again
        print(f"training on {device} x{world}: {len(train_set)} images, {steps_per_epoch} steps/epoch at batch "
              f"{args.batch_size}{'x' + str(world) if world > 1 else ''}, epochs {start_epoch + 1}-{epochs}, "
              f"{total_iterations} iterations, bf16 autocast {'on' if args.amp else 'off'}")
    stream = EpochBatches(sampler, args.batch_size, drop_last, epochs=range(start_epoch, epochs),
                          skip=partial.get("steps", 0))
    loader = DataLoader(train_set, batch_sampler=stream, collate_fn=BCCDDataset.collate_fn, num_workers=args.workers,
                        pin_memory=cuda, worker_init_fn=ignore_stop_signals)
    bar = tqdm(total=total_iterations, initial=iteration, disable=not is_main, unit="it", dynamic_ncols=True)
    curve = TrainingCurve(log_path, os.path.join(args.out_dir, TRAINING_PNG), f"train.py --out-dir {args.out_dir}",
                          say=bar.write, until=start_epoch,  # resumed elsewhere: the first run's epochs first
                          earlier_log=os.path.join(os.path.dirname(os.path.abspath(args.resume)), "log.jsonl")
                          if ckpt is not None and not continuing else None)
    return SimpleNamespace(
        args=args, device=device, world=world, is_main=is_main, model=model, raw_model=raw_model,  # raw: not DDP's
        criterion=MultiBoxLoss(raw_model.priors_cxcy).to(device), optimizer=optimizer, ema=ema,
        batches=iter(loader),  # all epochs in one stream: the workers never wait for the next epoch
        steps_per_epoch=steps_per_epoch, start_epoch=start_epoch, epochs=epochs, total_iterations=total_iterations,
        iteration=iteration, lr=None, partial=partial, val_loader=val_loader, log_path=log_path, out_ckpt=out_ckpt,
        label_map=train_set.label_map, field=field,
        provenance=(ckpt or {}).get("run_info") or run_info(device),  # where and when the run started (commit, hardware)
        bar=bar, running=RunningLoss(device), curve=curve)


class BatchFailed(Exception):
    """A batch of TRAIN could not be made (train_one_epoch): the error, and the epoch's steps done before it."""

    def __init__(self, error, n_steps, loss_sum, seconds):
        super().__init__(str(error))
        self.error, self.n_steps, self.loss_sum, self.seconds = error, n_steps, loss_sum, seconds


def train_one_epoch(run, epoch, stop):
    """The steps of one epoch (those left of it, resuming in its middle): for each batch the schedule's lr, the loss,
    its gradient, an SGD step and the weight average. Ends early at the run's last iteration, and on Ctrl-C or SIGTERM
    in a run of one process. Returns (steps done in the epoch, their loss sum on the device, seconds)."""
    args, model, optimizer, device = run.args, run.model, run.optimizer, run.device
    model.train()
    partial, run.partial = run.partial, {}
    start = time.perf_counter() - partial.get("seconds", 0.)
    loss_sum = partial["loss_sum"].to(device) if partial else torch.zeros((), device=device)
    n_steps = partial.get("steps", 0)
    for _ in range(n_steps, run.steps_per_epoch):
        if run.iteration >= run.total_iterations or (stop.signal and run.world == 1):
            break
        try:
            images, boxes, labels, _ = next(run.batches)
        except UserError as e:  # an image that cannot be read any more (changed since the lists were made)
            if run.world > 1:
                raise
            raise BatchFailed(e, n_steps, loss_sum, time.perf_counter() - start) from None
        run.lr = args.lr * lr_at(run.iteration, run.total_iterations, args)
        for group in optimizer.param_groups:
            group["lr"] = run.lr * group["lr_mult"]
        images = images.to(device, non_blocking=True)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        images = normalize(images)  # uint8 -> float on the device, in the memory format above
        boxes = [b.to(device, non_blocking=True) for b in boxes]
        labels = [l.to(device, non_blocking=True) for l in labels]
        loss = compute_loss(model, run.criterion, images, boxes, labels, amp=args.amp, world=run.world)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        if run.ema is not None:
            run.ema.update(run.raw_model)
        loss_sum += loss.detach()
        n_steps += 1
        run.iteration += 1
        shown = run.running.update(loss)
        if shown is not None:
            run.bar.set_postfix(epoch=epoch + 1, loss=f"{shown:.3f}", refresh=False)
        run.bar.update(1)
    return n_steps, loss_sum, time.perf_counter() - start


def save_checkpoint(run, epoch, partial_epoch=None):
    """checkpoint.pt: plain data, enough to rebuild the model and to resume (also in the middle of an epoch)."""
    state = {"model": run.raw_model.state_dict(), "model_args": run.raw_model.model_args,
             "optimizer": run.optimizer.state_dict(), "epoch": epoch, "iteration": run.iteration, "args": vars(run.args),
             "label_map": run.label_map, "field": list(run.field), "run_info": run.provenance}
    if run.ema is not None:
        state.update(ema=run.ema.module.state_dict(), ema_updates=run.ema.updates)
    if partial_epoch:
        state["partial_epoch"] = partial_epoch
    save_atomic(state, run.out_ckpt)


def save_partial_epoch(run, epoch, n_steps, loss_sum, seconds):
    """The checkpoint of a run stopped in the middle of `epoch` (a signal, an image that failed): the epochs before
    it, and the steps done of it (none: stopped before its first step), so that --resume goes on from there."""
    save_checkpoint(run, epoch - 1, n_steps and {"steps": n_steps, "loss_sum": loss_sum.cpu(), "seconds": seconds})


def validate(run, record):
    """TEST's mAP into the epoch's log record (--val-every), of the weights and of their average; returns the mAP."""
    args = run.args
    aps, mean_ap = evaluate(run.raw_model, run.val_loader, amp=args.amp, channels_last=args.channels_last)
    record.update(mAP=round(mean_ap, 5), AP={k: round(v, 5) for k, v in aps.items()})
    if run.ema is not None:
        aps, ema_map = evaluate(run.ema.module, run.val_loader, amp=args.amp, channels_last=args.channels_last)
        record.update(mAP_ema=round(ema_map, 5), AP_ema={k: round(v, 5) for k, v in aps.items()})
    return mean_ap


def train(args, rank, world, device, cleanup):
    """The tutorial's training loop: set up the run (set_up), then for each epoch train_one_epoch, the epoch's loss
    (stop if it is not finite), --val-every's validation, a line of log.jsonl, the checkpoint and training.png.
    Ctrl-C or SIGTERM saves where the run stopped and exits with the command that resumes it."""
    run = set_up(args, rank, world, device, cleanup)
    if run is None:
        return
    with StopRequest() as stop, run.bar:  # the bar is closed however training ends (an error: no stale bar at exit)
        for epoch in range(run.start_epoch, run.epochs):
            if run.iteration >= run.total_iterations:
                break
            try:
                n_steps, loss_sum, seconds = train_one_epoch(run, epoch, stop)
            except BatchFailed as f:  # the steps before it are saved, as a stop's are
                run.bar.close()
                save_partial_epoch(run, epoch, f.n_steps, f.loss_sum, f.seconds)
                raise UserError(f"epoch {epoch + 1}, step {f.n_steps + 1}: {one_line(f.error)} (the training "
                                f"before it is saved in {run.out_ckpt}; fix it, then resume with --resume "
                                f"{run.out_ckpt})") from None
            if stop.signal and world == 1 and n_steps < run.steps_per_epoch and run.iteration < run.total_iterations:
                run.bar.close()  # interrupted in the middle of an epoch (or before its first step): save where it stopped
                save_partial_epoch(run, epoch, n_steps, loss_sum, seconds)
                stopped(stop, run.out_ckpt, run.iteration, f"epoch {epoch + 1}, step {n_steps} of {run.steps_per_epoch}")
            if n_steps == 0:
                break
            epoch_loss = loss_sum / n_steps
            if world > 1:
                dist.all_reduce(epoch_loss)
                epoch_loss /= world
            epoch_loss = epoch_loss.item()  # one host sync per epoch
            if not math.isfinite(epoch_loss):
                run.bar.close()
                kept = (f"the last good checkpoint is kept in {args.out_dir}" if os.path.exists(run.out_ckpt) else
                        "no checkpoint was saved")
                raise UserError(f"epoch {epoch + 1}: the loss is {epoch_loss}; training stopped ({kept}). Try a lower "
                                f"--lr or --grad-clip")
            record = {"epoch": epoch + 1, "iteration": run.iteration, "loss": round(epoch_loss, 5), "lr": run.lr,
                      "seconds": round(seconds, 3), "images_per_s": round(n_steps * args.batch_size * world / seconds, 1)}
            run.bar.set_postfix(epoch=epoch + 1, loss=f"{epoch_loss:.3f}")
            last = epoch + 1 == run.epochs or run.iteration >= run.total_iterations
            stopping = stop_requested(stop, world, device)
            failed = None  # a TEST image that cannot be read: the epoch's training is saved before the error
            if run.val_loader is not None and ((epoch + 1) % args.val_every == 0 or last):
                try:
                    mean_ap = validate(run, record)
                    run.bar.set_postfix(epoch=epoch + 1, loss=f"{epoch_loss:.3f}", mAP=f"{mean_ap:.3f}")
                except UserError as e:
                    failed = e
            if run.is_main:
                with open(run.log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                if (epoch + 1) % args.checkpoint_every == 0 or last or stopping or failed:
                    save_checkpoint(run, epoch)
                if "mAP" in record:  # after a validation, between epochs: redrawn from log.jsonl
                    run.curve.update()
            if failed:
                run.bar.close()
                then = "" if last else f"; fix it, then resume with --resume {run.out_ckpt}"
                raise UserError(f"validating epoch {epoch + 1}: {failed} (the epoch's training is saved in "
                                f"{run.out_ckpt}{then})")
            if world > 1:  # the other ranks wait here, not inside the next step, while rank 0 validates and saves
                dist.barrier()
            if stopping and not last:
                run.bar.close()
                stopped(stop, run.out_ckpt, run.iteration, f"the end of epoch {epoch + 1}")
    run.bar.close()
    if run.is_main:
        print(f"done: {run.iteration} iterations; checkpoint in {run.out_ckpt}")


def stop_requested(stop, world, device):
    """Whether any process got SIGINT/SIGTERM; processes of a distributed run agree at the end of an epoch."""
    if world == 1:
        return stop.signal is not None
    flag = torch.tensor(float(stop.signal is not None), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def stopped(stop, out_ckpt, iteration, where):
    """After saving on SIGINT/SIGTERM: say where the run stopped and how to resume it, and exit (130 / 143)."""
    if int(os.environ.get("RANK", 0)) == 0:
        launcher = "torchrun ... train.py" if int(os.environ.get("WORLD_SIZE", 1)) > 1 else "python train.py"
        print(f"stopped at iteration {iteration} ({where}); saved {out_ckpt}. Resume with:\n"
              f"  {launcher} --resume {out_ckpt}", file=sys.stderr)
    sys.exit(128 + (stop.signal or signal.SIGINT))


def main(args):
    rank, world, device = init_distributed(args.device)
    try:
        with contextlib.ExitStack() as cleanup:
            train(args, rank, world, device, cleanup)
    finally:
        if world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    run_cli(main, get_args_parser())
