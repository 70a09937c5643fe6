"""utils.calculate_mAP against hand-computed precision/recall curves and the tutorial's sequential algorithm.

Run: python -m pytest tests/test_map.py -q
"""
import json
import random
import re
import shutil

import numpy as np
import pytest
import torch

from conftest import load_tool
from misc import UserError
from utils import calculate_mAP

INTERPOLATIONS = ("11point", "all", "101point")
CLASS_NAMES = {1: "RBC", 2: "WBC", 3: "Platelets"}


def image(true=(), dets=()):
    """One image: true = [(box, label, difficult)], dets = [(box, label, score)] -> the six per-image tensors."""
    return (torch.tensor([b for b, _, _ in dets], dtype=torch.float).reshape(-1, 4),
            torch.tensor([lab for _, lab, _ in dets], dtype=torch.long),
            torch.tensor([s for _, _, s in dets], dtype=torch.float),
            torch.tensor([b for b, _, _ in true], dtype=torch.float).reshape(-1, 4),
            torch.tensor([lab for _, lab, _ in true], dtype=torch.long),
            torch.tensor([d for _, _, d in true], dtype=torch.long))


def evaluate(images, **kwargs):
    """calculate_mAP over a list of image(...) tuples."""
    return calculate_mAP(*[list(column) for column in zip(*images)], **kwargs)


# objects and detections used below: boxes far apart, and boxes with IoU 0.81 (> 0.5) with them
A, A_HIT = [0.1, 0.1, 0.3, 0.3], [0.1, 0.1, 0.28, 0.28]
B, B_HIT = [0.6, 0.6, 0.8, 0.8], [0.61, 0.61, 0.8, 0.8]
NOWHERE = [0.4, 0.0, 0.5, 0.05]


# ---- hand-computed curves -------------------------------------------------------------------------

# 2 objects; detections by score: TP (A), FP (nowhere), TP (B)
# precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1
#   11-point: recall >= 0, .1, ..., .5 -> best precision 1; >= .6, ..., 1 -> 2/3:  (6 + 5 * 2/3) / 11
#   all points: 1/2 * 1 + 1/2 * 2/3 = 5/6
#   101-point: 51 thresholds (0 ... .50) at 1, 50 (.51 ... 1) at 2/3:  (51 + 50 * 2/3) / 101
HAND_CASE_AP = {"11point": (6 + 5 * 2 / 3) / 11, "all": 5 / 6, "101point": (51 + 50 * 2 / 3) / 101}


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_hand_computed_curve(interpolation):
    images = [image(true=[(A, 1, 0), (B, 1, 0)],
                    dets=[(A_HIT, 1, 0.9), (NOWHERE, 1, 0.8), (B_HIT, 1, 0.7)])]
    aps, mean_ap = evaluate(images, interpolation=interpolation)
    assert set(aps) == {"RBC"}  # WBC and Platelets have no objects: left out
    assert aps["RBC"] == pytest.approx(HAND_CASE_AP[interpolation], abs=1e-6)
    assert mean_ap == pytest.approx(HAND_CASE_AP[interpolation], abs=1e-6)


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_duplicate_detection_of_an_object_is_a_false_positive(interpolation):
    # TP (A), duplicate of A, TP (B): the same curve as the hand case
    images = [image(true=[(A, 1, 0), (B, 1, 0)],
                    dets=[(A_HIT, 1, 0.9), (A, 1, 0.8), (B_HIT, 1, 0.7)])]
    aps, _ = evaluate(images, interpolation=interpolation)
    assert aps["RBC"] == pytest.approx(HAND_CASE_AP[interpolation], abs=1e-6)


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_detection_of_a_difficult_object_is_neither_tp_nor_fp(interpolation):
    # objects A (easy) and B (difficult): detections B (ignored), nowhere (FP), A (TP)
    # -> FP, TP: precision 0, 1/2 at recall 0, 1. Every rule gives 1/2 (as an FP it would be 1/3, as a TP 1)
    images = [image(true=[(A, 2, 0), (B, 2, 1)],
                    dets=[(B_HIT, 2, 0.9), (NOWHERE, 2, 0.8), (A_HIT, 2, 0.7)])]
    aps, mean_ap = evaluate(images, interpolation=interpolation)
    assert set(aps) == {"WBC"}
    assert aps["WBC"] == pytest.approx(0.5, abs=1e-6)
    assert mean_ap == pytest.approx(0.5, abs=1e-6)


def test_only_difficult_objects_leave_the_class_out():
    images = [image(true=[(A, 3, 1), (B, 1, 0)], dets=[(A_HIT, 3, 0.9), (B_HIT, 1, 0.5)])]
    aps, mean_ap = evaluate(images)
    assert set(aps) == {"RBC"} and aps["RBC"] == pytest.approx(1.)
    assert mean_ap == pytest.approx(1.)


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_detection_in_another_image_never_matches(interpolation):
    # object A in image 0 only; a detection at A in image 1 scores higher: FP, then TP -> 1/2
    images = [image(true=[(A, 1, 0)], dets=[(A_HIT, 1, 0.5)]),
              image(true=[(B, 2, 0)], dets=[(A_HIT, 1, 0.9), (B_HIT, 2, 0.9)])]
    aps, mean_ap = evaluate(images, interpolation=interpolation)
    assert aps["RBC"] == pytest.approx(0.5, abs=1e-6)
    assert aps["WBC"] == pytest.approx(1.0, abs=1e-6)
    assert mean_ap == pytest.approx(0.75, abs=1e-6)


def test_iou_exactly_at_the_threshold_is_not_a_match():
    # object 0.5 x 0.25 (area 1/8), detection its left half (area 1/16): IoU exactly 1/2 in floating point
    true = [([0., 0., 0.5, 0.25], 1, 0)]
    aps, _ = evaluate([image(true=true, dets=[([0., 0., 0.25, 0.25], 1, 0.9)])])
    assert aps["RBC"] == 0.
    aps, _ = evaluate([image(true=true, dets=[([0., 0., 0.25, 0.25], 1, 0.9)])], iou_threshold=0.49)
    assert aps["RBC"] == pytest.approx(1.)
    aps, _ = evaluate([image(true=true, dets=[([0., 0., 0.2578125, 0.25], 1, 0.9)])])  # IoU 0.5156
    assert aps["RBC"] == pytest.approx(1.)


def test_class_without_detections_scores_zero_and_counts_in_the_mean():
    images = [image(true=[(A, 1, 0), (B, 3, 0)], dets=[(A_HIT, 1, 0.9)])]
    aps, mean_ap = evaluate(images)
    assert aps == pytest.approx({"RBC": 1.0, "Platelets": 0.0})
    assert mean_ap == pytest.approx(0.5)


@pytest.mark.parametrize("interpolation, n_objects, found_first", [("11point", 10, 3), ("11point", 20, 14),
                                                                   ("101point", 100, 50), ("101point", 100, 53),
                                                                   ("101point", 20, 13)])
def test_recall_exactly_on_a_recall_threshold_counts(interpolation, n_objects, found_first):
    """`found_first` objects found with precision 1, then as many false positives, then the rest.

    Recall found_first / n_objects is exactly one of the thresholds t (0.3, 0.7, 0.5, 0.53, 0.65), so
    "the best precision at recall >= t" is 1 there. After the false positives every later point has
    precision (found_first + j) / (2 found_first + j) < 1, largest at the end.
    """
    n_points = 11 if interpolation == "11point" else 101
    boxes = [[i / 128, 0., (i + 0.5) / 128, 0.5] for i in range(n_objects)]  # disjoint
    dets = [(boxes[i], 1, 1. - i / 1000) for i in range(found_first)]
    dets += [([i / 128, 0.6, (i + 0.5) / 128, 0.9], 1, 0.8 - i / 1000) for i in range(found_first)]
    dets += [(boxes[i], 1, 0.5 - i / 1000) for i in range(found_first, n_objects)]
    aps, _ = evaluate([image(true=[(b, 1, 0) for b in boxes], dets=dets)], interpolation=interpolation)
    final_precision = n_objects / (n_objects + found_first)
    # thresholds k / (n_points - 1) with k * n_objects <= found_first * (n_points - 1): precision 1
    at_one = sum(1 for k in range(n_points) if k * n_objects <= found_first * (n_points - 1))
    expected = (at_one + (n_points - at_one) * final_precision) / n_points
    assert aps["RBC"] == pytest.approx(expected, abs=1e-6)


def test_one_object_missed_caps_voc07_ap_at_ten_elevenths_and_eval_reports_the_recall():
    """11 objects, 10 found with precision 1 and one never: recall 10/11, 11-point AP 10/11 (the point at recall 1
    is 0), all-point AP 10/11 too; the same with all 11 found is 1. eval.compute_metrics reports the recall."""
    from eval import compute_metrics
    boxes = [[i / 16, 0., (i + 0.5) / 16, 0.5] for i in range(11)]  # disjoint
    for found in (10, 11):
        one = image(true=[(b, 2, 0) for b in boxes], dets=[(boxes[i], 2, 0.9 - i / 100) for i in range(found)])
        metrics = compute_metrics(*[[t] for t in one], label_names=CLASS_NAMES)
        assert metrics["recall"] == pytest.approx({"WBC": found / 11})
        assert metrics["AP"]["WBC"] == pytest.approx(1. if found == 11 else 10 / 11, abs=1e-6)
        assert metrics["AP_all_point"]["WBC"] == pytest.approx(found / 11, abs=1e-6)


def test_empty_inputs():
    # no detections at all: every class with objects scores 0
    aps, mean_ap = evaluate([image(true=[(A, 1, 0), (B, 2, 0)]), image()])
    assert aps == {"RBC": 0.0, "WBC": 0.0} and mean_ap == 0.0


# ---- against the tutorial's sequential algorithm ----------------------------------------------------

def iou(a, b):
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0.) * max(h, 0.)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def reference_mAP(det_boxes, det_labels, det_scores, true_boxes, true_labels, true_difficulties,
                  iou_threshold=0.5, interpolation="11point"):
    """The tutorial's calculate_mAP, one detection at a time, with exact recall thresholds."""
    aps = {}
    for c, name in CLASS_NAMES.items():
        objects = [(i, b, bool(d)) for i in range(len(true_boxes))
                   for b, lab, d in zip(true_boxes[i].tolist(), true_labels[i].tolist(), true_difficulties[i].tolist())
                   if lab == c]
        n_easy = sum(not d for _, _, d in objects)
        if n_easy == 0:
            continue
        dets = [(s, i, b) for i in range(len(det_boxes))
                for b, lab, s in zip(det_boxes[i].tolist(), det_labels[i].tolist(), det_scores[i].tolist()) if lab == c]
        dets.sort(key=lambda d: -d[0])
        detected = [False] * len(objects)
        tp_flags = []  # one per detection that is not ignored
        for _, img, box in dets:
            candidates = [k for k, (i, _, _) in enumerate(objects) if i == img]
            if not candidates:
                tp_flags.append(False)
                continue
            overlaps = [iou(box, objects[k][1]) for k in candidates]
            best = max(range(len(candidates)), key=lambda t: overlaps[t])
            k = candidates[best]
            if overlaps[best] > iou_threshold:
                if objects[k][2]:
                    continue  # difficult: neither TP nor FP
                tp_flags.append(not detected[k])
                detected[k] = True
            else:
                tp_flags.append(False)
        n_tp, precision, n_found = 0, [], []
        for j, is_tp in enumerate(tp_flags):
            n_tp += is_tp
            precision.append(n_tp / (j + 1))
            n_found.append(n_tp)
        if interpolation == "all":
            ap, previous = 0., 0
            for j in range(len(precision)):
                ap += (n_found[j] - previous) / n_easy * max(precision[j:])
                previous = n_found[j]
        else:
            n_points = 11 if interpolation == "11point" else 101
            ap = 0.
            for k in range(n_points):  # recall >= k / (n_points - 1), compared in integers
                above = [p for p, f in zip(precision, n_found) if f * (n_points - 1) >= k * n_easy]
                ap += max(above) if above else 0.
            ap /= n_points
        aps[name] = ap
    return aps, sum(aps.values()) / max(len(aps), 1)


def random_dataset(seed, n_images=60):
    """Images with 0-8 objects (10% difficult), detections near most of them (some twice, some with the
    wrong class), and false alarms."""
    rng = random.Random(seed)
    columns = [[] for _ in range(6)]
    for _ in range(n_images):
        true, dets = [], []
        for _ in range(rng.randint(0, 8)):
            x, y, w, h = rng.uniform(0, 0.8), rng.uniform(0, 0.8), rng.uniform(0.03, 0.2), rng.uniform(0.03, 0.2)
            box = [x, y, x + w, y + h]
            label = rng.randint(1, 3)
            true.append((box, label, int(rng.random() < 0.1)))
            for _ in range(rng.choice([0, 1, 1, 1, 2])):
                jitter = [v + rng.gauss(0, 0.02) for v in box]
                jitter = [min(jitter[0], jitter[2] - 0.01), min(jitter[1], jitter[3] - 0.01), jitter[2], jitter[3]]
                dets.append((jitter, label if rng.random() < 0.9 else rng.randint(1, 3), rng.random()))
        for _ in range(rng.randint(0, 4)):
            x, y = rng.uniform(0, 0.9), rng.uniform(0, 0.9)
            dets.append(([x, y, x + rng.uniform(0.02, 0.1), y + rng.uniform(0.02, 0.1)], rng.randint(1, 3), rng.random()))
        for column, value in zip(columns, image(true, dets)):
            column.append(value)
    return columns


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_random_data_equals_the_sequential_algorithm(seed, interpolation):
    data = random_dataset(seed)
    labels, diffs = torch.cat(data[4]), torch.cat(data[5])
    n_easy = [int(((labels == c) & (diffs == 0)).sum()) for c in CLASS_NAMES]
    assert all(n > 0 for n in n_easy)
    aps, mean_ap = calculate_mAP(*data, interpolation=interpolation)
    ref_aps, ref_mean = reference_mAP(*data, interpolation=interpolation)
    assert set(aps) == set(ref_aps) == set(CLASS_NAMES.values())
    for name in ref_aps:
        assert aps[name] == pytest.approx(ref_aps[name], abs=1e-5), name
    assert mean_ap == pytest.approx(ref_mean, abs=1e-5)
    assert 0.2 < mean_ap < 0.95  # a curve with both kinds of detections, not a trivial 0 or 1


def test_count_check_gives_the_errors_by_hand_and_a_bad_file_in_one_line(tmp_path, capsys, monkeypatch):
    """tools/count_check.py: per class, sum |counted - annotated| / annotated and the bias, over the same images, and
    the images whose counts differ."""
    count_check = load_tool("count_check")
    images = [str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")]
    lists = tmp_path / "lists"
    lists.mkdir()
    for name, data in (("TEST_images.json", images), ("label_map.json", {"background": 0, "RBC": 1, "WBC": 2, "Platelets": 3}),
                       ("TEST_objects.json", [{"labels": [1, 1, 2]}, {"labels": [1, 3]}])):
        (lists / name).write_text(json.dumps(data))
    counts, out = tmp_path / "counts.csv", tmp_path / "report.json"
    counts.write_text(f"image,RBC,WBC,Platelets\n{images[1]},4,0,2\n{tmp_path}/lists/../a.jpg,3,1,0\n")  # any order

    def check(csv_path, folder=lists, key="all"):
        count_check.main(count_check.get_args_parser().parse_args([str(csv_path), "--data-folder", str(folder),
                                                                   "--output", str(out), "--list"]))
        return json.loads(out.read_text())[key]

    differ = check(counts, key="differ")
    assert [(d["image"], d["counted"], d["annotated"]) for d in differ["RBC"]] == [  # named as counts.csv names them
        (f"{tmp_path}/lists/../a.jpg", 3, 2), (images[1], 4, 1)]  # in the lists' order; printed, by difference
    assert differ["WBC"] == [] and [d["image"] for d in differ["Platelets"]] == [images[1]]
    printed = capsys.readouterr().out.splitlines()
    assert printed[-4:] == [f"RBC  counted 4, annotated 1  ?  {images[1]}",
                            f"RBC  counted 3, annotated 2  ?  {tmp_path}/lists/../a.jpg",
                            f"Platelets  counted 2, annotated 1  ?  {images[1]}",
                            "images whose counts differ: RBC 2, WBC 0, Platelets 1"]
    figures = check(counts)
    assert figures["RBC"] == {"annotated": 3, "counted": 7, "error": pytest.approx(4 / 3), "bias": pytest.approx(4 / 3)}
    assert figures["WBC"] == {"annotated": 1, "counted": 1, "error": 0, "bias": 0}
    assert figures["Platelets"] == {"annotated": 1, "counted": 2, "error": 1, "bias": 1}
    (tmp_path / "wrong.csv").write_text(f"image,RBC\n{images[0]},3\n{images[1]},0\n")
    (tmp_path / "short.csv").write_text(f"image,RBC,WBC,Platelets\n{images[0]},3,1,0\n")
    for path, folder, says in ((tmp_path / "none.csv", lists, "none.csv: cannot read"),
                               (tmp_path / "wrong.csv", lists, "wrong.csv: not the counts.csv of detect.py"),
                               (tmp_path / "short.csv", lists, "1 of TEST not counted"),
                               (counts, tmp_path / "nowhere", "TEST_images.json: list not found")):
        with pytest.raises(UserError, match=says):
            check(path, folder)
    for name, data, says in (("label_map.json", ["RBC"], "label_map.json: not a label map"),
                             ("TEST_objects.json", [{"boxes": []}, {"labels": [1]}], "TEST_objects.json: not an entry"),
                             ("TEST_objects.json", [{"labels": [1]}, {"labels": [4]}], "TEST_objects.json: not an entry"),
                             ("TEST_objects.json", [{"labels": None}] * 2, "TEST_objects.json: not an entry"),
                             ("TEST_objects.json", [{"labels": [1], "source": ["x"]}] * 2, "TEST_objects.json"),
                             ("TEST_objects.json", [{"labels": [1]}], "TEST_objects.json: not an entry"),
                             ("TEST_images.json", [1, 2], "TEST_images.json: not a list of image paths"),
                             ("TEST_images.json", [images[0], f"{tmp_path}/lists/../a.jpg"], r"image\(s\) listed twice")):
        bad = tmp_path / f"bad-{name}-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(lists, bad)
        (bad / name).write_text(json.dumps(data))
        with pytest.raises(UserError, match=says):
            check(counts, bad)
    kept = counts.read_bytes()
    for output in (counts, lists / "TEST_objects.json"):  # an input of the run: refused before it is read
        with pytest.raises(UserError, match="which this run reads; writing there would destroy it"):
            count_check.main(count_check.get_args_parser().parse_args([str(counts), "--data-folder", str(lists),
                                                                       "--output", str(output)]))
    assert counts.read_bytes() == kept
    (tmp_path / "relative.csv").write_text("image,RBC,WBC,Platelets\na.jpg,3,1,0\nb.jpg,4,0,2\n")
    monkeypatch.chdir(lists)  # not where these names are
    with pytest.raises(UserError, match="its paths are relative to the folder detect.py ran in: run count_check.py there"):
        check(tmp_path / "relative.csv")
    monkeypatch.chdir(tmp_path)
    assert check(tmp_path / "relative.csv")["RBC"]["counted"] == 7


def test_unannotated_cells_sorts_detections_as_voc_matches_them():
    """tools/unannotated_cells.py's classify: by score, IoU > 0.5 matches an annotation once, a second match is a
    duplicate, 0.1 < IoU <= 0.5 is near, the rest lie on no annotated box."""
    module = load_tool("unannotated_cells")
    true = torch.tensor([[0., 0., 10., 10.], [20., 20., 30., 30.]])
    boxes = torch.tensor([[0., 0., 10., 9.],     # IoU 0.9 with the first, score 0.8: after the match, a duplicate
                          [50., 50., 60., 60.],  # on no box
                          [0., 0., 10., 10.],    # IoU 1 with the first, score 0.9: the match
                          [20., 20., 30., 45.]])  # IoU 0.4 with the second: near
    scores = torch.tensor([0.8, 0.1, 0.9, 0.5])
    _, kinds, found = module.classify(boxes, scores, true)
    assert kinds == [0, 1, 2, 3]  # in score order: 0.9 match, 0.8 duplicate, 0.5 near, 0.1 on no box
    assert found.tolist() == [True, False]
    _, kinds, found = module.classify(boxes, scores, true[:0])
    assert kinds == [3, 3, 3, 3] and found.numel() == 0
    _, kinds, found = module.classify(boxes[:0], scores[:0], true)
    assert kinds == [] and found.tolist() == [False, False]


def test_count_check_against_another_run_is_a_paired_bootstrap_of_the_plain_errors(tmp_path, capsys):
    """tools/count_check.py --against: the difference of two runs' errors over the same images and its interval are
    those of a plain loop over the same resamples, each scored by errors(); the same counts differ by exactly 0, and
    a run better on every image is lower in every resample."""
    count_check = load_tool("count_check")
    rng = np.random.default_rng(5)
    truth = rng.integers(0, 4, size=40)
    truth[:3] = 0  # images without the class: some resamples hold almost none
    this, other = np.maximum(truth + rng.integers(-2, 3, size=40), 0), np.maximum(truth + rng.integers(-1, 2, size=40), 0)
    b = count_check.paired_bootstrap(this, other, truth, resamples=500, seed=3)
    index = np.random.default_rng(3).integers(0, 40, size=(500, 40))  # the same draws, one resample at a time
    plain = []
    for picked in index:
        rows = lambda counts: [({"c": int(counts[i])}, {"c": int(truth[i])}) for i in picked]  # noqa: E731
        mine, theirs = count_check.errors(rows(this), ["c"])["c"], count_check.errors(rows(other), ["c"])["c"]
        if mine["error"] is not None:
            plain.append(mine["error"] - theirs["error"])
    assert b["resamples"] == len(plain)
    assert b["interval"] == pytest.approx(list(np.percentile(plain, [2.5, 97.5])))
    assert b["lower_share"] == pytest.approx(np.mean(np.array(plain) < -1e-12))
    assert b["difference"] == pytest.approx((np.abs(this - truth).sum() - np.abs(other - truth).sum()) / truth.sum())
    same = count_check.paired_bootstrap(this, this, truth, resamples=200)
    assert same["difference"] == 0 and same["interval"] == [0, 0] and same["same_share"] == 1
    better = count_check.paired_bootstrap(truth, truth + 1, truth, resamples=200)
    assert better["lower_share"] == 1 and better["interval"][1] < 0

    images = [str(tmp_path / f"{n}.jpg") for n in "ab"]
    lists = tmp_path / "lists"
    lists.mkdir()
    for name, data in (("TEST_images.json", images), ("label_map.json", {"background": 0, "RBC": 1, "WBC": 2}),
                       ("TEST_objects.json", [{"labels": [1, 1, 2]}, {"labels": [1]}])):
        (lists / name).write_text(json.dumps(data))
    for name, text in (("mine.csv", f"image,RBC,WBC\n{images[0]},2,1\n{images[1]},1,0\n"),
                       ("theirs.csv", f"image,RBC,WBC\n{images[0]},3,1\n{images[1]},1,0\n"),
                       ("twice.csv", f"image,RBC,WBC\n{images[0]},2,1\n{images[1]},1,0\n{images[1]},1,0\n"),
                       ("other.csv", f"image,RBC,WBC\n{images[0]},2,1\n"),
                       ("negative.csv", f"image,RBC,WBC\n{images[0]},2,1\n{images[1]},-1,0\n")):
        (tmp_path / name).write_text(text)
    out = tmp_path / "report.json"

    def check(against):
        count_check.main(count_check.get_args_parser().parse_args([str(tmp_path / "mine.csv"), "--data-folder",
                                                                   str(lists), "--against", str(against),
                                                                   "--output", str(out)]))
        return json.loads(out.read_text())["against"]["classes"]

    classes = check(tmp_path / "theirs.csv")
    assert classes["RBC"]["difference"] == pytest.approx(-1 / 3) and classes["WBC"]["difference"] == 0
    assert capsys.readouterr().out.splitlines()[-2].startswith("RBC        -33.3 [")
    (tmp_path / "saved.csv").write_text("\ufeff" + (tmp_path / "theirs.csv").read_text(), encoding="utf-8")
    assert check(tmp_path / "saved.csv") == classes  # re-saved by a spreadsheet, with a byte-order mark
    capsys.readouterr()
    for against, says in (("twice.csv", "1 image(s) counted twice"), ("other.csv", "1 of TEST not counted"),
                          ("negative.csv", "a negative count"), ("none.csv", "none.csv: cannot read")):
        with pytest.raises(UserError, match=re.escape(says)):
            check(tmp_path / against)
        assert capsys.readouterr().out == ""  # refused before any figure
