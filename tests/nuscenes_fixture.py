"""The nuScenes-format test dataset of ``tests/test_nuscenes*.py``: two mini-split scenes with objects placed at
known poses in the reference ego frame of one keyframe, so that every BEV cell they cover is computed by hand."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from fusionlens.data.nuscenes_fixture import (
    FixtureManifest,
    FixtureObject,
    FixtureScene,
    scene_ego_pose,
    write_nuscenes_fixture,
)
from fusionlens.data.sample import BEVGrid

#: 1 m cells over +-20 m: cell i spans [-20 + i, -19 + i), so hand-computed indices are floor(x + 20).
GRID = BEVGrid(((-20.0, 20.0), (-20.0, 20.0), (-5.0, 5.0)), (40, 40, 4))
IMAGE_SIZE = (18, 32)  # the fixture's 36x64 images halved
KEYFRAME = 1  # objects are placed in the ego frame of this keyframe (t = 0.5 s)


def placed(scene: FixtureScene, category: str, ego_xy: tuple[float, float], ego_yaw: float,
           size: tuple[float, float, float], velocity: tuple[float, float] = (0.0, 0.0), visibility: str = "4",
           z: float = 0.8) -> FixtureObject:
    """An object whose box, at keyframe ``KEYFRAME``, sits at ``ego_xy``/``ego_yaw`` in that keyframe's ego frame
    and moves at ``velocity`` (global)."""
    t = 0.5 * KEYFRAME
    pose = scene_ego_pose(scene, t)
    g = pose @ np.array([ego_xy[0], ego_xy[1], z, 1.0])
    yaw = ego_yaw + math.atan2(pose[1, 0], pose[0, 0])
    start = (g[0] - velocity[0] * t, g[1] - velocity[1] * t, g[2])
    return FixtureObject(category, start, size, yaw, velocity, visibility, num_lidar_pts=7, num_radar_pts=3)


def scenes() -> tuple[FixtureScene, ...]:
    train = FixtureScene("scene-0061", description="Parked truck, construction, intersection, turn left",
                         landmarks=((15.0, 3.0, 0.5), (-8.0, -12.0, 1.0)))
    train = replace(train, objects=(
        placed(train, "vehicle.car", (10.0, 5.0), 0.0, (2.0, 4.0, 1.5), velocity=(3.0, 0.0)),  # 8 seg cells
        placed(train, "vehicle.truck", (-12.0, -8.0), math.pi / 2, (2.5, 8.0, 3.0), visibility="1"),  # invalid
        placed(train, "human.pedestrian.adult", (4.0, -3.0), 0.3, (0.6, 0.7, 1.8), visibility="3"),
        placed(train, "vehicle.bicycle", (6.0, -6.0), 0.0, (0.6, 1.7, 1.2)),  # not a fusionlens class
        placed(train, "vehicle.car", (35.0, 0.0), 0.0, (2.0, 4.0, 1.5)),  # outside the test grid
    ))
    val = FixtureScene("scene-0103", description="Night, rain, many peds right", ego_start=(100.0, 50.0, -1.0),
                       ego_velocity=(-2.0, 1.0), ego_yaw_rate=-0.05, landmarks=((5.0, 12.0, 0.0),),
                       start_time_us=1_533_151_603_547_590)
    return train, val


def write_test_dataset(root: Path) -> FixtureManifest:
    return write_nuscenes_fixture(root, scenes())
