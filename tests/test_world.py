"""The built-in world: determinism, geometry oracles against the simulator's own truth, labels, visibility."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fusionlens.data.labels import boxes_to_bev
from fusionlens.data.sample import CAMERA_NAMES, CLASSES, LIDAR_FIELDS, RADAR_FIELDS, VEHICLE_CLASSES
from fusionlens.world import WorldConfig, generate_sample, render_frame
from fusionlens.world.raycast import GROUND

SMALL = WorldConfig(image_size=(32, 56), lidar_azimuth_steps=180)
CLEAR = SMALL.with_(condition_probs={}, time_probs={"day": 1.0})
EXACT = CLEAR.with_(sensor_noise=0.0)
F = {n: i for i, n in enumerate(RADAR_FIELDS)}


def test_same_seed_same_sample_and_different_seed_differs() -> None:
    a, b = generate_sample(SMALL, 3, "train", 5), generate_sample(SMALL, 3, "train", 5)
    for name in ("images", "radar", "lidar", "bev_seg", "boxes"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.meta == b.meta
    c = generate_sample(SMALL, 4, "train", 5)
    assert not torch.equal(a.boxes, c.boxes) or not torch.equal(a.lidar, c.lidar)
    d = generate_sample(SMALL, 3, "val", 5)
    assert not torch.equal(a.lidar, d.lidar)


def test_shapes_and_fields() -> None:
    s = generate_sample(SMALL, 0, "train", 0)
    assert s.images.shape == (6, 3, 32, 56) and 0 <= s.images.min() and s.images.max() <= 1
    assert s.radar.shape[1] == len(RADAR_FIELDS) and s.lidar.shape[1] == len(LIDAR_FIELDS)
    assert s.bev_seg.shape == SMALL.grid.shape[:2] and s.bev_offset.shape == (2, *SMALL.grid.shape[:2])
    assert s.boxes.shape[1] == 9 and s.box_labels.shape == (s.boxes.shape[0],)
    for key, value in s.visibility.items():
        assert value.shape[0] == s.boxes.shape[0], key
    assert s.meta["tags"][0] in ("day", "dusk", "night")
    assert set(s.lidar[:, 4].unique().tolist()) <= set(range(32))


def test_projected_box_points_land_on_pixels_drawn_as_that_object() -> None:
    frame = render_frame(EXACT, 0, "train", 1)
    rig, ids = frame.rig, frame.camera.object_ids
    h, w = EXACT.image_size
    checked = 0
    for row, obj in enumerate(frame.labelled):
        box = frame.sample.boxes[row].double().numpy()
        if np.hypot(box[0], box[1]) > 25.0:  # keep silhouettes several pixels wide at 32x56
            continue
        # Points inside the box near its vertical edges (shrunk 30% towards the axis, at mid height): the
        # corner itself lies on the silhouette edge, where a pixel-centre ray may just miss.
        for sx, sy in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
            c, s = math.cos(box[6]), math.sin(box[6])
            lx, ly = sx * box[4] / 2 * 0.7, sy * box[3] / 2 * 0.7
            p = np.array([[box[0] + lx * c - ly * s, box[1] + lx * s + ly * c, box[2]]])
            for cam in range(len(CAMERA_NAMES)):
                (u, v), depth = rig.project(cam, p)[0][0], rig.project(cam, p)[1][0]
                if depth <= 0.5 or not (0 <= u < w and 0 <= v < h):
                    continue
                drawn = ids[cam, int(v), int(u)]
                # Unless something nearer covers it, the pixel must show this very object.
                if drawn >= 0 and drawn != obj:
                    continue
                assert drawn == obj, (row, cam, drawn)
                checked += 1
    assert checked >= 5


def _surface_distance(frame, pts: np.ndarray, ids: np.ndarray) -> np.ndarray:
    boxes = frame.scene.boxes
    loc = boxes.to_local(ids, pts)
    return np.min(np.abs(np.abs(loc) - boxes.half[ids]), axis=1)


def test_lidar_points_lie_on_objects_or_ground() -> None:
    frame = render_frame(EXACT, 0, "train", 2)
    pts, ids = frame.lidar.points[:, :3].astype(np.float64), frame.lidar.object_ids
    assert pts.shape[0] > 500
    assert np.all(np.abs(pts[ids == GROUND, 2]) < 1e-3)
    on = ids >= 0
    assert on.sum() > 50
    assert np.all(_surface_distance(frame, pts[on], ids[on]) < 1e-3)
    assert np.all(np.linalg.norm(pts - frame.rig.lidar_position, axis=1) <= EXACT.lidar_range + 1e-3)


def test_radar_compensated_velocity_is_the_objects_radial_velocity() -> None:
    frame = render_frame(EXACT, 0, "train", 3)
    r, ids, origin = frame.radar.points.astype(np.float64), frame.radar.object_ids, frame.radar.sensor_origin
    real = ids >= 0
    assert real.sum() > 10
    u = r[real, 0:2] - origin[real, :2]
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    v = frame.scene.velocity[ids[real]]
    radial = (v * u).sum(1)
    assert np.allclose(r[real, F["vx_comp"]], radial * u[:, 0], atol=1e-3)
    assert np.allclose(r[real, F["vy_comp"]], radial * u[:, 1], atol=1e-3)
    ego = np.array([frame.scene.ego_speed, 0.0])
    raw = ((v - ego) * u).sum(1)
    assert np.allclose(r[real, F["vx"]], raw * u[:, 0], atol=1e-3)
    # Each return lies on its object as it was time_lag seconds ago.
    lag = r[real, F["time_lag"]]
    pos = r[real, 0:3] + np.concatenate([v * lag[:, None], np.zeros((lag.size, 1))], axis=1)
    assert np.all(_surface_distance(frame, pos, ids[real]) < 1e-3)
    assert set(np.round(np.unique(r[:, F["time_lag"]]), 3)) <= {round(k * 0.077, 3) for k in range(5)}


def test_labels_match_boxes_and_visibility() -> None:
    s = generate_sample(SMALL, 0, "train", 4)
    again = boxes_to_bev(s.boxes, s.box_labels, SMALL.grid, invalid=~s.visibility["visible"])
    assert torch.equal(again["seg"], s.bev_seg) and torch.equal(again["valid"], s.bev_valid)
    vehicles = torch.isin(s.box_labels, torch.tensor([CLASSES.index(c) for c in VEHICLE_CLASSES]))
    assert (vehicles & s.visibility["visible"]).any() and s.bev_seg.sum() > 0
    (x0, x1), (y0, y1) = SMALL.grid.bounds[0], SMALL.grid.bounds[1]
    assert ((s.boxes[:, 0] > x0) & (s.boxes[:, 0] < x1) & (s.boxes[:, 1] > y0) & (s.boxes[:, 1] < y1)).all()


def test_visibility_counts_match_sensor_outputs() -> None:
    frame = render_frame(SMALL, 0, "train", 6)
    vis, idx = frame.sample.visibility, frame.labelled
    for row, obj in enumerate(idx):
        assert vis["lidar_points"][row] == int((frame.lidar.object_ids == obj).sum())
        assert vis["radar_points"][row] == int((frame.radar.object_ids == obj).sum())
        for cam in range(6):
            assert vis["camera_pixels"][row, cam] <= int((frame.camera.object_ids[cam] == obj).sum())
    assert ((vis["camera_frac"] >= 0) & (vis["camera_frac"] <= 1)).all()


def test_blacked_out_camera_sees_nothing() -> None:
    cfg = SMALL.with_(condition_probs={"camera_blackout": 1.0})
    frame = render_frame(cfg, 0, "train", 7)
    dark = [CAMERA_NAMES.index(n) for n in frame.conditions.blackout_cameras]
    assert dark and "camera_blackout" in frame.sample.meta["tags"]
    assert frame.sample.images[dark].abs().sum() == 0
    assert frame.sample.visibility["camera_pixels"][:, dark].sum() == 0
    assert frame.sample.visibility["camera_frac"][:, dark].sum() == 0


def test_faults_and_weather_degrade_their_sensors() -> None:
    base = generate_sample(CLEAR, 0, "train", 8)
    lost = generate_sample(CLEAR.with_(condition_probs={"lidar_beam_loss": 1.0}), 0, "train", 8)
    assert lost.lidar.shape[0] < 0.7 * base.lidar.shape[0]
    fog = generate_sample(CLEAR.with_(condition_probs={"fog": 1.0}), 0, "train", 8)
    far = lambda s: int((s.lidar[:, :2].norm(dim=1) > 40).sum())  # noqa: E731
    assert far(fog) < 0.2 * max(far(base), 1)
    dropped = generate_sample(CLEAR.with_(condition_probs={"radar_dropout": 1.0}), 0, "train", 8)
    assert dropped.radar.shape[0] < base.radar.shape[0]
    night = generate_sample(CLEAR.with_(time_probs={"night": 1.0}), 0, "train", 8)
    assert night.images.mean() < 0.5 * base.images.mean()


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"image_size": (0, 10)}, "image_size"),
        ({"classes": ("car", "unicorn")}, "classes"),
        ({"condition_probs": {"snow": 0.5}}, "condition_probs"),
        ({"time_probs": {"midnight": 1.0}}, "time_probs"),
        ({"condition_probs": {"fog": 1.5}}, "fog"),
        ({"lidar_range": 30.0}, "lidar_range"),
        ({"lidar_azimuth_steps": 0}, "lidar_azimuth_steps"),
        ({"vehicles": (5, 2)}, "vehicles"),
        ({"nonsense": 1}, "nonsense"),
    ],
)
def test_bad_config_names_the_setting(changes: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        WorldConfig().with_(**changes)


def test_bad_split_or_index() -> None:
    with pytest.raises(ValueError, match="split"):
        generate_sample(SMALL, 0, "holdout", 0)
    with pytest.raises(ValueError, match="index"):
        generate_sample(SMALL, 0, "train", -1)


def test_probability_dict_order_does_not_change_the_world() -> None:
    shuffled = SMALL.with_(layout_probs=dict(reversed(list(SMALL.layout_probs.items()))),
                           condition_probs=dict(reversed(list(SMALL.condition_probs.items()))))
    a, b = generate_sample(SMALL, 0, "train", 9), generate_sample(shuffled, 0, "train", 9)
    assert torch.equal(a.boxes, b.boxes) and a.meta == b.meta
