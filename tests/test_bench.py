"""bench.py end to end on CPU, with tiny settings: every measurement runs, its table prints and its
JSON holds positive timings for ours and torchvision. The figures themselves are not checked (they
depend on the machine); that the code paths behind them run is."""
import json

import pytest
import torch

from conftest import make_voc
from model import SSD300
from utils import create_data_lists, label_map


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    create_data_lists(make_voc(root / "BCCD", n_trainval=4, n_test=2), root / "lists", verbose=False)
    torch.manual_seed(0)
    model = SSD300(base_weights=None, batch_norm=True)
    torch.save({"model": model.state_dict(), "model_args": model.model_args, "label_map": label_map},
               root / "checkpoint.pt")
    return root


@pytest.mark.slow
def test_every_measurement_runs_and_reports_ours_beside_torchvision(bench_run, run_script):
    out = bench_run / "bench.json"
    result = run_script("bench.py", "--device", "cpu", "--data-folder", bench_run / "lists", "--checkpoint",
                        bench_run / "checkpoint.pt", "--only", "train", "pipeline", "infer", "data", "parts", "folder",
                        "tiling", "--train-batch", 2, "--infer-batches", 1, 2, "--iters", 1, "--workers", 1,
                        "--tiling-sizes", "900x480", "640x480", "--json", out, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    res = json.loads(out.read_text())
    for key in ("train_images_per_s", "multibox_loss_ms", "detect_objects_ms"):
        assert res[key]["ours"] > 0 and res[key]["torchvision"] > 0, key
    for name in ("ours", "torchvision"):
        assert set(res["infer_images_per_s"][name]) == {"batch_1", "batch_2"}
        assert all(v > 0 for v in res["infer_images_per_s"][name].values())
    assert res["calculate_mAP_ms"]["ours"] > 0
    by_chunk = res["detect_objects_ms_by_nms_chunk"]
    assert by_chunk.pop("batch") == 2 and set(by_chunk) == {"1", "5000", "25000", str(10 ** 9)}
    assert all(ms > 0 for ms in by_chunk.values())
    pipeline = res["train_pipeline_images_per_s"]  # train.py's own epochs: 4 TRAIN images at batch 2
    assert pipeline["ours"] > 0 and (pipeline["batch"], pipeline["workers"], pipeline["epochs"]) == (2, 1, 4)
    assert pipeline["fixed_batch"] == res["train_images_per_s"]["ours"] and pipeline["fraction_of_fixed_batch"] > 0
    data = res["data_images_per_s"]
    assert data["ours_one_process"] > 0 and data["ours_workers"] > 0 and data["ours_workers_restarted_each_epoch"] > 0
    folder = res["folder_seconds"]
    assert folder["images"] == 2 and folder["ours"] > folder["loop_only"]["ours"] > 0
    assert folder["torchvision"] > folder["loop_only"]["torchvision"] > 0
    tiled = res["tiling_seconds_per_megapixel"]  # 900x480: two windows; 640x480: BCCD's field, resized whole
    assert [(size, t["windows"]) for size, t in tiled.items()] == [("900x480", 2), ("640x480", 1)]
    assert all(t["tiled_s_per_mp"] > 0 and t["whole_s_per_mp"] > 0 for t in tiled.values())
    for line in ("train images/s (batch 2)", "train.py images/s (1 workers)", "infer images/s (batch 1)",
                 "detect.py on 2 images, s", "detect_image, s per megapixel"):
        assert line in result.stdout
    assert res["device_name"].startswith("CPU") and "commit" in res
