"""Looking at results: eval.py --plots, train.py's training.png (plots.py) and detect.py's report.html (report.py),
the page opened in a real browser (headless Chromium, skipped with the reason where it is not installed).

    python -m pytest tests/test_report.py -q
"""
import csv
import importlib.util
import json
import os
import sys
from urllib.parse import unquote_to_bytes

import pytest
import torch
from PIL import Image

import detect
import eval as eval_script
import files
import plots
import report
from chromium import Chromium, find_chromium
from misc import UserError

HOSTILE = "<img src=x onerror=document.body.dataset.pwned=1>.jpg"  # markup, if the page let it through
ODD = "a #1?&%.jpg"  # characters that mean something in a URL
NOT_UTF8 = os.fsdecode(b"bad\xff.jpg")  # a Linux file name may hold any bytes
PNG = b"\x89PNG\r\n\x1a\n"
needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason=f"matplotlib is not installed ({plots.PIP_COMMAND})")


@pytest.fixture(scope="module")
def smears(tiny_lists, tmp_path_factory):
    """A folder of 4 of tiny_lists' TRAIN images (64x48) to detect, named as a hostile user might."""
    folder = tmp_path_factory.mktemp("smears")
    (folder / "sub").mkdir()
    sources = json.loads((tiny_lists / "TRAIN_images.json").read_text())
    for name, source in zip(["BloodImage_00001.jpg", HOSTILE, ODD, os.path.join("sub", NOT_UTF8)], sources):
        Image.open(source).save(folder / name)
    return folder


@pytest.fixture
def run_detect(smears, untrained_checkpoint):
    """run_detect(out, *flags): detect.py with the untrained checkpoint on the smears, into `out`."""
    def run(out, *extra):
        detect.main(detect.get_args_parser().parse_args(
            [str(smears), "--checkpoint", str(untrained_checkpoint), "--output-dir", str(out), "--device", "cpu",
             "--top-k", "20", *extra]))
    return run


def read_counts(out):
    with open(out / "counts.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    return rows[0][1:], rows[1:]


# ---------------------------------------------------------------------------------------------
# report.html
# ---------------------------------------------------------------------------------------------

PAGE_FACTS = """(async () => {
  const images = Array.from(document.images);
  images.forEach(i => { i.loading = "eager"; });  // a lazy thumbnail below the fold loads too
  const width = i => i.decode().then(() => i.naturalWidth, () => 0);
  return {
    pwned: document.body.dataset.pwned || null, scripts: document.scripts.length,
    thumbnails: await Promise.all(images.map(width)),
    links: await Promise.all(Array.from(document.querySelectorAll("#images a"), a => {
      const i = new Image(); i.src = a.href; return width(i); })),
    names: Array.from(document.querySelectorAll("#images td.name"), td => td.textContent),
    rows: Array.from(document.querySelectorAll("#images tbody tr"), tr => Array.from(tr.cells, c => c.textContent)),
    totals: Object.fromEntries(Array.from(document.querySelectorAll("#totals td.total"),
                                          td => [td.dataset.class, Number(td.textContent)])),
    reviews: Number(document.getElementById("reviews").textContent),
    status: document.getElementById("status").textContent};
})()"""


def test_report_in_chromium_shows_every_image_the_totals_and_hostile_names_as_text(run_detect, tmp_path):
    """detect.py's report.html opened from disk in headless Chromium: every row of counts.csv with its counts,
    the totals of counts.csv, every thumbnail and every link to an annotated image loads (names with markup,
    URL characters and bytes that are not UTF-8), the hostile name is text (no second script, nothing ran),
    sorting by a class works; a screenshot is kept (in this test's tmp_path)."""
    executable = find_chromium()
    if executable is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
    out = tmp_path / "out"
    run_detect(out, "--min-score", "0.6")  # the random network scores 0.63-0.75 here: some are doubtful
    classes, rows = read_counts(out)
    assert len(rows) == 4 and any(HOSTILE in r[0] for r in rows)
    with Chromium(executable) as browser:
        page = browser.open(out / "report.html").evaluate(PAGE_FACTS)
        column = 3 + classes.index("RBC")  # #, thumbnail, image, then the classes
        browser.evaluate(f'document.querySelectorAll("#images thead th")[{column}].click()')  # ascending
        browser.evaluate(f'document.querySelectorAll("#images thead th")[{column}].click()')  # descending
        by_rbc = browser.evaluate(f'Array.from(document.querySelectorAll("#images tbody tr"), '
                                  f'tr => Number(tr.cells[{column}].textContent))')
        browser.evaluate("window.scrollTo(0, 0)")
        shot = browser.screenshot(tmp_path / "report.png")
    assert page["pwned"] is None and page["scripts"] == 1
    assert page["names"] == [r[0] for r in rows]  # every image, as counts.csv names it, HOSTILE as text
    assert [r[3:3 + len(classes)] for r in page["rows"]] == [r[1:] for r in rows]
    assert page["totals"] == {c: sum(int(r[1 + k]) for r in rows) for k, c in enumerate(classes)}
    assert len(page["thumbnails"]) == len(page["links"]) == 4 and all(w > 0 for w in page["thumbnails"] + page["links"])
    records = json.loads((out / "detections.json").read_text(encoding="utf-8"))
    scores = [s for r in records for s in r["scores"]]
    assert 0 < page["reviews"] == sum(s < 0.6 + report.REVIEW_MARGIN for s in scores) < len(scores)
    assert page["status"] == "done: 4 images"
    assert by_rbc == sorted((int(r[1 + classes.index("RBC")]) for r in rows), reverse=True)
    with Image.open(shot) as im:
        assert shot.read_bytes().startswith(PNG) and im.size == (1200, 900)
        assert im.convert("L").getextrema()[0] < 100  # text and thumbnails, not a blank page
    print(f"screenshot: {shot}")


def test_report_escapes_quotes_flags_and_writes_each_thumbnail_once(run_detect, tmp_path, monkeypatch):
    """Without a browser: no markup from a file name reaches the page, links are the names' bytes URL-quoted,
    each thumbnail is written once however often the page is rewritten, a detection is flagged for review
    exactly when it scores below its class's min_score + REVIEW_MARGIN; an early end says so on the page."""
    saved, real_save = [], report.save_image_atomic
    monkeypatch.setattr(report, "save_image_atomic",
                        lambda im, path, **kw: (saved.append(path), real_save(im, path, **kw)))
    monkeypatch.setattr(report, "REWRITE_SECONDS", 0.)  # rewritten after every image
    out = tmp_path / "out"
    run_detect(out)
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "<img src=x" not in page and "&lt;img src=x onerror=document.body.dataset.pwned=1&gt;.jpg" in page
    for name in ("BloodImage_00001.jpg", HOSTILE, ODD, NOT_UTF8):
        href = report.url(name)
        assert f'href="{href}"' in page and (out / os.fsdecode(unquote_to_bytes(href))).is_file()
    assert sorted(saved) == sorted(str(out / report.THUMBNAILS / report.thumbnail_name(n))
                                   for n in ("BloodImage_00001.jpg", HOSTILE, ODD, NOT_UTF8))
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]

    page = report.Report(tmp_path, ["RBC", "WBC"], [0.5, 0.3], {"model": "<b>x</b>"}, 2)
    page.add("a.jpg", "a.jpg", [2, 1], ["RBC", "RBC", "WBC"], [0.59, 0.61, 0.39])  # flagged: 0.59 and 0.39
    page.close(ended_early=True)
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert '<td class="review">2</td><td class="doubt">WBC 0.39, RBC 0.59</td>' in html
    assert "ended early, after 1 of 2 images" in html and "&lt;b&gt;x&lt;/b&gt;" in html
    assert '<td class="total" data-class="WBC">1</td>' in html and "<td>500.0</td>" in html  # 1 WBC per 2 RBC


def test_an_interrupted_detect_leaves_a_page_of_what_it_finished(run_detect, tmp_path, monkeypatch):
    out, real = tmp_path / "out", files.save_image_atomic
    done = []

    def save_then_stop(image, path, **kw):
        if done:
            raise KeyboardInterrupt
        done.append(path)
        real(image, path, **kw)

    monkeypatch.setattr(files, "save_image_atomic", save_then_stop)
    with pytest.raises(KeyboardInterrupt, match="interrupted after 1 of 4"):
        run_detect(out)
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "ended early, after 1 of 4 images" in page and page.count('<td class="name">') == 1


# ---------------------------------------------------------------------------------------------
# plots: eval.py --plots, train.py's training.png
# ---------------------------------------------------------------------------------------------

def test_confusion_matrix_against_a_count_by_hand():
    """Classes 1, 2 (+ background, last). Image 0: a class-1 object found (IoU 1) and found twice more (one
    duplicate of class 1, one of class 2, both unmatched: the object is taken), a class-2 object found as class 1,
    a detection of nothing. Image 1: a class-2 object missed, no detection."""
    box = lambda x: [x, 0., x + 10., 10.]
    det_boxes = [torch.tensor([box(0), box(0.5), box(1), box(50), box(100)]), torch.zeros(0, 4)]
    det_labels = [torch.tensor([1, 1, 2, 1, 2]), torch.zeros(0, dtype=torch.long)]
    true_boxes = [torch.tensor([box(0), box(50)]), torch.tensor([box(0)])]
    true_labels = [torch.tensor([1, 2]), torch.tensor([2])]
    expected = torch.tensor([[1, 1, 1],    # predicted 1: the found object, the class-2 object, a duplicate
                             [0, 0, 2],    # predicted 2: the duplicate, the detection of nothing
                             [0, 1, 0]])   # missed: image 1's class-2 object
    assert torch.equal(plots.confusion_matrix(det_boxes, det_labels, true_boxes, true_labels, 2), expected)


@needs_matplotlib
def test_eval_plots_writes_four_pngs_and_a_missing_matplotlib_is_one_line_before_the_pass(
        untrained_checkpoint, tiny_lists, tmp_path, capsys, monkeypatch):
    argv = ["--checkpoint", str(untrained_checkpoint), "--data-folder", str(tiny_lists), "--device", "cpu",
            "--workers", "0", "--plots", str(tmp_path / "plots")]
    eval_script.main(eval_script.get_args_parser().parse_args(argv))
    assert "plots written to" in capsys.readouterr().out
    for name in plots.EVAL_PNGS:
        path = tmp_path / "plots" / name
        with Image.open(path) as im:
            assert path.read_bytes().startswith(PNG) and min(im.size) >= 300 and im.convert("L").getextrema()[0] < 100
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import matplotlib.figure now fails
    monkeypatch.setattr(eval_script, "detect_dataset", lambda *a, **k: pytest.fail("the pass ran"))
    with pytest.raises(UserError, match="plots need matplotlib, which is not installed: pip install matplotlib"):
        eval_script.main(eval_script.get_args_parser().parse_args(argv[:-1] + [str(tmp_path / "other")]))
    assert not (tmp_path / "other").exists()


def test_training_curve_reads_each_epoch_once_and_a_missing_matplotlib_is_one_note(tmp_path, monkeypatch):
    """read_log: in order of epoch, each once (the last line of an epoch wins), a line cut by a kill skipped;
    TrainingCurve without matplotlib: one note, however often it is asked, and no error."""
    log = tmp_path / "log.jsonl"
    log.write_text('{"epoch": 2, "loss": 3.0}\n{"epoch": 1, "loss": 5.0}\n{"epoch": 2, "loss": 2.5, "mAP": 0.1}\n'
                   '["not", "a", "record"]\n{"epoch": 3, "lo')
    assert plots.read_log(log) == [{"epoch": 1, "loss": 5.0}, {"epoch": 2, "loss": 2.5, "mAP": 0.1}]
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    notes = []
    curve = plots.TrainingCurve(log, tmp_path / "training.png", say=notes.append)
    curve.update()
    curve.update()
    assert len(notes) == 1 and "pip install matplotlib" in notes[0] and not (tmp_path / "training.png").exists()


@needs_matplotlib
def test_plots_py_draws_runs_side_by_side(tmp_path, capsys):
    for seed in (0, 1):
        (tmp_path / f"log{seed}.jsonl").write_text("".join(
            json.dumps({"epoch": e, "loss": 10 / e + seed, "lr": 1e-3, **({"mAP": e / 10} if e % 2 == 0 else {})})
            + "\n" for e in range(1, 7)))
    plots.main(plots.get_args_parser().parse_args(
        ["--output", str(tmp_path / "both.png"), f"s0={tmp_path / 'log0.jsonl'}", f"s1={tmp_path / 'log1.jsonl'}"]))
    assert (tmp_path / "both.png").read_bytes().startswith(PNG)
    with pytest.raises(UserError, match="give NAME=LOG"):
        plots.main(plots.get_args_parser().parse_args(["--output", str(tmp_path / "x.png"),
                                                       str(tmp_path / "log0.jsonl")]))
