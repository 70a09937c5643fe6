"""Fixtures shared by the tests: BCCD data (the real one, or a tiny generated copy) and its lists.

    python -m pytest tests -q                          # real BCCD at ../shared/data/BCCD or data/BCCD when present
    BCCD_DIR=/path/to/BCCD python -m pytest tests -q   # another copy of BCCD
    python -m pytest tests -q -m "not slow"            # skip the tests marked slow
    python -m pytest tests -q -m "not slow" -n 2 --dist loadfile   # the README's: two workers (pytest-xdist)

Fixtures:
  * bccd_dir (session): a BCCD folder (Annotations, ImageSets/Main, JPEGImages). The real BCCD
    when it exists, else a tiny generated one of the same layout (see make_voc). Read only.
  * real_bccd_dir (session): the real BCCD; the test is skipped where it is missing.
  * data_lists (session): the folder of lists that create_data_lists.create_data_lists wrote from bccd_dir
    (TRAIN/TEST _images.json, _objects.json, label_map.json). Read only.
  * tiny_lists (session): lists of a tiny generated dataset of 64x48 images (4 TRAIN, 2 TEST), made once. Read only.
  * untrained_checkpoint (session): an untrained SSD300 (seed 0; BatchNorm, train.py's BCCD priors, BCCD's classes)
    saved as eval.py and detect.py read checkpoints, made once. Its detections depend on the image. Read only.
  * tiny_voc (function): a factory, tiny_voc(**options) -> path of a new tiny VOC dataset made
    in tmp_path; the test may change it freely. Options: see make_voc.
  * run_main (function): run_main("detect.py", "--flag", ...) runs a script's command line in this process, as
    `python detect.py --flag ...` would (misc.run_cli with sys.argv set): the same exit status, stdout and stderr,
    without the seconds a fresh Python and torch cost. Returns an object with returncode, stdout and stderr.
  * run_script (function): the same in a fresh Python, as a user would (a subprocess.CompletedProcess): for what
    only a separate process shows (a traceback at import, signals to a process group, torchrun).

Helpers: train_argv (train.py's command line for the tiny runs, with SCHEDULE), truncate_lists,
assert_one_line_error (a command that failed as a user error should), load_tool (a script of tools/ as a module).
"""
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from xml.sax.saxutils import escape

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `import utils, datasets` whatever the working directory
    sys.path.insert(0, str(REPO))

CLASSES = ("RBC", "WBC", "Platelets")
# Objects are drawn as filled rectangles in their class colour, so a model can learn them.
CLASS_COLORS = {"RBC": (200, 40, 40), "WBC": (60, 40, 200), "Platelets": (40, 170, 60)}
OTHER_COLORS = ((230, 140, 20), (20, 20, 20), (20, 150, 150), (150, 20, 150), (120, 90, 30))  # other classes, in order
# what train.py --val-every leaves beside checkpoint.pt and log.jsonl: its curve, where matplotlib is installed
CURVE = ["training.png"] if importlib.util.find_spec("matplotlib") else []


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds (deselect with -m 'not slow')")
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")  # a worker of pytest-xdist (-n N): the cores shared out,
    if workers:  # as torch's threads spin waiting for each other where they are more than the cores
        from misc import available_cpus
        threads = str(max(1, available_cpus() // int(workers)))
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = threads  # the Pythons the tests start too
        import torch
        torch.set_num_threads(int(threads))


def real_bccd_path():
    """The real BCCD folder: $BCCD_DIR, else ../shared/data/BCCD beside the repository, else data/BCCD in it
    (where the README puts it); None when missing."""
    if os.environ.get("BCCD_DIR"):
        candidates = [Path(os.environ["BCCD_DIR"])]
    else:
        candidates = [REPO.parent / "shared" / "data" / "BCCD", REPO / "data" / "BCCD"]
    return next((path for path in candidates if (path / "Annotations").is_dir()), None)


def image_id(i):
    """Id of the i-th image of a generated dataset, named like BCCD's."""
    return f"BloodImage_{i:05d}"


def annotation_xml(filename, size, objects):
    """VOC XML text as BCCD writes it. objects: dicts with name (written verbatim), box (4 values,
    written with str(), so ints stay ints and floats floats) and difficult (0/1; None: no tag)."""
    parts = ["<annotation>", "\t<folder>JPEGImages</folder>", f"\t<filename>{escape(filename)}</filename>",
             f"\t<size>\n\t\t<width>{size[0]}</width>\n\t\t<height>{size[1]}</height>\n\t\t<depth>3</depth>\n\t</size>",
             "\t<segmented>0</segmented>"]
    for obj in objects:
        difficult = obj.get("difficult", 0)
        parts += ["\t<object>", f"\t\t<name>{escape(obj['name'])}</name>", "\t\t<pose>Unspecified</pose>",
                  "\t\t<truncated>0</truncated>"]
        if difficult is not None:
            parts.append(f"\t\t<difficult>{difficult}</difficult>")
        parts.append("\t\t<bndbox>" + "".join(f"<{k}>{v}</{k}>" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), obj["box"]))
                     + "</bndbox>")
        parts.append("\t</object>")
    parts.append("</annotation>")
    return "\n".join(parts) + "\n"


def random_objects(rng, index, size, classes=CLASSES):
    """3-5 objects of 10-30% of the image side, of the classes in turn starting at the index-th, for the
    index-th image (so with 3 classes, one of each at least)."""
    width, height = size
    objects = []
    for j in range(3 + int(rng.integers(0, 3))):
        w = max(2, int(width * rng.uniform(0.1, 0.3)))
        h = max(2, int(height * rng.uniform(0.1, 0.3)))
        x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        objects.append({"name": classes[(index + j) % len(classes)], "box": [x, y, x + w, y + h], "difficult": 0})
    return objects


def class_colors(classes=CLASSES):
    """{class name: RGB} for drawing: BCCD's names get CLASS_COLORS, the others OTHER_COLORS in turn."""
    others = [name for name in classes if name not in CLASS_COLORS]
    return {name: CLASS_COLORS.get(name) or OTHER_COLORS[others.index(name) % len(OTHER_COLORS)] for name in classes}


def draw_image(rng, size, objects, colors=CLASS_COLORS):
    """uint8 (H, W, 3): noisy pink background, each object a filled rectangle in its class colour."""
    width, height = size
    image = rng.integers(200, 240, (height, width, 3)).astype(np.uint8)
    image[..., 1] -= 40  # pinkish, like a stained smear
    for obj in objects:
        if obj["name"].strip() not in colors:
            continue
        x0, y0, x1, y1 = (int(round(float(v))) for v in obj["box"])
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
        if x1 > x0 and y1 > y0:
            image[y0:y1, x0:x1] = colors[obj["name"].strip()]
    return image


def make_voc(root, n_trainval=4, n_test=2, size=(64, 48), objects=None, seed=0, classes=CLASSES):
    """Write a tiny BCCD-like VOC dataset at `root` and return `root` as a Path.

    Images are `image_id(i)` = BloodImage_00000, BloodImage_00001, ...: the first `n_trainval` make
    ImageSets/Main/trainval.txt (its first 3/4, at least one, make train.txt, the rest val.txt), the
    next `n_test` make test.txt. Each is a JPEG of `size` (width, height) with an XML annotation.
    objects: {image id: list of object dicts} overriding the random objects of those images; an
        object is {"name": str (written verbatim: " RBC\\n" tests stripping), "box": [x_min, y_min,
        x_max, y_max] (ints or floats, written as given; may be degenerate or reach outside),
        "difficult": 0 or 1, or None to leave the tag out (default 0)}.
    seed: seeds the random objects and pixels, so a call is reproducible.
    classes: the class names of the random objects (written verbatim, UTF-8), each drawn in a colour of its own.
    To break the dataset (a malformed XML, a missing image, ...) change the files afterwards.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    objects = objects or {}
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids = [image_id(i) for i in range(n_trainval + n_test)]
    for i, name in enumerate(ids):
        objs = objects[name] if name in objects else random_objects(rng, i, size, classes)
        (root / "Annotations" / f"{name}.xml").write_text(annotation_xml(f"{name}.jpg", size, objs), encoding="utf-8")
        Image.fromarray(draw_image(rng, size, objs, class_colors(classes))).save(root / "JPEGImages" / f"{name}.jpg",
                                                                                 quality=95)
    trainval, test = ids[:n_trainval], ids[n_trainval:]
    n_train = max(1, (3 * len(trainval)) // 4)
    splits = {"trainval": trainval, "test": test, "train": trainval[:n_train], "val": trainval[n_train:]}
    for split, split_ids in splits.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in split_ids))
    return root


@pytest.fixture(scope="session")
def bccd_dir(tmp_path_factory):
    """The real BCCD when it exists ($BCCD_DIR, ../shared/data/BCCD or data/BCCD), else a generated one of 12
    640x480 images (trainval 8 = train 6 + val 2, test 4). Tests must not change it."""
    real = real_bccd_path()
    if os.environ.get("BCCD_DIR") and real is None:
        pytest.fail(f"BCCD_DIR={os.environ['BCCD_DIR']} has no Annotations folder")
    return real or make_voc(tmp_path_factory.mktemp("data") / "BCCD", n_trainval=8, n_test=4, size=(640, 480))


@pytest.fixture(scope="session")
def real_bccd_dir():
    """The real BCCD; skips the test where it is missing."""
    real = real_bccd_path()
    if real is None:
        pytest.skip("checks figures of the real BCCD (its counts, the shipped model's TEST mAP), not found at "
                    "$BCCD_DIR, ../shared/data/BCCD or data/BCCD: python create_data_lists.py --download")
    return real


@pytest.fixture(scope="session")
def data_lists(bccd_dir, tmp_path_factory):
    """Folder of the lists made by create_data_lists.create_data_lists from bccd_dir (trainval/test). Tests must not change it."""
    from create_data_lists import create_data_lists
    folder = tmp_path_factory.mktemp("lists")
    create_data_lists(bccd_dir, folder, verbose=False)
    return folder


@pytest.fixture(scope="session")
def tiny_lists(tmp_path_factory):
    """Lists of a generated dataset of 64x48 images: 4 TRAIN (2 steps an epoch at batch 2), 2 TEST."""
    from create_data_lists import create_data_lists
    root = tmp_path_factory.mktemp("tiny")
    create_data_lists(make_voc(root / "BCCD", n_trainval=4, n_test=2), root / "lists", verbose=False)
    return root / "lists"


@pytest.fixture(scope="session")
def untrained_checkpoint(tmp_path_factory):
    """An untrained SSD300 (BatchNorm, train.py's BCCD priors, seed 0) saved with the fields eval.py and detect.py
    read. Its scores are not uniform and depend on the image, so its detections do too."""
    import torch
    from model import SSD300
    from train import BCCD_PRIOR_SCALES
    from utils import label_map
    torch.manual_seed(0)
    model = SSD300(base_weights=None, batch_norm=True, prior_scales=BCCD_PRIOR_SCALES)
    path = tmp_path_factory.mktemp("untrained") / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "model_args": model.model_args, "label_map": label_map}, path)
    return path


@pytest.fixture
def tiny_voc(tmp_path):
    """Factory: tiny_voc(**options) makes a new tiny VOC dataset under tmp_path and returns its path.
    Options as make_voc's (n_trainval=4, n_test=2, size=(64, 48), objects=None, seed=0, classes=CLASSES)."""
    made = []

    def make(**options):
        made.append(make_voc(tmp_path / f"voc{len(made)}", **options))
        return made[-1]

    return make


def child_env():
    """The environment of a command the tests start: no proxy for local addresses (the download tests' server)."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


@pytest.fixture
def run_main(monkeypatch, capsys):
    """run_main(script, *args) -> (returncode, stdout, stderr) of `python script args`, run in this process."""
    import importlib
    from misc import run_cli

    def run(script, *args):
        module = importlib.import_module(script.removesuffix(".py"))
        for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
        monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
        capsys.readouterr()  # what the test printed before
        sigterm = signal.getsignal(signal.SIGTERM)  # run_cli turns SIGTERM into an exception: not for pytest
        try:
            run_cli(module.main, module.get_args_parser())
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            signal.signal(signal.SIGTERM, sigterm)
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    return run


@pytest.fixture
def run_script():
    """run_script(script, *args, timeout=120) -> CompletedProcess (text stdout/stderr) of
    `python script args` run in the repository, with no proxy for local addresses."""
    def run(script, *args, timeout=120):
        return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO, env=child_env(),
                              capture_output=True, text=True, timeout=timeout)

    return run


# A schedule that does not depend on the length of the run, so that a run stopped early and resumed
# can be compared with one run straight through: 2 iterations of linear warm-up from lr/10, then lr
# (no decay: --decay-at with no value). Iterations 0, 1, 2 get 0.1, 0.55 and 1 times LR, so a resume
# that restarted the schedule would show.
LR = 1e-3
SCHEDULE = ["--lr", str(LR), "--schedule", "step", "--warmup", "2", "--ema-decay", "0.9", "--flips", "d4", "--decay-at"]


def train_argv(data_folder, out_dir, *extra):
    """train.py's command line for the tiny runs of the tests: batch 2, CPU, no workers, SCHEDULE."""
    return ["--data-folder", str(data_folder), "--out-dir", str(out_dir), "--batch-size", "2", "--workers", "0",
            "--device", "cpu", "--no-cache-images", *SCHEDULE, *map(str, extra)]


def truncate_lists(src, dst, n_train, n_test):
    """Copy the lists of `src` to `dst`, keeping the first n_train TRAIN and n_test TEST images."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for split, n in (("TRAIN", n_train), ("TEST", n_test)):
        for kind in ("images", "objects"):
            items = json.loads((Path(src) / f"{split}_{kind}.json").read_text())
            (dst / f"{split}_{kind}.json").write_text(json.dumps(items[:n]))
    shutil.copy(Path(src) / "label_map.json", dst / "label_map.json")
    return dst


def error_lines(stderr):
    """The lines a script printed as errors ("<script>: error: ..."); tqdm's bars are not among them."""
    return [line for line in stderr.splitlines() if re.match(r"\w+\.py: error: ", line)]


def assert_one_line_error(result, script, says):
    """A finished command (run_main, run_script) failed as a user error should: status 1, one error line, the last
    thing on stderr, saying `says` (words: a string or a list of them), no traceback. Returns the line."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: "), result.stderr
    assert result.stderr[result.stderr.index(lines[0]):].strip() == lines[0], result.stderr
    assert all(w in lines[0] for w in ([says] if isinstance(says, str) else says)), lines[0]
    return lines[0]


def load_tool(name):
    """The module of tools/NAME.py (run as `python tools/NAME.py`, it is no package's: imported from its path)."""
    spec = importlib.util.spec_from_file_location(f"tools_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
