"""Do the exports detect what the PyTorch model detects? TEST mAP through detect.py --checkpoint <export>.

    $ python create_data_lists.py --train-split train --test-split val --output-folder data/lists-val
    $ python tools/export_parity.py --output results/cpu/export_parity.json

Exports --checkpoint (default: the shipped model) with export.py to ONNX, OpenVINO and OpenVINO int8 (int8
calibrated on the TRAIN images of --calibration-lists: train.txt, the shipped model's own training images), then
runs detect.py, as a user would (a fresh process each), with the .pt and with each export on the TEST images of
--data-folder (test.txt's 72), at eval.py's setting (--min-score 0.01 --max-overlap 0.45 --top-k 200, --tile off:
they are BCCD fields), and scores each run's detections.json against the TEST annotations with utils.calculate_mAP,
independently of eval.py. The goal: ONNX and OpenVINO fp32 within 0.003 of the .pt's mAP, int8 within 0.01.
Also records detect.py's whole-command seconds for each. Writes --output (JSON) and prints a table.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the project's flat modules, one folder up (run as `python tools/export_parity.py`)

from datasets import BCCDDataset  # noqa: E402
from detect import DEFAULT_CHECKPOINT  # noqa: E402
from export import export_checkpoint  # noqa: E402
from misc import UserError, check_writable, repo_relative, run_cli, run_info, write_json_atomic  # noqa: E402
from utils import calculate_mAP  # noqa: E402

GOALS = {"onnxruntime fp32": 0.003, "openvino fp32": 0.003, "openvino int8": 0.01}


def get_args_parser():
    p = argparse.ArgumentParser("export_parity.py", description="TEST mAP of detect.py with the .pt and its exports.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="checkpoint.pt to export")
    p.add_argument("--data-folder", default="data/lists", help="lists whose TEST images are scored (test.txt)")
    p.add_argument("--calibration-lists", default="data/lists-val", help="lists whose TRAIN images calibrate int8 "
                   "(the model's training images)")
    p.add_argument("--calibration-images", type=int, default=64, help="export.py --calibration-images")
    p.add_argument("--output", default="results/cpu/export_parity.json", help="write the results as JSON here")
    return p


def score(detections_json, test_set):
    """VOC07 mAP of detect.py's detections.json on the TEST images: boxes back to fractions of their image."""
    with open(detections_json, encoding="utf-8") as f:
        records = {os.path.realpath(r["image"]): r for r in json.load(f)}
    label = test_set.label_map
    det_boxes, det_labels, det_scores, true_boxes, true_labels, true_difficulties = [], [], [], [], [], []
    for path, objects in zip(test_set.images, test_set.objects):
        r = records[os.path.realpath(path)]
        size = torch.tensor([r["width"], r["height"]] * 2, dtype=torch.float)
        det_boxes.append(torch.tensor(r["boxes"], dtype=torch.float).reshape(-1, 4) / size)
        det_labels.append(torch.tensor([label[n] for n in r["labels"]], dtype=torch.long))
        det_scores.append(torch.tensor(r["scores"], dtype=torch.float))
        true_boxes.append(torch.tensor(objects["boxes"], dtype=torch.float).reshape(-1, 4) / size)
        true_labels.append(torch.tensor(objects["labels"], dtype=torch.long))
        true_difficulties.append(torch.tensor(objects["difficulties"], dtype=torch.uint8))
    names = {v: k for k, v in label.items() if v}
    aps, mean = calculate_mAP(det_boxes, det_labels, det_scores, true_boxes, true_labels, true_difficulties,
                              label_names=names)
    return mean, aps


def main(args):
    check_writable(args.output, "--output")
    test_set = BCCDDataset(args.data_folder, "test", keep_difficult=True)
    result = {"checkpoint": repo_relative(args.checkpoint), "images": len(test_set), "paths": {}}
    with tempfile.TemporaryDirectory(prefix="export-parity-") as tmp:
        files = {"pytorch fp32": args.checkpoint}
        for name, fmt, int8 in (("onnxruntime fp32", "onnx", False), ("openvino fp32", "openvino", False),
                                ("openvino int8", "openvino", True)):
            files[name] = export_checkpoint(args.checkpoint, fmt, int8, os.path.join(tmp, name.replace(" ", "-")),
                                            args.calibration_lists, args.calibration_images)
        for name, path in files.items():
            out = os.path.join(tmp, "out-" + name.replace(" ", "-"))
            cmd = [sys.executable, os.path.join(REPO, "detect.py"), *test_set.images, "--checkpoint", path,
                   "--output-dir", out, "--device", "cpu", "--no-amp", "--min-score", "0.01", "--max-overlap", "0.45",
                   "--top-k", "200", "--tile", "off"]
            start = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            if done.returncode:
                raise UserError(f"detect.py with {path} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
            mean, aps = score(os.path.join(out, "detections.json"), test_set)
            result["paths"][name] = {"mAP": mean, "AP": aps, "detect_py_seconds": round(seconds, 1)}
            print(f"{name:<18} mAP {mean:.4f}  ({seconds:.0f} s)", flush=True)
    base = result["paths"]["pytorch fp32"]["mAP"]
    for name, goal in GOALS.items():
        r = result["paths"][name]
        r["difference"], r["goal"] = r["mAP"] - base, goal
        r["within_goal"] = abs(r["mAP"] - base) <= goal
    print(f"\n{'path':<18}{'TEST mAP':>9}{'- .pt':>9}{'goal':>7}")
    for name, r in result["paths"].items():
        against = f"{r['difference']:>+9.4f}{r['goal']:>7}{'' if r['within_goal'] else '  MISSED'}" if "goal" in r else ""
        print(f"{name:<18}{r['mAP']:>9.4f}{against}")
    write_json_atomic({**result, **run_info(torch.device("cpu"))}, args.output, indent=2)
    print(f"written to {args.output}")


if __name__ == "__main__":
    run_cli(main, get_args_parser())
