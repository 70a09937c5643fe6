"""Distributed training and evaluation (train.py and eval.py under torchrun), on CPU with gloo and 2 processes.

    python -m pytest tests/test_distributed.py -q     # about a minute on 2 CPU cores

The same code runs with NCCL on several GPUs; only SyncBatchNorm (CUDA only) is not exercised here.
Every child process runs with OMP_NUM_THREADS=1, so two of them share a 2-core machine without waiting
on each other. An SSD300 forward and backward costs ~1 s an image on one core: each process gets 1-2 images.
"""
import datetime
import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import train
from conftest import CURVE, REPO, image_id
from datasets import AugmentationSampler, BCCDDataset
from model import SSD300, MultiBoxLoss
from create_data_lists import create_data_lists

WORLD = 2
# torchrun's own variables: a test run under torchrun must not pass them on to the runs it starts
DIST_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
             "TORCHELASTIC_RUN_ID")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env():
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("http_proxy", "https_proxy", "all_proxy") and k not in DIST_VARS}
    env.update(NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", OMP_NUM_THREADS="1")
    return env


def run(script, *args, nproc=1, timeout=120):
    """`python script args` (nproc=1) or `torchrun --nproc_per_node=nproc script args`, in the repository."""
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                                      "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    return subprocess.run([sys.executable, *launcher, str(REPO / script), *map(str, args)], cwd=REPO,
                          env=child_env(), capture_output=True, text=True, timeout=timeout)


def read_log(out_dir):
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# Shuffling and augmentation per rank
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def tiny_lists(tiny_voc, tmp_path):
    create_data_lists(tiny_voc(n_trainval=5, n_test=1), tmp_path / "lists", verbose=False)
    return tmp_path / "lists"


def test_ranks_share_out_the_data_each_with_its_own_augmentation(tiny_lists):
    dataset = BCCDDataset(tiny_lists, "train")  # 5 images: DistributedSampler pads to 3 a rank

    def shards(seed, epoch):
        samplers = [AugmentationSampler(dataset, seed=seed, num_replicas=WORLD, rank=r) for r in range(WORLD)]
        for s in samplers:
            s.set_epoch(epoch)
        return [list(s) for s in samplers]

    ranks = shards(seed=0, epoch=0)
    assert [len(r) for r in ranks] == [3, 3]  # the same number of steps on every rank, or DDP would hang
    indices = [i for r in ranks for i, _ in r]
    assert sorted(set(indices)) == list(range(5))  # together the ranks cover the data (one image twice)
    seeds = [s for r in ranks for _, s in r]
    assert len(set(seeds)) == len(seeds)  # every rank augments with its own seeds
    assert shards(seed=0, epoch=0) == ranks  # reproducible
    assert [i for r in shards(seed=0, epoch=1) for i, _ in r] != indices  # set_epoch reshuffles
    assert shards(seed=1, epoch=0) != ranks


# ---------------------------------------------------------------------------------------------
# One DDP step has the gradient of one process on the whole global batch
# ---------------------------------------------------------------------------------------------

def global_batch():
    """2 fixed images, one per rank, with 1 and 3 objects: different numbers of positives, so a loss
    normalized by each rank's own positives would give another gradient. Small and large objects, so
    that the predictions of most feature maps get a gradient."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 300, 300, generator=g)  # (N, 3, 300, 300)
    boxes = [torch.tensor([[0.1, 0.1, 0.5, 0.6]]),
             torch.tensor([[0.05, 0.1, 0.13, 0.2], [0.4, 0.4, 0.9, 0.8], [0.6, 0.05, 0.95, 0.35]])]
    labels = [torch.tensor([2]), torch.tensor([1, 3, 1])]
    return images, boxes, labels


def new_model():
    torch.manual_seed(0)  # as train.py: the same initial weights in every process
    return SSD300(base_weights=None, batch_norm=False)  # no BatchNorm: on CPU its statistics are per process


def ddp_gradient_worker(rank, port, out_path):
    """One rank of train.compute_loss + backward under DDP; rank 0 saves the mean loss and the gradients."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        model = new_model()
        ddp = DistributedDataParallel(model)
        criterion = MultiBoxLoss(model.priors_cxcy)
        images, boxes, labels = global_batch()
        loss = train.compute_loss(ddp, criterion, images[rank:rank + 1], boxes[rank:rank + 1], labels[rank:rank + 1],
                                  world=WORLD)
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        if rank == 0:
            torch.save({"loss": mean_loss / WORLD, "grads": {k: p.grad for k, p in model.named_parameters()}}, out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_gradient_equals_single_process_gradient(tmp_path):
    out_path = tmp_path / "ddp.pt"
    mp.spawn(ddp_gradient_worker, args=(free_port(), out_path), nprocs=WORLD, join=True)
    ddp = torch.load(out_path, weights_only=True)

    model = new_model()
    criterion = MultiBoxLoss(model.priors_cxcy)
    images, boxes, labels = global_batch()
    _, true_classes = criterion.match(boxes, labels)
    positives = (true_classes != 0).sum(1).tolist()
    assert positives[0] != positives[1]  # else normalizing per rank would go unnoticed
    loss = criterion(*model(images), boxes, labels)  # the plain loss: summed over the batch / its positives
    loss.backward()

    torch.testing.assert_close(ddp["loss"], loss.detach(), rtol=1e-5, atol=0)
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert ddp["grads"].keys() == grads.keys()
    # a random network on noise images: the ReLUs of conv11 (1x1) may all be dead; everything else learns
    assert all("conv11" in name for name, g in grads.items() if not g.abs().max() > 0)
    for name, grad in ddp["grads"].items():
        scale = grads[name].abs().max().item()
        torch.testing.assert_close(grad, grads[name], rtol=1e-5, atol=1e-5 * scale, msg=name)


# ---------------------------------------------------------------------------------------------
# train.py under torchrun: rank 0 logs and saves, resume, the non-finite loss stop
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_torchrun_training_logs_once_resumes_and_stops_together(tiny_voc, tmp_path):
    voc = tiny_voc(n_trainval=4, n_test=1)  # TRAIN = the 4 trainval images
    lists, out = tmp_path / "lists", tmp_path / "run"
    flags = ("--data-folder", lists, "--bccd-folder", voc, "--out-dir", out, "--device", "cpu", "--workers", 0,
             "--no-cache-images", "--batch-size", 2, "--warmup", 0,  # 2 images a process: 1 step an epoch
             "--val-every", 1)  # rank 0 validates on the TEST image while the other waits
    # BatchNorm (the default): with batch 2 it trains, per process on CPU, and says so
    result = run("train.py", *flags, "--epochs", 1, "--lr", 1e-4, nproc=WORLD)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (lists / "TRAIN_images.json").is_file()  # made by rank 0 while the others waited
    assert result.stdout.count("training on cpu x2: 4 images, 1 steps/epoch at batch 2x2") == 1  # rank 0 alone
    assert result.stdout.count("note: BatchNorm without sync on cpu") == 1
    log = read_log(out)
    assert [r["epoch"] for r in log] == [1] and "mAP" in log[0]  # one line, written by rank 0 only
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert (ckpt["epoch"], ckpt["iteration"]) == (0, 1)
    assert SSD300.from_checkpoint(ckpt).batch_norm  # the state_dict of the model, not of the DDP wrapper
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "log.jsonl", *CURVE]  # no temporary files left

    # resume on every rank; epoch 2 trains at an absurd lr, so epoch 3's loss is not finite:
    # every rank sees the same all-reduced epoch loss and stops, none waits for the others
    result = run("train.py", *flags, "--resume", out / "checkpoint.pt", "--epochs", 3, "--lr", 1e38, nproc=WORLD)
    assert result.returncode != 0
    assert "epoch 3: the loss is" in result.stderr
    assert result.stdout.count("epochs 2-3") == 1
    log = read_log(out)
    assert [r["epoch"] for r in log] == [1, 2] and log[1]["iteration"] == 2 and math.isfinite(log[1]["loss"])
    assert "mAP" in log[1]
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert (ckpt["epoch"], ckpt["iteration"]) == (1, 2)  # the last good checkpoint is kept


# ---------------------------------------------------------------------------------------------
# eval.py under torchrun: the same results as one process
# ---------------------------------------------------------------------------------------------

def silenced_random_checkpoint(path):
    """An untrained SSD300 whose priors of the three largest maps (38x38, 19x19, 10x10) all say background:
    its random detections are then large boxes (the 5x5, 3x3 and 1x1 maps' priors), of the size of
    big_objects' objects, so that a fair share of them is right (mAP ~0.2) and the APs depend on every image."""
    torch.manual_seed(0)
    model = SSD300(base_weights=None, batch_norm=False)
    with torch.no_grad():
        for fmap in ("conv4_3", "conv7", "conv8_2"):
            conv = getattr(model.pred_convs, "cl_" + fmap)  # channels: (box, class), class fastest
            conv.weight.zero_()
            conv.bias.zero_()
            conv.bias.view(-1, model.n_classes)[:, 0] = 30.  # softmax: background ~1, the others ~1e-13
    torch.save({"model": model.state_dict(), "model_args": model.model_args}, path)


def big_objects(ids, size, seed=0):
    """One object of each class per image, each 45-70% of the image side."""
    rng = np.random.default_rng(seed)
    objects = {}
    for name in ids:
        objects[name] = []
        for cls in ("RBC", "WBC", "Platelets"):
            w, h = (int(side * rng.uniform(0.45, 0.7)) for side in size)
            x, y = int(rng.integers(0, size[0] - w + 1)), int(rng.integers(0, size[1] - h + 1))
            objects[name].append({"name": cls, "box": [x, y, x + w, y + h]})
    return objects


@pytest.mark.slow
def test_torchrun_evaluation_equals_single_process(tiny_voc, tmp_path):
    size, n_test = (160, 120), 5  # 5 test images: shards of 3 and 2
    test_ids = [image_id(1 + i) for i in range(n_test)]  # image 0 is the one TRAIN image
    voc = tiny_voc(n_trainval=1, n_test=n_test, size=size, objects=big_objects(test_ids, size))
    create_data_lists(voc, tmp_path / "lists", verbose=False)
    silenced_random_checkpoint(tmp_path / "random.pt")

    results = []
    for nproc in (1, WORLD):
        output = tmp_path / f"eval{nproc}.json"
        result = run("eval.py", "--checkpoint", tmp_path / "random.pt", "--data-folder", tmp_path / "lists",
                     "--device", "cpu", "--workers", 0, "--batch-size", 1, "--output", output, nproc=nproc)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.count("results written to") == 1  # rank 0 alone reports
        results.append(json.loads(output.read_text()))
    single, distributed = results
    assert (single["processes"], distributed["processes"], distributed["images"]) == (1, WORLD, n_test)
    assert all(0.05 < ap < 0.9 for ap in single["AP"].values())  # many detections, neither all right nor all wrong
    for key in ("mAP", "AP", "mAP_all_point", "AP_all_point", "mAP_coco", "AP_coco"):
        assert distributed[key] == pytest.approx(single[key], rel=1e-6, abs=1e-9), key
    assert distributed["counts"] == single["counts"]  # counts of the same detections, gathered in image order
