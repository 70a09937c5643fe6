"""Train SSD300 on BCCD, or on the lists of any VOC dataset (tutorial, "Training").

On one GPU, from scratch, with the BCCD recipe (the defaults; see README "Results"):
    $ python train.py --out-dir runs/ssd300
Resume an interrupted run (its flags come from the checkpoint; a flag given here overrides the run's):
    $ python train.py --resume runs/ssd300/checkpoint.pt
The tutorial's setting, with ImageNet weights (needs internet once), no BatchNorm, the paper's priors:
    $ python train.py --base-weights imagenet --no-batch-norm --lr 1e-3 --batch-size 8 --schedule step --warmup 0 \
          --grad-clip 0 --prior-scales 0.1 0.2 0.375 0.55 0.725 0.9
Fine-tune the shipped model on a few dozen images of your microscope (their TEST: held-out images, for
set_thresholds.py), about 15 minutes on a 2-core CPU:
    $ python train.py --fine-tune --init-weights weights/ssd300_bccd.pt --data-folder data/mine --out-dir runs/mine
On several GPUs (--batch-size is per process):
    $ torchrun --nproc_per_node=4 train.py --out-dir runs/ssd300-4gpu

Writes <out-dir>/checkpoint.pt (after every --checkpoint-every epochs and at the end; plain data, written to a
temporary file and then moved into place), <out-dir>/log.jsonl (one JSON line per epoch) and, with --val-every,
<out-dir>/training.png (loss, lr and validation mAP against epoch, redrawn after each validation; needs matplotlib,
else a note: pip install -r requirements-plots.txt).
The lists in --data-folder are made when missing (create_data_lists); the model, and its checkpoint, get their classes.
"""
import argparse
import contextlib
import json
import math
import os
import time

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from checkpoints import (check_out_dir, check_resumable, prepare_out_dir, recorded_flags, resume_state, save_checkpoint,
                         trim_log)
from create_data_lists import create_data_lists, missing_data_message
from datasets import AugmentationSampler, BCCDDataset, EpochBatches, median_image_size
from eval import check_scorable, evaluate
from misc import (RunningLoss, StopRequest, UserError, available_cpus, bf16_is_fast, check_workers,
                  ignore_stop_signals, init_distributed, iterate, load_checkpoint, one_line, run_cli, run_info)
from model import PRIOR_SCALES, SSD300, ModelEMA, MultiBoxLoss, valid_prior_scales
from plots import TRAINING_PNG, TrainingCurve
from utils import CROP_KEEP, CROP_MIN_VISIBLE, FLIPS, check_same_classes, normalize

DEFAULT_EPOCHS = 200  # when neither --epochs nor --iterations is given
# BCCD recipe (results/README): smaller priors than the paper's, for platelets of 4-8% of the image
BCCD_PRIOR_SCALES = (0.06, 0.15, 0.33, 0.51, 0.69, 0.87)
ARCHITECTURE = ("batch_norm", "prior_scales")  # a resumed or warm-started run has its checkpoint's
THIS_PROCESS = ("out_dir", "device", "workers")  # flags of a process, not of a run: never taken from a checkpoint
# --fine-tune: a few dozen images from a trained model, 60 steps of 8 images (13 to 19 minutes on a 2-core CPU without
# fast bf16, results/2026-12-07-cpu/README.md), half the lr of the warm start that made the shipped model; crops keep
# the cells they cut, as the shipped model's pre-annotations box them (red-cell errors 0.9-1.7 points lower, ibid.)
FINE_TUNE = dict(batch_size=8, iterations=60, lr=0.001, warmup=10, flips="d4", max_zoom=2., crop_keep="visible",
                 checkpoint_every=50)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's, noting in args.given the flags that the command line gives (with --resume they override the run's
    own): parsed again into a namespace of placeholders, argparse puts a default only where the namespace has none."""

    def parse_known_args(self, args=None, namespace=None):
        parsed, extras = super().parse_known_args(args, namespace)
        unset = object()
        bare, _ = super().parse_known_args(args, argparse.Namespace(**dict.fromkeys(vars(parsed), unset)))
        parsed.given = {name for name, value in vars(bare).items() if value is not unset}
        return parsed, extras


def get_args_parser():
    p = ArgumentParser("train.py", description="Train SSD300 on BCCD. With --resume, the flags not given take the "
                       "resumed run's values; the defaults are the BCCD recipe's.")
    p.add_argument("--data-folder", default="data/lists", help="JSON lists from create_data_lists.py (made when "
                   "missing); the model gets the classes of their label_map.json (default: %(default)s)")
    p.add_argument("--bccd-folder", default="data/BCCD", help="BCCD, used to make the lists when --data-folder has "
                   "none (default: %(default)s)")
    p.add_argument("--out-dir", default="runs/ssd300", help="where checkpoint.pt and log.jsonl go (default: "
                   "%(default)s; with --resume, the checkpoint's folder)")
    p.add_argument("--batch-size", type=int, default=32, help="images per step and process (paper, default: %(default)s)")
    p.add_argument("--lr", type=float, default=0.004, help="peak learning rate; biases get twice it (paper: 1e-3 "
                   "with an ImageNet base; from scratch with BatchNorm, 0.02 diverged on BCCD; default: %(default)s)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (paper and default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="on convolution weights; none on biases and "
                   "BatchNorm, as the Caffe SSD does for biases (paper and default: %(default)s)")
    p.add_argument("--iterations", type=int, default=None, help="training steps (the paper counts iterations: 120000 "
                   "at batch 32 on VOC); converted to epochs with the real batch size")
    p.add_argument("--epochs", type=int, default=None, help=f"epochs over TRAIN; overrides --iterations (default, "
                   f"when neither is given: {DEFAULT_EPOCHS})")
    p.add_argument("--schedule", choices=("cosine", "step"), default="cosine", help="cosine decay to zero, or step: "
                   "x0.1 at each --decay-at (the paper's) (default: %(default)s)")
    p.add_argument("--decay-at", type=float, nargs="*", default=[2 / 3, 5 / 6], help="step schedule: lr / 10 at these "
                   "fractions of training (< 1) or iterations (paper: 80000 100000 of 120000; default: 2/3 5/6)")
    p.add_argument("--warmup", type=int, default=300, help="linear warm-up from --lr / 10, in steps (default: %(default)s)")
    p.add_argument("--grad-clip", type=float, default=20., help="clip the gradient norm to this (the tutorial's "
                   "remedy for exploding gradients; norms start near 100 from scratch); 0 = off (default: %(default)s)")
    p.add_argument("--workers", type=int, default=max(0, min(4, available_cpus() - 1)), help="DataLoader worker "
                   "processes (default: one core fewer than this machine has, left to training, at most 4)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights, shuffles, augmentation (default: %(default)s)")
    p.add_argument("--resume", default=None, metavar="PATH", help="continue from this checkpoint (model, optimizer, "
                   "epoch, flags): `python train.py --resume runs/ssd300/checkpoint.pt` continues exactly")
    p.add_argument("--base-weights", default="none", help="imagenet (torchvision's VGG-16, downloaded), none (from "
                   "scratch) or PATH to a torchvision VGG-16 state_dict (default: %(default)s)")
    p.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, default=True, help="BatchNorm after every "
                   "base and auxiliary convolution (ScratchDet), needed from scratch (default: on)")
    p.add_argument("--prior-scales", type=float, nargs=6, default=list(BCCD_PRIOR_SCALES), metavar="S",
                   help=f"scales of the priors of conv4_3 ... conv11_2 (paper and tutorial: "
                   f"{' '.join(map(str, PRIOR_SCALES))}; default: {' '.join(map(str, BCCD_PRIOR_SCALES))})")
    p.add_argument("--max-zoom", type=float, default=4., help="largest zoom-out of the augmentation, as a multiple of "
                   "the image (paper and default: %(default)g; 1 turns zoom-out off)")
    p.add_argument("--flips", choices=FLIPS, default="h", help="h: the tutorial's horizontal flip; d4: also vertical "
                   "flips and transposes, every rotation by 90 degrees and mirror image (a smear has no up) (default: h)")
    p.add_argument("--crop-keep", choices=CROP_KEEP, default="centre", help="the boxes a zoom-in crop keeps: centre, "
                   "those whose centres it holds (the paper's, default); visible, those it shows more than "
                   f"{CROP_MIN_VISIBLE * 100:g} %% of, for datasets that box cells cut by the image's edge (TXL-PBC)")
    p.add_argument("--repeat", default=None, metavar="CLASS=N[,CLASS=N]", help="an epoch holds every image with an "
                   "object of CLASS N times, each with its own augmentation (an image of several such classes: the "
                   "largest N): more steps on a rare class, e.g. Platelets=2; the epochs grow with it (default: once)")
    p.add_argument("--ema-decay", type=float, default=0., help="keep a moving average of the weights with this decay "
                   "(0.995: over about 200 steps), saved and validated beside them; 0 = none (default: %(default)g)")
    p.add_argument("--fine-tune", action=argparse.BooleanOptionalAction, default=False, help="fine-tune --init-weights "
                   "on a few dozen images: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in FINE_TUNE.items()))
    p.add_argument("--init-weights", default=None, metavar="PATH", help="start from the weights of this SSD300 "
                   "checkpoint (a train.py checkpoint or the shipped model, with its architecture) with a new schedule "
                   "and optimizer: a warm start (default: initialized afresh)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: on "
                   "with CUDA, and on CPUs with native bf16 where it is faster: misc.bf16_is_fast)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last memory format (default: on with CUDA)")
    p.add_argument("--cache-images", action=argparse.BooleanOptionalAction, default=True,
                   help="decode TRAIN once and keep it in memory (BCCD: 270 MB) (default: on)")
    p.add_argument("--val-every", type=int, default=0, help="evaluate TEST every N epochs, log its mAP and redraw "
                   "training.png, for monitoring only (0 = never, the default); report results from the final checkpoint")
    p.add_argument("--checkpoint-every", type=int, default=1, help="save every N epochs and at the end (default: 1)")
    return p


def resolve_args(args, ckpt=None, model_args=None, say=print):
    """The flags of a run. Resumed from `ckpt`, nanoGPT's way: the flags are the run's own (recorded_flags), but for
    those given on this command line (args.given; a note says which differ), and --out-dir is the checkpoint's folder
    unless given. Resumed or started from --init-weights, the architecture is that of the checkpoint's model (its
    `model_args`): an architecture flag given with another value is an error, since the weights are its."""
    if args.fine_tune and ckpt is None:  # the preset, for the flags not given (--epochs: the run's length)
        given = args.given | ({"iterations"} if "epochs" in args.given else set())
        vars(args).update({k: v for k, v in FINE_TUNE.items() if k not in given})
    if ckpt is not None:
        length, changed = ("epochs", "iterations"), []
        new_length = bool(args.given & set(length))  # either given: the run's new length, as given here
        for name, value in recorded_flags(ckpt, args.resume, get_args_parser(), THIS_PROCESS).items():
            if name not in args.given and not (new_length and name in length):
                setattr(args, name, value)
            elif name not in (*length, *ARCHITECTURE, "resume") and getattr(args, name) != value:
                changed.append(f"--{name.replace('_', '-')} {getattr(args, name)} (the run's: {value})")
        before = [ckpt["args"].get(k) for k in length]
        if new_length and [args.epochs, args.iterations] != before:
            changed.append(f"--epochs {args.epochs} --iterations {args.iterations} (the run's: {before[0]}, {before[1]})")
        if changed:
            say(f"note: resuming with other flags than the run's: {'; '.join(changed)}; the rest of the run follows them")
        if "out_dir" not in args.given:
            args.out_dir = os.path.dirname(os.path.abspath(args.resume))
    source = f"--resume {args.resume}" if ckpt is not None else f"--init-weights {args.init_weights}"
    for name in ARCHITECTURE if model_args is not None else ():
        if name in args.given and name in model_args and getattr(args, name) != model_args[name]:
            raise UserError(f"{source}: its model has {name.replace('_', ' ')} {model_args[name]}, not "
                            f"{getattr(args, name)}; leave out --{name.replace('_', '-')}"
                            f"{' to resume, or start a new run in another --out-dir' if ckpt is not None else ''}")
        setattr(args, name, model_args.get(name, getattr(args, name)))
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
# the set-up of a run: its data, its model, where it resumes
# ---------------------------------------------------------------------------------------------

def load_data(args, rank, world, resuming=False):
    """TRAIN (its lists made from --bccd-folder when missing, by a new run), TEST when --val-every validates on this
    process (else None), and TRAIN's sampler for this process. Returns (train_set, val_set, sampler)."""
    if not os.path.isfile(os.path.join(args.data_folder, "TRAIN_images.json")) and rank == 0:
        if resuming:  # lists made again with other splits would change a run's data without a word
            raise UserError(f"--resume {args.resume}: no lists in {args.data_folder}; a resumed run does not make "
                            f"them (other splits would change its data): make them again as they were "
                            f"(create_data_lists.py --output-folder {args.data_folder} with the run's splits), or "
                            f"give --data-folder")
        if not os.path.isdir(args.bccd_folder):
            raise UserError(f"{args.data_folder}: no lists; and " + missing_data_message(args.bccd_folder))
        print(f"making the lists in {args.data_folder} from {args.bccd_folder} (TRAIN = trainval, TEST = test)")
        create_data_lists(args.bccd_folder, args.data_folder)
    if world > 1:
        dist.barrier()
    train_set = BCCDDataset(args.data_folder, "train", max_zoom=args.max_zoom, flips=args.flips, crop_keep=args.crop_keep)
    val_set = BCCDDataset(args.data_folder, "test", keep_difficult=True) if args.val_every and rank == 0 else None
    if val_set is not None:
        check_scorable(val_set)
    repeats = image_repeats(args.repeat, train_set) if args.repeat else None
    return train_set, val_set, AugmentationSampler(train_set, seed=args.seed, num_replicas=world, rank=rank,
                                                   repeats=repeats)


def image_repeats(spec, train_set):
    """--repeat "Platelets=2,WBC=3": how many times an epoch holds each image of `train_set`, the largest N of the
    classes of its objects (difficult ones included), else 1. A class not in its label_map is a UserError."""
    wanted = {}
    for part in spec.split(","):
        name, _, n = part.partition("=")
        name = name.strip()
        if name not in train_set.label_map or train_set.label_map[name] == 0 or name in wanted:
            classes = ", ".join(k for k, v in train_set.label_map.items() if v)
            raise UserError(f"--repeat {spec}: {name!r} is {'named twice' if name in wanted else 'not a class'} of "
                            f"{train_set.data_folder} (its classes: {classes}); give CLASS=N[,CLASS=N]")
        if not n.strip().isdecimal() or not 1 <= int(n) <= 100:
            raise UserError(f"--repeat {spec}: {name}'s count must be a whole number from 1 to 100, not {n.strip()!r}")
        wanted[name] = int(n)
    by_label = {train_set.label_map[name]: n for name, n in wanted.items()}
    return [max((by_label.get(label, 1) for label in objects["labels"]), default=1) for objects in train_set.objects]


def build_model(args, label_map, start=None, source=None):
    """The model a run trains: that of the checkpoint `start` (resumed or --init-weights), whose classes must be
    those of the lists (label_map), else a new SSD300 of the lists' classes and the flags' architecture."""
    if start is None:
        return SSD300(n_classes=len(label_map), label_map=label_map, batch_norm=args.batch_norm,
                      base_weights=None if args.base_weights.lower() == "none" else args.base_weights,
                      prior_scales=args.prior_scales)
    model = SSD300.from_checkpoint(start, source)
    check_same_classes(model.label_map, label_map, source, args.data_folder)
    return model


def check_batch(args, model_args, sampler):
    """Refuse, up front, a run whose steps would hold a single image with BatchNorm (which needs two)."""
    per_step = min(args.batch_size, len(sampler))
    if model_args.get("batch_norm") and per_step < 2:
        why = (f"--batch-size {args.batch_size}" if args.batch_size < 2 else
               f"TRAIN ({args.data_folder}) holds {len(sampler)} image{'s' * (len(sampler) != 1)} per process")
        raise UserError(f"{why}: with BatchNorm every step needs at least 2 images; use --batch-size 2 or more "
                        f"{'and more TRAIN images ' if args.batch_size >= 2 else ''}or train with --no-batch-norm")


# ---------------------------------------------------------------------------------------------
# training: the loss, the schedule, the optimizer; a plain run is a world of one
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


class BatchFailed(Exception):
    """A batch of TRAIN could not be made (train_one_epoch): the error, and the epoch's steps done before it."""

    def __init__(self, error, n_steps, loss_sum, seconds):
        super().__init__(str(error))
        self.error, self.n_steps, self.loss_sum, self.seconds = error, n_steps, loss_sum, seconds


def train_one_epoch(model, criterion, optimizer, batches, device, epoch, args, iteration, total_iterations,
                    steps_per_epoch, partial=None, ema=None, stop=None, bar=None, world=1):
    """The steps of one epoch (those left of it, resuming in its middle from `partial`): for each batch of `batches`
    the schedule's lr at `iteration`, the loss, its gradient, an SGD step and the weight average (`ema`). Ends early
    at iteration `total_iterations`, and on Ctrl-C or SIGTERM (`stop`) in a run of one process. Returns (steps done
    in the epoch, their loss sum on the device, seconds)."""
    model.train()
    partial, running = partial or {}, RunningLoss(device)
    start = time.perf_counter() - partial.get("seconds", 0.)
    n_steps, loss_sum = partial.get("steps", 0), partial.get("loss_sum", torch.zeros(())).to(device)
    for _ in range(n_steps, steps_per_epoch):
        if iteration >= total_iterations or (stop is not None and stop.signal and world == 1):
            break
        try:
            images, boxes, labels, _ = next(batches)
        except UserError as e:  # an image that cannot be read any more (changed since the lists were made)
            if world > 1:
                raise
            raise BatchFailed(e, n_steps, loss_sum, time.perf_counter() - start) from None
        lr = args.lr * lr_at(iteration, total_iterations, args)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        images = images.to(device, non_blocking=True)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        images = normalize(images)  # uint8 -> float on the device, in the memory format above
        boxes = [b.to(device, non_blocking=True) for b in boxes]
        labels = [l.to(device, non_blocking=True) for l in labels]
        loss = compute_loss(model, criterion, images, boxes, labels, amp=args.amp, world=world)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        if ema is not None:
            ema.update(model.module if world > 1 else model)  # DDP's wrapped model
        loss_sum += loss.detach()
        n_steps, iteration = n_steps + 1, iteration + 1
        if bar is not None:
            shown = running.update(loss)
            if shown is not None:
                bar.set_postfix(epoch=epoch + 1, loss=f"{shown:.3f}", refresh=False)
            bar.update(1)
    return n_steps, loss_sum, time.perf_counter() - start


def validate(model, ema, loader, args, record):
    """TEST's mAP into the epoch's log record (--val-every), of the weights and of their average; returns the mAP."""
    for weights, key in [(model, "")] + ([(ema.module, "_ema")] if ema is not None else []):
        aps, mean_ap = evaluate(weights, loader, amp=args.amp, channels_last=args.channels_last)
        record.update({f"mAP{key}": round(mean_ap, 5), f"AP{key}": {k: round(v, 5) for k, v in aps.items()}})
    return record["mAP"]


def train(args, rank, world, device, cleanup):
    """The tutorial's training loop. The set-up, every check before anything is written: the flags (resolve_args),
    the data (load_data), the model (build_model) with its optimizer and weight average, where the run resumes
    (resume_state). Then for each epoch train_one_epoch, the epoch's loss (stop if it is not finite), --val-every's
    validation, a line of log.jsonl, the checkpoint, training.png. A signal saves and says how to resume."""
    is_main, cuda, started = rank == 0, device.type == "cuda", time.perf_counter()
    ckpt = check_resumable(load_checkpoint(args.resume), args.resume) if args.resume else None
    if args.resume and args.init_weights:
        raise UserError("--init-weights starts a new run from a model's weights; --resume continues a run with its "
                        "own: give one of them")
    if args.fine_tune and not (args.init_weights or args.resume):
        raise UserError("--fine-tune starts from a trained model: give --init-weights (the shipped one: "
                        "weights/ssd300_bccd.pt)")
    start, source = (ckpt, args.resume) if ckpt is not None else (
        load_checkpoint(args.init_weights) if args.init_weights else None, args.init_weights)
    model_args = SSD300.from_checkpoint(start, source).model_args if start is not None else None
    args = resolve_args(args, ckpt, model_args, say=print if is_main else (lambda _: None))
    check_args(args)
    args.amp = bf16_is_fast(device) if args.amp is None else args.amp
    args.channels_last = cuda if args.channels_last is None else args.channels_last
    torch.manual_seed(args.seed)  # the same on every rank; augmentations differ by rank (AugmentationSampler)
    torch.backends.cudnn.benchmark = cuda
    out_ckpt, continuing = check_out_dir(args.out_dir, args.resume)
    train_set, val_set, sampler = load_data(args, rank, world, resuming=ckpt is not None)
    field = median_image_size(train_set.images)  # (width, height) of the training images: detect.py tiles larger ones
    model = build_model(args, train_set.label_map, start, source)
    check_batch(args, model.model_args, sampler)
    drop_last = len(sampler) >= args.batch_size  # no ragged last batch for BatchNorm
    steps_per_epoch = len(EpochBatches(sampler, args.batch_size, drop_last, epochs=range(1)))
    if world > 1 and cuda and model.batch_norm:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BN statistics over the global batch
    elif world > 1 and model.batch_norm and is_main:  # PyTorch's SyncBatchNorm runs on CUDA only
        print(f"note: BatchNorm without sync on {device.type}: each process normalizes over its own "
              f"{args.batch_size} images; running statistics are rank 0's")
    model = model.to(device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    optimizer = make_optimizer(model, args)
    ema = ModelEMA(model, args.ema_decay) if args.ema_decay else None  # of the weights in place, on the device
    start_epoch, iteration, partial = resume_state(ckpt, args.resume, optimizer, ema, steps_per_epoch)
    if is_main:  # the checks above passed: the run may write
        cleanup.callback(os.close, prepare_out_dir(args.out_dir))  # the lock on --out-dir, held until the run ends
    if args.epochs is None and args.iterations is not None:  # enough epochs for the iterations left
        total_iterations = args.iterations
        epochs = start_epoch + math.ceil(max(total_iterations - iteration + partial.get("steps", 0), 0) / steps_per_epoch)
    else:
        epochs = args.epochs or DEFAULT_EPOCHS
        total_iterations = epochs * steps_per_epoch
    if iteration >= total_iterations:
        if is_main:
            print(f"nothing to do: {args.resume} is at iteration {iteration} of {total_iterations}")
        return
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    val_loader = None if val_set is None else DataLoader(val_set, batch_size=32, collate_fn=BCCDDataset.collate_fn,
                                                         num_workers=min(args.workers, 4), pin_memory=cuda,
                                                         worker_init_fn=ignore_stop_signals)
    if args.cache_images:
        train_set.cache()  # after the checks above: decoding BCCD takes seconds, a large dataset minutes
    log_path = os.path.join(args.out_dir, "log.jsonl")
    if is_main:
        if continuing:
            trim_log(log_path, start_epoch)  # epochs logged after the checkpoint was saved are trained again
        repeated = f" ({len(sampler.indices)} an epoch with --repeat {args.repeat})" if args.repeat else ""
        print(f"training on {device} x{world}: {len(train_set)} images{repeated}, {steps_per_epoch} steps/epoch at batch "
              f"{args.batch_size}{'x' + str(world) if world > 1 else ''}, epochs {start_epoch + 1}-{epochs}, "
              f"{total_iterations} iterations, bf16 autocast {'on' if args.amp else 'off'}")
    stream = EpochBatches(sampler, args.batch_size, drop_last, epochs=range(start_epoch, epochs),
                          skip=partial.get("steps", 0))
    loader = DataLoader(train_set, batch_sampler=stream, collate_fn=BCCDDataset.collate_fn, pin_memory=cuda,
                        num_workers=args.workers, worker_init_fn=ignore_stop_signals)  # all epochs, one stream
    raw_model = model.module if world > 1 else model
    criterion = MultiBoxLoss(raw_model.priors_cxcy).to(device)
    record = {"args": {k: v for k, v in vars(args).items() if k != "given"}, "label_map": train_set.label_map,
              "field": list(field), "run_info": (ckpt or {}).get("run_info") or run_info(device)}  # as the run started
    curve = TrainingCurve(log_path, os.path.join(args.out_dir, TRAINING_PNG), f"train.py --out-dir {args.out_dir}",
                          say=tqdm.write, until=start_epoch,  # resumed elsewhere: the first run's epochs first
                          earlier_log=os.path.join(os.path.dirname(os.path.abspath(args.resume)), "log.jsonl")
                          if ckpt is not None and not continuing else None)

    def save(epoch, partial_epoch=None):
        save_checkpoint(out_ckpt, raw_model, optimizer, ema, epoch, iteration, record, partial_epoch)

    bar = tqdm(total=total_iterations, initial=iteration, disable=not is_main, unit="it", dynamic_ncols=True)
    with StopRequest() as stop, bar, contextlib.closing(iterate(loader)) as batches:  # closed however it ends
        for epoch in range(start_epoch, epochs):
            if iteration >= total_iterations:
                break
            done_before = partial.get("steps", 0)
            try:
                n_steps, loss_sum, seconds = train_one_epoch(
                    model, criterion, optimizer, batches, device, epoch, args, iteration, total_iterations,
                    steps_per_epoch, partial=partial, ema=ema, stop=stop, bar=bar, world=world)
            except BatchFailed as f:  # the steps before it are saved, as a stop's are
                bar.close()
                iteration += f.n_steps - done_before
                save(epoch - 1, f.n_steps and {"steps": f.n_steps, "loss_sum": f.loss_sum.cpu(), "seconds": f.seconds})
                raise UserError(f"epoch {epoch + 1}, step {f.n_steps + 1}: {one_line(f.error)} (the training "
                                f"before it is saved in {out_ckpt}; fix it, then resume with --resume {out_ckpt})") from None
            iteration, partial = iteration + n_steps - done_before, {}
            if stop.signal and world == 1 and n_steps < steps_per_epoch and iteration < total_iterations:
                bar.close()  # interrupted in the middle of an epoch (or before its first step): save where it stopped
                save(epoch - 1, n_steps and {"steps": n_steps, "loss_sum": loss_sum.cpu(), "seconds": seconds})
                stop.exit(out_ckpt, iteration, f"epoch {epoch + 1}, step {n_steps} of {steps_per_epoch}")
            if n_steps == 0:
                break
            epoch_loss = loss_sum / n_steps
            if world > 1:
                dist.all_reduce(epoch_loss)
                epoch_loss /= world
            epoch_loss = epoch_loss.item()  # one host sync per epoch
            if not math.isfinite(epoch_loss):
                bar.close()
                kept = (f"the last good checkpoint is kept in {args.out_dir}" if os.path.exists(out_ckpt) else
                        "no checkpoint was saved")
                raise UserError(f"epoch {epoch + 1}: the loss is {epoch_loss}; training stopped ({kept}). Try a lower "
                                f"--lr or --grad-clip")
            log = {"epoch": epoch + 1, "iteration": iteration, "loss": round(epoch_loss, 5),
                   "lr": args.lr * lr_at(iteration - 1, total_iterations, args),  # that of the epoch's last step
                   "seconds": round(seconds, 3), "images_per_s": round(n_steps * args.batch_size * world / seconds, 1)}
            bar.set_postfix(epoch=epoch + 1, loss=f"{epoch_loss:.3f}")
            last = epoch + 1 == epochs or iteration >= total_iterations
            stopping = stop.anywhere(world, device)
            failed = None  # a TEST image that cannot be read: the epoch's training is saved before the error
            if val_loader is not None and ((epoch + 1) % args.val_every == 0 or last):
                try:
                    mean_ap = validate(raw_model, ema, val_loader, args, log)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{epoch_loss:.3f}", mAP=f"{mean_ap:.3f}")
                except UserError as e:
                    failed = e
            if is_main:
                with open(log_path, "a") as f:
                    f.write(json.dumps(log) + "\n")
                if (epoch + 1) % args.checkpoint_every == 0 or last or stopping or failed:
                    save(epoch)
                if "mAP" in log:  # after a validation, between epochs: redrawn from log.jsonl
                    curve.update()
            if failed:
                bar.close()
                then = "" if last else f"; fix it, then resume with --resume {out_ckpt}"
                raise UserError(f"validating epoch {epoch + 1}: {failed} (the epoch's training is saved in "
                                f"{out_ckpt}{then})")
            if world > 1:  # the other ranks wait here, not inside the next step, while rank 0 validates and saves
                dist.barrier()
            if stopping and not last:
                bar.close()
                stop.exit(out_ckpt, iteration, f"the end of epoch {epoch + 1}")
    if is_main:
        print(f"done: {iteration} iterations, {(time.perf_counter() - started) / 60:.1f} min; checkpoint in {out_ckpt}")


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
