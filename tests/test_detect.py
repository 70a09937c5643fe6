"""detect.py's Python API and its path from an image file to boxes: load_model, detect_image, detect, the precision.

    python -m pytest tests/test_detect.py -q

Images of every PIL mode, bit depth, size and EXIF orientation, each with one bright rectangle at a known place:
a stand-in for the model finds the rectangle, so that what is checked is the reading and the boxes' conversion
to pixels of the upright original; the untrained model (conftest) checks the rest. The API's arguments are checked
as the command line's: a wrong kind of argument is a TypeError, a value out of range a UserError, each saying which.
"""
import csv
import json
import re
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import detect
import misc
from misc import UserError, bf16_is_fast
from test_detect_cli import assert_one_line_error
from utils import IMAGENET_MEAN, IMAGENET_STD, bccd_labels, label_color_map, label_map

DARK, BRIGHT = 40, 230


def bright_rectangle(size, rect):
    """uint8 (H, W) array: DARK everywhere, BRIGHT inside rect (x0, y0, x1, y1)."""
    w, h = size
    a = np.full((h, w), DARK, np.uint8)
    x0, y0, x1, y1 = rect
    a[y0:y1, x0:x1] = BRIGHT
    return a


def rgb_with_rectangle(size, rect):
    a = bright_rectangle(size, rect)
    return Image.fromarray(np.stack([a, a - 10, a], -1))  # RGB, a little pink


@pytest.fixture(scope="module")
def smear_images(tmp_path_factory):
    """A folder of images, one of each kind detect.py must take, each with one bright rectangle, and a loose
    file outside it. Returns (folder, loose file, {path: (upright width, upright height, rectangle upright)},
    unreadable file)."""
    root = tmp_path_factory.mktemp("smears")
    folder = root / "smears"
    (folder / "sub").mkdir(parents=True)
    expected = {}

    def add(name, image, size, rect, **save):
        path = (root if name == "loose.bmp" else folder) / name
        image.save(path, **save)
        expected[str(path)] = (*size, rect)

    size, rect = (160, 120), (40, 30, 100, 80)
    rgb = rgb_with_rectangle(size, rect)
    grey = Image.fromarray(bright_rectangle(size, rect))
    add("rgb.jpg", rgb, size, rect, quality=95)
    add("rgb_x3.jpg", rgb.resize((480, 360), Image.Resampling.NEAREST), (480, 360), tuple(3 * v for v in rect), quality=95)
    add("grey.jpg", grey, size, rect, quality=95)
    add("grey_alpha.png", grey.convert("LA"), size, rect)
    add("palette.png", rgb.convert("P", palette=Image.Palette.ADAPTIVE), size, rect)
    add("rgba.png", rgb.convert("RGBA"), size, rect)
    add("cmyk.jpg", rgb.convert("CMYK"), size, rect, quality=95)
    # 16 bits: 10000 and 60000 of 65535; clipping to 8 bits would make the whole image bright
    add("grey16.png", Image.fromarray(np.where(bright_rectangle(size, rect) == BRIGHT, 60000, 10000).astype(np.uint16)),
        size, rect)
    # 32-bit float grey (TIFF mode F): in [0, 1], and in 16-bit units with a pixel that is not a number
    bright = bright_rectangle(size, rect) == BRIGHT
    add("float01.tif", Image.fromarray(np.where(bright, 0.95, 0.15).astype(np.float32)), size, rect)
    float16 = np.where(bright, 60000, 10000).astype(np.float32)
    float16[0, 0] = np.nan
    add("float16.tif", Image.fromarray(float16), size, rect)
    add("tiny.png", rgb_with_rectangle((17, 9), (4, 2, 12, 7)), (17, 9), (4, 2, 12, 7))
    add("big.jpg", rgb_with_rectangle((3000, 2000), (900, 600, 2100, 1500)), (3000, 2000), (900, 600, 2100, 1500))
    # EXIF orientation 6: the stored pixels are the upright image turned 90 degrees; viewers turn it back
    upright_size, upright_rect = (40, 80), (5, 10, 30, 35)
    exif = Image.Exif()
    exif[0x0112] = 6
    add("rotated.jpg", rgb_with_rectangle(upright_size, upright_rect).transpose(Image.Transpose.ROTATE_90),
        upright_size, upright_rect, exif=exif, quality=95)
    add("sub/nested.png", rgb_with_rectangle((100, 100), (10, 60, 50, 90)), (100, 100), (10, 60, 50, 90))
    add("loose.bmp", rgb_with_rectangle((90, 70), (20, 20, 60, 50)), (90, 70), (20, 20, 60, 50))

    modes = {Path(p).name: Image.open(p).mode for p in expected}
    assert modes["grey16.png"] == "I;16" and modes["cmyk.jpg"] == "CMYK" and modes["palette.png"] == "P"
    assert modes["float01.tif"] == modes["float16.tif"] == "F"
    assert modes["grey_alpha.png"] == "LA" and modes["rgba.png"] == "RGBA" and modes["grey.jpg"] == "L"
    with Image.open(folder / "rotated.jpg") as im:
        assert im.size == (80, 40) and ImageOps.exif_transpose(im).size == upright_size
    garbage = folder / "garbage.jpg"
    garbage.write_bytes(b"this is not a JPEG\n" * 10)
    return SimpleNamespace(folder=folder, loose=root / "loose.bmp", expected=expected, garbage=garbage)


def bright_region_detector(model, images, min_score=0.2, max_overlap=0.5, top_k=200, amp=True):
    """Stands in for detect.predict: one RBC box (score 0.9) around the pixels of the 300x300 input brighter than 0.6."""
    boxes, labels, scores = [], [], []
    for image in images:
        ys, xs = ((image.float() / 255).mean(0) > 0.6).nonzero(as_tuple=True)
        boxes.append(torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()[None] / 300)
        labels.append(torch.tensor([label_map["RBC"]]))
        scores.append(torch.tensor([0.9]))
    return boxes, labels, scores


@pytest.mark.slow
def test_detect_command_on_a_folder_and_a_file(smear_images, untrained_checkpoint, tmp_path, run_main):
    # the untrained model: its detections depend on the image, and some score above 0.3. The flags come first:
    # --min-score takes one word, and the inputs after it stay inputs
    out = tmp_path / "out"
    result = run_main("detect.py", "--checkpoint", untrained_checkpoint, "--min-score", "0.3", smear_images.folder,
                      smear_images.loose, "--output-dir", out, "--device", "cpu", "--top-k", "50", "--scale", "3")

    # the unreadable file is named on one line and makes the status 1; every other image is done
    assert_one_line_error(result.returncode, result.stderr, "detect", [str(smear_images.garbage), "cannot read image"])
    with open(out / "counts.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["image", "RBC", "WBC", "Platelets"]
        counts = {r["image"]: {k: int(v) for k, v in r.items() if k != "image"} for r in reader}
    records = {r["image"]: r for r in json.loads((out / "detections.json").read_text())}
    assert set(records) == set(counts) == set(smear_images.expected)  # the folder recursively, and the loose file

    # counts.csv counts the detections of detections.json, which follow --min-score and --top-k
    for image, r in records.items():
        found = Counter(r["labels"])
        assert counts[image] == {name: found[name] for name in bccd_labels}, image
        assert len(r["boxes"]) == len(r["labels"]) == len(r["scores"]) <= 50 * r["windows"]  # --top-k per window
        assert all(s > 0.3 for s in r["scores"])
    assert sum(len(r["labels"]) for r in records.values()) > 0  # there were detections to check
    # big.jpg (3000x2000) is tiled in windows of 3 x BCCD's field (1920x1440, 9 of them), the others are resized whole
    assert {Path(p).name: r["windows"] for p, r in records.items() if r["windows"] > 1} == {"big.jpg": 3 * 3}

    # and prints them: a row per image, its three counts last
    printed = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines() if line.strip()}
    for image, c in counts.items():
        assert printed[image] == [str(c[name]) for name in bccd_labels]

    # boxes in pixels of the upright original; annotated images of its size (EXIF orientation 6: 40x80, not 80x40)
    for path, (width, height, _) in smear_images.expected.items():
        r = records[path]
        assert (r["width"], r["height"]) == (width, height), path
        for x0, y0, x1, y1 in r["boxes"]:
            assert 0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height, (path, [x0, y0, x1, y1])
        with Image.open(out / r["output"]) as annotated:
            assert annotated.size == (width, height), path
    assert records[str(smear_images.loose)]["output"] == "loose.png"  # BMP in, PNG out


def test_detect_boxes_are_in_pixels_of_the_upright_original_whatever_the_image(smear_images, untrained_checkpoint,
                                                                               tmp_path, monkeypatch, capsys):
    # the model is replaced by a detector of the bright rectangle, whose place in every image is known: what
    # is checked is reading (mode, depth, orientation, size) and the conversion of boxes to pixels. Each image
    # is resized whole (big.jpg's rectangle is larger than a window; tiling: test_tiling.py)
    monkeypatch.setattr(detect, "predict", bright_region_detector)
    args = detect.get_args_parser().parse_args(
        [str(smear_images.folder), str(smear_images.loose), "--checkpoint", str(untrained_checkpoint),
         "--output-dir", str(tmp_path), "--device", "cpu", "--workers", "0", "--tile", "off"])
    with pytest.raises(SystemExit) as e:  # the unreadable file
        detect.main(args)
    assert e.value.code == 1
    records = {r["image"]: r for r in json.loads((tmp_path / "detections.json").read_text())}
    assert set(records) == set(smear_images.expected)
    for path, (width, height, rect) in smear_images.expected.items():
        r = records[path]
        assert (r["width"], r["height"]) == (width, height), path
        assert len(r["boxes"]) == 1, path
        # one pixel of the 300x300 input, where the edge was found, is max(width, height) / 300 pixels here
        tolerance = 1.5 + 2 * max(width, height) / 300
        assert r["boxes"][0] == pytest.approx(rect, abs=tolerance), (path, r["boxes"][0], rect)

    # a larger copy gives proportionally larger boxes
    small, large = (records[str(smear_images.folder / n)]["boxes"][0] for n in ("rgb.jpg", "rgb_x3.jpg"))
    assert large == pytest.approx([3 * v for v in small], abs=3 * (1.5 + 2 * 160 / 300) + 1.5 + 2 * 480 / 300)


def hex_rgb(color):
    return tuple(int(color[i:i + 2], 16) for i in (1, 3, 5))


def test_detect_function_returns_the_original_size_annotated(untrained_checkpoint):
    model = detect.load_model(untrained_checkpoint)
    halves = np.repeat(np.array([[60] * 200 + [200] * 200], np.uint8), 200, axis=0)  # not flat: a flat field is blank
    original = Image.fromarray(halves, "L")
    annotated = detect.detect(original, min_score=0.2, max_overlap=0.5, top_k=1, model=model)
    assert annotated.size == (400, 200) and annotated.mode == "RGB"
    assert np.array_equal(np.asarray(original), halves)  # drawn on a copy

    # where the one detection must be drawn: the model's box, in pixels of the 400x200 original
    x = detect.preprocess(torch.from_numpy(halves)[None].expand(3, -1, -1))[None].float() / 255
    x = (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_is_fast(torch.device("cpu"))):
        locs, scores = model(x.contiguous(memory_format=torch.channels_last))
    boxes, labels, _ = model.detect_objects(locs, scores, min_score=0.2, max_overlap=0.5, top_k=1)
    assert len(labels[0]) == 1
    x0, y0, x1, y1 = (boxes[0][0] * torch.tensor([400, 200, 400, 200])).tolist()
    pixels = np.asarray(annotated).astype(int)
    changed = (pixels != halves[..., None]).any(-1)
    ys, xs = changed.nonzero()
    assert abs(xs.min() - x0) <= 1.5 and abs(ys.max() + 1 - y1) <= 1.5, ((xs.min(), ys.max()), (x0, y1))
    assert model.label_color_map == label_color_map  # BCCD's own colours
    color = hex_rgb(model.label_color_map[model.rev_label_map[int(labels[0][0])]])
    assert (pixels[changed] == color).all(-1).any()  # drawn in its class colour


def test_counting_thresholds_come_from_the_checkpoint_or_the_tutorial(tmp_path):
    from detect import counting_defaults
    assert counting_defaults({}, bccd_labels) == (0.2, 0.5)
    recorded = {"count_thresholds": {"min_score": {"WBC": 0.3, "RBC": 0.55, "Platelets": 0.4}, "max_overlap": 0.45}}
    assert counting_defaults(recorded, bccd_labels) == ([0.55, 0.3, 0.4], 0.45)  # label order, whatever the dict's
    for bad in ({"min_score": {"RBC": 0.5}, "max_overlap": 0.5}, {"min_score": {"RBC": 1.5, "WBC": 0.3,
                "Platelets": 0.3}, "max_overlap": 0.5}, {"min_score": {"RBC": 0.5, "WBC": 0.3, "Platelets": 0.3},
                "max_overlap": float("nan")}, "0.5"):
        with pytest.raises(UserError, match="bad.pt: unusable count_thresholds"):
            counting_defaults({"count_thresholds": bad}, bccd_labels, "bad.pt")

# ---------------------------------------------------------------------------------------------
# the Python API: a wrong kind of argument is a TypeError, a value out of range a UserError, each saying which
# ---------------------------------------------------------------------------------------------

API = [
    ("image-is-a-path", lambda m, im: detect.detect_image("smear.jpg", m), TypeError, "a PIL image"),
    ("image-is-a-tensor", lambda m, im: detect.detect_image(torch.zeros(3, 10, 10), m), TypeError, "a PIL image"),
    ("image-is-empty", lambda m, im: detect.detect_image(Image.new("RGB", (0, 0)), m), detect.UserError,
     "an empty image"),
    ("model-is-a-path", lambda m, im: detect.detect(im, model="checkpoint.pt"), TypeError, "load_model()"),
    ("min-score-nan", lambda m, im: detect.detect_image(im, m, min_score=float("nan")), detect.UserError,
     "min_score must lie in [0, 1)"),
    ("min-score-2-of-3", lambda m, im: detect.detect_image(im, m, min_score=[0.1, 0.2]), detect.UserError,
     "one per class"),
    ("min-score-text", lambda m, im: detect.detect_image(im, m, min_score="0.3"), TypeError, "min_score"),
    ("max-overlap-5", lambda m, im: detect.detect_image(im, m, max_overlap=5), detect.UserError, "max_overlap"),
    ("top-k-negative", lambda m, im: detect.detect_image(im, m, top_k=-5), detect.UserError, "top_k"),
    ("top-k-none", lambda m, im: detect.detect_image(im, m, top_k=None), detect.UserError, "top_k"),
    ("batch-size-0", lambda m, im: detect.detect_image(im, m, batch_size=0), detect.UserError, "batch_size"),
    ("amp-text", lambda m, im: detect.detect_image(im, m, amp="no"), TypeError, "amp"),
    ("tile-0x0", lambda m, im: detect.detect_image(im, m, tile=(0, 0)), detect.UserError, "--tile"),
    ("device-nonsense", lambda m, im: detect.load_model(m.source, device="gpu7"), detect.UserError, "gpu7"),
    ("checkpoint-missing", lambda m, im: detect.load_model(m.source + ".none"), detect.UserError,
     "no such checkpoint file"),
]


def test_python_api_takes_numpy_numbers(untrained_checkpoint):
    import numpy as np
    model = detect.load_model(untrained_checkpoint)
    image = Image.new("RGB", (64, 48))
    expected = detect.detect_image(image, model, min_score=0.3, max_overlap=0.5, top_k=50, batch_size=2)
    got = detect.detect_image(image, model, min_score=np.float32(0.3), max_overlap=np.float64(0.5),
                              top_k=np.int64(50), batch_size=np.int32(2))
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    got = detect.detect_image(image, model, min_score=[np.float32(0.3)] * 3, max_overlap=0.5, top_k=50, batch_size=2)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


@pytest.mark.parametrize("case, call, error, says", API, ids=[c[0] for c in API])
def test_python_api(case, call, error, says, untrained_checkpoint):
    model = detect.load_model(untrained_checkpoint)
    model.source = str(untrained_checkpoint)
    with pytest.raises(error) as e:
        call(model, Image.new("RGB", (64, 48)))
    assert says in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# precision: bf16 or fp32 by what the CPU is, never by a timing, so that a busy machine counts as an idle one
# ---------------------------------------------------------------------------------------------

CPUS = [  # (vendor, /proc/cpuinfo flags, bf16 by default): the CPUs the rule was measured on, and others
    ("GenuineIntel", {"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}, True),  # Xeon with AMX: 2.3-2.6x as fast
    ("AuthenticAMD", {"avx512f", "avx512_bf16"}, True),  # EPYC with AVX512-BF16: about 2x
    ("GenuineIntel", {"avx512f", "avx512_bf16"}, False),  # Xeon with AVX512-BF16, no AMX: bf16 slower
    ("GenuineIntel", {"avx512f", "avx512_vnni"}, False),  # no native bf16: emulated
    ("AuthenticAMD", {"avx2"}, False), ("", set(), False)]


@pytest.mark.parametrize("vendor, flags, bf16", CPUS, ids=["xeon-amx", "epyc-bf16", "xeon-bf16", "xeon", "amd", "none"])
def test_the_precision_follows_from_the_cpu_and_never_from_a_timing(vendor, flags, bf16, monkeypatch):
    def timed(*args, **kwargs):
        raise AssertionError("the choice timed something")

    monkeypatch.setattr(misc, "cpu_features", lambda: (vendor, frozenset(flags)))
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    for clock in ("perf_counter", "perf_counter_ns", "time", "monotonic", "process_time"):
        monkeypatch.setattr(time, clock, timed)
    monkeypatch.setattr(torch.nn.functional, "conv2d", timed)
    cpu = torch.device("cpu")
    answers = {(misc.bf16_is_fast(cpu), misc.bf16_choice(cpu)) for _ in range(3)}
    assert len(answers) == 1 and answers.pop()[0] is bf16
    assert misc.bf16_is_fast(torch.device("cuda")) is True  # not run here: the device's type decides
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)  # a torch without them
    assert misc.bf16_choice(cpu)[0] is False


def test_the_cpu_features_are_this_machines():
    vendor, flags = misc.cpu_features()
    text = Path("/proc/cpuinfo").read_text(errors="replace") if Path("/proc/cpuinfo").exists() else ""
    if not re.search(r"^flags\s*:", text, re.M):
        pytest.skip("reads an x86 CPU's flags in /proc/cpuinfo; elsewhere torch's own checks are the features")
    assert f"vendor_id\t: {vendor}" in text and flags == set(re.search(r"^flags\s*:(.*)$", text, re.M)[1].split())
    if hasattr(torch.cpu, "_is_avx512_bf16_supported"):  # torch's own check, from the cpuid instruction
        assert ("avx512_bf16" in flags) == torch.cpu._is_avx512_bf16_supported()


def test_a_blank_field_counts_no_cells_and_a_field_of_any_contrast_keeps_its_detections():
    """model.no_cells_in_blank: a dark frame (with a sensor's noise), bare glass or a flat colour gets background only
    (the shipped model saw a white cell at 0.88 in a black frame); one cell alone on glass, or a smear, keeps its
    scores. Then through detect_image, with and without test-time flips."""
    from model import no_cells_in_blank
    rng = np.random.default_rng(0)
    dark = np.clip(rng.normal(8, 5, (300, 300, 3)), 0, 255).astype(np.uint8)  # a dark frame's noise
    one_cell = np.full((300, 300, 3), 235, np.uint8)
    one_cell[140:148, 150:158] = (150, 90, 160)  # a platelet of 8 px on glass
    smear = np.asarray(Image.open(Path(detect.__file__).parent / "img" / "BloodImage_00007.jpg").resize((300, 300)))
    fields = [np.zeros_like(dark), np.full_like(dark, 255), np.full_like(dark, 0) + np.uint8([60, 20, 90]), dark,
              one_cell, smear]
    images = torch.from_numpy(np.stack(fields).astype(np.uint8)).permute(0, 3, 1, 2)
    scores = torch.randn(len(fields), 10, 4)
    out = no_cells_in_blank(images, scores)
    assert (out[:4, :, 1:] == float("-inf")).all() and torch.equal(out[:4, :, 0], scores[:4, :, 0])
    assert torch.equal(out[4:], scores[4:])
    for tta in ("off", "h"):
        model = detect.load_model(tta=tta)
        for pixels in fields[:4]:
            assert len(detect.detect_image(Image.fromarray(pixels), model, min_score=0.01)[2]) == 0
        assert len(detect.detect_image(Image.fromarray(smear), model)[2]) > 10
