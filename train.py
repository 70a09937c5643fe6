"""Train SSD300 on BCCD (tutorial, "Training").

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
written to a temporary file and then moved into place) and <out-dir>/log.jsonl (one JSON line
per epoch). The lists in --data-folder are made with create_data_lists when missing.
"""
import argparse
import json
import math
import os
import time

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from create_data_lists import missing_data_message
from datasets import AugmentationSampler, BCCDDataset, EpochBatches
from model import PRIOR_SCALES, SSD300, MultiBoxLoss
from utils import (UserError, bf16_is_fast, create_data_lists, init_distributed, label_map, load_checkpoint,
                   median_image_size, normalize, run_cli, save_atomic)


DEFAULT_EPOCHS = 200
# BCCD recipe (results/README): smaller priors than the paper's, for platelets of 4-8% of the image
BCCD_PRIOR_SCALES = (0.06, 0.15, 0.33, 0.51, 0.69, 0.87)


def get_args_parser():
    p = argparse.ArgumentParser("train.py", description="Train SSD300 on BCCD.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-folder", default="data/lists", help="JSON lists from create_data_lists.py (made when missing)")
    p.add_argument("--bccd-folder", default="data/BCCD", help="BCCD, used to make the lists when --data-folder has none")
    p.add_argument("--out-dir", default="runs/ssd300", help="where checkpoint.pt and log.jsonl go")
    p.add_argument("--batch-size", type=int, default=32, help="images per step and per process (paper: 32)")
    p.add_argument("--lr", type=float, default=0.004, help="peak learning rate; biases get twice it (paper: 1e-3 with "
                   "an ImageNet base; from scratch with BatchNorm, 0.02 diverged on BCCD)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (paper: 0.9)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="on convolution weights; none on biases and "
                   "BatchNorm, as the Caffe SSD does for biases (paper: 5e-4)")
    p.add_argument("--iterations", type=int, default=None, help="training steps (the paper counts iterations: 120000 "
                   "at batch 32 on VOC); converted to epochs with the real batch size")
    p.add_argument("--epochs", type=int, default=None, help=f"epochs over TRAIN; overrides --iterations (default, "
                   f"when neither is given: {DEFAULT_EPOCHS})")
    p.add_argument("--schedule", choices=("cosine", "step"), default="cosine",
                   help="cosine decay to zero, or step: x0.1 at each --decay-at (the paper's)")
    p.add_argument("--decay-at", type=float, nargs="*", default=[2 / 3, 5 / 6], help="step schedule: where the lr is "
                   "divided by 10, as fractions of training (< 1) or iteration numbers (paper: 80000 100000 of 120000)")
    p.add_argument("--warmup", type=int, default=300, help="iterations of linear lr warm-up from 1/10 of --lr")
    p.add_argument("--grad-clip", type=float, default=20., help="clip the gradient norm to this (the tutorial's "
                   "remedy for exploding gradients; norms start near 100 from scratch); 0 = off")
    p.add_argument("--workers", type=int, default=4, help="DataLoader worker processes")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seeds initialization, shuffling and augmentation")
    p.add_argument("--resume", default=None, metavar="PATH", help="continue from this checkpoint (model, optimizer, "
                   "epoch); the schedule follows the flags of this run")
    p.add_argument("--base-weights", default="none", help="imagenet (torchvision's VGG-16, downloaded), none (from "
                   "scratch) or PATH to a torchvision VGG-16 state_dict")
    p.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, default=True,
                   help="BatchNorm after every base and auxiliary convolution (ScratchDet), needed from scratch")
    p.add_argument("--prior-scales", type=float, nargs=6, default=list(BCCD_PRIOR_SCALES), metavar="S",
                   help=f"scales of the priors of conv4_3 ... conv11_2 (paper and tutorial: {' '.join(map(str, PRIOR_SCALES))})")
    p.add_argument("--max-zoom", type=float, default=4., help="largest zoom-out of the augmentation, as a multiple "
                   "of the image (paper: 4; 1 turns zoom-out off)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on with CUDA and on CPUs with native bf16, such as AVX512-BF16 or AMX)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last memory format (default: on with CUDA)")
    p.add_argument("--cache-images", action=argparse.BooleanOptionalAction, default=True,
                   help="decode TRAIN once and keep it in memory (BCCD: 270 MB)")
    p.add_argument("--val-every", type=int, default=0, help="evaluate TEST every N epochs and log its mAP, for "
                   "monitoring only (0 = never); report results from the final checkpoint")
    p.add_argument("--checkpoint-every", type=int, default=1, help="save the checkpoint every N epochs (and at the end)")
    return p


def check_args(args):
    for name in ("batch_size", "epochs", "iterations", "workers", "checkpoint_every"):
        value = getattr(args, name)
        if value is not None and (value < (0 if name == "workers" else 1)):
            raise UserError(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'workers' else 'positive'}, not {value}")
    if args.lr <= 0 or args.momentum < 0 or args.weight_decay < 0 or args.warmup < 0 or args.val_every < 0:
        raise UserError("--lr must be positive; --momentum, --weight-decay, --warmup and --val-every must be >= 0")
    if args.grad_clip < 0:
        raise UserError(f"--grad-clip must be >= 0, not {args.grad_clip}")
    if any(s <= 0 or s > 1 for s in args.prior_scales):
        raise UserError("--prior-scales must lie in (0, 1]")
    if args.max_zoom < 1:
        raise UserError(f"--max-zoom must be >= 1, not {args.max_zoom}")


# ---------------------------------------------------------------------------------------------
# distributed training: a plain run is a world of one (utils.init_distributed)
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


def ensure_lists(args, rank):
    if not os.path.isfile(os.path.join(args.data_folder, "TRAIN_images.json")) and rank == 0:
        if not os.path.isdir(args.bccd_folder):
            raise UserError(f"{args.data_folder}: no lists; and " + missing_data_message(args.bccd_folder))
        print(f"making the lists in {args.data_folder} from {args.bccd_folder}")
        create_data_lists(args.bccd_folder, args.data_folder)


def main(args):
    check_args(args)
    rank, world, device = init_distributed(args.device)
    try:
        train(args, rank, world, device)
    finally:
        if world > 1:
            dist.destroy_process_group()


def train(args, rank, world, device):
    is_main = rank == 0
    cuda = device.type == "cuda"
    amp = bf16_is_fast(device) if args.amp is None else args.amp
    channels_last = cuda if args.channels_last is None else args.channels_last
    torch.manual_seed(args.seed)  # the same on every rank; augmentations differ by rank (AugmentationSampler)
    if cuda:
        torch.backends.cudnn.benchmark = True

    ckpt = load_checkpoint(args.resume) if args.resume else None
    out_ckpt = os.path.join(args.out_dir, "checkpoint.pt")
    earlier = [f for f in ("checkpoint.pt", "log.jsonl") if os.path.exists(os.path.join(args.out_dir, f))]
    continuing = ckpt is not None and os.path.exists(out_ckpt) and os.path.samefile(args.resume, out_ckpt)
    if earlier and not continuing:  # this run would overwrite that checkpoint and mix its log with this one
        hint = f"continue it with --resume {out_ckpt}" if "checkpoint.pt" in earlier else "delete it"
        raise UserError(f"{args.out_dir} already holds a training run ({' and '.join(earlier)}); {hint}, or choose "
                        f"another --out-dir")
    ensure_lists(args, rank)
    if world > 1:
        dist.barrier()
    train_set = BCCDDataset(args.data_folder, "train", cache_images=args.cache_images, max_zoom=args.max_zoom)
    field = median_image_size(train_set.images)  # (width, height) of the training images: detect.py tiles larger ones
    sampler = AugmentationSampler(train_set, seed=args.seed, num_replicas=world, rank=rank)
    drop_last = len(sampler) >= args.batch_size  # no ragged last batch for BatchNorm
    steps_per_epoch = len(EpochBatches(sampler, args.batch_size, drop_last, epochs=range(1)))
    if args.epochs is None and args.iterations is not None:
        epochs, total_iterations = None, args.iterations  # epochs: once the starting point is known
    else:
        epochs = args.epochs or DEFAULT_EPOCHS
        total_iterations = epochs * steps_per_epoch

    base_weights = None if args.base_weights.lower() == "none" else args.base_weights
    if ckpt is not None:
        model = SSD300.from_checkpoint(ckpt, args.resume)
    else:
        model = SSD300(n_classes=len(label_map), base_weights=base_weights, batch_norm=args.batch_norm,
                       prior_scales=args.prior_scales)
    model_args = model.model_args
    if world > 1 and cuda and model.batch_norm:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BN statistics over the global batch
    elif world > 1 and model.batch_norm and is_main:  # PyTorch's SyncBatchNorm runs on CUDA only
        print(f"note: BatchNorm without sync on {device.type}: each process normalizes over its own "
              f"{args.batch_size} images; running statistics are rank 0's")
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    criterion = MultiBoxLoss(model.priors_cxcy).to(device)
    optimizer = make_optimizer(model, args)
    start_epoch, iteration = 0, 0
    if ckpt is not None:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
            start_epoch, iteration = ckpt["epoch"] + 1, ckpt["iteration"]
        except (KeyError, ValueError) as e:
            raise UserError(f"{args.resume}: cannot resume from this checkpoint ({type(e).__name__}: {e})") from None
    if epochs is None:  # enough epochs for the iterations left (a run may stop in the middle of an epoch)
        epochs = start_epoch + math.ceil(max(total_iterations - iteration, 0) / steps_per_epoch)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    raw_model = model.module if world > 1 else model

    val_loader = None
    if args.val_every and is_main:
        val_set = BCCDDataset(args.data_folder, "test", keep_difficult=True)
        val_loader = DataLoader(val_set, batch_size=32, collate_fn=BCCDDataset.collate_fn,
                                num_workers=min(args.workers, 4), pin_memory=cuda)

    if is_main:
        os.makedirs(args.out_dir, exist_ok=True)
        print(f"training on {device} x{world}: {len(train_set)} images, {steps_per_epoch} steps/epoch at batch "
              f"{args.batch_size}{'x' + str(world) if world > 1 else ''}, epochs {start_epoch + 1}-{epochs}, "
              f"{total_iterations} iterations, bf16 autocast {'on' if amp else 'off'}")
    log_path = os.path.join(args.out_dir, "log.jsonl")
    stream = EpochBatches(sampler, args.batch_size, drop_last, epochs=range(start_epoch, epochs))
    loader = DataLoader(train_set, batch_sampler=stream, collate_fn=BCCDDataset.collate_fn, num_workers=args.workers,
                        pin_memory=cuda)
    batches = iter(loader)  # all epochs in one stream: the workers never wait for the next epoch
    bar = tqdm(total=total_iterations, initial=iteration, disable=not is_main, unit="it", dynamic_ncols=True)
    for epoch in range(start_epoch, epochs):
        if iteration >= total_iterations:
            break
        model.train()
        start = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        n_steps = 0
        for _ in range(steps_per_epoch):
            if iteration >= total_iterations:
                break
            images, boxes, labels, _ = next(batches)
            lr = args.lr * lr_at(iteration, total_iterations, args)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_mult"]
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            images = normalize(images)  # uint8 -> float on the device, in the memory format above
            boxes = [b.to(device, non_blocking=True) for b in boxes]
            labels = [l.to(device, non_blocking=True) for l in labels]
            loss = compute_loss(model, criterion, images, boxes, labels, amp=amp, world=world)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            loss_sum += loss.detach()
            n_steps += 1
            iteration += 1
            bar.update(1)
        if n_steps == 0:
            break
        epoch_loss = (loss_sum / n_steps)
        if world > 1:
            dist.all_reduce(epoch_loss)
            epoch_loss /= world
        epoch_loss = epoch_loss.item()  # one host sync per epoch
        seconds = time.perf_counter() - start
        if not math.isfinite(epoch_loss):
            bar.close()
            raise UserError(f"epoch {epoch + 1}: the loss is {epoch_loss}; training stopped. The last good checkpoint "
                            f"is kept in {args.out_dir}. Try a lower --lr or --grad-clip")
        record = {"epoch": epoch + 1, "iteration": iteration, "loss": round(epoch_loss, 5), "lr": lr,
                  "seconds": round(seconds, 3), "images_per_s": round(n_steps * args.batch_size * world / seconds, 1)}
        bar.set_postfix(epoch=epoch + 1, loss=f"{epoch_loss:.3f}")
        last = epoch + 1 == epochs or iteration >= total_iterations
        if val_loader is not None and ((epoch + 1) % args.val_every == 0 or last):
            from eval import evaluate
            aps, mean_ap = evaluate(raw_model, val_loader, amp=amp, channels_last=channels_last)
            record.update(mAP=round(mean_ap, 5), AP={k: round(v, 5) for k, v in aps.items()})
            bar.set_postfix(epoch=epoch + 1, loss=f"{epoch_loss:.3f}", mAP=f"{mean_ap:.3f}")
        if is_main:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if (epoch + 1) % args.checkpoint_every == 0 or last:
                save_atomic({"model": raw_model.state_dict(), "model_args": model_args,
                             "optimizer": optimizer.state_dict(), "epoch": epoch, "iteration": iteration,
                             "args": vars(args), "label_map": label_map, "field": list(field)},
                            os.path.join(args.out_dir, "checkpoint.pt"))
        if world > 1:  # the other ranks wait here, not inside the next step, while rank 0 validates and saves
            dist.barrier()
    bar.close()
    if is_main:
        print(f"done: {iteration} iterations; checkpoint in {os.path.join(args.out_dir, 'checkpoint.pt')}")


if __name__ == "__main__":
    run_cli(main, get_args_parser())
