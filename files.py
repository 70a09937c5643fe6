"""The files of a detect.py run: the images it reads, and the output folder it writes (annotated images, counts.csv,
detections.json, report.html), taken up where a stopped run left it.

    paths, missing, repeats, outputs = find_images(["smears/", "extra.jpg"])  # folders searched recursively, each file once
    with Results(folder, classes, rev_label_map, report, settings) as results:   # detect.py's command line
        names = results.start(paths)                                       # a stopped run's images: results.done
        results.add(path, name, annotated, windows, boxes, labels, scores)   # one image done

Images: any file PIL opens, upright by its EXIF orientation (open_image); ImageFiles reads and cuts them
(tiling.prepare) in DataLoader workers while the model runs; an unreadable file is reported, not fatal. Whole-slide
scans, pyramidal TIFFs and images beyond PIL's limit are read by region, their windows one at a time (slides.py).

The output folder:
  * each image annotated, under a distinct name (output_names), and its thumbnail in thumbnails/ (report.py);
  * counts.csv: the image, then one column per class of the checkpoint (UTF-8; a name a spreadsheet would take for
    a formula, = + - @ first, gets a leading ': spreadsheet_text), a row appended as each image is done;
  * detections.json: a JSON list, a record per image: its size, its boxes in pixels of the original image, labels,
    scores, and the precision they were computed in (bf16, fp32, or an export's). It is written whole (a temporary
    file moved into place) when the run ends or stops, so it is valid JSON at every moment;
  * report.html (report.py), rewritten whole as the run goes;
  * labels/ with --save-labels: the boxes as pre-annotations for labelling tools (labels.py), when the run ends whole;
  * detections.partial.jsonl (JOURNAL), while a run goes on and after one that stopped: its settings on the first
    line, then each image's record, a line each, flushed as the image is done (JSON Lines). It is what a stopped
    run is taken up from, and is removed when the run ends whole.
File names are shown as text on one line (printable).

A stopped run (Ctrl-C, SIGTERM, kill -9, a power loss) is taken up by the next detect.py into the same folder, by
default (--no-resume counts every image again): with the same settings (model, thresholds, tiling, precision,
device, batch size; else one line says which differs), the images its record holds are skipped and keep their rows,
and the others are counted; a second stop adds to the first's. A line that a kill cut short is dropped, and its image
counted again. When the run ends whole, counts.csv and detections.json are written from the record in the order of
the inputs: the same bytes as a run that never stopped (at --batch-size 1, the CPU's default: larger batches group
windows otherwise after a stop, which can move a score in its last digit).

Where an earlier whole run's counts.csv, detections.json and report.html are, a run writes counts.partial.csv,
detections.partial.json and report.partial.html (PARTIAL) instead, moved onto them only when it ends whole.
"""
import csv
import io
import json
import math
import os
import sys
import time
import warnings

from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from misc import (UserError, check_writable, format_min_score, ignore_stop_signals, iterate, lock_folder,
                  remove_stale_temporaries, save_image_atomic, stop_signals_held, write_text_atomic)
from labels import write_labels
from report import REPORT, THUMBNAILS, thumbnail_name
from slides import (INSTALL, OPENSLIDE_EXTENSIONS, ArraySource, Overview, kind_of, overview, plan, plan_source,
                    record_of, window_inputs)
from tiling import TILE_ABOVE, Reading, prepare
from utils import class_names, first_line, image_extensions, pil_to_tensor

# ---------------------------------------------------------------------------------------------
# The images read
# ---------------------------------------------------------------------------------------------

def is_output_folder(folder):
    """Whether `folder` holds a detect.py run's output (its counts.csv and detections.json, or its journal)."""
    return (os.path.isfile(os.path.join(folder, JOURNAL)) or all(
        os.path.isfile(os.path.join(folder, name)) for name in ("counts.csv", "detections.json")))


def find_images(inputs, skip=None):
    """Expand files and folders (recursively, linked folders too) into a sorted list of image paths, each file once (a
    file given twice, or also inside a folder given, is counted once); returns (paths, missing inputs, number of
    repeats left out, output folders left out). skip: a folder whose files are left out of the folders searched (the
    output folder: its annotated images); so are those of any other detect.py output found below a folder given (an
    earlier run's, written beside the images: its annotated images and thumbnails are not smears)."""
    paths, missing, seen, repeats, outputs = [], [], set(), 0, []
    extensions = image_extensions() | set(OPENSLIDE_EXTENSIONS)  # PIL's formats (.tif too), and whole-slide scans
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
                        if is_output_folder(real):
                            outputs.append(os.path.join(root, d))
                        else:
                            kept.append(d)
                dirs[:] = kept
                found += sorted(os.path.join(root, f) for f in files if os.path.splitext(f)[1].lower() in extensions)
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
    return paths, missing, repeats, outputs


def open_image(path_or_file, max_pixels=None):
    """Open an image upright (EXIF orientation applied) as a uint8 RGB tensor (3, H, W). An image of more pixels than
    PIL reads by default (its decompression-bomb limit: twice 89 megapixels) or than max_pixels, when given, is a
    one-line UserError naming the fixes (too_large); PIL's warning below that is not printed: a large scan is what
    tiling is for."""
    limit = max_pixels or pil_limit()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        bomb_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # checked here, with the fixes named
        try:
            with Image.open(path_or_file) as im:
                if im.width * im.height > limit:
                    raise UserError(too_large(path_or_file, im.size, limit, max_pixels))
                return pil_to_tensor(ImageOps.exif_transpose(im))
        finally:
            Image.MAX_IMAGE_PIXELS = bomb_limit


def pil_limit():
    """The most pixels PIL opens (PIL.Image.MAX_IMAGE_PIXELS, twice, as its DecompressionBombError does)."""
    return math.inf if Image.MAX_IMAGE_PIXELS is None else 2 * Image.MAX_IMAGE_PIXELS


def too_large(path, size, limit, max_pixels):
    """What to do about an image of `size` beyond `limit` pixels (open_image)."""
    n = size[0] * size[1]
    tiff = isinstance(path, (str, os.PathLike)) and kind_of(os.fspath(path)) == "tiff"
    return (f"{size[0]}x{size[1]} px = {n:,} pixels, more than {'--max-pixels' if max_pixels else 'PIL reads'} "
            f"({limit:,}): {'read it by region: ' + INSTALL + '; or ' if tiff else ''}give --max-pixels {n} to read it "
            f"whole (about {6 * n / 2**30:.1f} GiB of memory), or convert it to a tiled pyramidal TIFF, read by region "
            f"in little memory: vips tiffsave IN OUT.tif --tile --pyramid --compression jpeg")


class ImageFiles(Dataset):
    """Reads and prepares image files (prepare(image, tiles)); an unreadable file yields its error message instead."""

    def __init__(self, paths, tiles=None, reading=Reading()):
        self.paths = paths
        self.tiles = tiles
        self.reading = reading  # how slides and images beyond PIL's limit are read (slides.py)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        path = self.paths[i]
        if not os.path.isfile(path) and os.path.exists(path):  # a pipe or a device: opening it could wait for ever
            return i, None, f"{path}: not a regular file (a pipe, socket or device), not an image"
        if not os.path.exists(path):  # gone since the folder was searched, or a link to nothing
            return i, None, f"{path}: no such file{' (a link to ' + os.readlink(path) + ')' if os.path.islink(path) else ''}"
        try:
            planned = plan(path, self.reading, self.tiles, pil_limit())  # a slide: (Plan, overview) read by region
            image = None if planned else open_image(path, self.reading.max_pixels)
        except UserError as e:  # too large, a damaged slide, a missing extra
            return i, None, f"{path}: {e}"
        except Exception as e:  # PIL raises many kinds: report and go on
            return i, None, f"{path}: cannot read image ({type(e).__name__}: {first_line(e, path)})"
        try:
            if image is not None and (image.shape[1] * image.shape[2] <= pil_limit() or self.tiles is None):
                return i, image, prepare(image, self.tiles)
            if image is not None:  # beyond PIL's limit, read whole (--max-pixels): its windows made one at a time
                source = ArraySource(image)
                planned = plan_source(path, "array", source, self.reading, self.tiles, image), overview(source)
        except UserError as e:  # too many windows
            return i, None, f"{path}: {e}"
        slide, (picture, factor) = planned
        return i, Overview(picture, factor, record_of(slide, picture, factor)), slide

    @staticmethod
    def collate_fn(batch):
        return batch

    @classmethod
    def read(cls, paths, tiles, workers, errors, reading=Reading()):
        """The images, read and cut by `workers` processes (0: this one) while the model runs, as
        tiling.in_batches takes them: ((index, image, windows), (width, height), windows, inputs). A slide (an image
        read by region, slides.py) comes as ((index, its Overview, windows), its level's size, windows, its windows'
        inputs read one at a time in this process, (its level's Tiling, pixels of level 0 per pixel of the level)).
        An unreadable file is left out, and its message added to `errors`."""
        loader = DataLoader(cls(paths, tiles, reading), batch_size=None, num_workers=workers,
                            collate_fn=cls.collate_fn, worker_init_fn=ignore_stop_signals)
        for i, image, prepared in iterate(loader):  # workers shut down at once, also by an error
            if image is None:
                errors.append(printable(prepared))
            elif isinstance(image, Overview):
                level, name = prepared.levels[prepared.level], printable(prepared.path)
                try:
                    inputs = window_inputs(prepared, name, errors)
                except UserError as e:  # removed or changed since a worker read it
                    errors.append(f"{name}: {e}")
                    continue
                yield (i, image, prepared.windows), level[:2], prepared.windows, inputs, (prepared.tiles, level.downsample)
            else:
                yield (i, image, prepared[0]), (image.shape[2], image.shape[1]), *prepared


def drawable(image, boxes):
    """What detect.py annotates for an image of ImageFiles.read: (a PIL image, the boxes (n, 4) in its pixels, what
    detections.json's record says of the image beyond the annotated image's size, or None). A slide's Overview is
    downscaled, its boxes with it."""
    if isinstance(image, Overview):
        return image.image, boxes * boxes.new_tensor(image.factor * 2), image.record
    return Image.fromarray(image.permute(1, 2, 0).numpy()), boxes, None


# ---------------------------------------------------------------------------------------------
# The output folder
# ---------------------------------------------------------------------------------------------

def output_names(paths, reserved=("counts.csv", "detections.json"), fixed=None):
    """A distinct output file name for every input, whatever the folders and names: the input's name (.jpg, .jpeg
    and .png kept, other formats saved as .png), with _1, _2, ... when it is taken (names compared ignoring case,
    for case-insensitive file systems), and shortened to stay within the file systems' 255 bytes. fixed: {index:
    name} of inputs whose names are given (a stopped run's)."""
    fixed = fixed or {}
    names, taken = [], {n.casefold() for n in (*reserved, *fixed.values())}
    for i, p in enumerate(paths):
        if i in fixed:
            names.append(fixed[i])
            continue
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
JOURNAL = "detections.partial.jsonl"  # the record of a run as it goes: its settings, then a line per image done


def spreadsheet_text(text):
    """A counts.csv cell as text: one that starts as a formula does (= + - @, a tab or a return) gets a leading
    apostrophe, which Excel and LibreOffice read as "text" rather than running the formula (a file named
    =HYPERLINK(...).jpg)."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def earlier_outputs(folder):
    """The names of the annotated images that earlier detect.py runs wrote in `folder`, as their detections.json,
    detections.partial.json and record (JOURNAL) say, also when a run was killed before closing the list (a run of
    an older detect.py)."""
    outputs = set()
    if os.path.isfile(os.path.join(folder, JOURNAL)):
        outputs |= {r["output"] for r in read_record(os.path.join(folder, JOURNAL))
                    if isinstance(r, dict) and isinstance(r.get("output"), str)}
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
    for name in (*PARTIAL, *PARTIAL.values(), JOURNAL):  # no folder, device or pipe where they go
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
    """The output folder of a run (see the module's docstring). A context manager:

        with Results(folder, classes, rev_label_map, report, settings) as results:  # locks the folder if it is there,
            names = results.start(paths)  # and reads the record of a run stopped there: results.done, by image
            results.add(...)              # one image; the first creates the folder (locked)

    Leaving the block writes counts.csv and detections.json whole from the record, in the order of the inputs, and
    report.html's last page ("ended early" after an error or an interruption), and releases the lock: a second
    detect.py writing into the folder at the same time is refused. settings: what the detections depend on (the
    model, thresholds, tiling, precision, ...); a stopped run is taken up only with the same, unless resume is
    False, which counts every image again."""

    def __init__(self, folder, classes, rev_label_map, report=None, settings=None, resume=True, labels=None):
        self.folder, self.classes, self.rev_label_map, self.report = folder, classes, rev_label_map, report
        self.labels, self.paths = labels, []  # pre-annotations to write (labels.FORMATS) when the run ends whole
        self.settings, self.resume = json.loads(json.dumps(settings or {})), resume  # as JSON holds them
        self.n, self.done, self.order = 0, {}, {}  # images counted by this run; a stopped run's records, by image
        self.width = len("image")  # of the printed table's first column
        self.lock = self.counts = self.journal = None
        self.names = {name: name for name in PARTIAL}  # where each file goes (PARTIAL's names when staged)

    @property
    def staged(self):
        return self.names == PARTIAL

    def held(self):
        """Where the images finished so far are recorded, for a run that stops."""
        if not self.n + len(self.done):
            return ""
        kept = " (the earlier run's counts.csv, detections.json and report.html are kept)" if self.staged else ""
        return (f"; {self.names['counts.csv']} and {self.names['detections.json']} in {self.folder} hold those{kept}; "
                f"the same command takes the run up where it stopped")

    def __enter__(self):
        if os.path.isdir(self.folder):
            self._lock()
            try:
                if self.resume and os.path.isfile(os.path.join(self.folder, JOURNAL)):
                    self._take_up()
            except BaseException:
                self.__exit__(None, None, None)
                raise
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

    def _take_up(self):
        """Read the record a stopped run left: its settings must be this run's; its images are self.done."""
        lines = read_record(os.path.join(self.folder, JOURNAL))
        if not lines:
            return  # stopped before its first line: nothing to take up
        head = lines[0].get("detect.py") if isinstance(lines[0], dict) else None
        if not (isinstance(head, dict) and isinstance(head.get("settings"), dict)):
            raise UserError(f"--output-dir {self.folder}: {JOURNAL} there is not detect.py's record; remove it, or "
                            f"give --no-resume")
        theirs, ours = head["settings"], self.settings
        differ = next((k for k in sorted({*theirs, *ours}) if theirs.get(k) != ours.get(k)), None)
        if differ:
            raise UserError(f"--output-dir {self.folder}: the run stopped there counted {len(lines) - 1} image(s) "
                            f"with {differ} {theirs.get(differ)!r:.80}, not {ours.get(differ)!r:.80}; give the same "
                            f"settings to take it up, or --no-resume to count every image again")
        taken = set()
        for record in lines[1:]:
            if not self._valid(record, taken):
                break  # a line damaged by hand: the images from there on are counted again
            self.done[record["image"]] = record
            taken.add(record["output"].casefold())
        self.names = PARTIAL if head.get("staged") else self.names

    def _valid(self, record, taken):
        """A record this run can take as its own: an image's, of this model's classes, its annotated image one of
        output_names' that no other record has."""
        if not isinstance(record, dict):
            return False
        image, output, labels, scores = (record.get(key) for key in ("image", "output", "labels", "scores"))
        return (isinstance(image, str) and image not in self.done and isinstance(output, str)
                and os.path.basename(output) == output and output.casefold() not in taken
                and os.path.splitext(output)[1].lower() in (".jpg", ".jpeg", ".png") and isinstance(labels, list)
                and all(label in self.classes for label in labels) and isinstance(scores, list)
                and len(scores) == len(labels) and all(is_number(s) for s in scores))

    def start(self, paths):
        """The annotated images' names for the inputs `paths` (a stopped run's images keep theirs), checked
        (check_names); taking up a stopped run, its files are opened at once. Images the stopped run counted must be
        among the inputs."""
        self.paths, self.order = paths, {printable(p): i for i, p in enumerate(paths)}
        gone = next((image for image in self.done if image not in self.order), None)
        if gone:
            raise UserError(f"--output-dir {self.folder}: the run stopped there counted {gone}, which is not among "
                            f"this run's inputs; give the same inputs to take it up, or --no-resume")
        names = output_names(paths, fixed={self.order[image]: r["output"] for image, r in self.done.items()})
        check_names(self.folder, paths, names)
        if self.done:
            self._open()
        return names

    def say_start(self, paths, repeats, outputs=()):
        """Print what a run starts with: inputs given twice, earlier runs' output folders left out, a stopped run taken
        up, the header of the counts."""
        if repeats:
            print(f"note: {repeats} input file(s) given more than once; each is counted once")
        if outputs:
            print(f"note: left out {len(outputs)} folder(s) holding detect.py's output (annotated images, not smears): "
                  f"{', '.join(map(printable, outputs[:3]))}{', ...' if len(outputs) > 3 else ''}")
        if self.done:
            print(f"note: taking up the run stopped in {self.folder}: {len(self.done)} of {len(paths)} image(s) were "
                  f"counted; counting the others")
        self.width = max([len("image")] + [len(printable(p)) for p in paths])
        print(f"{'image':<{self.width}}  " + "  ".join(f"{name:>9}" for name in self.classes), flush=True)

    def _open(self):
        """Create (or take up) the run's files: the record, counts.csv's rows so far, report.html's rows."""
        done = list(self.done.values())
        try:
            os.makedirs(self.folder, exist_ok=True)
            if self.lock is None:
                self._lock()
            if not self.done and any(os.path.lexists(os.path.join(self.folder, name)) for name in PARTIAL):
                self.names = PARTIAL  # an earlier run's files: replaced only when this run ends whole
            for name in (self.names["counts.csv"], JOURNAL):  # a link is replaced, not written through
                if os.path.islink(os.path.join(self.folder, name)):
                    os.remove(os.path.join(self.folder, name))
            head = {"detect.py": {"settings": self.settings, "staged": self.staged}}
            write_text_atomic("".join(json_line(r) for r in [head, *done]), os.path.join(self.folder, JOURNAL))
            self._write_counts(done)
            self.journal = open(os.path.join(self.folder, JOURNAL), "a", encoding="utf-8")
            self.counts = open(os.path.join(self.folder, self.names["counts.csv"]), "a", encoding="utf-8", newline="")
            remove_stale_temporaries(self.folder, (*PARTIAL, *PARTIAL.values(), JOURNAL))  # a killed run's (locked)
        except OSError as e:
            raise UserError(f"--output-dir {self.folder}: cannot write {e.filename or 'there'} ({e.strerror or e})") from None
        self.csv = csv.writer(self.counts, lineterminator="\n")
        if self.report is not None:
            self.report.name = self.names[REPORT]
            for r in done:
                self.report.thumbnails[r["output"]] = thumbnail_size(self.folder, r["output"])
                self.report.add(r["image"], r["output"], self.counted(r), r["labels"], r["scores"])

    def counted(self, record):
        """The counts per class of an image's record."""
        return [record["labels"].count(name) for name in self.classes]

    def _write_counts(self, records):
        rows = [["image", *map(spreadsheet_text, self.classes)]]
        rows += [[spreadsheet_text(r["image"]), *self.counted(r)] for r in records]
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(rows)
        write_text_atomic(text.getvalue(), os.path.join(self.folder, self.names["counts.csv"]))

    def add(self, path, name, annotated, windows, boxes, labels, scores, about=None):
        """One image: its annotated copy (a PIL image) saved as `name`, a row of counts.csv and a line of the record
        (boxes in pixels), and its counts printed; about: what else the record says of it (a slide's, drawable).
        Returns the UserError that kept its annotated image from being written, or None: it is counted all the same."""
        if self.counts is None:
            self._open()
        try:  # an interrupted save leaves no half image, and a link there is replaced, not written through
            save_image_atomic(annotated, os.path.join(self.folder, name), quality=90)
            if self.report is not None:
                self.report.thumbnail(name, annotated)
            failed = None
        except UserError as e:
            failed = e
        record = {"image": printable(path), "output": printable(name), "width": annotated.width,
                  "height": annotated.height, "windows": windows, "boxes": [[round(v, 1) for v in b] for b in boxes.tolist()],
                  "labels": [self.rev_label_map[l] for l in labels.tolist()],
                  "scores": [round(s, 4) for s in scores.tolist()], "precision": self.settings.get("precision")}
        record.update(about or {})  # a slide's: its full size, its level, and that the annotated image is an overview
        n = self.counted(record)
        try:  # the row first: an image is done once its line of the record is written
            self.csv.writerow([spreadsheet_text(record["image"]), *n])
            self.counts.flush()
            self.journal.write(json_line(record))
            self.journal.flush()
        except OSError as e:  # a full disk: what was written before stays readable
            raise UserError(f"--output-dir {self.folder}: cannot write {self.names['counts.csv']} and {JOURNAL} "
                            f"({e.strerror or e}); they hold the first {len(self.done) + self.n} image(s)") from None
        self.n += 1
        if self.report is not None:
            self.report.add(record["image"], name, n, record["labels"], record["scores"])
        print(f"{record['image']:<{self.width}}  " + "  ".join(f"{c:>{max(9, len(c_name))}}" for c, c_name in
                                                              zip(n, self.classes)), flush=True)
        return failed

    def close(self, quiet=False):
        """Writes counts.csv and detections.json whole from the record, in the order of the inputs, and report.html's
        last page (quiet: the run ends early, with an error, and the page says so); a write that fails (a full disk)
        is a UserError unless quiet. A run that ends whole moves its files onto an earlier run's (staged) and
        removes the record; one that stops keeps it, for the next run to take up."""
        failed = None
        for f in (self.journal, self.counts):
            try:
                f.close()
            except OSError as e:
                failed = failed or e
        try:
            records = sorted(read_record(os.path.join(self.folder, JOURNAL))[1:],
                             key=lambda r: self.order.get(r.get("image"), len(self.order)))
            self._write_counts(records)
            write_text_atomic("[" + ",".join("\n" + json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n",
                              os.path.join(self.folder, self.names["detections.json"]))
            if self.labels and not quiet:
                write_labels(self.labels, self.folder, [(printable(os.path.basename(self.paths[self.order[r["image"]]])),
                                                         os.path.splitext(r["output"])[0], r) for r in records],
                             self.classes)
        except (OSError, UserError) as e:
            failed = failed or e
        if self.report is not None:
            self.report.close(ended_early=quiet, quiet=quiet or failed is not None)  # failed: that error is said
        if failed and not quiet:
            raise UserError(f"--output-dir {self.folder}: cannot finish {self.names['detections.json']} "
                            f"({getattr(failed, 'strerror', None) or failed}); {JOURNAL} holds the images done")
        if quiet or failed:
            return
        try:
            with stop_signals_held():  # the three files belong together
                for name in ("detections.json", "counts.csv", REPORT):  # the page last: it shows the other two
                    path, partial = os.path.join(self.folder, name), os.path.join(self.folder, PARTIAL[name])
                    if os.path.lexists(partial):
                        os.replace(partial, path) if self.staged else os.remove(partial)  # else a stopped run's, older
                os.remove(os.path.join(self.folder, JOURNAL))
        except OSError as e:
            raise UserError(f"--output-dir {self.folder}: cannot move {e.filename} into place ({e.strerror or e})") from None


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def json_line(value):
    return json.dumps(value, ensure_ascii=False) + "\n"


def read_record(path):
    """The values of a JSON Lines file, up to the first line that is cut short or damaged (what a kill leaves)."""
    values = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                values.append(json.loads(line))
            except (ValueError, RecursionError):
                break
            if not line.endswith("\n"):  # whole as JSON, but its writing was cut short: taken, and ended
                break
    return values


def thumbnail_size(folder, output):
    """The size of an annotated image's thumbnail written by an earlier run (None: the image without one; False:
    neither written), for report.Report."""
    try:
        with Image.open(os.path.join(folder, THUMBNAILS, thumbnail_name(output))) as im:
            return im.size
    except (OSError, ValueError):
        return None if os.path.isfile(os.path.join(folder, output)) else False


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
