"""Multi-sweep radar and LiDAR reading for :mod:`fusionlens.data.nuscenes`, on the devkit's readers and poses.

The devkit's ``PointCloud.from_file_multisweep`` maps every sweep into a reference *sensor* frame and
transforms only x, y, z. We need the reference *ego* frame and radar velocities that are rotated along with
the positions (a sweep's ``vx, vy, vx_comp, vy_comp`` are in that sweep's sensor axes; leaving them there
would mix five radars' axes in one cloud), so the sweep loop is written here with the same devkit pieces:
``from_file`` (PCD and ``.pcd.bin`` parsing, radar state filters), ``remove_close``, ``transform`` and
``transform_matrix`` on the ego-pose and calibration records. ``tests/test_nuscenes_points.py`` checks
positions and time lags against ``from_file_multisweep`` itself."""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

#: The radar filter settings: "none" keeps every return (the metadata fields invalid_state, ambig_state and pdh0
#: travel with each point, so a model can weigh them itself); "default" applies the devkit's defaults
#: (keep invalid_state 0, dyn_prop 0-6, ambig_state 3 only).
RADAR_FILTERS: tuple[str, ...] = ("none", "default")
_VELOCITY_PAIRS = ((6, 7), (8, 9))  # (vx, vy) and (vx_comp, vy_comp) in the devkit's 18-row layout


@functools.cache
def _reader(kind: str) -> Any:
    """The devkit point-cloud class for ``kind``: subclasses pin the radar filters instead of mutating the
    devkit's class-level defaults (global state other code may change), and keep the LiDAR ring column."""
    from nuscenes.utils.data_classes import LidarPointCloud, RadarPointCloud

    if kind == "lidar":
        class LidarWithRing(LidarPointCloud):
            @staticmethod
            def nbr_dims() -> int:
                return 5

            @classmethod
            def from_file(cls, file_name: str) -> LidarWithRing:
                if not file_name.endswith(".bin"):
                    raise ValueError(f"LiDAR sweeps must be nuScenes .pcd.bin files, got {file_name}")
                return cls(np.fromfile(file_name, dtype=np.float32).reshape(-1, 5).T)

        return LidarWithRing

    class Radar(RadarPointCloud):
        pass

    if kind == "radar:none":
        Radar.invalid_states, Radar.dynprop_states, Radar.ambig_states = list(range(18)), list(range(8)), \
            list(range(5))
    else:
        Radar.invalid_states, Radar.dynprop_states, Radar.ambig_states = [0], list(range(7)), [3]
    return Radar


def sweep_records(nusc: Any, sample_data_token: str, n_sweeps: int) -> list[dict]:
    """The keyframe ``sample_data`` record and up to ``n_sweeps - 1`` earlier ones (fewer at scene start)."""
    records = [nusc.get("sample_data", sample_data_token)]
    while len(records) < n_sweeps and records[-1]["prev"]:
        records.append(nusc.get("sample_data", records[-1]["prev"]))
    return records


def require_files(nusc: Any, records: list[dict], what: str) -> None:
    """Raise ``FileNotFoundError`` naming the first missing file among ``records`` (before any is read)."""
    for rec in records:
        path = os.path.join(nusc.dataroot, rec["filename"])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"nuScenes {what}: {rec.get('channel', '?')} file {path} "
                                    f"(sample_data {rec['token']}) does not exist")


def pose_matrix(record: dict, inverse: bool = False) -> np.ndarray:
    """4x4 transform of an ``ego_pose`` or ``calibrated_sensor`` record (devkit's ``transform_matrix``)."""
    from nuscenes.utils.geometry_utils import transform_matrix
    from pyquaternion import Quaternion

    return transform_matrix(record["translation"], Quaternion(record["rotation"]), inverse=inverse)


def load_sweeps(nusc: Any, records: list[dict], kind: str, ref_ego_from_global: np.ndarray, ref_time_us: int,
                *, radar_filters: str = "none", min_distance: float = 1.0) -> np.ndarray:
    """Points of all ``records`` (one channel's sweeps) in the reference ego frame, ``(N, F)`` float32.

    Radar: the 18 devkit fields with positions and both velocity pairs in the reference ego frame, then the
    sweep's time lag ``(t_ref - t_sweep)`` in seconds (``RADAR_FIELDS``).
    LiDAR: ``(x, y, z, intensity, ring)``.
    Each sweep is ego-motion compensated through the global frame: ref_ego <- global <- ego(t) <- sensor.
    Points within ``min_distance`` of the sensor (in x and y, the devkit's ``remove_close``) are dropped.
    """
    cls = _reader("lidar" if kind == "lidar" else f"radar:{radar_filters}")
    out = []
    for rec in records:
        pc = cls.from_file(os.path.join(nusc.dataroot, rec["filename"]))
        pc.remove_close(min_distance)
        ego_from_sensor = pose_matrix(nusc.get("calibrated_sensor", rec["calibrated_sensor_token"]))
        global_from_ego = pose_matrix(nusc.get("ego_pose", rec["ego_pose_token"]))
        ref_from_sensor = ref_ego_from_global @ global_from_ego @ ego_from_sensor
        pc.transform(ref_from_sensor)
        pts = pc.points.astype(np.float64)
        if kind == "radar":
            for ix, iy in _VELOCITY_PAIRS:
                vel = np.vstack([pts[ix], pts[iy], np.zeros_like(pts[ix])])
                pts[ix], pts[iy] = (ref_from_sensor[:3, :3] @ vel)[:2]
            lag = (ref_time_us - rec["timestamp"]) * 1e-6
            pts = np.vstack([pts, np.full((1, pts.shape[1]), lag)])
        out.append(pts.T)
    width = 19 if kind == "radar" else 5
    return np.concatenate(out, axis=0).astype(np.float32) if out else np.zeros((0, width), np.float32)
