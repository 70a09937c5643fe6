"""The files of a detect.py run: the images it reads, and the output folder it writes (annotated images, counts.csv,
detections.json, report.html).

    paths, missing, repeats = find_images(["smears/", "extra.jpg"])   # folders searched recursively, each file once
    with Results(folder, classes, rev_label_map, report) as results:   # detect.py's command line
        results.add(path, name, annotated, windows, boxes, labels, scores)   # one image done

Images: any file PIL opens, upright by its EXIF orientation (open_image); ImageFiles reads and cuts them (tiling.prepare)
in DataLoader workers while the model runs, and an unreadable file is reported, not fatal.

counts.csv: the image, then one column per class of the checkpoint (UTF-8; a name a spreadsheet would take for a
formula, = + - @ first, gets a leading ': spreadsheet_text). detections.json: a JSON list, a record per image with
its size, its boxes in pixels of the original image, labels and scores, and the precision they were computed in (bf16,
fp32, or an export's). report.html: report.py. Each input gets a distinct
annotated image name (output_names), and any file name is shown as text on one line (printable).
"""
import csv
import json
import os
import sys
import time
import warnings

import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from misc import (UserError, check_writable, format_min_score, ignore_stop_signals, lock_folder,
                  remove_stale_temporaries, save_image_atomic, stop_signals_held)
from report import REPORT, THUMBNAILS, thumbnail_name
from tiling import TILE_ABOVE, prepare
from utils import class_names, image_extensions, pil_to_tensor

# ---------------------------------------------------------------------------------------------
# The images read
# ---------------------------------------------------------------------------------------------

def find_images(inputs, skip=None):
    """Expand files and folders (recursively, linked folders too) into a sorted list of image paths, each file once (a
    file given twice, or also inside a folder given, is counted once); returns (paths, missing inputs, number of
    repeats left out). skip: a folder whose files are left out of the folders searched (the output folder: its
    annotated images)."""
    paths, missing, seen, repeats = [], [], set(), 0
    skip = os.path.realpath(skip) if skip else None
    for item in inputs:
        if os.path.isdir(item):
            found, walked = [], {os.path.realpath(item), skip}
            for root, dirs, files in os.walk(item, followlinks=True):
                kept = []
                for d in sorted(dirs):  # a folder already walked (a link back up: a loop) is not walked again
                    real = os.path.realpath(os.path.join(root, d))
                    if real not in walked:
                        walked.add(real)
                        kept.append(d)
                dirs[:] = kept
                found += sorted(os.path.join(root, f) for f in files if os.path.splitext(f)[1].lower() in image_extensions())
        elif os.path.exists(item):  # a file; a pipe or device is reported when read (ImageFiles)
            found = [item]
        else:
            missing.append(item)
            continue
        for path in found:
            key = os.path.realpath(path)
            repeats += key in seen
            if key not in seen:
                seen.add(key)
                paths.append(path)
    return paths, missing, repeats


def open_image(path_or_file):
    """Open an image upright (EXIF orientation applied) as a uint8 RGB tensor (3, H, W). Images above PIL's
    decompression-bomb limit (twice 89 megapixels) are refused by PIL; its warning below that is not printed: a
    large scan is what tiling is for."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path_or_file) as im:
            return pil_to_tensor(ImageOps.exif_transpose(im))


class ImageFiles(Dataset):
    """Reads and prepares image files (prepare(image, tiles)); an unreadable file yields its error message instead."""

    def __init__(self, paths, tiles=None):
        self.paths = paths
        self.tiles = tiles

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        path = self.paths[i]
        if not os.path.isfile(path) and os.path.exists(path):  # a pipe or a device: opening it could wait for ever
            return i, None, f"{path}: not a regular file (a pipe, socket or device), not an image"
        try:
            image = open_image(path)
        except Exception as e:  # PIL raises many kinds: report and go on
            return i, None, f"{path}: cannot read image ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
        try:
            return i, image, prepare(image, self.tiles)
        except UserError as e:  # too many windows
            return i, None, f"{path}: {e}"

    @staticmethod
    def collate_fn(batch):
        return batch

    @classmethod
    def read(cls, paths, tiles, workers, errors):
        """The images, read and cut by `workers` processes (0: this one) while the model runs, as
        tiling.in_batches takes them: ((index, image, windows), (width, height), windows, inputs). An unreadable
        file is left out, and its message added to `errors`."""
        loader = DataLoader(cls(paths, tiles), batch_size=None, num_workers=workers, collate_fn=cls.collate_fn,
                            worker_init_fn=ignore_stop_signals)
        for i, image, prepared in loader:
            if image is None:
                errors.append(printable(prepared))
            else:
                yield (i, image, prepared[0]), (image.shape[2], image.shape[1]), *prepared


# ---------------------------------------------------------------------------------------------
# The output folder
# ---------------------------------------------------------------------------------------------

def output_names(paths, reserved=("counts.csv", "detections.json")):
    """A distinct output file name for every input, whatever the folders and names: the input's name (.jpg, .jpeg
    and .png kept, other formats saved as .png), with _1, _2, ... when it is taken (names compared ignoring case,
    for case-insensitive file systems), and shortened to stay within the file systems' 255 bytes."""
    names, taken = [], {n.casefold() for n in reserved}
    for p in paths:
        stem, ext = os.path.splitext(os.path.basename(p))
        ext = ext.lower() if ext.lower() in (".jpg", ".jpeg", ".png") else ".png"
        while len(os.fsencode(stem)) > 200:  # room for a counter and the extension
            stem = stem[:-1]
        name, n = stem + ext, 0
        while name.casefold() in taken:
            n += 1
            name = f"{stem}_{n}{ext}"
        taken.add(name.casefold())
        names.append(name)
    return names


CONTROL_CHARACTERS = {c: f"\\x{c:02x}" for c in [*range(32), 127]}


def printable(path):
    """A path as text that any UTF-8 file or terminal takes, on one line: bytes that are not UTF-8 (on Linux a
    file name may hold any) and control characters (a newline, a tab) shown as \\xNN, as `ls -b` does."""
    return os.fsencode(path).decode("utf-8", "backslashreplace").translate(CONTROL_CHARACTERS)


# What a run writes beside the annotated images, and where it writes them while the folder holds an earlier run's
PARTIAL = {"counts.csv": "counts.partial.csv", "detections.json": "detections.partial.json", REPORT: "report.partial.html"}


def spreadsheet_text(text):
    """A counts.csv cell as text: one that starts as a formula does (= + - @, a tab or a return) gets a leading
    apostrophe, which Excel and LibreOffice read as "text" rather than running the formula (a file named
    =HYPERLINK(...).jpg)."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def earlier_outputs(folder):
    """The names of the annotated images that earlier detect.py runs wrote in `folder`, as their detections.json
    (and detections.partial.json) record them, also when a run was killed before closing the list."""
    outputs = set()
    for name in ("detections.json", PARTIAL["detections.json"]):
        if not os.path.isfile(os.path.join(folder, name)):  # a pipe there would block open() for ever
            continue
        try:
            with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        for candidate in (text, text.rstrip().rstrip(",") + "\n]"):
            try:
                records = json.loads(candidate)
            except (ValueError, RecursionError):  # damaged, or nested deeper than Python's stack
                continue
            if isinstance(records, list):
                outputs |= {r["output"] for r in records if isinstance(r, dict) and isinstance(r.get("output"), str)}
            break
    return outputs


def check_writable_folder(folder):
    """Before any work, a one-line UserError for an output folder the run cannot write into (checked without
    creating it: it is created at the first image detected)."""
    check_writable(folder, "--output-dir", folder=True, create=False)
    for name in (*PARTIAL, *PARTIAL.values()):  # no folder, device or pipe where they go
        check_writable(os.path.join(folder, name), "--output-dir", create=False)


def check_names(folder, paths, names):
    """Before any work, a one-line UserError where an annotated image (names, of the inputs paths) would replace an
    input image or a file that no earlier detect.py wrote, or where the thumbnails folder cannot be."""
    inputs = {os.path.realpath(p) for p in paths}
    clash = next((n for n in names if os.path.realpath(os.path.join(folder, n)) in inputs), None)
    if clash:
        raise UserError(f"--output-dir {folder}: writing {printable(clash)} there would overwrite an input image; "
                        f"choose another folder")
    ours = earlier_outputs(folder)
    foreign = next((p for n in names if printable(n) not in ours  # an annotated image, or its thumbnail
                    for p in (n, os.path.join(THUMBNAILS, thumbnail_name(n)))
                    if os.path.lexists(os.path.join(folder, p))), None)
    if foreign:
        raise UserError(f"--output-dir {folder}: {printable(foreign)} is there and no earlier detect.py wrote it; the "
                        f"annotated image would replace it: choose another folder")
    thumbnails = os.path.join(folder, THUMBNAILS)
    if os.path.lexists(thumbnails) and (os.path.islink(thumbnails) or not os.path.isdir(thumbnails)):
        raise UserError(f"--output-dir {folder}: {THUMBNAILS} there is not a folder (report.html's thumbnails go in "
                        f"it); remove it or choose another folder")


class Results:
    """The output folder of a run: the annotated images, counts.csv and detections.json, written as the images are
    done (each row flushed), so that an interrupted or failing run keeps what it finished, and report.html (a
    report.Report, with its thumbnails) refreshed as they are. A context manager:

        with Results(folder, classes, rev_label_map, report) as results:   # locks the folder, if it is there
            results.add(...)   # the first image creates the folder (locked)

    An earlier run's counts.csv, detections.json and report.html are never replaced by a partial one: where they
    are, the run writes counts.partial.csv, detections.partial.json and report.partial.html (PARTIAL), moved onto
    them only when it ends whole; a run that stops (an error, Ctrl-C, SIGTERM) leaves them beside the earlier
    ones. Annotated images are replaced as they are done. Leaving the block closes detections.json as a JSON list
    and writes report.html's last page ("ended early" after an error or an interruption) however the run ends (a
    kill, SIGKILL, leaves detections.json without its closing bracket and the page as last written; counts.csv
    stays whole up to its last row) and releases the lock: a second detect.py writing into the folder at the same
    time is refused."""

    def __init__(self, folder, classes, rev_label_map, report=None, precision=None):
        self.folder, self.classes, self.rev_label_map, self.n = folder, classes, rev_label_map, 0
        self.precision = precision  # how the detections were computed (bf16, fp32, an export's): in each record
        self.report = report  # report.html (a report.Report), kept up to date beside the two files; None: none
        self.lock = self.counts = self.detections = None
        self.names = {name: name for name in PARTIAL}  # where each file goes during the run (PARTIAL when staged)

    @property
    def staged(self):
        return self.names == PARTIAL

    def held(self):
        """Where the images finished so far are recorded, for a run that stops."""
        if not self.n:
            return ""
        if self.staged:
            return (f"; {PARTIAL['counts.csv']} and {PARTIAL['detections.json']} in {self.folder} hold those (the "
                    f"earlier run's counts.csv, detections.json and report.html are kept)")
        return f"; counts.csv and detections.json in {self.folder} hold those"

    def __enter__(self):
        if os.path.isdir(self.folder):
            self._lock()
        return self

    def __exit__(self, kind, error, traceback):
        try:
            if self.counts is not None:
                self.close(quiet=error is not None)  # a run already ending with an error says that one
        finally:
            if self.lock is not None:
                os.close(self.lock)

    def _lock(self):
        self.lock = lock_folder(self.folder, f"--output-dir {self.folder}: another detect.py is writing there; wait "
                                             f"for it or choose another folder")

    def _open(self):
        try:
            os.makedirs(self.folder, exist_ok=True)
            if self.lock is None:
                self._lock()
            if any(os.path.lexists(os.path.join(self.folder, name)) for name in PARTIAL):  # an earlier run's
                self.names = PARTIAL
                if self.report is not None:
                    self.report.name = PARTIAL[REPORT]
            for name in (self.names["counts.csv"], self.names["detections.json"]):  # a link is replaced, not written through
                if os.path.islink(os.path.join(self.folder, name)):
                    os.remove(os.path.join(self.folder, name))
            self.counts = open(os.path.join(self.folder, self.names["counts.csv"]), "w", encoding="utf-8", newline="")
            self.detections = open(os.path.join(self.folder, self.names["detections.json"]), "w", encoding="utf-8")
            remove_stale_temporaries(self.folder, (REPORT, PARTIAL[REPORT]))  # a killed run's half page (locked)
        except OSError as e:
            raise UserError(f"--output-dir {self.folder}: cannot write {e.filename or 'there'} ({e.strerror or e})") from None
        self.csv = csv.writer(self.counts, lineterminator="\n")
        self.csv.writerow(["image", *map(spreadsheet_text, self.classes)])
        self.counts.flush()
        self.detections.write("[")

    def add(self, path, name, annotated, windows, boxes, labels, scores):
        """One image: its annotated copy (a PIL image) saved as `name`, a row of counts.csv and a record of
        detections.json (boxes in pixels). Returns (its counts per class, the UserError that kept its annotated
        image from being written or None: it is counted all the same)."""
        if self.counts is None:
            self._open()
        try:  # an interrupted save leaves no half image, and a link there is replaced, not written through
            save_image_atomic(annotated, os.path.join(self.folder, name), quality=90)
            if self.report is not None:
                self.report.thumbnail(name, annotated)
            failed = None
        except UserError as e:
            failed = e
        n = torch.bincount(labels, minlength=len(self.classes) + 1).tolist()[1:]
        record = {"image": printable(path), "output": printable(name), "width": annotated.width,
                  "height": annotated.height, "windows": windows, "boxes": [[round(v, 1) for v in b] for b in boxes.tolist()],
                  "labels": [self.rev_label_map[l] for l in labels.tolist()],
                  "scores": [round(s, 4) for s in scores.tolist()], "precision": self.precision}
        try:
            self.csv.writerow([spreadsheet_text(printable(path)), *n])
            self.counts.flush()
            self.detections.write(("," if self.n else "") + "\n" + json.dumps(record, ensure_ascii=False))
            self.detections.flush()
        except OSError as e:  # a full disk: what was written before stays readable
            raise UserError(f"--output-dir {self.folder}: cannot write {self.names['counts.csv']} and "
                            f"{self.names['detections.json']} ({e.strerror or e}); they hold the first {self.n} "
                            f"image(s)") from None
        self.n += 1
        if self.report is not None:
            self.report.add(record["image"], name, n, record["labels"], scores.tolist())
        return n, failed

    def close(self, quiet=False):
        """Ends detections.json as a JSON list and writes report.html's last page (quiet: the run ends early, with an
        error, and the page says so); a write that fails (a full disk) is a UserError unless quiet. A run that
        ends whole replaces the earlier run's three files with its own (and removes a stopped run's)."""
        failed = None
        for f, end in ((self.detections, "\n]\n"), (self.counts, "")):
            try:
                f.write(end)
                f.close()
            except OSError as e:
                failed = failed or e
        if self.report is not None:
            self.report.close(ended_early=quiet, quiet=quiet or failed is not None)  # failed: that error is said
        if failed and not quiet:
            raise UserError(f"--output-dir {self.folder}: cannot finish {self.names['detections.json']} "
                            f"({failed.strerror or failed}); {self.names['counts.csv']} holds the {self.n} image(s)")
        if quiet or failed:
            return
        try:
            with stop_signals_held():  # the three files belong together
                for name in ("detections.json", "counts.csv", REPORT):  # the page last: it shows the other two
                    path, partial = os.path.join(self.folder, name), os.path.join(self.folder, PARTIAL[name])
                    if os.path.lexists(partial):
                        os.replace(partial, path) if self.staged else os.remove(partial)  # else a stopped run's, older
        except OSError as e:
            raise UserError(f"--output-dir {self.folder}: cannot move {e.filename} into place ({e.strerror or e})") from None


def report_settings(args, model, min_score, max_overlap, tiles, device, precision):
    """What report.html says of a run: {label: text}. precision: (bf16, fp32 or an export's, why)."""
    classes = class_names(model.label_map)
    command = " ".join(printable(a) for a in sys.argv)  # a long list of files: its start
    return {"model": f"{printable(os.path.abspath(args.checkpoint))} (classes {', '.join(classes)}; trained on "
                     f"{model.field[0]}x{model.field[1]} px fields)",
            "min_score": format_min_score(min_score, classes), "max_overlap": f"{max_overlap:g}", "top_k": args.top_k,
            "tiling": "off: every image resized whole" if tiles is None else
                      f"windows of {tiles.window[0]}x{tiles.window[1]} px overlapping by {tiles.overlap} px, for "
                      f"images more than {TILE_ABOVE:g} times as wide or tall",
            "device": str(device), "precision": f"{precision[0]} ({precision[1]})",
            "command": command if len(command) <= 200 else f"{command[:200]} ... ({len(sys.argv) - 1} arguments)",
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
