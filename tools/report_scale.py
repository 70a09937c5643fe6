"""How report.html scales: a page for N images (default 5,000), its size, the time report.py spends rewriting
it, and how long headless Chromium takes to open it and to sort it (tests/chromium.py).

    $ python tools/report_scale.py --image img/BloodImage_00007.jpg    # writes into a new temporary folder

The rows are made up (14 cells an image, random scores above the thresholds); every thumbnail is a copy of
the one of --image, so the browser loads real files. Nothing here runs a model.
"""
import argparse
import os
import random
import shutil
import sys
import tempfile
import time

from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the project's flat modules, one folder up (run as `python tools/report_scale.py`)
sys.path.insert(1, os.path.join(REPO, "tests"))  # tests/chromium.py

import report  # noqa: E402
from chromium import Chromium, find_chromium  # noqa: E402
from misc import UserError, run_cli  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser("report_scale.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--image", required=True, help="an image to make the thumbnails of")
    p.add_argument("--images", type=int, default=5000, help="rows of the page")
    p.add_argument("--folder", default=None, help="an empty or new folder to write into (default: a new temporary one)")
    return p


def main(args):
    if not find_chromium():
        raise UserError("chromium is not installed (Debian: apt-get install chromium; or set $CHROMIUM)")
    if args.folder is None:
        args.folder = tempfile.mkdtemp(prefix="report-scale-")
    os.makedirs(args.folder, exist_ok=True)
    if os.listdir(args.folder):
        raise UserError(f"--folder {args.folder}: not empty (give an empty or new folder)")
    classes = ["RBC", "WBC", "Platelets"]
    page = report.Report(args.folder, classes, [0.35, 0.25, 0.3], {"model": "made-up rows"}, args.images)
    page.thumbnail("first.jpg", Image.open(args.image))
    first = os.path.join(args.folder, report.THUMBNAILS, report.thumbnail_name("first.jpg"))
    rng, rewrites, start = random.Random(0), 0, time.perf_counter()
    for i in range(args.images):
        name = f"smear_{i:05d}.jpg"
        shutil.copyfile(first, os.path.join(args.folder, report.THUMBNAILS, report.thumbnail_name(name)))
        page.thumbnails[name] = Image.open(first).size
        labels = rng.choices(classes, [12, 1, 1], k=14)
        before = page.written_at
        page.add(f"/data/smears/{name}", name, [labels.count(c) for c in classes], labels,
                 [rng.uniform(0.3, 1) for _ in labels])
        rewrites += page.written_at != before
    page.close()
    path = os.path.join(args.folder, report.REPORT)
    print(f"{args.images} images: page {path}, {os.path.getsize(path) / 1e6:.2f} MB, {rewrites + 1} writes in "
          f"{time.perf_counter() - start:.1f} s (with the thumbnails' copies), the last "
          f"{page.write_seconds * 1e3:.0f} ms")
    with Chromium(timeout=300) as browser:
        start = time.perf_counter()
        browser.open(path)
        opened = time.perf_counter() - start
        timing = browser.evaluate("(() => { const t = performance.getEntriesByType('navigation')[0]; "
                                  "return [t.domInteractive, t.loadEventEnd]; })()")
        sort = browser.evaluate("(() => { const t = performance.now(); document.querySelectorAll('#images thead th')[3]"
                                ".click(); document.body.offsetHeight; return performance.now() - t; })()")
    print(f"chromium: load event {opened:.2f} s after the request (DOM interactive at {timing[0] / 1e3:.2f} s, "
          f"loaded at {timing[1] / 1e3:.2f} s), sorting by RBC {sort / 1e3:.2f} s")


if __name__ == "__main__":
    run_cli(main, get_args_parser())
