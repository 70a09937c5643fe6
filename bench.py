"""Speed of this SSD300 beside torchvision's ssd300_vgg16, on one device, in one run, same inputs.

    $ python bench.py --json results/bench-cpu.json                 # CPU: batch 8 training, batch 1/8 inference
    $ python bench.py --device cuda --json results/bench-gpu.json   # GPU: batch 32 training, batch 1/64 inference
    $ python bench.py --only data                                    # just the data pipeline (images/s)
    $ python bench.py --only folder --checkpoint runs/ssd300/checkpoint.pt   # detect.py vs a torchvision loop

Measures (--only picks some): train (images/s of forward + loss + backward + SGD step on one fixed
batch), pipeline (train.py itself for 4 epochs with --workers: images/s of its epochs, data pipeline
included, beside the fixed batch's; on CUDA only by default, a CPU takes minutes an epoch), infer
(images/s of forward + post-processing at min_score 0.01, max_overlap 0.45, top_k 200), data
(TRAIN pipeline images/s in one process and from --workers processes, as one stream of all epochs like
train.py and restarted every epoch), parts (ms of MultiBoxLoss,
detect_objects and calculate_mAP beside torchvision's matching + loss and post-processing) and
folder (detect.py over a folder of images vs a plain fp32 torchvision loop that loads, detects,
draws and saves each image; whole commands, and their loops without Python's and torch's start-up) and
tiling (seconds per megapixel of detect.detect_image on mosaics of TEST images of --tiling-sizes,
tiled into windows of BCCD's field vs resized whole; ours only, not run by default). Both models get
the same images and the same precision (--amp: bf16 autocast); ours also uses channels-last, one of
its speed levers. Weights are random unless --checkpoint is given; timings of different machines
must not be compared.

    $ python bench.py --only tiling --device cpu --checkpoint runs/ssd300/checkpoint.pt   # tiled vs whole, s/MP
    $ python bench.py --only export --device cpu --data-folder data/lists-val --json results/cpu/bench-export.json

export (CPU only, not run by default; needs requirements-export.txt) exports --checkpoint (default: the shipped
model) to ONNX and OpenVINO, fp32 and int8 (calibrated on --calibration-images TRAIN images of --data-folder) and
times them beside eager PyTorch in fp32 and at detect.py's default precision, in one run, going round the paths in
turn so that they share the machine's load: per 300x300 window, the network and its decoding at the model's
counting thresholds at batch 1 and 8; and detect.py's whole command on three 3840x2160 mosaics of TEST images.

    $ python bench.py --only throughput --device cpu --json results/cpu/bench-throughput.json

throughput (not run by default) sets detect.py's fields per second over the TEST images (or --folder), each one
window, beside the model's own windows per second on the same images at detect.py's batch size: eager PyTorch at
detect.py's default precision and, with requirements-export.txt, OpenVINO int8 calibrated on those images.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch.utils.data import DataLoader

from bench_detect import (bench_export, bench_folder, bench_throughput, bench_tiling, fixed_batch, print_commands_table, ratio, timeit,
                          tiling_sizes)
from datasets import AugmentationSampler, BCCDDataset, EpochBatches
from detect import MAP_MAX_OVERLAP, MAP_MIN_SCORE, TOP_K, predict
from misc import (UserError, available_cpus, bf16_choice, check_not_an_input, check_workers, check_writable,
                  load_checkpoint, resolve_device, run_cli, run_info, write_json_atomic)
from model import SSD300, MultiBoxLoss
from utils import calculate_mAP, label_map, normalize

# dense bf16 tensor-core peaks (TFLOP/s) from NVIDIA's data sheets, for the "fraction of peak" line
BF16_PEAK_TFLOPS = {"H100": 989., "H200": 989., "A100": 312., "L4": 121., "A10": 125.}
PIPELINE_EPOCHS = 4  # train.py's epochs in the pipeline measurement: the first starts the workers, the others are timed
PARTS = ("train", "pipeline", "infer", "data", "parts", "folder", "tiling", "export", "throughput")


def get_args_parser():
    p = argparse.ArgumentParser("bench.py", description="Benchmark SSD300 against torchvision's ssd300_vgg16.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--only", nargs="+", choices=PARTS, default=None, help="run only these measurements "
                   "(default: all but folder, which needs --checkpoint, tiling and export)")
    p.add_argument("--data-folder", default="data/lists", help="JSON lists from create_data_lists.py")
    p.add_argument("--checkpoint", default=None, help="use these weights for ours (folder, and an extra inference row)")
    p.add_argument("--train-batch", type=int, default=None, help="training batch (default: 32 on CUDA, 8 on CPU)")
    p.add_argument("--infer-batches", type=int, nargs="+", default=None, help="inference batches (default: 1 64 on CUDA, 1 8 on CPU)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations per measurement (default: 20 on CUDA, 2 on CPU)")
    p.add_argument("--workers", type=int, default=available_cpus(), help="DataLoader workers for the data measurement")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast for both models (default: detect.py's, by the device: misc.bf16_choice)")
    p.add_argument("--no-batch-norm", dest="batch_norm", action="store_false",
                   help="time our model without BatchNorm (the tutorial's), like torchvision's")
    p.add_argument("--folder", default=None, help="images for the folder measurement (default: the TEST images)")
    p.add_argument("--calibration-images", type=int, default=64, help="export: TRAIN images that calibrate int8")
    p.add_argument("--tiling-sizes", nargs="+", default=["640x480", "1280x960", "1920x1080", "3840x2160"],
                   metavar="WxH", help="image sizes for the tiling measurement (mosaics of TEST images)")
    return p


def to_torchvision_inputs(images, boxes=None, labels=None):
    """torchvision's SSD takes [0, 1] float images (it normalizes itself) and pixel boxes."""
    imgs = list(images.float() / 255)
    if boxes is None:
        return imgs
    targets = [{"boxes": b * 300, "labels": l} for b, l in zip(boxes, labels)]
    return imgs, targets


def make_models(args, device, channels_last):
    import torchvision  # here: misc checks first that torchvision fits torch
    ours = SSD300(n_classes=len(label_map), base_weights=None, batch_norm=args.batch_norm)
    tv = torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None, num_classes=len(label_map))
    tv.score_thresh, tv.nms_thresh, tv.detections_per_img, tv.topk_candidates = MAP_MIN_SCORE, MAP_MAX_OVERLAP, TOP_K, 400
    ours = ours.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return ours, tv.to(device)


def count_macs(model, device):
    """Multiply-accumulates of one forward pass of one image, counted over the convolutions."""
    macs = []

    def hook(m, inp, out):
        macs.append(out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1])

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, 300, 300, device=device))
    for h in handles:
        h.remove()
    return sum(macs)


def bench_train(args, device, amp, channels_last, out):
    ours, tv = make_models(args, device, channels_last)
    images, boxes, labels = fixed_batch(args.data_folder, args.train_batch)
    images = images.to(device)
    boxes, labels = [b.to(device) for b in boxes], [l.to(device) for l in labels]
    tv_images, tv_targets = to_torchvision_inputs(images, boxes, labels)
    criterion = MultiBoxLoss(ours.priors_cxcy).to(device)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=1e-4, momentum=0.9)
    opt_tv = torch.optim.SGD(tv.parameters(), lr=1e-4, momentum=0.9)
    x = images.contiguous(memory_format=torch.channels_last) if channels_last else images

    def step_ours():  # as train.py: uint8 images normalized on the device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            locs, scores = ours(normalize(x))
        loss = criterion(locs, scores, boxes, labels)
        opt_ours.zero_grad(set_to_none=True)
        loss.backward()
        opt_ours.step()

    def step_tv():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            losses = tv(tv_images, tv_targets)
        loss = sum(losses.values())
        opt_tv.zero_grad(set_to_none=True)
        loss.backward()
        opt_tv.step()

    ours.train()
    tv.train()
    t_ours = timeit(step_ours, device, args.iters)
    t_tv = timeit(step_tv, device, args.iters)
    n = args.train_batch
    out["train_images_per_s"] = {"ours": round(n / t_ours, 1), "torchvision": round(n / t_tv, 1),
                                 "ratio": ratio(n / t_ours, n / t_tv), "batch": n}
    macs = count_macs(ours, device)
    flops = 3 * 2 * macs * n / t_ours  # training ~ 3x the forward pass; 2 FLOPs per MAC
    out["model_gmacs_per_image"] = round(macs / 1e9, 2)
    out["train_tflops"] = round(flops / 1e12, 1)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
        if peak and amp:
            out["train_fraction_of_bf16_peak"] = round(flops / 1e12 / peak, 3)


def bench_infer(args, device, amp, channels_last, out):
    ours, tv = make_models(args, device, channels_last)
    ours.eval()
    tv.eval()
    trained = None
    if args.checkpoint:
        trained = SSD300.from_checkpoint(load_checkpoint(args.checkpoint), args.checkpoint).to(
            device, memory_format=torch.channels_last if channels_last else torch.contiguous_format).eval()
    result = {"ours": {}, "torchvision": {}, "ratio": {}}
    if trained is not None:
        result["ours_trained"] = {}
    for n in args.infer_batches:
        images, _, _ = fixed_batch(args.data_folder, n)
        images = images.to(device)
        x = images.contiguous(memory_format=torch.channels_last) if channels_last else images
        tv_images = to_torchvision_inputs(images)

        def run_ours(model=ours):
            return predict(model, x, MAP_MIN_SCORE, MAP_MAX_OVERLAP, TOP_K, amp=amp, channels_last=channels_last)

        @torch.no_grad()
        def run_tv():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                return tv(tv_images)

        iters = args.iters if n <= 8 or device.type == "cuda" else 1
        t_ours, t_tv = timeit(run_ours, device, iters, warmup=1), timeit(run_tv, device, iters, warmup=1)
        key = f"batch_{n}"
        result["ours"][key], result["torchvision"][key] = round(n / t_ours, 1), round(n / t_tv, 1)
        result["ratio"][key] = ratio(n / t_ours, n / t_tv)
        if trained is not None:
            result["ours_trained"][key] = round(n / timeit(lambda: run_ours(trained), device, iters, warmup=1), 1)
    out["infer_images_per_s"] = result


def bench_pipeline(args, device, amp, out):
    """train.py as a user runs it, in a fresh process: the median images/s of its epochs after the first (which
    starts the workers), so with its data pipeline; beside the train measurement's fixed batch when there is one."""
    epochs = PIPELINE_EPOCHS
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py"), "--data-folder",
               args.data_folder, "--out-dir", tmp, "--epochs", str(epochs), "--batch-size", str(args.train_batch),
               "--workers", str(args.workers), "--device", str(device), "--checkpoint-every", str(epochs),
               "--amp" if amp else "--no-amp", "--batch-norm" if args.batch_norm else "--no-batch-norm"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        log_path = os.path.join(tmp, "log.jsonl")
        if result.returncode != 0 or not os.path.exists(log_path):
            lines = [l for l in result.stderr.split("\n") if l.strip() and "%|" not in l]  # not tqdm's bar
            raise UserError(f"train.py failed (status {result.returncode}): {(lines or ['no message'])[-1].strip()}")
        with open(log_path) as f:
            log = [json.loads(line) for line in f]
        if not log:
            raise UserError("train.py wrote no epoch to its log")
    rate = statistics.median(r["images_per_s"] for r in log[1:] or log)
    res = {"ours": rate, "batch": args.train_batch, "workers": args.workers, "epochs": epochs}
    if "train_images_per_s" in out:
        res["fixed_batch"] = out["train_images_per_s"]["ours"]
        res["fraction_of_fixed_batch"] = round(rate / res["fixed_batch"], 3) if res["fixed_batch"] else None
    out["train_pipeline_images_per_s"] = res


def bench_data(args, device, out):
    """TRAIN images/s: in one process, and from --workers processes as train.py runs them (all epochs in one
    stream), beside a DataLoader restarted every epoch (whose workers wait at each epoch's start)."""
    train_set = BCCDDataset(args.data_folder, "train", cache_images=True)
    n = min(len(train_set), 128)
    start = time.perf_counter()
    for i in range(n):
        train_set[(i, i)]
    single = n / (time.perf_counter() - start)
    sampler = AugmentationSampler(train_set, seed=0)
    epochs = 5
    pin = device.type == "cuda"
    per_epoch = len(EpochBatches(sampler, 32, False, range(1)))

    def rate(batches):
        for _ in range(per_epoch):  # a first epoch to start the workers and warm them up; then time 4 epochs
            next(batches)
        count, start = 0, time.perf_counter()
        for images, *_ in batches:
            count += images.size(0)
        return count / (time.perf_counter() - start)

    stream = DataLoader(train_set, batch_sampler=EpochBatches(sampler, 32, False, range(epochs)),
                        collate_fn=BCCDDataset.collate_fn, num_workers=args.workers, pin_memory=pin)
    restarted = DataLoader(train_set, batch_size=32, sampler=sampler, collate_fn=BCCDDataset.collate_fn,
                           num_workers=args.workers, persistent_workers=args.workers > 0, pin_memory=pin)

    def each_epoch():
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            yield from restarted

    # whichever runs first is measured slower (seen here: 15-20 %), so each runs twice, alternately: best of two
    rates = [(rate(iter(stream)), rate(each_epoch())) for _ in range(2)]
    out["data_images_per_s"] = {"ours_one_process": round(single, 1), "ours_workers": round(max(r[0] for r in rates), 1),
                                "ours_workers_restarted_each_epoch": round(max(r[1] for r in rates), 1),
                                "workers": args.workers}


def bench_parts(args, device, amp, out):
    """Post-processing, loss and mAP on their own (random predictions, real BCCD boxes)."""
    import torchvision  # here: misc checks first that torchvision fits torch
    ours, tv = make_models(args, device, False)
    n = 8
    _, boxes, labels = fixed_batch(args.data_folder, n)
    boxes, labels = [b.to(device) for b in boxes], [l.to(device) for l in labels]
    g = torch.Generator(device="cpu").manual_seed(0)
    locs = torch.randn(n, 8732, 4, generator=g).to(device)
    scores = torch.randn(n, 8732, len(label_map), generator=g).to(device)
    criterion = MultiBoxLoss(ours.priors_cxcy).to(device)

    # torchvision's matching + loss and post-processing, with its own anchors for 300x300 images
    images = torchvision.models.detection.image_list.ImageList(torch.zeros(n, 3, 300, 300, device=device), [(300, 300)] * n)
    feats = []
    handle = tv.head.register_forward_hook(lambda m, inp, o: feats.extend(inp[0]))
    with torch.no_grad():
        tv.eval()(list(torch.zeros(1, 3, 300, 300, device=device)))
    handle.remove()
    anchors = tv.anchor_generator(images, [f.expand(n, -1, -1, -1) for f in feats])
    head = {"bbox_regression": locs, "cls_logits": scores}
    targets = [{"boxes": b * 300, "labels": l} for b, l in zip(boxes, labels)]

    def tv_loss():
        matched = [tv.proposal_matcher(torchvision.ops.box_iou(t["boxes"], a)) for t, a in zip(targets, anchors)]
        return tv.compute_loss(targets, head, anchors, matched)

    res = {}
    res["multibox_loss_ms"] = {"ours": timeit(lambda: criterion(locs, scores, boxes, labels), device, 10),
                               "torchvision": timeit(tv_loss, device, 10)}
    res["detect_objects_ms"] = {"ours": timeit(lambda: ours.detect_objects(locs, scores, MAP_MIN_SCORE, MAP_MAX_OVERLAP,
                                                                            TOP_K), device, 5),
                                "torchvision": timeit(lambda: tv.postprocess_detections(head, anchors, [(300, 300)] * n), device, 5)}

    # calculate_mAP on 72 images x TOP_K detections against the real TEST objects
    test_set = BCCDDataset(args.data_folder, "test", keep_difficult=True)
    true_boxes, true_labels, true_diff = [], [], []
    for objects in test_set.objects[:72]:
        b = torch.tensor(objects["boxes"]).reshape(-1, 4) / torch.tensor([640., 480., 640., 480.])
        true_boxes.append(b)
        true_labels.append(torch.tensor(objects["labels"]))
        true_diff.append(torch.tensor(objects["difficulties"], dtype=torch.uint8))
    k = len(true_boxes)
    xy = torch.rand(k, TOP_K, 2, generator=g) * 0.8
    det_boxes = list(torch.cat([xy, xy + 0.05 + 0.2 * torch.rand(k, TOP_K, 2, generator=g)], -1))
    det_labels = list(torch.randint(1, 4, (k, TOP_K), generator=g))
    det_scores = list(torch.rand(k, TOP_K, generator=g))
    res["calculate_mAP_ms"] = {"ours": timeit(lambda: calculate_mAP(det_boxes, det_labels, det_scores, true_boxes,
                                                                    true_labels, true_diff), torch.device("cpu"), 5)}
    for key, v in res.items():
        out[key] = {name: round(t * 1000, 2) for name, t in v.items()}
        if "torchvision" in v:
            out[key]["ratio"] = ratio(v["ours"], v["torchvision"], higher_is_better=False)
    out["parts_batch"] = n

    # detect_objects at the largest inference batch for several NMS run sizes (1: image by image; 10**9: one
    # batched_nms call, which torchvision itself splits by image and class past its cut-off)
    big = max(args.infer_batches)
    locs_big = torch.randn(big, 8732, 4, generator=g).to(device)
    scores_big = torch.randn(big, 8732, len(label_map), generator=g).to(device)
    out["detect_objects_ms_by_nms_chunk"] = {"batch": big, **{
        str(chunk): round(1000 * timeit(lambda: ours.detect_objects(locs_big, scores_big, MAP_MIN_SCORE, MAP_MAX_OVERLAP,
                                                                    TOP_K, nms_chunk=chunk), device, 5), 2)
        for chunk in (1, 5000, 25_000, 10 ** 9)}}


def print_table(out):
    rows = []
    if "train_images_per_s" in out:
        t = out["train_images_per_s"]
        rows.append((f"train images/s (batch {t['batch']})", t["ours"], t["torchvision"], t["ratio"]))
    if "train_pipeline_images_per_s" in out:
        t = out["train_pipeline_images_per_s"]
        rows.append((f"train.py images/s ({t['workers']} workers)", t["ours"], "", t.get("fraction_of_fixed_batch", "")))
    if "infer_images_per_s" in out:
        t = out["infer_images_per_s"]
        for key in t["ours"]:
            rows.append((f"infer images/s ({key.replace('_', ' ')})", t["ours"][key], t["torchvision"][key], t["ratio"][key]))
            if "ours_trained" in t:
                rows.append((f"  ours, trained weights ({key.replace('_', ' ')})", t["ours_trained"][key], "", ""))
    for key in ("multibox_loss_ms", "detect_objects_ms", "calculate_mAP_ms"):
        if key in out:
            t = out[key]
            rows.append((key.replace("_ms", " ms"), t["ours"], t.get("torchvision", ""), t.get("ratio", "")))
    if "detect_objects_ms_by_nms_chunk" in out:
        t = out["detect_objects_ms_by_nms_chunk"]
        for chunk, ms in t.items():
            if chunk != "batch":
                rows.append((f"  batch {t['batch']}, nms_chunk {chunk}, ms", ms, "", ""))
    if "data_images_per_s" in out:
        t = out["data_images_per_s"]
        rows.append(("data images/s, 1 process", t["ours_one_process"], "", ""))
        rows.append((f"data images/s, {t['workers']} workers", t["ours_workers"], "", ""))
        rows.append(("  restarted every epoch", t["ours_workers_restarted_each_epoch"], "", ""))
    if "folder_seconds" in out:
        t = out["folder_seconds"]
        rows.append((f"detect.py on {t['images']} images, s", t["ours"], t["torchvision"], t["ours_over_torchvision"]))
        loop = t["loop_only"]
        rows.append(("  its loop, without start-up, s", loop["ours"], loop["torchvision"], loop["ours_over_torchvision"]))
    if rows:
        print(f"\n{'measurement':<34}{'ours':>12}{'torchvision':>14}{'ratio':>9}")
    for name, a, b, r in rows:
        print(f"{name:<34}{a:>12}{b:>14}{r:>9}")
    if "train_fraction_of_bf16_peak" in out:
        print(f"training reaches {out['train_tflops']} TFLOP/s, {100 * out['train_fraction_of_bf16_peak']:.1f}% of the "
              f"card's dense bf16 peak ({out['model_gmacs_per_image']} GMAC per image forward)")
    if rows:
        print("ratios: ours / torchvision for images/s; torchvision / ours for ms; ours / torchvision for folder "
              "seconds; train.py / fixed batch for train.py images/s")
    print_commands_table(out)


MAX_BATCH, MAX_COUNT = 1024, 10_000  # batches; iterations and images: beyond what a benchmark needs, short of
                                    # a list or a batch that fills the memory before anything is measured


def check_args(args):
    """Flags, the output place and the checkpoint, checked before minutes of measuring."""
    for name, most in (("train_batch", MAX_BATCH), ("iters", MAX_COUNT), ("calibration_images", MAX_COUNT)):
        value = getattr(args, name)
        if value is not None and not 1 <= value <= most:
            raise UserError(f"--{name.replace('_', '-')} must be 1 to {most:,}, not {value}")
    if args.train_batch == 1 and args.batch_norm:
        raise UserError("--train-batch 1: BatchNorm needs at least 2 images a step; use 2 or more, or --no-batch-norm")
    if args.infer_batches is not None and not all(1 <= b <= MAX_BATCH for b in args.infer_batches):
        raise UserError(f"--infer-batches must be 1 to {MAX_BATCH:,}, not {' '.join(map(str, args.infer_batches))}")
    check_workers(args.workers)
    tiling_sizes(args.tiling_sizes)
    if args.folder is not None and not os.path.isdir(args.folder):
        raise UserError(f"--folder {args.folder}: no such folder")
    if args.json is not None:
        check_writable(args.json, "--json")
        check_not_an_input(args.json, "--json", args.checkpoint, args.data_folder)
    if args.checkpoint:
        SSD300.from_checkpoint(load_checkpoint(args.checkpoint), args.checkpoint)


def main(args):
    check_args(args)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    default, why = bf16_choice(device)
    amp = default if args.amp is None else args.amp
    if amp and not default:
        print(f"warning: bf16 is not the default on this CPU ({why}); timings with --amp may be slow", file=sys.stderr)
    channels_last = True
    args.train_batch = args.train_batch or (32 if cuda else 8)
    args.infer_batches = args.infer_batches or ([1, 64] if cuda else [1, 8])
    args.iters = args.iters or (20 if cuda else 2)
    only = args.only or [p for p in PARTS if p not in ("folder", "tiling", "export", "throughput") and (cuda or p != "pipeline")]
    if cuda:
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    out = {**run_info(device), "amp_bf16": amp}
    steps = {"train": lambda: bench_train(args, device, amp, channels_last, out),
             "pipeline": lambda: bench_pipeline(args, device, amp, out),
             "infer": lambda: bench_infer(args, device, amp, channels_last, out),
             "data": lambda: bench_data(args, device, out),
             "parts": lambda: bench_parts(args, device, amp, out),
             "folder": lambda: bench_folder(args, device, out),
             "tiling": lambda: bench_tiling(args, device, amp, out),
             "export": lambda: bench_export(args, device, out),
             "throughput": lambda: bench_throughput(args, device, out)}
    for name in PARTS:
        if name in only:
            print(f"measuring {name} ...", flush=True)
            steps[name]()
            if cuda:
                torch.cuda.empty_cache()
    print_table(out)
    if args.json is not None:
        write_json_atomic(out, args.json, indent=2)
        print(f"written to {args.json}")


if __name__ == "__main__":
    run_cli(main, get_args_parser())
