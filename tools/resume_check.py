"""detect.py stopped and taken up, measured as a lab running a day's batch would see it: a folder of --images images
(BCCD's fields, a fifth of them as PNG and a fifth as TIFF copies), counted by the same command

    1. uninterrupted (the reference: its time and its counts.csv);
    2. killed with SIGKILL at --kill-at of the images, then started again: the total time against the reference's,
       and counts.csv against the reference's, byte for byte;
    3. killed twice in a row (at --kill-at / 2 and at --kill-at), then started again: nothing lost, counts.csv the same;
    4. started while both cores are busy (a busy process per core for the run's first images): counts.csv the same.

    python tools/resume_check.py --bccd data/BCCD --images 1500 --output results/2026-12-08-cpu/resume-check.json

Times are whole commands (Python's start-up and the model's loading included), on an otherwise idle machine.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the project's flat modules, one folder up (run as `python tools/resume_check.py`)
from misc import UserError, run_cli, run_info, write_json_atomic  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser("resume_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--bccd", default="data/BCCD", help="BCCD (its JPEGImages are the fields)")
    p.add_argument("--images", type=int, default=1500, help="images in the folder (BCCD's fields repeated)")
    p.add_argument("--kill-at", type=float, default=0.4, help="the share of the images after which the run is killed")
    p.add_argument("--detect-flags", default="--device cpu", help="detect.py's flags besides the folders")
    p.add_argument("--only", nargs="+", choices=("stops", "busy"), default=("stops", "busy"), help="stops: 2 and 3; "
                   "busy: 4 (1, the reference, always runs)")
    p.add_argument("--work", default=None, help="folder for the images and outputs (default: a temporary one)")
    p.add_argument("--output", required=True, help="the figures, JSON")
    return p


def make_images(bccd, n, folder):
    """n files in `folder`: BCCD's JPEGs in turn, every fifth saved as PNG and every fifth (offset) as TIFF."""
    from PIL import Image
    jpegs = sorted(os.path.join(bccd, "JPEGImages", f) for f in os.listdir(os.path.join(bccd, "JPEGImages"))
                   if f.lower().endswith(".jpg"))
    if not jpegs:
        raise UserError(f"--bccd {bccd}: no JPEGImages/*.jpg")
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        source, stem = jpegs[i % len(jpegs)], os.path.join(folder, f"{i:05d}")
        if i % 5 == 1:
            Image.open(source).save(stem + ".png")
        elif i % 5 == 3:
            Image.open(source).save(stem + ".tif")
        else:
            shutil.copyfile(source, stem + ".jpg")


def detect(inputs, output, flags, kill_after=None, busy_until_first=False):
    """detect.py inputs --output-dir output: (seconds, images it printed, images a stopped run had counted before it
    as it says); killed with SIGKILL after kill_after images (None: to the end). busy_until_first: a busy process per
    core until its first image is counted."""
    names = {os.path.join(inputs, f) for f in os.listdir(inputs)}
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)] \
        if busy_until_first else []
    start = time.perf_counter()
    errors = tempfile.TemporaryFile("w+")  # a file, not a pipe: a long stderr cannot block the run
    proc = subprocess.Popen([sys.executable, "detect.py", inputs, "--output-dir", output, *flags], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=errors, text=True)
    counted, before = 0, 0
    try:
        for line in proc.stdout:
            if line.startswith("note: taking up the run stopped"):
                before = int(line.split(": ")[2].split()[0])
            if line.split() and line.split()[0] in names:
                counted += 1
                for b in busy:
                    b.kill()
                busy = []
                if kill_after is not None and counted >= kill_after:
                    proc.send_signal(signal.SIGKILL)
                    break
        proc.wait()
    finally:
        for b in busy:
            b.kill()
    seconds = time.perf_counter() - start
    with errors:
        errors.seek(0)
        if kill_after is None and proc.returncode:
            raise UserError(f"detect.py failed (exit status {proc.returncode}): {errors.read().strip()[-300:]}")
    return seconds, counted, before


def counts(output):
    with open(os.path.join(output, "counts.csv"), "rb") as f:
        return f.read()


def main(args):
    if not 1 <= args.images <= 100000 or not 0 < args.kill_at < 1:
        raise UserError("--images must be 1 to 100,000 and --kill-at between 0 and 1")
    work = args.work or tempfile.mkdtemp(prefix="resume-check-")
    inputs, flags = os.path.join(work, "images"), args.detect_flags.split()
    make_images(args.bccd, args.images, inputs)
    kill = round(args.kill_at * args.images)
    out = {**run_info(torch.device("cpu")), "images": args.images, "kill_at": kill, "detect_flags": args.detect_flags}

    t_whole, n, _ = detect(inputs, os.path.join(work, "whole"), flags)
    reference = counts(os.path.join(work, "whole"))
    out["uninterrupted_seconds"] = round(t_whole, 1)
    print(f"uninterrupted: {n} images in {t_whole:.1f} s", flush=True)

    if "stops" in args.only:
        stops(args, inputs, work, flags, kill, reference, t_whole, out)
    if "busy" in args.only:
        t_busy, _, _ = detect(inputs, os.path.join(work, "busy"), flags, busy_until_first=True)
        out["busy_start"] = {"seconds": round(t_busy, 1),
                             "counts_csv_identical": counts(os.path.join(work, "busy")) == reference}
    write_json_atomic(out, args.output, indent=2)
    print(json.dumps(out, indent=2))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


def stops(args, inputs, work, flags, kill, reference, t_whole, out):
    """Steps 2 and 3: killed once, killed twice."""
    t_killed, n_killed, _ = detect(inputs, os.path.join(work, "once"), flags, kill_after=kill)
    t_rest, n_rest, kept = detect(inputs, os.path.join(work, "once"), flags)
    out["killed_once"] = {"killed_after": n_killed, "kept": kept, "seconds_to_kill": round(t_killed, 1),
                          "resumed_images": n_rest,
                          "resumed_seconds": round(t_rest, 1), "total_over_uninterrupted":
                          round((t_killed + t_rest) / t_whole, 3),
                          "counts_csv_identical": counts(os.path.join(work, "once")) == reference}
    print(f"killed after {n_killed}, resumed {n_rest}: {(t_killed + t_rest) / t_whole:.3f}x", flush=True)

    times, done, kept = [], [], []
    for after in (kill // 2, kill, None):
        t, k, b = detect(inputs, os.path.join(work, "twice"), flags, kill_after=after and after - sum(done))
        times.append(t)
        done.append(k)
        kept.append(b)
    # every image a killed run printed is among those the next run finds counted, and the last run counts the rest
    out["killed_twice"] = {"printed_by_each_run": done, "kept_at_each_start": kept, "seconds": [round(t, 1) for t in times],
                           "nothing_lost": kept[1] >= done[0] and kept[2] >= kept[1] + done[1]
                           and kept[2] + done[2] == args.images,
                           "total_over_uninterrupted": round(sum(times) / t_whole, 3),
                           "counts_csv_identical": counts(os.path.join(work, "twice")) == reference}
    print(f"killed twice, runs counted {done}: {sum(times) / t_whole:.3f}x", flush=True)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
