"""A lab's loop on a microscope the model never saw, measured: fine-tune on N corrected images, choose the counting
thresholds on the lab's held-out images, count that source's validation images; for N = 0 (the model as it is) and
each --samples N. The corrections are TXL-PBC's labels.

    python tools/txl_sources.py --txl data/TXL-PBC --output data/txl-sources --samples 10 25 50 --held-out 50
    python tools/adaptation.py --model weights/ssd300_bccd.pt --source data/txl-sources/Raabin --samples 10 25 50 \
        --output results/adaptation-raabin.json

For each N it runs, as a lab would, and records with their minutes:
    python create_data_lists.py --data-folder SOURCE --train-split train-N --test-split held-out --output-folder W/lists-N
    python train.py --fine-tune --init-weights MODEL --data-folder W/lists-N --out-dir W/run-N
    python set_thresholds.py --checkpoint W/run-N/checkpoint.pt --data-folder W/lists-N
    python eval.py --checkpoint W/run-N/checkpoint.pt --data-folder W/lists-val --output W/eval-N.json
and for N = 0 eval.py on MODEL as it is, and at thresholds set_thresholds.py chose on the held-out images. The table:
mAP (VOC07) and counting error / bias per class on SOURCE's val images, which neither the fine-tune nor the
thresholds saw. --work (default: a new temporary folder) keeps the lists, runs and reports.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the project's flat modules, one folder up (run as `python tools/adaptation.py`)
from misc import UserError, run_cli, run_python, write_json_atomic  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser("adaptation.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="weights/ssd300_bccd.pt", help="the model to adapt (fp16 shipped or checkpoint)")
    p.add_argument("--source", required=True, help="a YOLO dataset with splits train-N, held-out and val "
                   "(tools/txl_sources.py --samples --held-out)")
    p.add_argument("--samples", type=int, nargs="+", default=[10, 25, 50], help="the N of corrected images")
    p.add_argument("--fine-tune-flags", default="", help="extra train.py flags after --fine-tune (say, "
                   "'--iterations 60'); the table records them")
    p.add_argument("--work", default=None, help="folder for the lists, runs and reports (default: a temporary one)")
    p.add_argument("--output", required=True, help="the table, JSON")
    return p


def run(*argv):
    """`python argv...` in the repository (misc.run_python); its seconds."""
    start = time.perf_counter()
    run_python(argv)
    return round(time.perf_counter() - start, 1)


def figures(report):
    """mAP, and per class AP, counting error and bias, of an eval.py --output JSON."""
    with open(report) as f:
        r = json.load(f)
    counts = r["counts"]
    return {"images": r["images"], "mAP": round(r["mAP"], 4), "AP": {k: round(v, 4) for k, v in r["AP"].items()},
            "min_score": counts["min_score"], "max_overlap": counts["max_overlap"],
            "error": {k: round(v["relative_error"], 4) for k, v in counts.items() if isinstance(v, dict)
                      and v.get("relative_error") is not None},
            "bias": {k: round(v["relative_bias"], 4) for k, v in counts.items() if isinstance(v, dict)
                     and v.get("relative_bias") is not None}}


def lists_folder(work, name):
    return os.path.join(work, f"lists-{name}")


def main(args):
    if any(n < 1 for n in args.samples):
        raise UserError(f"--samples must be 1 or more, not {args.samples}")
    work = args.work or tempfile.mkdtemp(prefix="adaptation-")
    os.makedirs(work, exist_ok=True)
    val = lists_folder(work, "val")
    for split in ("val", "held-out"):  # lists of that split alone, as TEST
        if not os.path.isdir(lists_folder(work, split)):
            run("create_data_lists.py", "--data-folder", args.source, "--train-split", "none", "--test-split", split,
                "--output-folder", lists_folder(work, split))
    rows = {}
    before = os.path.join(work, "eval-0.json")
    run("eval.py", "--checkpoint", args.model, "--data-folder", val, "--output", before)
    rows["0"] = {"fine_tune_minutes": 0, **figures(before)}
    model_copy = os.path.join(work, "model-0-thresholds.pt")
    shutil.copyfile(args.model, model_copy)  # N = 0, thresholds chosen on the held-out images
    run("set_thresholds.py", "--checkpoint", model_copy, "--data-folder", lists_folder(work, "held-out"))
    report = os.path.join(work, "eval-0-thresholds.json")
    run("eval.py", "--checkpoint", model_copy, "--data-folder", val, "--output", report)
    rows["0, thresholds on held-out"] = {"fine_tune_minutes": 0, **figures(report)}
    for n in args.samples:
        lists_n, out = lists_folder(work, n), os.path.join(work, f"run-{n}")
        if not os.path.isdir(lists_n):
            run("create_data_lists.py", "--data-folder", args.source, "--train-split", f"train-{n}", "--test-split",
                "held-out", "--output-folder", lists_n)
        seconds = run("train.py", "--fine-tune", "--init-weights", args.model, "--data-folder", lists_n, "--out-dir", out,
                      *args.fine_tune_flags.split())
        run("set_thresholds.py", "--checkpoint", os.path.join(out, "checkpoint.pt"), "--data-folder", lists_n)
        report = os.path.join(work, f"eval-{n}.json")
        run("eval.py", "--checkpoint", os.path.join(out, "checkpoint.pt"), "--data-folder", val, "--output", report)
        rows[str(n)] = {"fine_tune_minutes": round(seconds / 60, 1), **figures(report)}
        print(f"N={n}: {rows[str(n)]}", flush=True)
    write_json_atomic({"model": args.model, "source": args.source, "fine_tune_flags": args.fine_tune_flags,
                       "command": "python " + " ".join(sys.argv), "rows": rows}, args.output, indent=2)
    names = list(rows["0"]["AP"])
    print(f"{'N':<26}{'minutes':>8}{'mAP':>8}  " + "  ".join(f"{n} err (bias)" for n in names))
    for n, r in rows.items():
        print(f"{n:<26}{r['fine_tune_minutes']:>8}{r['mAP']:>8.3f}  " + "  ".join(
            f"{r['error'].get(c, float('nan')):.1%} ({r['bias'].get(c, float('nan')):+.1%})" for c in names))


if __name__ == "__main__":
    run_cli(main, get_args_parser())
