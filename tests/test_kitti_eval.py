"""KITTI evaluation on hand-worked cases: overlaps, a perfect detector, precision / recall curves whose AP is
worked out by hand, the difficulty filters, neighbouring classes and DontCare regions."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from fusionlens.data.kitti import KittiObject
from fusionlens.evaluate.kitti import evaluate_kitti, overlaps


def car(x: float = 0.0, z: float = 20.0, *, kind: str = "Car", occluded: int = 0, truncated: float = 0.0,
        height_px: float = 60.0, score: float | None = None, y: float = 1.7, ry: float = 0.0) -> KittiObject:
    """A 4 x 2 x 1.5 m box, bottom centre (x, y, z) in the camera frame, with a 2-D box of ``height_px``."""
    return KittiObject(kind, truncated, occluded, -1.0, (100 + 10 * x, 100.0, 180 + 10 * x, 100.0 + height_px),
                       (1.5, 2.0, 4.0), (x, y, z), ry, score)


def frames(n: int) -> list[list[KittiObject]]:
    return [[car()] for _ in range(n)]


def test_overlaps_by_hand():
    """Length along camera x when ry = 0; shifted 1 m along it: BEV 6 / 10; half the height (0.75 m) off too:
    6 * 0.75 / (12 + 12 - 4.5)."""
    a = car(x=0.0)
    b = car(x=1.0)
    assert overlaps([a], [b], "bev")[0, 0] == pytest.approx(0.6)
    assert overlaps([a], [b], "3d")[0, 0] == pytest.approx(0.6)
    assert overlaps([a], [replace(b, location=(1.0, 1.7 + 0.75, 20.0))], "3d")[0, 0] == pytest.approx(4.5 / 19.5)
    turned = car(ry=math.pi / 2)  # 2 x 4 across 4 x 2: a 2 x 2 square in common of 8 + 8 - 4
    assert overlaps([a], [turned], "bev")[0, 0] == pytest.approx(4 / 12)
    # 2-D: 80 x 60 boxes 10 px apart: 70 * 60 / (2 * 4800 - 4200)
    assert overlaps([a], [b], "bbox")[0, 0] == pytest.approx(4200 / 5400)


def test_perfect_detector_scores_100_and_few_objects_are_capped_as_in_the_devkit():
    gt = frames(45)
    dt = [[replace(o, score=0.5 + 0.01 * k) for o in f] for k, f in enumerate(gt)]
    result = evaluate_kitti(gt, dt, classes=("Car",))
    for metric in ("bbox", "bev", "3d"):
        assert result.ap[metric]["Car"] == {"easy": 100.0, "moderate": 100.0, "hard": 100.0}
    assert result.num_gt["Car"]["easy"] == 45
    few = evaluate_kitti(gt[:4], dt[:4], classes=("Car",))
    assert few.ap["3d"]["Car"]["easy"] == pytest.approx(3 / 40 * 100)
    assert evaluate_kitti(gt, dt, classes=("Car",), recall_points=11).ap["bev"]["Car"]["hard"] == 100.0
    assert math.isnan(evaluate_kitti(gt, dt, classes=("Pedestrian",)).ap["3d"]["Pedestrian"]["easy"])


def test_known_precision_recall_curve():
    """80 cars; 40 found, scores falling with the index i; before each of the found cars i = 20..39 a false
    positive scores just above it. Thresholds fall on the true positives i = 0, 1, 3, 5, .., 39 (the devkit keeps
    one whenever recall passes the next 1/40); at threshold i precision = (i + 1) / (i + 1 + max(0, i - 19)),
    falling, so AP-40 = (sum over i = 1, 3, .., 39 of it) / 40 and AP-11 uses the thresholds 0, 4, .., 20."""
    gt = frames(80)
    dt: list[list[KittiObject]] = [[] for _ in range(80)]
    for i in range(40):
        dt[i].append(replace(gt[i][0], score=1.0 - 0.01 * i))
        if i >= 20:
            dt[40 + i].append(car(x=30.0, score=1.0 - 0.01 * i + 0.005))  # nowhere near a car
    precision = {i: (i + 1) / (i + 1 + max(0, i - 19)) for i in range(40)}
    at = [0] + list(range(1, 40, 2))  # the 21 thresholds
    expected_40 = sum(precision[i] for i in at[1:]) / 40 * 100
    expected_11 = sum(precision[at[k]] for k in range(0, 21, 4)) / 11 * 100
    result = evaluate_kitti(gt, dt, classes=("Car",), metrics=("bev",))
    assert result.ap["bev"]["Car"]["easy"] == pytest.approx(expected_40)
    r11 = evaluate_kitti(gt, dt, classes=("Car",), metrics=("bev",), recall_points=11)
    assert r11.ap["bev"]["Car"]["easy"] == pytest.approx(expected_11)
    half = evaluate_kitti(gt, [f[:1] if k < 40 else [] for k, f in enumerate(dt)], classes=("Car",), metrics=("bev",))
    assert half.ap["bev"]["Car"]["moderate"] == pytest.approx(50.0)  # precision 1 up to recall 1/2


def test_iou_threshold_per_class():
    """A detection 1 m off (BEV IoU 0.6) misses a Car (0.7) but finds a Pedestrian-sized threshold (0.5)."""
    gt = frames(45)
    dt = [[replace(car(x=1.0), score=0.9)] for _ in range(45)]
    assert evaluate_kitti(gt, dt, classes=("Car",), metrics=("bev",)).ap["bev"]["Car"]["easy"] == 0.0
    loose = evaluate_kitti(gt, dt, classes=("Car",), metrics=("bev",), min_overlap={"Car": 0.5})
    assert loose.ap["bev"]["Car"]["easy"] == 100.0


@pytest.mark.parametrize(("change", "counted"), [
    ({"occluded": 1}, (False, True, True)), ({"occluded": 2}, (False, False, True)),
    ({"occluded": 3}, (False, False, False)), ({"truncated": 0.2}, (False, True, True)),
    ({"truncated": 0.4}, (False, False, True)), ({"truncated": 0.6}, (False, False, False)),
    ({"height_px": 30.0}, (False, True, True)), ({"height_px": 25.0}, (False, False, False)),
])
def test_difficulty_filters_ignore_rather_than_count_false(change, counted):
    """45 easy cars found, plus 45 harder cars, each found with the top score. Where a harder car does not count,
    its detection must be ignored (AP stays 100), not a false positive; where it counts, AP stays 100 too."""
    gt = [[car(), car(x=20.0, **change)] for _ in range(45)]
    dt = [[replace(f[0], score=0.5), replace(f[1], score=0.9)] for f in gt]
    result = evaluate_kitti(gt, dt, classes=("Car",), metrics=("bev",))
    for level, name in enumerate(("easy", "moderate", "hard")):
        assert result.num_gt["Car"][name] == 45 * (1 + counted[level])
        assert result.ap["bev"]["Car"][name] == 100.0
    missed = evaluate_kitti(gt, [f[:1] for f in dt], classes=("Car",), metrics=("bev",))
    for level, name in enumerate(("easy", "moderate", "hard")):  # an undetected counted car lowers recall
        assert (missed.ap["bev"]["Car"][name] < 100.0) == counted[level]


def test_neighbouring_classes_and_dontcare_are_ignored_not_false():
    base = frames(45)
    for extra in (car(x=20.0, kind="Van"), car(x=20.0, kind="DontCare")):
        gt = [f + [extra] for f in base]
        dt = [[replace(f[0], score=0.5), replace(car(x=20.0), score=0.9)] for f in base]
        assert evaluate_kitti(gt, dt, classes=("Car",), metrics=("3d",)).ap["3d"]["Car"]["easy"] == 100.0
    gt = [f + [car(x=20.0, kind="Truck")] for f in base]  # not a neighbour of Car: its detection is false
    dt = [[replace(f[0], score=0.5), replace(car(x=20.0), score=0.9)] for f in base]
    assert evaluate_kitti(gt, dt, classes=("Car",), metrics=("3d",)).ap["3d"]["Car"]["easy"] < 60.0
    ped = [[car(kind="Person_sitting")] + f for f in frames(45)]
    dt = [[replace(car(kind="Pedestrian"), score=0.9)] for _ in range(45)]
    result = evaluate_kitti(ped, dt, classes=("Pedestrian",), metrics=("bbox",))
    assert math.isnan(result.ap["bbox"]["Pedestrian"]["easy"])  # no pedestrian counts, and no false positive


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="2 frames of labels but 1 of detections"):
        evaluate_kitti(frames(2), [[]])
    with pytest.raises(ValueError, match="frame 0 has a detection without a score"):
        evaluate_kitti(frames(1), frames(1))
    with pytest.raises(ValueError, match=r"no overlap threshold for \['Truck'\]"):
        evaluate_kitti(frames(1), [[]], classes=("Truck",))
    with pytest.raises(ValueError, match="recall_points must be 40 or 11"):
        evaluate_kitti(frames(1), [[]], recall_points=20)
    assert np.array_equal(overlaps([], [car()], "3d"), np.zeros((0, 1)))
