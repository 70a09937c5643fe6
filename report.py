"""report.html: the page of a detect.py run, for a person to review the counts (detect.py writes it).

    $ python detect.py smears/ --output-dir my_counts   # then open my_counts/report.html in a browser

One self-contained HTML file beside counts.csv: inline CSS and a few lines of JavaScript (sorting), no
network, no framework, so it works opened straight from disk (file://). It shows the run's settings and
model, the totals per class and each class's share (per 1,000 red cells), and a table of every image with
its counts, sortable by any column, with a small thumbnail that opens the annotated image. Counted
detections whose score is less than REVIEW_MARGIN above their class's min_score are flagged for review,
with their number per image: those are the doubtful ones (cells just below the threshold are not counted,
and not shown).

Thumbnails are written once per image, as the images are done, into thumbnails/ (JPEG, at most
THUMBNAIL_SIZE), and loaded lazily by the browser; each row is rendered once, and the page is rewritten
whole (atomically: a temporary file moved into place) at most every REWRITE_SECONDS, or less often when
the page is large, and once at the end. A page for 5,000 images is 1.7 MB: headless Chromium had it
interactive in 1.6 s and sorted it in 2.9 s on a 2-core CPU busy with a training (tools/report_scale.py).
Every text from a file name is HTML-escaped and every link URL-quoted (from the name's bytes), so a file
named `<script>.jpg` is shown as text.
"""
import html
import os
import time
from urllib.parse import quote

from misc import UserError, save_image_atomic, write_text_atomic

REPORT = "report.html"
THUMBNAILS = "thumbnails"  # folder of the output folder
THUMBNAIL_SIZE = (120, 90)  # pixels, at most: a 640x480 field is 120x90
REVIEW_MARGIN = 0.1  # a counted detection scoring below its class's min_score + this is flagged for review
REWRITE_SECONDS = 1.0  # the page is rewritten at most this often while the run goes on ...
REWRITE_SHARE = 0.05  # ... and takes at most this share of the run's time (a large page: less often)


def thumbnail_name(output):
    """The thumbnail's file name in THUMBNAILS for the annotated image `output` (one name per output name)."""
    return output + ".jpg"


def url(name):
    """A relative URL for a file name of this folder (any bytes: a name need not be UTF-8), quoted."""
    return quote(os.fsencode(name), safe="")


def text(value):
    return html.escape(str(value), quote=True)


class Report:
    """report.html in `folder`, kept up to date as images are done (add), closed once (close); nothing is written
    before the first image (detect.Results creates and locks the folder, and calls these).

    classes: the class names in label order; min_score: one value, or one per class; settings: {label: text}
    shown at the top (the model, the thresholds, the command); total: the number of image files the run has."""

    def __init__(self, folder, classes, min_score, settings, total):
        self.folder, self.classes, self.settings, self.total = folder, list(classes), settings, total
        scores = [min_score] * len(classes) if isinstance(min_score, (int, float)) else list(min_score)
        self.threshold = dict(zip(classes, (float(s) for s in scores)))
        self.rows, self.totals, self.reviews, self.images_to_review = [], [0] * len(classes), 0, 0
        self.thumbnails = {}  # output name -> thumbnail size, or None where it could not be written
        self.written_at, self.write_seconds = -float("inf"), 0.
        self.name = REPORT  # the page's file name in `folder` (detect.Results: report.partial.html while staged)

    def thumbnail(self, output, image):
        """The annotated image `output` (a PIL image) was saved: write its thumbnail, once."""
        self.thumbnails[output] = None
        small = image.convert("RGB")
        small.thumbnail(THUMBNAIL_SIZE)
        save_image_atomic(small, os.path.join(self.folder, THUMBNAILS, thumbnail_name(output)), quality=80)
        self.thumbnails[output] = small.size

    def add(self, image, output, counts, labels, scores):
        """One image done: `image` its name as shown (printable), `output` the annotated image's file name,
        counts per class, the class names and scores of its counted detections. The page is rewritten when due."""
        review = sorted((s, name) for name, s in zip(labels, scores) if s < self.threshold[name] + REVIEW_MARGIN)
        self.totals = [t + c for t, c in zip(self.totals, counts)]
        self.reviews += len(review)
        self.images_to_review += bool(review)
        size = self.thumbnails.pop(output, False)  # False: the annotated image was not saved
        if size:
            link = (f'<a href="{url(output)}"><img src="{THUMBNAILS}/{url(thumbnail_name(output))}" width="{size[0]}" '
                    f'height="{size[1]}" loading="lazy" decoding="async" alt=""></a>')
        elif size is None:
            link = f'<a href="{url(output)}">open</a>'
        else:
            link = "not saved"
        shown = ", ".join(f"{name} {s:.2f}" for s, name in review[:5]) + (", ..." if len(review) > 5 else "")
        cells = "".join(f"<td>{c}</td>" for c in counts)
        self.rows.append(f'<tr><td>{len(self.rows) + 1}</td><td class="thumb">{link}</td><td class="name">'
                         f'{text(image)}</td>{cells}<td>{sum(counts)}</td><td class="review">{len(review)}</td>'
                         f'<td class="doubt">{text(shown)}</td></tr>\n')
        if time.perf_counter() - self.written_at >= max(REWRITE_SECONDS, self.write_seconds / REWRITE_SHARE):
            self.write()

    def close(self, ended_early=False, quiet=False):
        """The final page. ended_early: the run stopped before its last image. quiet: a page that cannot be
        written is let be (the run is already ending with an error)."""
        try:
            self.write("ended early" if ended_early else "done")
        except UserError:  # a write the file system refused
            if not quiet:
                raise

    def write(self, state="in progress"):
        start = time.perf_counter()
        write_text_atomic(self.page(state), os.path.join(self.folder, self.name))
        self.written_at = time.perf_counter()
        self.write_seconds = self.written_at - start

    def page(self, state):
        n, classes = len(self.rows), self.classes
        cells = sum(self.totals)
        reference = "RBC" if "RBC" in classes else classes[max(range(len(classes)), key=self.totals.__getitem__)]
        per_reference = self.totals[classes.index(reference)]
        totals = []
        for name, total in zip(classes, self.totals):
            share = f"{100 * total / cells:.1f} %" if cells else "-"
            per = "" if name == reference else f"{1000 * total / per_reference:.1f}" if per_reference else "-"
            totals.append(f'<tr><th>{text(name)}</th><td class="total" data-class="{text(name)}">{total}</td>'
                          f'<td>{total / n if n else 0:.2f}</td><td>{share}</td><td>{per}</td>'
                          f'<td>{self.threshold[name]:g}</td></tr>')
        when = time.strftime("%Y-%m-%d %H:%M:%S")
        status = {"in progress": f"in progress: {n} of {self.total} images at {when}; reload the page for more",
                  "done": f"done: {n} images" + (f" of the {self.total} files given (see detect.py's messages for "
                                                 f"the others)" if n < self.total else ""),
                  "ended early": f"ended early, after {n} of {self.total} images"}[state]
        settings = "".join(f"<tr><th>{text(k)}</th><td>{text(v)}</td></tr>" for k, v in self.settings.items())
        heads = "".join(f'<th class="num">{text(name)}</th>' for name in classes)
        return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>detect.py: {n} images, {cells} cells</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }}
h1 {{ font-size: 1.4em; margin: 0 0 .2em; }} h2 {{ font-size: 1.1em; margin: 1.4em 0 .4em; }}
table {{ border-collapse: collapse; }} th, td {{ padding: 3px 8px; border-bottom: 1px solid #ddd; text-align: right; }}
th {{ background: #f4f4f4; }} .settings th, .settings td, td.name, td.doubt, th.text {{ text-align: left; }}
.top {{ display: flex; flex-wrap: wrap; gap: 0 3em; align-items: flex-start; }} .top h2 {{ margin-top: .6em; }}
td.name {{ max-width: 28em; overflow-wrap: anywhere; }} .settings td {{ max-width: 34em; overflow-wrap: anywhere; }}
td.thumb {{ padding: 1px 4px; }} td.thumb img {{ display: block; }}
tr.flag td.review {{ color: #b35c00; font-weight: bold; }}
#images thead th {{ position: sticky; top: 0; cursor: pointer; user-select: none; }}
#images th[aria-sort="ascending"]::after {{ content: " \\25B2"; }}
#images th[aria-sort="descending"]::after {{ content: " \\25BC"; }}
.status {{ color: #555; }} .note {{ color: #555; max-width: 42em; }}
</style></head><body>
<h1>Cell counts: {n} images</h1>
<p class="status" id="status">{text(status)}</p>
<div class="top"><div>
<h2>Totals</h2>
<table id="totals"><thead><tr><th>class</th><th>counted</th><th>per image</th><th>share of all cells</th>
<th>per 1,000 {text(reference)}</th><th>min_score</th></tr></thead><tbody>
{"".join(totals)}
<tr><th>all</th><td>{cells}</td><td>{cells / n if n else 0:.2f}</td><td></td><td></td><td></td></tr>
</tbody></table>
<p class="note">To review: <b id="reviews">{self.reviews}</b> counted detections in <b>{self.images_to_review}</b>
images score less than {REVIEW_MARGIN:g} above their class's min_score (the "review" column; the annotated
image shows every score). Detections below min_score are not counted and not shown.</p>
</div><div>
<h2>Settings</h2>
<table class="settings">{settings}</table>
</div></div>
<h2>Images</h2>
<p class="note">Click a column's heading to sort by it (again: the other way); a thumbnail opens the annotated
image.</p>
<table id="images"><thead><tr><th class="num">#</th><th class="text">annotated</th><th class="text">image</th>{heads}
<th class="num">all</th><th class="num">review</th><th class="text">doubtful (class, score)</th></tr></thead>
<tbody>
{"".join(self.rows)}</tbody></table>
<script>
"use strict";
for (const row of document.querySelectorAll("#images tbody tr"))
  if (row.querySelector("td.review").textContent !== "0") row.classList.add("flag");
const collator = new Intl.Collator(undefined, {{numeric: true}});
document.querySelectorAll("#images thead th").forEach((th, column) => th.addEventListener("click", () => {{
  const body = document.querySelector("#images tbody"), rows = Array.from(body.rows);  // sorted once by key
  const descending = th.getAttribute("aria-sort") === "ascending", numeric = th.classList.contains("num");
  const keyed = rows.map(row => [numeric ? Number(row.cells[column].textContent) : row.cells[column].textContent, row]);
  const order = numeric ? (a, b) => a[0] - b[0] : (a, b) => collator.compare(a[0], b[0]);
  keyed.sort((a, b) => order(a, b) * (descending ? -1 : 1));
  document.querySelectorAll("#images thead th").forEach(h => h.removeAttribute("aria-sort"));
  th.setAttribute("aria-sort", descending ? "descending" : "ascending");
  const sorted = document.createDocumentFragment();
  for (const [, row] of keyed) sorted.append(row);
  body.append(sorted);
}}));
</script>
</body></html>
"""
