"""bench.py end to end on CPU, with tiny settings: every measurement runs, its table prints the JSON's figures and
its JSON holds, for ours and torchvision, timings that are real (finite, positive) and ratios that are those of
the timings. The figures themselves are not checked (they depend on the machine); that the code paths behind them
run and report what they measured is."""
import json
import math
import re

import pytest

import bench


def real(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_every_measurement_runs_and_reports_ours_beside_torchvision(tiny_lists, untrained_checkpoint, tmp_path,
                                                                    run_main, monkeypatch):
    monkeypatch.setattr(bench, "PIPELINE_EPOCHS", 2)  # train.py's first epoch starts its workers, the second is timed
    out = tmp_path / "bench.json"
    result = run_main("bench.py", "--device", "cpu", "--data-folder", tiny_lists, "--checkpoint", untrained_checkpoint,
                      "--only", "train", "pipeline", "infer", "data", "parts", "folder", "tiling", "--train-batch", 2,
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
