"""Visibility truth of the built-in world on hand-built scenes, against answers worked out from the rig geometry.

The right-sensor attribution metric is scored against ``Sample.visibility``; these scenes pin it down. Each scene
is a few boxes placed by hand around the ego (x forward, y left, metres; no roads, no clutter), rendered by the
world's own ``render_frame`` with noise off, under conditions set by hand. The rig (``world.rig``): cameras at
~1.5 m with a horizontal half field of view of 32.3 deg (CAM_BACK 44.7 deg) and a vertical one of 19.6 deg at
64 x 112; the LiDAR at (0.94, 0, 1.84) with beams from -30.67 to +10.67 deg, range 70 m; five radars sweeping a
horizontal plane at 0.5 m, +-60 deg around their yaws, range 75 m.
"""

from __future__ import annotations

import numpy as np
import pytest

from fusionlens.data.sample import CAMERA_NAMES, CLASSES, RADAR_NAMES
from fusionlens.world import generate
from fusionlens.world.conditions import Conditions
from fusionlens.world.config import WorldConfig
from fusionlens.world.raycast import Boxes
from fusionlens.world.scene import VEHICLE, Scene

FRONT = CAMERA_NAMES.index("CAM_FRONT")
SIZE = {"car": (4.62, 1.95, 1.73), "bus": (11.19, 2.94, 3.47), "pedestrian": (0.73, 0.67, 1.77)}  # l, w, h
RCS = {"car": 10.0, "bus": 20.0, "pedestrian": -4.0}


def _scene(*objects: tuple) -> Scene:
    """``objects``: ``(class, x, y)`` standing on the ground, heading along +x, optionally ``(l, w, h)`` and an RCS
    in dBsm after them."""
    rows = []
    for obj in objects:
        cls, x, y = obj[:3]
        length, width, height = obj[3] if len(obj) > 3 else SIZE[cls]
        rows.append((x, y, height / 2, length / 2, width / 2, height / 2, obj[4] if len(obj) > 4 else RCS[cls],
                     CLASSES.index(cls)))
    a = np.array(rows, dtype=np.float64)
    m = len(rows)
    return Scene(layout="hand", roads=[], boxes=Boxes(centre=a[:, 0:3], half=a[:, 3:6], yaw=np.zeros(m)),
                 velocity=np.zeros((m, 2)), label=a[:, 7].astype(np.int64), texture=np.full(m, VEHICLE),
                 colour=np.full((m, 3), 0.6), reflectivity=np.full(m, 0.6), rcs=a[:, 6], ego_speed=0.0)


def _observe(monkeypatch, scene: Scene, **conditions):
    """``render_frame`` of ``scene`` under ``Conditions(**conditions)`` (a clear day otherwise), noise off."""
    monkeypatch.setattr(generate, "make_scene", lambda cfg, rng: scene)
    monkeypatch.setattr(generate, "sample_conditions", lambda cfg, rng, yaws: Conditions(**conditions))
    frame = generate.render_frame(WorldConfig().with_(sensor_noise=0.0), 0, "val", 0)
    assert list(frame.labelled) == list(range(len(scene.label)))  # visibility row i is object i
    return frame, {k: v.numpy() for k, v in frame.sample.visibility.items()}


def test_car_behind_a_bus_is_hidden_from_every_sensor(monkeypatch):
    """Bus at x 6.4..17.6, car at x 21.7..26.3, both on the axis. The bus is wider (1.47 vs 0.98 m half width)
    and taller (3.47 vs 1.73 m) than the car, so every line from a camera (z ~1.5), the LiDAR (z 1.84) or a radar
    (z 0.5) to the car passes through the bus; no other camera or radar looks along the axis."""
    _, vis = _observe(monkeypatch, _scene(("bus", 12.0, 0.0), ("car", 24.0, 0.0)))
    assert vis["camera_pixels"][1].tolist() == [0] * 6
    assert vis["lidar_points"][1] == 0 and vis["radar_points"][1] == 0 and not vis["visible"][1]
    assert vis["camera_pixels"][0, FRONT] > 0 and vis["lidar_points"][0] > 0 and vis["radar_points"][0] > 0
    # alone, the same car is seen by the front camera, the LiDAR and the front radar
    _, alone = _observe(monkeypatch, _scene(("car", 24.0, 0.0)))
    assert alone["camera_pixels"][0, FRONT] > 0 and alone["lidar_points"][0] > 0 and alone["radar_points"][0] > 0
    assert alone["camera_frac"][0, FRONT] == 1.0  # nothing in front of it: every pixel it covers is its own


def test_object_below_every_camera_view(monkeypatch):
    """A 0.6 m high object at x 3.6..4.0 (a crouching pedestrian at the bumper): from CAM_FRONT (x 1.70, z 1.51)
    its top's far edge lies (1.51 - 0.6) / 2.3 = 0.40 below the horizon, more than tan(19.6 deg) = 0.36, the lower
    image edge; from the front-left/right cameras (yaw +-55 deg, half FOV 32.3) it lies at -18..-5 deg / 5..18
    deg, outside. The LiDAR's lower beams (-30.67 .. -25.3 deg) hit it, and so does the front radar's plane (0.5 m
    < 0.6 m, 0.2 m ahead of the sensor)."""
    _, vis = _observe(monkeypatch, _scene(("pedestrian", 3.8, 0.0, (0.4, 0.6, 0.6))))
    assert vis["camera_pixels"][0].tolist() == [0] * 6
    assert vis["camera_frac"][0].tolist() == [0.0] * 6  # not occluded: outside the views (nothing unoccluded)
    assert vis["lidar_points"][0] > 0 and vis["radar_points"][0] > 0 and vis["visible"][0]


def test_bus_beyond_lidar_range_but_within_radar_range(monkeypatch):
    """A bus whose near face is at x 71.7 is 70.8 m from the LiDAR (range 70) and 68.3 m from the front radar
    (range 75). With an RCS of 30 dBsm its SNR there is 30 - 40 log10(6.83) = -3.4 dB against the -20 dB
    threshold: detected in practically every sweep. Moved to x 60, the LiDAR sees it."""
    _, far = _observe(monkeypatch, _scene(("bus", 77.3, 0.0, SIZE["bus"], 30.0)))
    assert far["lidar_points"][0] == 0 and far["radar_points"][0] > 0 and far["visible"][0]
    _, near = _observe(monkeypatch, _scene(("bus", 60.0, 0.0, SIZE["bus"], 30.0)))
    assert near["lidar_points"][0] > 0


def test_pedestrian_in_the_radars_blind_spot_by_the_rear_door(monkeypatch):
    """A pedestrian at x -0.17..0.57, y 1.07..1.74 (20 cm from the rear door). From RADAR_FRONT_LEFT (2.42, 0.8;
    yaw 90 +- 60 deg) its nearest-to-the-field corner (0.565, 1.735) lies at 153 deg, beyond 150; from
    RADAR_BACK_LEFT (-0.56, 0.63; yaw 160 +- 60) it lies at 21..48 deg, short of 100; the front radar (+-60 deg)
    looks away and the right radars (-150..-30 and 140..260 deg, from y = -0.6) see it at 0..90 deg. CAM_BACK_LEFT
    (yaw 110 +- 32.3) sees it at 132 deg; the LiDAR's lower beams hit it 1.5 m away."""
    _, vis = _observe(monkeypatch, _scene(("pedestrian", 0.2, 1.4)))
    assert vis["radar_points"][0] == 0
    assert vis["camera_pixels"][0, CAMERA_NAMES.index("CAM_BACK_LEFT")] > 0 and vis["lidar_points"][0] > 0




def test_camera_blackout_removes_exactly_that_camera(monkeypatch):
    scene = _scene(("car", 15.0, 0.0), ("car", 8.0, 8.0))  # straight ahead; at 45 deg (CAM_FRONT_LEFT only)
    _, clear = _observe(monkeypatch, scene)
    _, dark = _observe(monkeypatch, scene, blackout_cameras=["CAM_FRONT"])
    assert clear["camera_pixels"][0, FRONT] > 0 and clear["camera_pixels"][1, CAMERA_NAMES.index("CAM_FRONT_LEFT")] > 0
    expected = clear["camera_pixels"].copy()
    expected[:, FRONT] = 0
    np.testing.assert_array_equal(dark["camera_pixels"], expected)
    np.testing.assert_array_equal(dark["lidar_points"], clear["lidar_points"])
    assert dark["camera_frac"][0, FRONT] == 0.0 and dark["visible"].all()  # the LiDAR still sees both


def test_lens_occlusion_hides_what_the_blob_covers(monkeypatch):
    """A blob over the centre of CAM_FRONT (u, v = 0.5, 0.5; radii 0.25 x 0.3 of the image) covers the car
    straight ahead; the car at 25 deg (u ~ 0.5 + tan 25 deg * 88.6 / 112 = 0.87, outside the blob's ellipse
    even where it fades) keeps every pixel."""
    scene = _scene(("car", 15.0, 0.0), ("car", 15.0, 7.0))
    _, clear = _observe(monkeypatch, scene)
    _, blob = _observe(monkeypatch, scene, occluded_camera="CAM_FRONT", occlusion_blob=(0.5, 0.5, 0.25, 0.3))
    assert clear["camera_pixels"][0, FRONT] > 0 and clear["camera_pixels"][1, FRONT] > 0
    assert blob["camera_pixels"][0, FRONT] == 0
    assert blob["camera_pixels"][1, FRONT] == clear["camera_pixels"][1, FRONT]
    others = [i for i in range(6) if i != FRONT]
    np.testing.assert_array_equal(blob["camera_pixels"][:, others], clear["camera_pixels"][:, others])


@pytest.mark.parametrize("lost", ["all", "even"])
def test_lidar_beam_loss_drops_exactly_the_lost_rings(monkeypatch, lost):
    """Each beam is cast on its own and, with noise off, kept by its power alone: the returns under beam loss are
    exactly the clear-day returns of the rings still firing."""
    scene = _scene(("car", 10.0, 0.0), ("pedestrian", 5.0, -4.0))
    clear_frame, clear = _observe(monkeypatch, scene)
    rings = list(range(32)) if lost == "all" else list(range(0, 32, 2))
    _, loss = _observe(monkeypatch, scene, lost_rings=rings)
    ring = clear_frame.lidar.points[:, 4].astype(int)
    firing = ~np.isin(ring, rings)
    expected = [int(((clear_frame.lidar.object_ids == i) & firing).sum()) for i in range(2)]
    assert loss["lidar_points"].tolist() == expected
    assert (expected == [0, 0]) == (lost == "all") and clear["lidar_points"].min() > 0


def test_radar_dropout_silences_the_dropped_radar(monkeypatch):
    """A car straight ahead at x 12.7..17.3 lies only in RADAR_FRONT's field (from the front-left/right radars at
    y = +-0.8 it is at -+3.6 deg, outside their 30..150 / -150..-30 deg); a car to the left at (0, 10) only in
    RADAR_FRONT_LEFT's and RADAR_BACK_LEFT's."""
    scene = _scene(("car", 15.0, 0.0), ("car", 0.0, 10.0))
    _, clear = _observe(monkeypatch, scene)
    _, drop = _observe(monkeypatch, scene, dropped_radars=["RADAR_FRONT"])
    assert clear["radar_points"].min() > 0
    assert drop["radar_points"][0] == 0 and drop["radar_points"][1] > 0
    _, left_drop = _observe(monkeypatch, scene, dropped_radars=["RADAR_FRONT_LEFT", "RADAR_BACK_LEFT"])
    assert left_drop["radar_points"][1] == 0 and left_drop["radar_points"][0] > 0
    assert set(RADAR_NAMES) >= {"RADAR_FRONT", "RADAR_FRONT_LEFT", "RADAR_BACK_LEFT"}
