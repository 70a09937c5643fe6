"""The measurements of bench.py that run detect.py's whole commands, or detect_image, as a user would (--only
folder, tiling, export), kept apart from those of the model (bench.py); and the timing helpers both use."""
import csv
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch
from PIL import Image

from datasets import BCCDDataset
from detect import DEFAULT_CHECKPOINT, TOP_K, default_batch_size, detect_image, load_model, predict, preprocess
from misc import UserError, bf16_is_fast, repo_relative, run_python
from model import SSD300
from tiling import BCCD_FIELD, tile_windows, tiling
from utils import image_extensions, label_map, load_image


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device, iters, warmup=2):
    """Median seconds of fn() over `iters` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ratio(ours, theirs, higher_is_better=True):
    return round(ours / theirs if higher_is_better else theirs / ours, 2)


def fixed_batch(data_folder, n):
    """n TEST images (no augmentation) with their boxes: identical inputs for both models."""
    test_set = BCCDDataset(data_folder, "test")
    items = [test_set[i % len(test_set)] for i in range(n)]
    images, boxes, labels, _ = BCCDDataset.collate_fn(items)
    return images, boxes, labels


def run_detect(argv, summary, what):
    """detect.py's command line in a fresh process, as a user runs it (Python's and torch's start-up and the model's
    loading included), its summary (detect.detect_files' return: the images, the seconds of its loop) written as
    JSON to `summary`: (the command's seconds, the summary)."""
    code = ("import json, sys; sys.path.insert(0, sys.argv.pop(1)); import detect, misc; path = sys.argv.pop(1); "
            "summary = misc.run_cli(detect.main, detect.get_args_parser()); json.dump(summary, open(path, 'w'))")
    start = time.perf_counter()
    run_python(["-c", code, os.path.dirname(os.path.abspath(__file__)), summary, *argv], what, in_repo=False)
    seconds = time.perf_counter() - start
    with open(summary, encoding="utf-8") as f:
        return seconds, json.load(f)


def bench_images(args):
    """The image files of --folder, or the TEST images of --data-folder's lists (a UserError where there are none)."""
    if args.folder is None:
        return BCCDDataset(args.data_folder, "test").images
    images = sorted(os.path.join(args.folder, f) for f in os.listdir(args.folder)
                    if os.path.splitext(f)[1].lower() in image_extensions() and os.path.isfile(os.path.join(args.folder, f)))
    if not images:
        raise UserError(f"--folder {args.folder}: no image files in it")
    return images


def linked(images, tmp):
    """A folder in tmp of links to the images, numbered (two of one name stay two): detect.py's input, as a user's."""
    listing = os.path.join(tmp, "inputs")
    os.makedirs(listing)
    for i, p in enumerate(images):
        os.symlink(os.path.abspath(p), os.path.join(listing, f"{i:05d}-{os.path.basename(p)}"))
    return listing


def bench_folder(args, device, out):
    """detect.py (as a user runs it) vs a plain fp32 torchvision loop: load, detect, draw, save, per image."""
    if not args.checkpoint:
        raise UserError("--only folder needs --checkpoint (detect.py loads a trained model)")
    images = bench_images(args)
    tmp = tempfile.mkdtemp(prefix="bench-folder-")
    try:
        # ours: detect.py in a fresh process, the way a user runs it (its start-up and model load included)
        listing = linked(images, tmp)
        t_ours, summary = run_detect(["--checkpoint", args.checkpoint, listing, "--output-dir", os.path.join(tmp, "ours"),
                                      "--device", str(device)], os.path.join(tmp, "summary.json"), "--only folder: detect.py")
        loop_ours = summary["seconds"]  # detect.py's own timing of its loop

        # torchvision: the plain loop, fp32, one image at a time, also in a fresh process
        code = f"""
import os, sys, torch, torchvision
from PIL import Image, ImageDraw
import torchvision.transforms.functional as FT
torch.manual_seed(0)
model = torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None, num_classes=4)
model.score_thresh, model.nms_thresh = 0.2, 0.5
model = model.eval().to({str(device)!r})
os.makedirs(sys.argv[1], exist_ok=True)
import time
start = time.perf_counter()
with torch.no_grad():
    for path in sys.argv[2:]:
        image = Image.open(path).convert("RGB")
        det = model([FT.to_tensor(image).to({str(device)!r})])[0]
        draw = ImageDraw.Draw(image)
        for box in det["boxes"].tolist():
            draw.rectangle(box, outline="red")
        image.save(os.path.join(sys.argv[1], os.path.basename(path)))
print(time.perf_counter() - start)
"""
        start = time.perf_counter()
        printed = run_python(["-c", code, os.path.join(tmp, "tv"), *images], "--only folder: the torchvision loop",
                             in_repo=False)
        t_tv = time.perf_counter() - start
        loop_tv = float(printed.split()[-1])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out["folder_seconds"] = {"ours": round(t_ours, 2), "torchvision": round(t_tv, 2),
                             "ours_over_torchvision": round(t_ours / t_tv, 3), "images": len(images),
                             "loop_only": {"ours": round(loop_ours, 2), "torchvision": round(loop_tv, 2),
                                           "ours_over_torchvision": round(loop_ours / loop_tv, 3)}}


def bench_throughput(args, device, out):
    """detect.py's fields per second over a folder of images that each go through the model whole (one window: BCCD's
    TEST fields, or --folder), beside the model's own windows per second on the same images (predict at detect.py's
    batch size in this process, nothing else: the ceiling), for eager PyTorch at detect.py's default precision and,
    with requirements-export.txt, an OpenVINO int8 export calibrated on those images. Each path: model, detect.py,
    model again (the mean of the two), so that both figures share the machine's load."""
    checkpoint = args.checkpoint or DEFAULT_CHECKPOINT
    images = bench_images(args)
    tmp = tempfile.mkdtemp(prefix="bench-throughput-")
    try:
        listing = linked(images, tmp)
        files = {"eager default": checkpoint}
        try:
            if device.type == "cpu":  # exports run on the CPU only
                import export
                files["openvino int8"] = export.export_checkpoint(
                    checkpoint, "openvino", True, os.path.join(tmp, "int8"), calibration=args.calibration_images,
                    quiet=True, calibrate=listing)
        except UserError as e:
            if "pip install" not in str(e):
                raise
            print(f"throughput: int8 left out ({e})", file=sys.stderr)
        result = {}
        for path, model_file in files.items():
            amp = path == "eager default" and bf16_is_fast(device)  # an export runs as exported
            model = load_model(model_file, device)
            batch = default_batch_size(device)
            inputs = [preprocess(load_image(p)) for p in images]
            windows = [torch.stack(inputs[i:i + batch]) for i in range(0, len(inputs), batch)]
            for b in windows[:2]:  # warm-up
                predict(model, b, model.min_score, model.max_overlap, TOP_K, amp)

            def model_rate():
                start = time.perf_counter()
                for b in windows:
                    predict(model, b, model.min_score, model.max_overlap, TOP_K, amp)
                return len(inputs) / (time.perf_counter() - start)

            first = model_rate()
            output = os.path.join(tmp, "out-" + path.replace(" ", "-"))
            _, summary = run_detect([listing, "--checkpoint", model_file, "--output-dir", output, "--device",
                                     str(device), "--amp" if amp else "--no-amp"], output + ".json",
                                    f"detect.py with {path}")
            model_windows = (first + model_rate()) / 2
            detect_fields = summary["images"] / summary["seconds"]
            result[path] = {"model_windows_per_s": round(model_windows, 2),
                            "detect_fields_per_s": round(detect_fields, 2),
                            "detect_over_model": round(detect_fields / model_windows, 3),
                            "precision": summary["precision"]}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out["throughput"] = {"checkpoint": repo_relative(checkpoint), "images": len(images), "paths": result,
                         "threads": torch.get_num_threads(), "batch_size": default_batch_size(device)}


def source_images(data_folder, n):
    """The lists' first n TEST images, RGB PIL images (one that cannot be read is a UserError naming it)."""
    import torchvision  # here: misc checks first that torchvision fits torch
    return [torchvision.transforms.functional.to_pil_image(load_image(p))
            for p in BCCDDataset(data_folder, "test").images[:n]]


def bench_tiling(args, device, amp, out):
    """Seconds per megapixel of detect_image at detect.py's defaults on mosaics of TEST images (cells at BCCD's
    size), tiled (windows of BCCD's field, batch 1 on a CPU) and resized whole (--tile off): ours only."""
    if args.checkpoint:
        model = load_model(args.checkpoint, device)
    else:
        model = SSD300(n_classes=len(label_map), base_weights=None, batch_norm=args.batch_norm)
        model = model.to(device, memory_format=torch.channels_last).eval().fuse_batch_norm()
    sources = source_images(args.data_folder, 16)
    result = {}
    for size, (width, height) in zip(args.tiling_sizes, tiling_sizes(args.tiling_sizes)):
        image = mosaic(sources, width, height, 0)  # TEST images side by side, as many as fill it
        windows = tile_windows(width, height, tiling(getattr(model, "field", BCCD_FIELD)))
        t_tiled, t_whole = (timeit(lambda tile=tile: detect_image(image, model, tile=tile, amp=amp), device, args.iters,
                                   warmup=1) for tile in ("auto", "off"))
        mp = width * height / 1e6
        result[size] = {"megapixels": round(mp, 3), "windows": 1 if windows is None else len(windows),
                        "tiled_s_per_mp": round(t_tiled / mp, 3), "whole_s_per_mp": round(t_whole / mp, 3),
                        "tiled_over_whole": round(t_tiled / t_whole, 2)}
    out["tiling_seconds_per_megapixel"] = result


def mosaic(sources, width, height, first):
    """A width x height image of the source images side by side, from the first-th on (cells at BCCD's size)."""
    image, k = Image.new("RGB", (width, height)), first
    for y in range(0, height, sources[0].height):
        for x in range(0, width, sources[0].width):
            image.paste(sources[k % len(sources)], (x, y))
            k += 1
    return image


EXPORT_MOSAIC = (3840, 2160)  # the large images of --only export: 4K, 195 windows of BCCD's field each
EXPORT_PATHS = (("onnxruntime fp32", "onnx", False), ("openvino fp32", "openvino", False),
                ("onnxruntime int8", "onnx", True), ("openvino int8", "openvino", True))


def bench_export(args, device, out):
    """Eager PyTorch (fp32, and detect.py's default precision) beside the exports of export.py, on the CPU: ms per
    window at batch 1 and 8 (network + detect_objects at the model's counting thresholds), and seconds of detect.py's
    whole command on three 3840x2160 mosaics of TEST images. Each measurement goes round the paths in turn, so that
    they share the machine's load."""
    import export  # its runtimes, only here
    if device.type != "cpu":
        raise UserError("--only export times inference on the CPU, where the exports run: use --device cpu")
    checkpoint = args.checkpoint or DEFAULT_CHECKPOINT
    default_amp = bf16_is_fast(device)
    tmp = tempfile.mkdtemp(prefix="bench-export-")
    try:
        made, files = {}, {"eager fp32": checkpoint, "eager default": checkpoint}
        for name, fmt, int8 in EXPORT_PATHS:
            start = time.perf_counter()
            files[name] = export.export_checkpoint(checkpoint, fmt, int8, os.path.join(tmp, name.replace(" ", "-")),
                                                   args.data_folder, args.calibration_images, quiet=True)
            made[name] = round(time.perf_counter() - start, 1)
        paths = [p for p in files if p != "eager default" or default_amp]  # without fast bf16 it is eager fp32
        amp = {p: p == "eager default" and default_amp for p in paths}
        models = {p: load_model(files[p], device) for p in paths}
        result = {p: {} for p in paths}
        for n in (1, 8):
            images, _, _ = fixed_batch(args.data_folder, n)
            times = {p: [] for p in paths}
            for i in range(1 + args.iters):  # a warm-up round, then round the paths args.iters times
                for p in paths:
                    m = models[p]
                    start = time.perf_counter()
                    predict(m, images, m.min_score, m.max_overlap, TOP_K, amp[p])
                    if i:
                        times[p].append(time.perf_counter() - start)
            for p in paths:
                result[p][f"batch_{n}_ms_per_window"] = round(1000 * statistics.median(times[p]) / n, 1)
        del models

        sources = source_images(args.data_folder, 36)
        folder = os.path.join(tmp, "mosaics")
        os.makedirs(folder)
        for i in range(3):  # at 4K 6 x 5 fields of 640x480 (the last row cut), 12 source images apart
            mosaic(sources, *EXPORT_MOSAIC, 12 * i).save(os.path.join(folder, f"mosaic{i}.jpg"), quality=95)
        for p in paths:  # detect.py as a user runs it, in a fresh process: start-up and model load included
            output = os.path.join(tmp, "out-" + p.replace(" ", "-"))
            seconds, summary = run_detect([folder, "--checkpoint", files[p], "--output-dir", output, "--device", "cpu",
                                           "--amp" if amp[p] else "--no-amp"], output + ".json", f"detect.py with {p}")
            result[p]["mosaics_seconds"], result[p]["mosaics_loop_seconds"] = round(seconds, 2), round(summary["seconds"], 2)
            with open(os.path.join(output, "counts.csv"), newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
            result[p]["mosaics_counts"] = {k: sum(int(r[k]) for r in rows) for k in rows[0] if k != "image"}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base, default = result["eager fp32"], result["eager default" if default_amp else "eager fp32"]
    for r in result.values():
        for n in (1, 8):
            r[f"speedup_batch_{n}"] = ratio(base[f"batch_{n}_ms_per_window"], r[f"batch_{n}_ms_per_window"])
        r["mosaics_over_default"] = round(r["mosaics_seconds"] / default["mosaics_seconds"], 3)
    out["export"] = {"checkpoint": repo_relative(checkpoint), "threads": torch.get_num_threads(), "eager_default_bf16": default_amp,
                     "mosaics": 3, "mosaic_size": "x".join(map(str, EXPORT_MOSAIC)),
                     "windows_per_mosaic": len(tile_windows(*EXPORT_MOSAIC, tiling(BCCD_FIELD))),
                     "export_seconds": made, "calibration_images": args.calibration_images, "paths": result}


def tiling_sizes(sizes):
    """--tiling-sizes as [(width, height)]: each WIDTHxHEIGHT, 1 to 16384 pixels a side (a 16K image)."""
    parsed = []
    for size in sizes:
        try:
            width, height = (int(v) for v in size.lower().split("x"))
        except ValueError:
            raise UserError(f"--tiling-sizes: {size!r} is not WIDTHxHEIGHT") from None
        if not (1 <= width <= 16384 and 1 <= height <= 16384):
            raise UserError(f"--tiling-sizes: {size!r}: each side must be 1 to 16384 pixels")
        parsed.append((width, height))
    return parsed


def print_commands_table(out):
    """The tables of --only export and tiling."""
    if "export" in out:
        e = out["export"]
        print(f"\n{'CPU, ' + str(e['threads']) + ' threads':<18}{'ms/window b1':>13}{'b8':>7}{'speedup b1':>11}"
              f"{'b8':>6}{'3 mosaics, s':>13}{'/ default':>10}  counts on the {e['mosaics']} {e['mosaic_size']} mosaics")
        for p, r in e["paths"].items():
            print(f"{p:<18}{r['batch_1_ms_per_window']:>13}{r['batch_8_ms_per_window']:>7}{r['speedup_batch_1']:>11}"
                  f"{r['speedup_batch_8']:>6}{r['mosaics_seconds']:>13}{r['mosaics_over_default']:>10}  "
                  + " ".join(f"{k} {v}" for k, v in r["mosaics_counts"].items()))
        if not e["eager_default_bf16"]:
            print("eager default: bf16 is not detect.py's default on this CPU (misc.bf16_choice), so it is eager fp32")
    if "throughput" in out:
        t = out["throughput"]
        print(f"\n{t['images']} fields, one window each{'':<8}{'model windows/s':>16}{'detect.py fields/s':>19}{'ratio':>7}")
        for p, r in t["paths"].items():
            print(f"{p + ' (' + r['precision'].split(' (')[0] + ')':<39}{r['model_windows_per_s']:>16}{r['detect_fields_per_s']:>19}"
                  f"{r['detect_over_model']:>7}")
    if "tiling_seconds_per_megapixel" in out:
        print(f"\n{'detect_image, s per megapixel':<34}{'windows':>9}{'tiled':>9}{'whole':>9}{'ratio':>9}")
        for size, t in out["tiling_seconds_per_megapixel"].items():
            print(f"{size:<34}{t['windows']:>9}{t['tiled_s_per_mp']:>9}{t['whole_s_per_mp']:>9}{t['tiled_over_whole']:>9}")
