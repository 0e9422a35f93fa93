"""The sensor rig: nuScenes-like mounting positions and calibration, scaled to the configured image size.

Cameras follow nuScenes' 1600x900 calibration (focal lengths ~1260 px for the five 70-degree cameras and ~800 px
for the 110-degree rear camera, mounting points and yaws as on the Renault Zoe); the intrinsics are rescaled to
the rendered size exactly as a resized image's would be. The LiDAR is an HDL-32E on the roof (32 rings from
-30.67 to +10.67 degrees); the five radars sit on the bumpers at 0.5 m.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fusionlens.data.sample import CAMERA_NAMES, RADAR_NAMES

NUSCENES_IMAGE_SIZE: tuple[int, int] = (900, 1600)  # (H, W) of the calibration below
# name: (fx=fy at 1600x900, x, y, z of the optical centre in ego, yaw of the optical axis in degrees)
_CAMERAS: dict[str, tuple[float, float, float, float, float]] = {
    "CAM_FRONT": (1266.4, 1.70, 0.02, 1.51, 0.0),
    "CAM_FRONT_RIGHT": (1260.8, 1.55, -0.49, 1.49, -55.0),
    "CAM_BACK_RIGHT": (1259.5, 1.03, -0.48, 1.56, -110.0),
    "CAM_BACK": (809.2, 0.03, 0.00, 1.57, 180.0),
    "CAM_BACK_LEFT": (1256.7, 1.04, 0.48, 1.57, 110.0),
    "CAM_FRONT_LEFT": (1272.6, 1.52, 0.49, 1.51, 55.0),
}
# name: (x, y, z, yaw in degrees, half field of view in degrees)
_RADARS: dict[str, tuple[float, float, float, float, float]] = {
    "RADAR_FRONT": (3.41, 0.00, 0.50, 0.0, 60.0),
    "RADAR_FRONT_LEFT": (2.42, 0.80, 0.50, 90.0, 60.0),
    "RADAR_FRONT_RIGHT": (2.42, -0.80, 0.50, -90.0, 60.0),
    "RADAR_BACK_LEFT": (-0.56, 0.63, 0.50, 160.0, 60.0),
    "RADAR_BACK_RIGHT": (-0.56, -0.63, 0.50, -160.0, 60.0),
}
LIDAR_POSITION: tuple[float, float, float] = (0.94, 0.0, 1.84)
LIDAR_ELEVATION_DEG: tuple[float, float] = (-30.67, 10.67)


def camera_rotation(yaw: float) -> np.ndarray:
    """3x3 rotation from OpenCV camera axes (x right, y down, z forward) to ego axes for a level camera."""
    c, s = math.cos(yaw), math.sin(yaw)
    # columns: camera x (right), y (down), z (forward) expressed in the ego frame
    return np.array([[s, 0.0, c], [-c, 0.0, s], [0.0, -1.0, 0.0]], dtype=np.float64)


@dataclass(frozen=True)
class Rig:
    """Calibration of every sensor for one image size (arrays are float64; convert when storing)."""

    intrinsics: np.ndarray  # (6, 3, 3)
    cam_to_ego: np.ndarray  # (6, 4, 4)
    image_size: tuple[int, int]
    radar_position: np.ndarray  # (5, 3)
    radar_yaw: np.ndarray  # (5,) radians
    radar_half_fov: np.ndarray  # (5,) radians
    lidar_position: np.ndarray  # (3,)
    lidar_elevations: np.ndarray  # (beams,) radians, ring 0 lowest

    @property
    def camera_yaw(self) -> np.ndarray:
        fwd = self.cam_to_ego[:, :3, 2]
        return np.arctan2(fwd[:, 1], fwd[:, 0])

    def camera_half_fov(self) -> np.ndarray:
        """Horizontal half field of view of each camera (radians)."""
        w = self.image_size[1]
        return np.arctan2(w / 2.0, self.intrinsics[:, 0, 0])

    def camera_rays(self, cam: int) -> tuple[np.ndarray, np.ndarray]:
        """Origin ``(3,)`` and unit directions ``(H*W, 3)`` (ego frame) through every pixel centre, row-major."""
        h, w = self.image_size
        v, u = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
        pix = np.stack([u.ravel(), v.ravel(), np.ones(h * w)], axis=1)
        dirs = pix @ np.linalg.inv(self.intrinsics[cam]).T @ self.cam_to_ego[cam, :3, :3].T
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        return self.cam_to_ego[cam, :3, 3].copy(), dirs

    def project(self, cam: int, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel coordinates ``(N, 2)`` (u, v) of ego-frame ``points`` ``(N, 3)`` and their camera depth."""
        ego_to_cam = np.linalg.inv(self.cam_to_ego[cam])
        pc = points @ ego_to_cam[:3, :3].T + ego_to_cam[:3, 3]
        uvw = pc @ self.intrinsics[cam].T
        return uvw[:, :2] / uvw[:, 2:3], pc[:, 2]


def build_rig(image_size: tuple[int, int], lidar_beams: int = 32) -> Rig:
    """The nuScenes-like rig for cameras rendered at ``image_size`` = (H, W)."""
    h, w = image_size
    sx, sy = w / NUSCENES_IMAGE_SIZE[1], h / NUSCENES_IMAGE_SIZE[0]
    intr, ext = [], []
    for name in CAMERA_NAMES:
        f, x, y, z, yaw = _CAMERAS[name]
        intr.append(np.array([[f * sx, 0.0, w / 2.0], [0.0, f * sy, h / 2.0], [0.0, 0.0, 1.0]]))
        m = np.eye(4)
        m[:3, :3] = camera_rotation(math.radians(yaw))
        m[:3, 3] = (x, y, z)
        ext.append(m)
    radar = np.array([_RADARS[n] for n in RADAR_NAMES])
    lo, hi = LIDAR_ELEVATION_DEG
    return Rig(
        intrinsics=np.stack(intr), cam_to_ego=np.stack(ext), image_size=(int(h), int(w)),
        radar_position=radar[:, :3].copy(), radar_yaw=np.radians(radar[:, 3]),
        radar_half_fov=np.radians(radar[:, 4]), lidar_position=np.array(LIDAR_POSITION),
        lidar_elevations=np.radians(np.linspace(lo, hi, lidar_beams)),
    )
