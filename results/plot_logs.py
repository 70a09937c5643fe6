"""Plot training loss and validation mAP per epoch from train.py's log.jsonl files.

    $ pip install matplotlib   # only this script needs it
    $ python results/plot_logs.py --output results/2026-11-26-h200/training.png \\
          seed0=results/2026-11-26-h200/final/log-s0.jsonl seed1=results/2026-11-26-h200/final/log-s1.jsonl
"""
import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("logs", nargs="+", metavar="NAME=LOG", help="a label and a log.jsonl written by train.py")
    p.add_argument("--output", required=True, help="PNG to write")
    p.add_argument("--title", default="SSD300 on BCCD, from scratch")
    args = p.parse_args()

    fig, (ax_loss, ax_map) = plt.subplots(1, 2, figsize=(11, 4))
    for item in args.logs:
        name, path = item.split("=", 1)
        records = [json.loads(line) for line in open(path)]
        ax_loss.plot([r["epoch"] for r in records], [r["loss"] for r in records], label=name)
        scored = [r for r in records if r.get("mAP") is not None]
        ax_map.plot([r["epoch"] for r in scored], [r["mAP"] for r in scored], marker="o", markersize=3, label=name)
    ax_loss.set(xlabel="epoch", ylabel="MultiBox loss", yscale="log", title="training loss")
    ax_map.set(xlabel="epoch", ylabel="VOC07 mAP", ylim=(0, 1), title="mAP (monitoring only)")
    for ax in (ax_loss, ax_map):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(args.title)
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
