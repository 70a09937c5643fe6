"""bench.py end to end on CPU, with tiny settings: every measurement runs, its table prints the JSON's figures and
its JSON holds, for ours and torchvision, timings that are real (finite, positive) and ratios that are those of
the timings. The figures themselves are not checked (they depend on the machine); that the code paths behind them
run and report what they measured is. Bad flags and files are one line each, before any measurement."""
import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest

import bench
from test_detect_cli import assert_one_line_error, fill, snapshot


def real(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_every_measurement_runs_and_reports_ours_beside_torchvision(tiny_lists, untrained_checkpoint, tmp_path,
                                                                    run_main, monkeypatch):
    monkeypatch.setattr(bench, "PIPELINE_EPOCHS", 2)  # train.py's first epoch starts its workers, the second is timed
    out = tmp_path / "bench.json"
    result = run_main("bench.py", "--device", "cpu", "--data-folder", tiny_lists, "--checkpoint", untrained_checkpoint,
                      "--only", "train", "pipeline", "infer", "data", "parts", "folder", "tiling", "throughput", "--train-batch", 2,
                      "--infer-batches", 1, 2, "--iters", 1, "--workers", 1, "--tiling-sizes", "900x480", "640x480",
                      "--json", out)
    assert result.returncode == 0, result.stderr
    res = json.loads(out.read_text())
    for key, half_unit in (("train_images_per_s", 0.05), ("multibox_loss_ms", 0.005), ("detect_objects_ms", 0.005)):
        t = res[key]  # figures rounded to 0.1 images/s or 0.01 ms, ratios to 0.01: the ratio of the exact figures
        assert real(t["ours"]) and real(t["torchvision"]), key
        ours, theirs = (t["ours"], t["torchvision"]) if key.endswith("_per_s") else (t["torchvision"], t["ours"])
        low = (ours - half_unit) / (theirs + half_unit)
        high = (ours + half_unit) / max(theirs - half_unit, 1e-9)
        assert low - 0.005 <= t["ratio"] <= high + 0.005, (key, t)
    infer = res["infer_images_per_s"]
    for name in ("ours", "torchvision", "ours_trained"):
        assert set(infer[name]) == {"batch_1", "batch_2"} and all(real(v) for v in infer[name].values()), name
    assert real(res["calculate_mAP_ms"]["ours"])
    by_chunk = res["detect_objects_ms_by_nms_chunk"]
    assert by_chunk.pop("batch") == 2 and set(by_chunk) == {"1", "5000", "25000", str(10 ** 9)}
    assert all(real(ms) for ms in by_chunk.values())
    pipeline = res["train_pipeline_images_per_s"]  # train.py's own epochs: 4 TRAIN images at batch 2
    assert real(pipeline["ours"]) and (pipeline["batch"], pipeline["workers"], pipeline["epochs"]) == (2, 1, 2)
    assert pipeline["fixed_batch"] == res["train_images_per_s"]["ours"]
    assert pipeline["fraction_of_fixed_batch"] == pytest.approx(pipeline["ours"] / pipeline["fixed_batch"], abs=1e-3)
    data = res["data_images_per_s"]
    assert all(real(data[k]) for k in ("ours_one_process", "ours_workers", "ours_workers_restarted_each_epoch"))
    folder = res["folder_seconds"]  # whole commands take longer than their loops
    assert folder["images"] == 2 and folder["ours"] > folder["loop_only"]["ours"] > 0
    assert folder["torchvision"] > folder["loop_only"]["torchvision"] > 0
    tiled = res["tiling_seconds_per_megapixel"]  # 900x480: two windows; 640x480: BCCD's field, resized whole
    assert [(size, t["windows"]) for size, t in tiled.items()] == [("900x480", 2), ("640x480", 1)]
    assert all(real(t["tiled_s_per_mp"]) and real(t["whole_s_per_mp"]) for t in tiled.values())
    through = res["throughput"]  # detect.py beside the model alone, eager and (with the export extras) int8
    assert through["images"] == folder["images"] and through["paths"]
    assert set(through["paths"]) <= {"eager default", "openvino int8"}
    for r in through["paths"].values():
        assert real(r["model_windows_per_s"]) and real(r["detect_fields_per_s"])
        assert r["detect_over_model"] == pytest.approx(r["detect_fields_per_s"] / r["model_windows_per_s"], rel=0.02)
    # the table shows the JSON's figures
    rows = {line[:34].strip(): line[34:].split() for line in result.stdout.splitlines() if len(line) > 34}
    t = res["train_images_per_s"]
    assert rows["train images/s (batch 2)"] == [str(t["ours"]), str(t["torchvision"]), str(t["ratio"])]
    assert rows["infer images/s (batch 2)"][:2] == [str(infer["ours"]["batch_2"]), str(infer["torchvision"]["batch_2"])]
    assert rows["detect.py on 2 images, s"] == [str(folder["ours"]), str(folder["torchvision"]),
                                                str(folder["ours_over_torchvision"])]
    assert rows["train.py images/s (1 workers)"] == [str(pipeline["ours"]), str(pipeline["fraction_of_fixed_batch"])]
    assert re.search(r"^detect_image, s per megapixel", result.stdout, re.M)
    assert res["device_name"].startswith("CPU") and "commit" in res


# ---------------------------------------------------------------------------------------------
# bad flags and files: one line, before any measurement, and an earlier --json kept
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tiny_lists, untrained_checkpoint, tmp_path_factory):
    """Tiny lists, copies of them whose first TEST image is a truncated JPEG, a checkpoint, a file, a pipe, a
    folder without images and an earlier bench.json."""
    root = tmp_path_factory.mktemp("bench")
    shutil.copytree(tiny_lists, root / "lists")
    shutil.copytree(tiny_lists, root / "bad-image")
    images = json.loads((root / "lists" / "TEST_images.json").read_text())
    (root / "truncated.jpg").write_bytes(Path(images[0]).read_bytes()[:400])
    (root / "bad-image" / "TEST_images.json").write_text(json.dumps([str(root / "truncated.jpg"), *images[1:]]))
    shutil.copy(untrained_checkpoint, root / "checkpoint.pt")
    (root / "file").write_text("a file where a folder should be\n")
    os.mkfifo(root / "fifo")
    (root / "blocked").mkdir()
    (root / "blocked" / "label_map.json").write_text("{}\n")  # files, but no image
    (root / "bench.json").write_text('{"earlier": true}\n')
    return root


BENCH_BASE = ["--device", "cpu", "--data-folder", "{root}/lists", "--only", "parts", "--json", "{root}/bench.json"]


BENCH = [
    ("train-batch-0", ["--train-batch", "0"], ["--train-batch must be 1 to 1,024, not 0"]),
    ("train-batch-huge", ["--train-batch", "5000"], ["--train-batch must be 1 to 1,024, not 5000"]),
    ("train-batch-1-batch-norm", ["--train-batch", "1"], ["BatchNorm"]),
    ("infer-batches-0", ["--infer-batches", "1", "0"], ["--infer-batches"]),
    ("infer-batches-huge", ["--infer-batches", "10000000"], ["--infer-batches must be 1 to 1,024"]),
    ("iters-0", ["--iters", "0"], ["--iters"]),
    ("calibration-images-0", ["--only", "export", "--calibration-images", "0"],
     ["--calibration-images must be 1 to 10,000, not 0"]),
    ("workers-1000", ["--workers", "1000"], ["--workers 1000"]),
    ("json-under-a-file", ["--json", "{root}/file/bench.json"], ["--json", "cannot write there"]),
    ("json-is-a-pipe", ["--json", "{root}/fifo"], ["--json", "not a regular file"]),
    ("tiling-sizes-negative", ["--tiling-sizes=-5x3"], ["--tiling-sizes", "1 to 16384"]),
    ("tiling-sizes-huge", ["--tiling-sizes", "99999x99999"], ["--tiling-sizes", "1 to 16384"]),
    ("tiling-image-unreadable", ["--only", "tiling", "--data-folder", "{root}/bad-image", "--tiling-sizes", "640x480"],
     ["truncated.jpg", "cannot read image"]),
    ("checkpoint-missing", ["--checkpoint", "{root}/none.pt"], ["none.pt: no such checkpoint file"]),
    ("folder-missing", ["--folder", "{root}/none"], ["--folder", "no such folder"]),
    ("folder-without-images", ["--only", "folder", "--checkpoint", "{root}/checkpoint.pt", "--folder",
                               "{root}/blocked"], ["--folder", "no image files in it"]),
    ("json-is-the-checkpoint", ["--checkpoint", "{root}/checkpoint.pt", "--json", "{root}/checkpoint.pt"],
     ["--json", "which this run reads"]),
]


@pytest.mark.parametrize("case, argv, says", BENCH, ids=[c[0] for c in BENCH])
def test_bench_refuses(case, argv, says, world, run_main):
    kept = snapshot([world / "bench.json"])
    result = run_main("bench.py", *fill(BENCH_BASE + argv, world))
    assert_one_line_error(result.returncode, result.stderr, "bench", says)
    assert snapshot([world / "bench.json"]) == kept
