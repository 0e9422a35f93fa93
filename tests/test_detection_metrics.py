"""nuScenes detection metrics on hand-made boxes: oracles computed by hand from the nuScenes definitions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("nuscenes")

from fusionlens.evaluate.detection import (  # noqa: E402
    DetectionEvaluator,
    evaluate_detection,
    ground_truth_extras,
    motion_attribute,
    yaw_to_quaternion,
)


def _gt(n: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n well-separated boxes; first two classes alternate."""
    g = torch.Generator().manual_seed(seed)
    boxes = torch.zeros(n, 9)
    boxes[:, 0] = torch.arange(n) * 10.0 - 12.0
    boxes[:, 1] = torch.rand(n, generator=g) * 20 - 10
    boxes[:, 2] = 0.8
    boxes[:, 3:6] = torch.tensor([1.9, 4.6, 1.7])
    boxes[:, 6] = torch.rand(n, generator=g) * 6 - 3
    boxes[:, 7:9] = torch.rand(n, 2, generator=g) * 4 - 2
    return boxes, torch.arange(n) % 2


def _score(pred: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, gt: torch.Tensor, gl: torch.Tensor,
           classes: tuple[str, ...] = ("car", "pedestrian")):
    return evaluate_detection([{"boxes": pred, "scores": scores, "labels": labels}],
                              [{"boxes": gt, "labels": gl}], classes=classes)


def test_perfect_prediction_scores_one_with_zero_errors() -> None:
    gts = [_gt(4, seed) for seed in range(3)]
    preds = [{"boxes": b, "scores": torch.linspace(0.9, 0.5, len(b)), "labels": lab} for b, lab in gts]
    truth = [{"boxes": b, "labels": lab} for b, lab in gts]
    rep = evaluate_detection(preds, truth, classes=("car", "pedestrian"))
    assert rep.mean_ap == pytest.approx(1.0)
    assert all(ap == pytest.approx(1.0) for per in rep.label_aps.values() for ap in per.values())
    for name, err in rep.tp_errors.items():
        assert err == pytest.approx(0.0, abs=1e-6), name
    assert rep.nds == pytest.approx(1.0)
    assert rep.num_gt == {"car": 6, "pedestrian": 6}


@pytest.mark.parametrize("shift, ap_expected", [(0.3, 1.0), (0.7, 0.75), (1.5, 0.5), (3.0, 0.25)])
def test_shifted_prediction_gives_expected_ate_and_ap(shift: float, ap_expected: float) -> None:
    gt, gl = _gt()
    pred = gt.clone()
    pred[:, 0] += shift * 0.6
    pred[:, 1] -= shift * 0.8  # a 3-4-5 direction: the centre distance is exactly `shift`
    rep = _score(pred, torch.full((len(gt),), 0.5), gl, gt, gl)
    # AP is 1 at every threshold above the shift and 0 below it: thresholds 0.5, 1, 2, 4 m.
    assert rep.mean_ap == pytest.approx(ap_expected)
    if shift < 2.0:  # TP errors are taken at the 2 m threshold
        assert rep.tp_errors["trans_err"] == pytest.approx(shift, abs=1e-5)
        assert rep.nds == pytest.approx((5 * ap_expected + 4 + (1 - min(1.0, shift))) / 10, abs=1e-5)
    else:
        assert rep.tp_errors["trans_err"] == 1.0  # no match at 2 m: the devkit assigns error 1


def test_half_recall_gives_hand_computed_ap() -> None:
    # 2 GT, 1 correct detection: precision 1 up to recall 0.5, 0 above. calc_ap averages max(0, p - 0.1) / 0.9
    # over the 90 recall bins above 0.1: bins 0.11..0.50 (40 of them) count fully -> AP = 40 / 90.
    gt, gl = _gt(2)
    gl[:] = 0
    rep = _score(gt[:1], torch.tensor([0.7]), gl[:1], gt, gl, classes=("car",))
    assert rep.mean_ap == pytest.approx(40 / 90)


def test_false_positive_ranked_first_gives_hand_computed_ap() -> None:
    # 1 GT; a false positive outranks the true one: (recall, precision) = (0, 0), (1, 0.5), so the
    # interpolated precision is p(r) = r / 2.
    # AP = sum_{i=11..100} max(0, i/200 - 0.1) / 90 / 0.9 = 16.2 / 81 = 0.2.
    gt, gl = _gt(1)
    fp = gt.clone()
    fp[:, 1] += 20.0
    both = torch.cat([fp, gt])
    rep = _score(both, torch.tensor([0.9, 0.5]), torch.tensor([0, 0]), gt, gl, classes=("car",))
    assert rep.mean_ap == pytest.approx(0.2)


def test_scale_orientation_velocity_and_attribute_errors() -> None:
    gt, gl = _gt(2)
    gt[:, 7:9] = 0.0  # parked
    pred = gt.clone()
    pred[:, 3:6] *= 2.0  # aligned boxes twice the size: IoU = 1/8
    pred[:, 6] += 0.5
    pred[:, 7:9] = torch.tensor([3.0, 4.0])  # 5 m/s: velocity error 5, attribute "moving" vs "parked"
    rep = _score(pred, torch.tensor([0.6, 0.4]), gl, gt, gl)
    assert rep.tp_errors["scale_err"] == pytest.approx(7 / 8)
    assert rep.tp_errors["orient_err"] == pytest.approx(0.5, abs=1e-6)
    assert rep.tp_errors["vel_err"] == pytest.approx(5.0)
    assert rep.tp_errors["attr_err"] == pytest.approx(1.0)
    assert rep.tp_scores == pytest.approx({"trans_err": 1.0, "scale_err": 1 / 8, "orient_err": 0.5,
                                           "vel_err": 0.0, "attr_err": 0.0})
    assert rep.nds == pytest.approx((5 * 1.0 + 1.0 + 1 / 8 + 0.5) / 10)


def test_orientation_error_wraps_around() -> None:
    gt, gl = _gt(1)
    gt[:, 6] = math.pi - 0.1
    pred = gt.clone()
    pred[:, 6] = -math.pi + 0.2  # 0.3 rad away across the +-pi seam
    rep = _score(pred, torch.tensor([0.5]), gl, gt, gl, classes=("car",))
    assert rep.tp_errors["orient_err"] == pytest.approx(0.3, abs=1e-6)


def test_range_and_point_filters_drop_boxes() -> None:
    gt, gl = _gt(2)
    gl[:] = 0
    far = gt[:1].clone()
    far[:, 0], far[:, 1] = 45.0, 30.0  # 54 m away: beyond the 50 m car range
    ev = DetectionEvaluator(classes=("car",))
    # The far prediction is no false positive, the far GT no miss; the GT with zero points is ignored.
    ev.add(torch.cat([gt[:1], far]), torch.tensor([0.9, 0.95]), torch.tensor([0, 0]),
           torch.cat([gt, far]), torch.tensor([0, 0, 0]), gt_num_points=torch.tensor([12, 0, 5]))
    rep = ev.compute()
    assert rep.num_gt == {"car": 1} and rep.num_pred == {"car": 1}
    assert rep.mean_ap == pytest.approx(1.0)


def test_class_without_ground_truth_scores_zero() -> None:
    gt, gl = _gt(2)
    gl[:] = 0
    rep = _score(gt, torch.tensor([0.9, 0.8]), gl, gt, gl, classes=("car", "bus"))
    assert rep.class_aps == pytest.approx({"car": 1.0, "bus": 0.0})
    assert rep.mean_ap == pytest.approx(0.5)
    assert rep.label_tp_errors["bus"]["trans_err"] == 1.0  # devkit convention for a class with no match
    assert rep.tp_errors["trans_err"] == pytest.approx(0.5)


def test_attributes_none_caps_aae() -> None:
    gt, gl = _gt(2)
    rep = evaluate_detection([{"boxes": gt, "scores": torch.tensor([0.9, 0.8]), "labels": gl}],
                             [{"boxes": gt, "labels": gl}], classes=("car", "pedestrian"), attributes="none")
    assert rep.tp_errors["attr_err"] == 1.0
    assert rep.nds == pytest.approx(0.9)


def test_quaternion_matches_devkit_yaw() -> None:
    from nuscenes.eval.common.utils import quaternion_yaw
    from pyquaternion import Quaternion

    for yaw in np.linspace(-3.1, 3.1, 9):
        q = yaw_to_quaternion(float(yaw))
        ref = Quaternion(axis=[0, 0, 1], angle=float(yaw))
        assert np.allclose(q, ref.elements)
        assert quaternion_yaw(Quaternion(q)) == pytest.approx(yaw)


def test_motion_attribute() -> None:
    assert motion_attribute("car", (0.1, 0.1)) == "vehicle.parked"
    assert motion_attribute("truck", (1.0, 0.0)) == "vehicle.moving"
    assert motion_attribute("pedestrian", (0.0, 0.5)) == "pedestrian.moving"
    assert motion_attribute("barrier", (5.0, 0.0)) == ""


def test_report_serialises_and_formats() -> None:
    gt, gl = _gt(3)
    rep = _score(gt, torch.tensor([0.9, 0.8, 0.7]), gl, gt, gl)
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["mAP"] == pytest.approx(1.0) and d["NDS"] == pytest.approx(1.0) and "mATE" in d
    assert d["class_aps"].keys() == {"car", "pedestrian"}
    table = rep.format_table()
    assert "| car |" in table and "NDS" in table


def test_empty_predictions_score_zero() -> None:
    gt, gl = _gt(2)
    rep = _score(torch.zeros(0, 9), torch.zeros(0), torch.zeros(0, dtype=torch.long), gt, gl)
    assert rep.mean_ap == 0.0 and rep.nds == 0.0


@pytest.mark.parametrize("mutate, match", [
    (lambda p: p.update(boxes=p["boxes"][:, :7]), "pred_boxes must be"),
    (lambda p: p.update(labels=p["labels"] + 5), "pred_labels must be"),
    (lambda p: p.update(scores=p["scores"] * 0), "pred_scores must lie"),
    (lambda p: p.update(scores=p["scores"][:1]), "pred_scores has"),
    (lambda p: p["boxes"].__setitem__((0, 0), float("nan")), "NaN"),
    (lambda p: p["boxes"].__setitem__((0, 3), 0.0), "positive sizes"),
])
def test_bad_input_raises(mutate, match: str) -> None:
    gt, gl = _gt(2)
    pred = {"boxes": gt.clone(), "scores": torch.tensor([0.9, 0.8]), "labels": gl.clone()}
    mutate(pred)
    with pytest.raises(ValueError, match=match):
        evaluate_detection([pred], [{"boxes": gt, "labels": gl}], classes=("car", "pedestrian"))


def test_bad_settings_raise() -> None:
    with pytest.raises(ValueError, match="classes"):
        DetectionEvaluator(classes=("car", "spaceship"))
    with pytest.raises(ValueError, match="attributes"):
        DetectionEvaluator(attributes="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="class_range"):
        DetectionEvaluator(classes=("car",), class_range={"car": -1.0})
    ev = DetectionEvaluator(classes=("car",))
    with pytest.raises(ValueError, match="no samples"):
        ev.compute()
    gt, gl = _gt(1)
    ev.add(gt, torch.tensor([0.5]), gl, gt, gl, token="a")
    with pytest.raises(ValueError, match="already added"):
        ev.add(gt, torch.tensor([0.5]), gl, gt, gl, token="a")


def test_unknown_gt_velocity_is_left_out_of_ave() -> None:
    gt, gl = _gt(2)
    gl[:] = 0
    pred = gt.clone()
    pred[0, 7:9] = gt[0, 7:9] + torch.tensor([0.6, 0.8])  # velocity error 1 m/s
    pred[1, 7:9] = gt[1, 7:9] + 50.0  # would dominate AVE if its ground-truth velocity counted
    ev = DetectionEvaluator(classes=("car",))
    ev.add(pred, torch.tensor([0.9, 0.8]), gl, gt, gl, gt_velocity_known=torch.tensor([True, False]))
    rep = ev.compute()
    assert rep.tp_errors["vel_err"] == pytest.approx(1.0)
    assert rep.mean_ap == pytest.approx(1.0)


def test_ground_truth_extras_follow_nuscenes_point_counts() -> None:
    vis = {"num_lidar_pts": torch.tensor([0, 3, 0]), "num_radar_pts": torch.tensor([0, 0, 2]),
           "velocity_known": torch.tensor([True, False, True]), "visibility_token": torch.tensor([1, 2, 3])}
    extras = ground_truth_extras(vis)
    assert extras["num_points"].tolist() == [0, 3, 2]
    assert extras["velocity_known"].tolist() == [True, False, True]
    assert ground_truth_extras({}) == {}
    world = ground_truth_extras({"lidar_points": torch.tensor([4, 0]), "radar_points": torch.tensor([1, 0])})
    assert world["num_points"].tolist() == [5, 0]
